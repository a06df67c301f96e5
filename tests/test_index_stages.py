"""The stages of `update_index` that talk to the manifest: a pluggable encode stage (chunks may come
back in any order), per-chunk SQLite commits whose cost does not grow with the collection, shard
compaction, and indexes whose manifest is the JSON file of earlier versions (opened, then upgraded)."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import numpy as np
import pytest

import cbir.indexing as ing
from cbir.index import SHARDS, SearchIndex, read_manifest, update_index
from cbir.manifest import LEGACY_MANIFEST, MANIFEST, NEXT, ManifestWriter, ShardInfo, upgrade_legacy
from cbir.models.base import ImageEmbedding
from tests.conftest import write_legacy_manifest

DIM = 8


def vector_of(data: bytes) -> np.ndarray:
    """A unit vector that depends on the file's bytes only: what a model would give, without one."""
    seed = int.from_bytes(hashlib.sha1(data).digest()[:8], "little")
    v = np.random.default_rng(seed).normal(size=DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def backwards_encode(model_dir: Path, root: Path, chunks):
    """An `EncodeStage` without a network that hands chunks back last first (as a cluster may);
    files whose bytes start with 'x' fail."""
    assert (model_dir / "config.json").is_file()  # the index's own copy of its model
    for number in reversed(range(len(chunks))):
        contents = [Path(p).read_bytes() for p in chunks[number]]
        vectors = np.stack([vector_of(c) for c in contents])
        ids = [Path(p).relative_to(root).as_posix() for p in chunks[number]]
        failed = {i: "not a readable image" for i, c in zip(ids, contents, strict=True) if c.startswith(b"x")}
        yield number, ImageEmbedding(vectors, [hashlib.sha1(c).hexdigest() for c in contents], failed)


def make_folder(tmp_path: Path, n: int, start: int = 0) -> Path:
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True, exist_ok=True)
    for i in range(start, start + n):
        (root / ("sub" if i % 3 == 0 else "") / f"p{i:03d}.jpg").write_bytes(f"photo {i}".encode())
    return root


def expected_vectors(ix: SearchIndex) -> np.ndarray:
    return np.stack([vector_of((ix.root / i).read_bytes()) for i in ix.ids])


def test_encode_stage_is_pluggable_and_its_chunks_may_come_in_any_order(tmp_path):
    root = make_folder(tmp_path, 7)
    (root / "bad.jpg").write_bytes(b"x broken")
    progress = []
    ix, report = update_index(
        root,
        tmp_path / "ix",
        "default",
        progress=False,
        chunk_size=3,
        encode=backwards_encode,
        on_chunk=lambda done, total: progress.append((done, total)),
    )
    assert sorted(report.added) == sorted(ix.ids) and len(ix) == 7 and list(report.failed) == ["bad.jpg"]
    assert progress == [(2, 8), (5, 8), (8, 8)]  # the last chunk (2 files) came first
    assert ix.ids == sorted(ix.ids)  # compacted into one shard, in id order
    np.testing.assert_array_equal(ix.vectors, expected_vectors(ix))
    assert isinstance(ix.vectors, np.memmap)  # one shard holding exactly the entries: mapped, not read
    assert read_manifest(ix.path)["dim"] == DIM and ix.failed == {"bad.jpg": "not a readable image"}


def test_an_encode_stage_that_loses_a_chunk_is_an_error_and_the_rest_is_kept(tmp_path):
    root = make_folder(tmp_path, 6)

    def loses_the_first(model_dir, root, chunks):
        yield from ((n, e) for n, e in backwards_encode(model_dir, root, chunks) if n != 0)

    with pytest.raises(RuntimeError, match="ended without 1 of 3 chunks"):
        update_index(root, tmp_path / "ix", "default", progress=False, chunk_size=2, encode=loses_the_first)
    assert len(read_manifest(tmp_path / "ix")["entries"]) == 4  # the chunks that came are committed
    ix, report = update_index(root, tmp_path / "ix", "default", progress=False, encode=backwards_encode)
    assert len(report.added) == 2 and report.unchanged == 4 and len(ix) == 6


def test_local_encode_chunks_is_the_models_embedding_of_each_chunk():
    from cbir.datasets import Dataset
    from cbir.models import load_model, model_dir

    root = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cs5785-mini" / "images_train"
    if not root.is_dir():
        pytest.skip(f"{root} not here")
    chunks = [[root / "1.jpg", root / "2.jpg"], [root / "3.jpg"]]
    model = model_dir("default")
    got = dict(ing.local_encode_chunks(model, root, chunks))
    assert sorted(got) == [0, 1]
    for number, chunk in enumerate(chunks):
        want = load_model(model).embed(Dataset.from_paths(chunk, root))
        np.testing.assert_allclose(got[number].vectors, want.vectors, atol=1e-6)
        assert got[number].keys == want.keys and got[number].failed == want.failed == {}


def count_changes(monkeypatch) -> list[int]:
    """The rows each run's manifest writer changed (inserted, updated, deleted), by SQLite's count."""
    changes: list[int] = []
    real_close = ManifestWriter.close

    def close(self):
        changes.append(self.conn.total_changes)
        real_close(self)

    monkeypatch.setattr(ManifestWriter, "close", close)
    return changes


def test_adding_photos_writes_only_their_rows_and_leaves_big_shards_alone(tmp_path, monkeypatch):
    monkeypatch.setattr(ing, "COMPACT_ALL_ROWS", 8)  # a "large" index at 40 photos
    changes = count_changes(monkeypatch)
    root = make_folder(tmp_path, 40)
    index_dir = tmp_path / "ix"
    update_index(root, index_dir, "default", progress=False, chunk_size=16, encode=backwards_encode)
    (big,) = read_manifest(index_dir)["shards"]  # the run's 3 chunks (16+16+8) merged into one
    big_file = index_dir / SHARDS / big
    written = big_file.stat().st_mtime_ns
    make_folder(tmp_path, 2, start=40)
    ix, report = update_index(root, index_dir, "default", progress=False, encode=backwards_encode)
    assert sorted(report.added) == ["p040.jpg", "p041.jpg"] and report.unchanged == 40
    assert big_file.stat().st_mtime_ns == written and big in read_manifest(index_dir)["shards"]
    assert changes[1] <= 12  # 2 entries, 1 shard, the header: not the 40 photos already there
    assert len(ix) == 42 and not isinstance(ix.vectors, np.memmap)  # two shards, gathered
    np.testing.assert_array_equal(ix.vectors, expected_vectors(ix))
    assert [r.id for r in ix.search_vector(ix.vector("p041.jpg"), k=1)] == ["p041.jpg"]


def test_removed_and_changed_photos_leave_the_manifest(tmp_path):
    root = make_folder(tmp_path, 6)
    index_dir = tmp_path / "ix"
    update_index(root, index_dir, "default", progress=False, encode=backwards_encode)
    (root / "p001.jpg").unlink()
    (root / "p002.jpg").write_bytes(b"new content, longer")
    (root / "p004.jpg").write_bytes(b"x now broken")
    ix, report = update_index(root, index_dir, "default", progress=False, encode=backwards_encode)
    assert report.removed == ["p001.jpg"] and report.changed == ["p002.jpg"] and report.unchanged == 3
    assert ix.ids == ["p002.jpg", "p005.jpg", "sub/p000.jpg", "sub/p003.jpg"]
    assert ix.failed == {"p004.jpg": "not a readable image"}
    np.testing.assert_array_equal(ix.vectors, expected_vectors(ix))
    (root / "p004.jpg").write_bytes(b"fixed")  # a failure that now reads is indexed, no longer failed
    ix, report = update_index(root, index_dir, "default", progress=False, encode=backwards_encode)
    assert report.changed == ["p004.jpg"] and "p004.jpg" in ix and not ix.failed


def shard(name: str, live: int, rows: int | None = None, seq: int = 0) -> ShardInfo:
    return ShardInfo(name, rows if rows is not None else live, live, seq)


def test_compaction_keeps_a_small_index_in_one_shard(monkeypatch):
    monkeypatch.setattr(ing, "COMPACT_ALL_ROWS", 100)
    assert ing.compaction_group([shard("a", 60)]) == []
    assert ing.compaction_group([shard("a", 60, rows=61)]) == ["a"]  # a row no entry uses
    assert ing.compaction_group([shard("a", 60), shard("b", 40, seq=1)]) == ["a", "b"]
    assert ing.compaction_group([]) == []


def test_compaction_merges_only_what_is_small_next_to_the_rest(monkeypatch):
    monkeypatch.setattr(ing, "COMPACT_ALL_ROWS", 100)
    big = shard("big", 1_000_000)
    assert ing.compaction_group([big, shard("new", 1000, seq=1)]) == []  # the big shard is left be
    chunks = [shard(f"c{i}", 256, seq=1 + i) for i in range(4)]
    assert ing.compaction_group([big, *chunks]) == ["c0", "c1", "c2", "c3"]
    assert ing.compaction_group([big, shard("s", 4000, seq=1), shard("t", 1000, seq=2)]) == []
    assert ing.compaction_group([big, shard("s", 1500, seq=1), shard("t", 1000, seq=2)]) == ["s", "t"]
    assert ing.compaction_group([shard("old", 1000, rows=5000), shard("t", 300, seq=1)]) == ["old", "t"]
    assert set(ing.compaction_group([shard("a", 200), shard("b", 200, seq=1)])) == {"a", "b"}


def test_a_json_manifest_opens_and_the_next_run_upgrades_it(tmp_path):
    root = make_folder(tmp_path, 5)
    index_dir = tmp_path / "ix"
    before = update_index(root, index_dir, "default", progress=False, encode=backwards_encode)[0]
    legacy = write_legacy_manifest(index_dir)  # what cbir wrote before its SQLite manifest
    assert sorted(p.name for p in index_dir.glob("index.*")) == [LEGACY_MANIFEST]
    old = SearchIndex.open(index_dir)
    assert old.ids == before.ids and old.meta == before.meta
    np.testing.assert_array_equal(old.vectors, before.vectors)
    make_folder(tmp_path, 1, start=5)
    ix, report = update_index(root, index_dir, "default", progress=False, encode=backwards_encode)
    assert report.unchanged == 5 and report.added == ["p005.jpg"]
    assert (index_dir / MANIFEST).is_file() and not (index_dir / LEGACY_MANIFEST).exists()
    assert {k: v for k, v in read_manifest(index_dir).items() if k in ("root", "model_dir")} == {
        "root": legacy["root"],
        "model_dir": legacy["model_dir"],
    }
    np.testing.assert_array_equal(ix.vectors, expected_vectors(ix))


def test_upgrade_keeps_a_generation_that_was_being_built_aside(tmp_path):
    root = make_folder(tmp_path, 3)
    index_dir = tmp_path / "ix"
    update_index(root, index_dir, "default", progress=False, encode=backwards_encode)

    def interrupted_switch(manifest: dict) -> None:
        manifest[NEXT] = {**manifest, "model_fingerprint": "f" * 40, "entries": manifest["entries"][:1]}

    write_legacy_manifest(index_dir, interrupted_switch)
    upgrade_legacy(index_dir)
    manifest = read_manifest(index_dir)
    assert len(manifest["entries"]) == 3 and manifest[NEXT]["model_fingerprint"] == "f" * 40
    writer = ManifestWriter(index_dir)
    try:
        assert writer.count(manifest[NEXT]["gen"]) == 1
    finally:
        writer.close()


@pytest.fixture
def small_index(tmp_path) -> Path:
    root = make_folder(tmp_path, 3)
    update_index(root, tmp_path / "ix", "default", progress=False, encode=backwards_encode)
    return tmp_path / "ix"


def test_a_failed_commit_leaves_the_manifest_as_it_was(small_index):
    before = read_manifest(small_index)
    writer = ManifestWriter(small_index)
    try:
        with pytest.raises(sqlite3.IntegrityError), writer.commit() as conn:
            conn.execute("DELETE FROM entries")  # half a change, then a fault
            conn.execute("INSERT INTO info VALUES ('format', 'twice')")
    finally:
        writer.close()
    assert read_manifest(small_index) == before


def test_a_reader_sees_the_last_committed_chunk_while_a_writer_is_mid_transaction(small_index):
    before = read_manifest(small_index)
    writer = ManifestWriter(small_index)
    try:
        with writer.commit() as conn:
            conn.execute("DELETE FROM entries")
            assert read_manifest(small_index) == before  # not blocked, and not the half-done change
    finally:
        writer.close()
    assert read_manifest(small_index)["entries"] == []
