"""The index's write path, function by function, without a network: atomic files, the scan and plan
that decide what to embed, the bookkeeping of one embedded chunk, orphan sweeping, the HNSW graph.
Fast, so that mutation testing can run them against every mutant (BENCHMARKS.md). The manifest and the
stages that commit to it: tests/test_index_stages.py."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest

import cbir.index as ix
import cbir.indexing as ing
from cbir.manifest import MANIFEST, ShardInfo, create_manifest, is_index
from cbir.manifest import tmp_path as tmp_path_of
from cbir.models.base import ImageEmbedding


def sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def test_tmp_path_is_a_hidden_unique_sibling(tmp_path):
    target = tmp_path / MANIFEST
    a, b = tmp_path_of(target), tmp_path_of(target)
    assert a != b and a.parent == b.parent == tmp_path
    assert a.name.startswith(".index.sqlite.") and a.name.endswith(ing.TMP_SUFFIX)
    assert ing._is_ours(a.name) and ing._is_ours(ix.LOCK_FILE) and not ing._is_ours(MANIFEST)
    assert ing._is_ours(f"{a.name}-journal") and not ing._is_ours(f"{MANIFEST}-wal")


def test_a_new_manifest_is_published_by_rename_only(tmp_path, monkeypatch):
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: None)  # a crash before the rename
    create_manifest(tmp_path, tmp_path / "photos")
    assert not is_index(tmp_path) and all(ing._is_ours(name) for name in os.listdir(tmp_path))
    monkeypatch.setattr(os, "replace", real_replace)
    create_manifest(tmp_path, tmp_path / "photos")
    assert ix.read_manifest(tmp_path)["entries"] == [] and (tmp_path / MANIFEST).is_file()


def test_npy_shard_is_float32_renamed_into_place_and_its_checksum_returned(tmp_path, monkeypatch):
    target = tmp_path / "s.npy"
    digest = ing._write_npy_atomic(target, np.arange(6, dtype=np.float64).reshape(3, 2)[:, ::-1])
    loaded = np.load(target)
    assert loaded.dtype == np.float32 and loaded.tolist() == [[1, 0], [3, 2], [5, 4]]
    assert digest == sha1(target) == ix.file_hash(target) and os.listdir(tmp_path) == ["s.npy"]
    monkeypatch.setattr(ing.os, "replace", lambda src, dst: None)
    ing._write_npy_atomic(target, np.zeros((1, 2)))
    assert np.load(target).shape == (3, 2)


def test_file_hash_reads_large_files_whole(tmp_path):
    big = tmp_path / "big"
    big.write_bytes(os.urandom((1 << 20) + 17))
    assert ix.file_hash(big) == sha1(big)


def test_out_folder_check(tmp_path):
    ing._check_out_folder(tmp_path / "new")  # not there yet: fine
    ing._check_out_folder(tmp_path)  # empty
    (tmp_path / ix.LOCK_FILE).touch()
    (tmp_path / f".x{ing.TMP_SUFFIX}").touch()
    ing._check_out_folder(tmp_path)  # only what the indexer leaves
    (tmp_path / ix.SHARDS).mkdir()
    with pytest.raises(ix.IndexFormatError, match=r"exists and is not an index \(it holds shards\)"):
        ing._check_out_folder(tmp_path)
    ing._check_out_folder(tmp_path, another_writer_may_be_starting=True)
    for name in ("b", "c"):
        (tmp_path / name).touch()
    with pytest.raises(ix.IndexFormatError, match=r"\(it holds b, c, shards\); choose"):
        ing._check_out_folder(tmp_path)
    (tmp_path / "d").touch()
    with pytest.raises(ix.IndexFormatError, match=r"\(it holds b, c, d, …\); choose an empty or new"):
        ing._check_out_folder(tmp_path)
    (tmp_path / MANIFEST).touch()
    ing._check_out_folder(tmp_path)  # an index: fine
    with pytest.raises(ix.IndexFormatError, match="exists and is not a folder"):
        ing._check_out_folder(tmp_path / "b")


def test_orphans_and_temporaries_are_swept_and_nothing_else(tmp_path):
    shards = tmp_path / ix.SHARDS
    shards.mkdir()
    names = (
        "live.npy",
        "live.hnsw",
        "dead.npy",
        "dead.hnsw",
        "dead.ivfpq",
        f".t{ing.TMP_SUFFIX}",
        "notes.txt",
    )
    for name in names:
        (shards / name).touch()
    for model in ("model-live", "model-old", ix.MODEL_DIR):  # the live, a replaced and a legacy model folder
        (tmp_path / model).mkdir()
        (tmp_path / model / "weights").touch()
    (tmp_path / f".m{ing.TMP_SUFFIX}").mkdir()
    (tmp_path / f".m{ing.TMP_SUFFIX}" / "f").touch()
    (tmp_path / f".j{ing.TMP_SUFFIX}").touch()
    (tmp_path / "ann.faiss").touch()  # an older layout's single graph
    (tmp_path / "keep.json").touch()
    (tmp_path / f".{MANIFEST}.1{ing.TMP_SUFFIX}-journal").touch()  # SQLite's, beside a killed run's
    ing._remove_orphans(tmp_path, {"live.npy", "live.hnsw"}, "model-live")
    assert sorted(os.listdir(shards)) == ["live.hnsw", "live.npy", "notes.txt"]
    assert sorted(os.listdir(tmp_path)) == ["keep.json", "model-live", ix.SHARDS]
    assert os.listdir(tmp_path / "model-live") == ["weights"]


def write_shard(index_dir: Path, name: str, rows: int) -> str:
    (index_dir / ix.SHARDS).mkdir(exist_ok=True)
    return ing._write_npy_atomic(index_dir / ix.SHARDS / name, np.eye(rows, 4, dtype=np.float32))


def test_damaged_shards_are_named(tmp_path):
    good = write_shard(tmp_path, "good.npy", 2)
    write_shard(tmp_path, "bad.npy", 2)
    shards = [ShardInfo("good.npy", 2, 2, 0, good), ShardInfo("bad.npy", 2, 2, 1, "0")]
    damaged, sound = ing._damaged_shards(tmp_path, [*shards, ShardInfo("gone.npy", 2, 2, 2)])
    assert sorted(damaged) == ["bad.npy", "gone.npy"] and list(sound) == ["good.npy"]
    assert "checksum mismatch" in damaged["bad.npy"] and "shard missing" in damaged["gone.npy"]
    assert str(tmp_path / ix.SHARDS / "bad.npy") in damaged["bad.npy"]


def test_only_shards_whose_file_changed_since_their_last_check_are_hashed_again(tmp_path):
    good = write_shard(tmp_path, "good.npy", 2)
    _, sound = ing._damaged_shards(tmp_path, [ShardInfo("good.npy", 2, 2, 0, good)])
    # a wrong checksum shows whether the bytes were hashed: not while the file is as it was when checked
    recorded = ShardInfo("good.npy", 2, 2, 0, "0", sound["good.npy"])
    assert ing._damaged_shards(tmp_path, [recorded], every=False) == ({}, {})
    assert "good.npy" in ing._damaged_shards(tmp_path, [recorded], every=True)[0]
    write_shard(tmp_path, "good.npy", 2)  # the same bytes, a new file: checked again
    assert "good.npy" in ing._damaged_shards(tmp_path, [recorded], every=False)[0]


def photo_folder(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    for name in ("a.jpg", "b.jpg", "c.jpg", "sub/d.jpg", "e.jpg", "sub/f.jpg"):
        (root / name).write_bytes(name.encode())
    return root


def entry_of(root: Path, image_id: str, **extra) -> dict:
    st = (root / image_id).stat()
    return {"id": image_id, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha1": "old", **extra}


NO_META = {"taken": None, "camera": None}  # what `photo_metadata` finds in a file without EXIF
CAMERA_META = {"taken": "2020-05-01T10:00:00", "camera": "Canon EOS"}


def test_scan_and_plan_sort_files_into_kept_failed_and_to_embed(tmp_path):
    root = photo_folder(tmp_path)
    old_entries = {
        "a.jpg": entry_of(root, "a.jpg", shard="s", row=0),  # unchanged
        "sub/f.jpg": entry_of(root, "sub/f.jpg", shard="s", row=4, meta=CAMERA_META),  # unchanged
        "b.jpg": {**entry_of(root, "b.jpg", shard="s", row=1), "mtime_ns": 1},  # touched
        "sub/d.jpg": entry_of(root, "sub/d.jpg", shard="s", row=2),  # in a damaged shard
        "gone.jpg": {"id": "gone.jpg", "size": 1, "mtime_ns": 1, "sha1": "x", "shard": "s", "row": 3},
    }
    old_failed = {
        "c.jpg": {**entry_of(root, "c.jpg"), "reason": "not a readable image"},
        "e.jpg": {**entry_of(root, "e.jpg"), "size": 0, "reason": "cannot read"},  # changed since
    }
    (root / "new.jpg").write_bytes(b"new")
    (root / "dangling.jpg").symlink_to(root / "nowhere.jpg")
    report = ing.IndexReport()
    found = ing.scan_folder(root, report)
    assert [i for i, _, _ in found] == [
        "a.jpg",
        "b.jpg",
        "c.jpg",
        "e.jpg",
        "new.jpg",
        "sub/d.jpg",
        "sub/f.jpg",
    ]
    assert all(path == root / i and st.st_size == path.stat().st_size for i, path, st in found)
    plan = ing.plan_update(found, old_entries, old_failed, {"sub/d.jpg"}, report)
    # b.jpg keeps its entry, still served as it was until its new content is embedded; sub/d.jpg's
    # shard is damaged: dropped now, embedded again
    assert plan.drop_entries == {"gone.jpg", "sub/d.jpg"}
    assert plan.missing_meta == {"a.jpg": root / "a.jpg"}  # recorded now, for filters; f.jpg has it
    assert plan.drop_failed == {"e.jpg"} and report.unchanged == 2  # c.jpg's failure stands
    assert report.failed["c.jpg"] == "not a readable image"
    assert report.failed["dangling.jpg"].startswith("broken symbolic link: ")
    todo = plan.todo
    assert [(t.image_id, t.old is not None, t.repair) for t in todo] == [
        ("b.jpg", True, False),
        ("e.jpg", True, False),
        ("new.jpg", False, False),
        ("sub/d.jpg", False, True),
    ]
    assert todo[0].stat.st_size == 5 and todo[0].path == root / "b.jpg"
    assert report.removed == ["gone.jpg"] and report.added == report.changed == []
    assert todo[2].entry("k") == {
        "id": "new.jpg",
        "size": 3,
        "mtime_ns": (root / "new.jpg").stat().st_mtime_ns,
        "sha1": "k",
    }


class StubModel:
    """Embeds by file content: a row of the file's first bytes; files starting with 'x' fail."""

    def __init__(self):
        self.calls = 0

    def embed(self, images):
        self.calls += 1
        contents = [p.read_bytes() for p in images.images]
        vectors = np.array([[len(c), c[0], 1.0] for c in contents], dtype=np.float32)
        ids = images.image_ids
        failed = {ids[i]: "not a readable image" for i, c in enumerate(contents) if c.startswith(b"x")}
        vectors[[i for i, image_id in enumerate(ids) if image_id in failed]] = 0
        keys = [hashlib.sha1(c).hexdigest() for c in contents]
        return ImageEmbedding(vectors, keys, failed)


def record(root: Path, chunk: list, report: ing.IndexReport) -> ing.ChunkResult:
    """What the encode stage hands `record_chunk`: the chunk's embedding and its ids."""
    from cbir.datasets import Dataset

    data = Dataset.from_paths([t.path for t in chunk], root)
    return ing.record_chunk(chunk, data.image_ids, StubModel().embed(data), report)


def test_one_embedded_chunk_is_recorded(tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    files = (
        ("add.jpg", b"add"),
        ("same.jpg", b"same"),
        ("chg.jpg", b"new"),
        ("bad.jpg", b"xx"),
        ("xnew.jpg", b"x"),
    )
    for name, data in files:
        (root / name).write_bytes(data)
    (root / "fix.jpg").write_bytes(b"fix")

    def todo(name, old=None, repair=False):
        return ing.Todo(name, root / name, (root / name).stat(), old, repair)

    same_old = {
        "id": "same.jpg",
        "size": 4,
        "mtime_ns": 1,
        "sha1": hashlib.sha1(b"same").hexdigest(),
        "shard": "s",
        "row": 0,
    }
    chg_old = {"id": "chg.jpg", "size": 3, "mtime_ns": 1, "sha1": "other", "shard": "s", "row": 1}
    bad_old = {"id": "bad.jpg", "size": 2, "mtime_ns": 1, "sha1": "b", "shard": "s", "row": 2}
    report = ing.IndexReport()
    chunk = [
        todo("add.jpg"),
        todo("same.jpg", same_old),
        todo("chg.jpg", chg_old),
        todo("bad.jpg", bad_old),
        todo("fix.jpg", repair=True),
        todo("xnew.jpg"),  # new and unreadable: it was in no entry
    ]
    result = record(root, chunk, report)
    assert [(t.image_id, key) for t, key in result.ok] == [
        ("add.jpg", hashlib.sha1(b"add").hexdigest()),
        ("chg.jpg", hashlib.sha1(b"new").hexdigest()),
        ("fix.jpg", hashlib.sha1(b"fix").hexdigest()),
    ]
    assert result.vectors.tolist() == [[3, ord("a"), 1], [3, ord("n"), 1], [3, ord("f"), 1]]
    assert report.added == ["add.jpg"] and report.changed == ["chg.jpg"] and report.repaired == ["fix.jpg"]
    assert report.unchanged == 1
    assert report.failed == {"bad.jpg": "not a readable image", "xnew.jpg": "not a readable image"}
    st = (root / "same.jpg").stat()
    # touched, not changed: keeps its vector, with the new size and time (and meta, read once)
    assert result.touched == [{**same_old, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "meta": NO_META}]
    bad = (root / "bad.jpg").stat()
    assert [f["id"] for f in result.failed] == ["bad.jpg", "xnew.jpg"]
    assert result.failed[0] == {
        "id": "bad.jpg",
        "size": 2,
        "mtime_ns": bad.st_mtime_ns,
        "sha1": hashlib.sha1(b"xx").hexdigest(),
        "reason": "not a readable image",
    }


def test_every_touched_but_unchanged_file_is_counted(tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    chunk = []
    for name in ("a.jpg", "b.jpg"):
        (root / name).write_bytes(name.encode())
        digest = hashlib.sha1(name.encode()).hexdigest()
        old = {"id": name, "size": 5, "mtime_ns": 1, "sha1": digest, "shard": "s", "row": 0}
        chunk.append(ing.Todo(name, root / name, (root / name).stat(), old, False))
    report = ing.IndexReport()
    result = record(root, chunk, report)
    assert result.ok == [] and len(result.vectors) == 0 and report.unchanged == 2


def test_a_failed_file_that_was_failed_before_counts_as_changed_when_it_now_reads(tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    (root / "c.jpg").write_bytes(b"content")
    old = {
        "id": "c.jpg",
        "size": 1,
        "mtime_ns": 1,
        "sha1": hashlib.sha1(b"content").hexdigest(),
        "reason": "r",
    }
    report = ing.IndexReport()
    t = ing.Todo("c.jpg", root / "c.jpg", (root / "c.jpg").stat(), old, False)
    result = record(root, [t], report)
    assert [k[0].image_id for k in result.ok] == ["c.jpg"]
    assert report.changed == ["c.jpg"] and report.unchanged == 0


def test_hnsw_graph_is_written_per_set_of_shards(tmp_path):
    import faiss

    from cbir import ann
    from cbir.manifest import ShardInfo

    shards = tmp_path / ix.SHARDS
    shards.mkdir()
    vectors = np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32)
    sums = {"a.npy": ing._write_npy_atomic(shards / "a.npy", vectors)}
    a = ShardInfo("a.npy", rows=4, live=3, seq=0)  # a row no entry uses: still in the graph
    written = ing.write_ann(tmp_path, [a], "hnsw", sums)
    assert written["shards"] == [["a.npy", 4, 3]]
    graph_file = shards / written["name"]
    graph = faiss.read_index(str(graph_file))
    assert graph.ntotal == 4 and isinstance(graph, faiss.IndexHNSWFlat)
    assert graph.metric_type == faiss.METRIC_INNER_PRODUCT
    before = graph_file.stat().st_mtime_ns
    assert ing.write_ann(tmp_path, [a], "hnsw", sums)["name"] == graph_file.name  # same shards: not rebuilt
    assert graph_file.stat().st_mtime_ns == before
    assert not [p for p in [*tmp_path.iterdir(), *shards.iterdir()] if p.name.endswith(ing.TMP_SUFFIX)]
    # other shards get their own graph, over all their rows
    sums["b.npy"] = ing._write_npy_atomic(shards / "b.npy", vectors[:1])
    other = ing.write_ann(tmp_path, [a, ShardInfo("b.npy", 1, 1, 1)], "hnsw", sums)
    assert other["name"] != graph_file.name and faiss.read_index(str(shards / other["name"])).ntotal == 5
    assert ann.SUFFIXES["hnsw"] == ".hnsw" and other["name"].endswith(".hnsw")
    (shards / "old.ivfpq").write_bytes(b"an IVF-PQ index of shards since replaced")
    ing._remove_orphans(tmp_path, {"a.npy", graph_file.name}, "model-x")  # what the manifest names stays
    assert sorted(os.listdir(shards)) == sorted(["a.npy", graph_file.name])


def test_scan_reports_a_file_that_vanished_after_listing(tmp_path, monkeypatch):
    import cbir.datasets

    root = photo_folder(tmp_path)
    monkeypatch.setattr(cbir.datasets, "list_images", lambda folder: [folder / "a.jpg", folder / "gone.jpg"])
    report = ing.IndexReport()
    found = ing.scan_folder(root, report)
    assert [image_id for image_id, _, _ in found] == ["a.jpg"]
    assert (
        report.failed["gone.jpg"].startswith("cannot read: ") and "No such file" in report.failed["gone.jpg"]
    )
