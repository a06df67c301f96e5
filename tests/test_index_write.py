"""The index's write path, function by function, without a network: atomic files, the scan that
decides what to embed, the bookkeeping of one embedded chunk, orphan sweeping, the HNSW graph.
Fast, so that mutation testing can run them against every mutant (BENCHMARKS.md)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

import cbir.index as ix
from cbir.models.base import ImageEmbedding


def sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def test_tmp_path_is_a_hidden_unique_sibling(tmp_path):
    target = tmp_path / "index.json"
    a, b = ix._tmp_path(target), ix._tmp_path(target)
    assert a != b and a.parent == b.parent == tmp_path
    assert a.name.startswith(".index.json.") and a.name.endswith(ix.TMP_SUFFIX)
    assert ix._is_ours(a.name) and ix._is_ours(ix.LOCK_FILE) and not ix._is_ours("index.json")


def test_json_is_published_by_rename_only(tmp_path, monkeypatch):
    target = tmp_path / "index.json"
    ix._write_json_atomic(target, {"a": [1, 2]})
    assert json.loads(target.read_text()) == {"a": [1, 2]} and os.listdir(tmp_path) == ["index.json"]
    monkeypatch.setattr(ix.os, "replace", lambda src, dst: None)  # a crash before the rename
    ix._write_json_atomic(target, {"a": "new"})
    assert json.loads(target.read_text()) == {"a": [1, 2]}


def test_npy_shard_is_float32_renamed_into_place_and_its_checksum_returned(tmp_path, monkeypatch):
    target = tmp_path / "s.npy"
    digest = ix._write_npy_atomic(target, np.arange(6, dtype=np.float64).reshape(3, 2)[:, ::-1])
    loaded = np.load(target)
    assert loaded.dtype == np.float32 and loaded.tolist() == [[1, 0], [3, 2], [5, 4]]
    assert digest == sha1(target) == ix.file_hash(target) and os.listdir(tmp_path) == ["s.npy"]
    monkeypatch.setattr(ix.os, "replace", lambda src, dst: None)
    ix._write_npy_atomic(target, np.zeros((1, 2)))
    assert np.load(target).shape == (3, 2)


def test_file_hash_reads_large_files_whole(tmp_path):
    big = tmp_path / "big"
    big.write_bytes(os.urandom((1 << 20) + 17))
    assert ix.file_hash(big) == sha1(big)


def test_out_folder_check(tmp_path):
    ix._check_out_folder(tmp_path / "new")  # not there yet: fine
    ix._check_out_folder(tmp_path)  # empty
    (tmp_path / ix.LOCK_FILE).touch()
    (tmp_path / f".x{ix.TMP_SUFFIX}").touch()
    ix._check_out_folder(tmp_path)  # only what the indexer leaves
    (tmp_path / ix.SHARDS).mkdir()
    with pytest.raises(ix.IndexFormatError, match=r"exists and is not an index \(it holds shards\)"):
        ix._check_out_folder(tmp_path)
    ix._check_out_folder(tmp_path, another_writer_may_be_starting=True)
    for name in ("b", "c"):
        (tmp_path / name).touch()
    with pytest.raises(ix.IndexFormatError, match=r"\(it holds b, c, shards\); choose"):
        ix._check_out_folder(tmp_path)
    (tmp_path / "d").touch()
    with pytest.raises(ix.IndexFormatError, match=r"\(it holds b, c, d, …\); choose an empty or new"):
        ix._check_out_folder(tmp_path)
    (tmp_path / ix.MANIFEST).touch()
    ix._check_out_folder(tmp_path)  # an index: fine
    with pytest.raises(ix.IndexFormatError, match="exists and is not a folder"):
        ix._check_out_folder(tmp_path / "b")


def test_orphans_and_temporaries_are_swept_and_nothing_else(tmp_path):
    shards = tmp_path / ix.SHARDS
    shards.mkdir()
    names = ("live.npy", "live.hnsw", "dead.npy", "dead.hnsw", f".t{ix.TMP_SUFFIX}", "notes.txt")
    for name in names:
        (shards / name).touch()
    for model in ("model-live", "model-old", ix.MODEL_DIR):  # the live, a replaced and a legacy model folder
        (tmp_path / model).mkdir()
        (tmp_path / model / "weights").touch()
    (tmp_path / f".m{ix.TMP_SUFFIX}").mkdir()
    (tmp_path / f".m{ix.TMP_SUFFIX}" / "f").touch()
    (tmp_path / f".j{ix.TMP_SUFFIX}").touch()
    (tmp_path / "ann.faiss").touch()  # an older layout's single graph
    (tmp_path / "keep.json").touch()
    manifest = {"entries": [{"shard": "live.npy", "row": 0}], "model_dir": "model-live"}
    ix._remove_orphans(tmp_path, manifest)
    assert sorted(os.listdir(shards)) == ["live.hnsw", "live.npy", "notes.txt"]
    assert sorted(os.listdir(tmp_path)) == ["keep.json", "model-live", ix.SHARDS]
    assert os.listdir(tmp_path / "model-live") == ["weights"]


def write_shard(index_dir: Path, name: str, rows: int) -> str:
    (index_dir / ix.SHARDS).mkdir(exist_ok=True)
    return ix._write_npy_atomic(index_dir / ix.SHARDS / name, np.eye(rows, 4, dtype=np.float32))


def test_compact_means_one_shard_holding_exactly_the_entries_in_order(tmp_path):
    write_shard(tmp_path, "a.npy", 3)
    write_shard(tmp_path, "b.npy", 1)
    entries = [{"shard": "a.npy", "row": i} for i in range(3)]
    assert ix._is_compact(tmp_path, entries)
    write_shard(tmp_path, "one.npy", 1)
    assert ix._is_compact(tmp_path, [{"shard": "one.npy", "row": 0}])
    assert not ix._is_compact(tmp_path, entries[:2])  # the shard holds more
    assert not ix._is_compact(tmp_path, [entries[1], entries[0], entries[2]])
    assert not ix._is_compact(tmp_path, [*entries[:2], {"shard": "b.npy", "row": 2}])


def test_damaged_shards_are_named(tmp_path):
    good = write_shard(tmp_path, "good.npy", 2)
    write_shard(tmp_path, "bad.npy", 2)
    damaged = ix._damaged_shards(
        tmp_path, {"good.npy", "bad.npy", "gone.npy"}, {"good.npy": good, "bad.npy": "0"}
    )
    assert sorted(damaged) == ["bad.npy", "gone.npy"]
    assert "checksum mismatch" in damaged["bad.npy"] and "shard missing" in damaged["gone.npy"]
    assert str(tmp_path / ix.SHARDS / "bad.npy") in damaged["bad.npy"]


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


def test_scan_sorts_files_into_kept_failed_and_to_embed(tmp_path):
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
    report = ix.IndexReport()
    entries, failed, todo = ix._scan(root, old_entries, old_failed, {"sub/d.jpg"}, report)
    assert entries == {
        "a.jpg": {**old_entries["a.jpg"], "meta": NO_META},  # recorded now, for filters
        "b.jpg": old_entries["b.jpg"],  # still served as it was until its new content is embedded
        "sub/f.jpg": old_entries["sub/f.jpg"],  # metadata already recorded: not read again
    }
    assert failed == {"c.jpg": old_failed["c.jpg"]} and report.unchanged == 2
    assert report.failed["c.jpg"] == "not a readable image"
    assert report.failed["dangling.jpg"].startswith("broken symbolic link: ")
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


def record_chunk(model, root, chunk, entries, failed, report):
    """One chunk through the encode stage (`model.embed`) and then recorded, as `update_index` does."""
    from cbir.datasets import Dataset

    embedding = model.embed(Dataset.from_paths([t.path for t in chunk], root))
    return ix._record_chunk(embedding, root, chunk, entries, failed, report)


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
        return ix.Todo(name, root / name, (root / name).stat(), old, repair)

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
    entries = {"same.jpg": same_old, "chg.jpg": chg_old, "bad.jpg": bad_old}
    failed: dict = {}
    report = ix.IndexReport()
    chunk = [
        todo("add.jpg"),
        todo("same.jpg", same_old),
        todo("chg.jpg", chg_old),
        todo("bad.jpg", bad_old),
        todo("fix.jpg", repair=True),
        todo("xnew.jpg"),  # new and unreadable: it was in no entry
    ]
    keep, vectors = record_chunk(StubModel(), root, chunk, entries, failed, report)
    assert [(t.image_id, key) for t, key in keep] == [
        ("add.jpg", hashlib.sha1(b"add").hexdigest()),
        ("chg.jpg", hashlib.sha1(b"new").hexdigest()),
        ("fix.jpg", hashlib.sha1(b"fix").hexdigest()),
    ]
    assert vectors.tolist() == [[3, ord("a"), 1], [3, ord("n"), 1], [3, ord("f"), 1]]
    assert report.added == ["add.jpg"] and report.changed == ["chg.jpg"] and report.repaired == ["fix.jpg"]
    assert report.unchanged == 1
    assert report.failed == {"bad.jpg": "not a readable image", "xnew.jpg": "not a readable image"}
    st = (root / "same.jpg").stat()
    assert entries == {
        "same.jpg": {**same_old, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "meta": NO_META},
        "chg.jpg": chg_old,  # replaced by the caller once its new vector is written
    }
    bad = (root / "bad.jpg").stat()
    assert sorted(failed) == ["bad.jpg", "xnew.jpg"]
    assert failed["bad.jpg"] == {
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
        chunk.append(ix.Todo(name, root / name, (root / name).stat(), old, False))
    report = ix.IndexReport()
    keep, vectors = record_chunk(StubModel(), root, chunk, {}, {}, report)
    assert keep == [] and len(vectors) == 0 and report.unchanged == 2


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
    report = ix.IndexReport()
    t = ix.Todo("c.jpg", root / "c.jpg", (root / "c.jpg").stat(), old, False)
    keep, _ = record_chunk(StubModel(), root, [t], {}, {}, report)
    assert (
        [k[0].image_id for k in keep] == ["c.jpg"] and report.changed == ["c.jpg"] and report.unchanged == 0
    )


def test_hnsw_graph_is_written_per_compacted_shard_above_the_threshold(tmp_path, monkeypatch):
    import faiss

    monkeypatch.setattr(ix, "ANN_THRESHOLD", 4)
    shards = tmp_path / ix.SHARDS
    shards.mkdir()
    vectors = np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32)
    checksum = ix._write_npy_atomic(shards / "a.npy", vectors)
    manifest = {"entries": [{"shard": "a.npy", "row": i} for i in range(4)], "shards": {"a.npy": checksum}}
    ix._write_ann(tmp_path, manifest)
    assert ix._ann_path(tmp_path, "a.npy") == shards / f"a{ix.ANN_SUFFIX}"
    graph = faiss.read_index(str(shards / f"a{ix.ANN_SUFFIX}"))
    assert graph.ntotal == 4 and isinstance(graph, faiss.IndexHNSWFlat)
    assert graph.metric_type == faiss.METRIC_INNER_PRODUCT
    before = (shards / f"a{ix.ANN_SUFFIX}").stat().st_mtime_ns
    ix._write_ann(tmp_path, manifest)  # same shard: not rebuilt
    assert (shards / f"a{ix.ANN_SUFFIX}").stat().st_mtime_ns == before
    assert not [p for p in [*tmp_path.iterdir(), *shards.iterdir()] if p.name.endswith(ix.TMP_SUFFIX)]
    # a new compacted shard (another index content) gets its own graph; the old one is an orphan
    checksum = ix._write_npy_atomic(shards / "b.npy", np.vstack([vectors, vectors[:1]]))
    bigger = {"entries": [{"shard": "b.npy", "row": i} for i in range(5)], "shards": {"b.npy": checksum}}
    ix._write_ann(tmp_path, bigger)
    assert faiss.read_index(str(shards / f"b{ix.ANN_SUFFIX}")).ntotal == 5
    # below the threshold: no graph
    checksum = ix._write_npy_atomic(shards / "c.npy", vectors[:3])
    smaller = {"entries": [{"shard": "c.npy", "row": i} for i in range(3)], "shards": {"c.npy": checksum}}
    ix._write_ann(tmp_path, smaller)
    assert not (shards / f"c{ix.ANN_SUFFIX}").exists()
    ix._remove_orphans(tmp_path, {**smaller, "model_dir": "model-x"})  # the graphs go with their shards
    assert sorted(os.listdir(shards)) == ["c.npy"]


def test_scan_reports_a_file_that_vanished_after_listing(tmp_path, monkeypatch):
    import cbir.datasets

    root = photo_folder(tmp_path)
    monkeypatch.setattr(cbir.datasets, "list_images", lambda folder: [folder / "a.jpg", folder / "gone.jpg"])
    report = ix.IndexReport()
    _, _, todo = ix._scan(root, {}, {}, set(), report)
    assert [t.image_id for t in todo] == ["a.jpg"]
    assert (
        report.failed["gone.jpg"].startswith("cannot read: ") and "No such file" in report.failed["gone.jpg"]
    )
