"""An approximate index kept across small changes (issue 16): adding or removing a few photos leaves
its file as it is, readers search the new photos exactly and drop the removed ones from its results,
and a change past `ann.MAX_DELTA_SHARE` of the collection rebuilds it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import cbir.indexing as ing
from cbir import ann
from cbir.index import SHARDS, SearchIndex, read_manifest
from tests.test_index_stages import backwards_encode, make_folder, vector_of


@pytest.fixture
def small_thresholds(monkeypatch):
    """An approximate index from 300 photos; shards merged whole only up to 50 rows (as above 50k
    photos, a big shard is left be when a few photos are added)."""
    monkeypatch.setattr(ann, "ANN_THRESHOLD", 300)
    monkeypatch.setattr(ing, "COMPACT_ALL_ROWS", 50)


def add(root: Path, out: Path, paths: list[Path]) -> SearchIndex:
    ing.add_paths(root, out, paths, "default", progress=False, encode=backwards_encode)
    return SearchIndex.open(out)


def ann_file(out: Path) -> Path:
    return out / SHARDS / read_manifest(out)["ann"]["name"]


def assert_ranks_like_exact_search(ix: SearchIndex, queries: np.ndarray, k: int = 10) -> None:
    vectors = np.asarray(ix.vectors)
    for query in queries:
        exact = [ix.ids[i] for i in np.argsort(-(vectors @ query), kind="stable")[:k]]
        assert [r.id for r in ix.search_vector(query, k)] == exact


def test_adding_a_few_photos_keeps_the_approximate_index_and_finds_them(small_thresholds, tmp_path):
    root = make_folder(tmp_path, 400)
    out = tmp_path / "ix"
    ing.index_folder(root, out, "default", progress=False, encode=backwards_encode)
    graph = ann_file(out)
    before = graph.stat().st_mtime_ns
    new = sorted(make_folder(tmp_path, 5, start=400).rglob("p4*.jpg"))
    ix = add(root, out, new)
    assert len(ix) == 405 and ann_file(out) == graph and graph.stat().st_mtime_ns == before
    assert ix.approximate and len(ix._index().uncovered) == 5  # the new photos, searched exactly
    for photo in new:
        found = ix.search_vector(vector_of(photo.read_bytes()), k=3)
        assert found[0].id == photo.relative_to(root).as_posix()
    queries = np.stack([vector_of(f"query {i}".encode()) for i in range(30)])
    assert_ranks_like_exact_search(ix, queries)


def test_removed_photos_never_come_back_and_k_results_still_do(small_thresholds, tmp_path):
    root = make_folder(tmp_path, 400)
    out = tmp_path / "ix"
    ix = add(root, out, [root])
    graph = ann_file(out)
    query = ix.vector(ix.ids[0])
    # the 30 nearest photos to the query go: the graph's first answers are all removed ones
    nearest = [ix.ids[i] for i in np.argsort(-(np.asarray(ix.vectors) @ query))[:30]]
    for image_id in nearest:
        (root / image_id).unlink()
    ix = add(root, out, [root / i for i in nearest])
    assert len(ix) == 370 and ann_file(out) == graph  # kept: 30 of 400 is under a tenth
    found = ix.search_vector(query, k=10)
    assert len(found) == 10 and not {r.id for r in found} & set(nearest)
    assert len(ix.search_vector(query, k=len(ix))) == len(ix)
    assert_ranks_like_exact_search(ix, np.stack([query, *ix.vectors[:20]]))


def test_adding_more_than_a_tenth_rebuilds_it_over_everything(small_thresholds, tmp_path):
    root = make_folder(tmp_path, 400)
    out = tmp_path / "ix"
    ix = add(root, out, [root])
    graph = ann_file(out)
    new = sorted(make_folder(tmp_path, 60, start=400).rglob("p4[0-5]*.jpg"))
    assert len(new) == 60
    ix = add(root, out, new)
    rebuilt = ann_file(out)
    assert rebuilt != graph and not graph.exists()  # the old one swept
    assert len(ix._index().uncovered) == 0 and ix._index().searcher.ntotal == 460  # all covered
    queries = np.stack([vector_of(p.read_bytes()) for p in new[:10]])
    assert_ranks_like_exact_search(ix, queries)


def test_a_kept_index_of_the_wrong_kind_or_a_missing_file_is_rebuilt(small_thresholds, tmp_path, monkeypatch):
    root = make_folder(tmp_path, 400)
    out = tmp_path / "ix"
    add(root, out, [root])
    graph = ann_file(out)
    graph.unlink()  # lost: the next run writes it again rather than leave readers on exact search
    add(root, out, [*make_folder(tmp_path, 1, start=400).glob("p400.jpg")])
    assert ann_file(out).exists()
    monkeypatch.setattr(ann, "IVFPQ_THRESHOLD", 300)  # the collection now wants IVF-PQ
    ix = add(root, out, [*make_folder(tmp_path, 1, start=401).glob("p401.jpg")])
    assert ann_file(out).suffix == ".ivfpq" and isinstance(ix._index().searcher, ann.IVFPQIndex)
    ivfpq = ann_file(out)
    (photo,) = make_folder(tmp_path, 1, start=403).glob("p403.jpg")
    ix = add(root, out, [photo])  # kept, and the new photo is searched exactly beside IVF-PQ
    assert ann_file(out) == ivfpq and len(ix._index().uncovered) == 1
    assert ix.search_vector(vector_of(photo.read_bytes()), k=1)[0].id == "p403.jpg"


def test_a_run_killed_before_it_names_a_new_index_leaves_readers_the_old_one(
    small_thresholds, tmp_path, monkeypatch
):
    root = make_folder(tmp_path, 400)
    out = tmp_path / "ix"
    add(root, out, [root])
    graph = ann_file(out)
    new = sorted(make_folder(tmp_path, 60, start=400).rglob("p4[0-5]*.jpg"))

    def killed(*args):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(ing, "set_ann", killed)
        with pytest.raises(KeyboardInterrupt):
            ing.add_paths(root, out, new, "default", progress=False, encode=backwards_encode)
    (written,) = [p for p in (out / SHARDS).glob("*.hnsw") if p != graph]
    ix = SearchIndex.open(out)  # the photos are in, the old graph too: they are searched exactly
    assert len(ix) == 460 and ann_file(out) == graph and len(ix._index().uncovered) == 60
    assert ix.search_vector(vector_of(new[0].read_bytes()), k=1)[0].id == new[0].relative_to(root).as_posix()
    before = written.stat().st_mtime_ns
    add(root, out, [new[0]])  # the rerun names the file the killed run wrote, without writing it again
    assert ann_file(out) == written and written.stat().st_mtime_ns == before and not graph.exists()


def test_a_manifest_written_before_it_named_approximate_indexes(small_thresholds, tmp_path):
    import sqlite3

    from cbir.manifest import MANIFEST

    root = make_folder(tmp_path, 400)
    out = tmp_path / "ix"
    add(root, out, [root])
    with sqlite3.connect(out / MANIFEST) as conn:
        conn.execute("DROP TABLE ann")
    ix = SearchIndex.open(out)  # no table: searched exactly (its graph was named after the layout then)
    assert (
        read_manifest(out)["ann"] is None
        and not ix.approximate
        and len(ix.search_vector(ix.vectors[0])) == 20
    )
    ix = add(root, out, [*make_folder(tmp_path, 1, start=400).glob("p400.jpg")])  # the writer adds the table
    assert ix.approximate and ann_file(out).exists() and len(ix._index().uncovered) == 0


def test_a_shard_longer_than_its_upgraded_rows_count_is_covered_whole(tmp_path, monkeypatch):
    """A manifest upgraded from JSON counts a shard's rows up to its last entry; when the photos of its
    last rows were removed before the upgrade, the approximate index still covers the file as it is,
    so it opens and searches (it failed on every search, and a rerun rebuilt the same file)."""
    from cbir import manifest

    monkeypatch.setattr(ann, "ANN_THRESHOLD", 100)
    out = tmp_path / "ix"
    (out / SHARDS).mkdir(parents=True)
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((400, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    shard = ing.write_shard(out, vectors)
    entries = [
        {"id": f"p{i:04d}.jpg", "size": 1, "mtime_ns": 1, "sha1": "x", "shard": shard.name, "row": i}
        for i in range(300)  # the photos of rows 300-399 were removed before the upgrade
    ]
    legacy = {"root": str(tmp_path), "shards": {shard.name: shard.sha1}, "entries": entries, "failed": []}
    manifest._publish_new(out, {"live": legacy})
    writer = manifest.ManifestWriter(out)
    try:
        ing.refresh_ann(writer, writer.generations()[0]["gen"], out)
    finally:
        writer.close()
    mf = read_manifest(out)
    from cbir.index import _ann_of, _coverage

    path, covers = _ann_of(out, mf)
    searcher = ann.DeltaSearcher.open(path, vectors[:300], *_coverage(mf["entries"], covers))
    _, rows = searcher.search(vectors[:5], 1)
    assert rows[:, 0].tolist() == [0, 1, 2, 3, 4]


def test_removing_more_than_a_tenth_rebuilds_it_over_the_photos_left_only(small_thresholds, tmp_path):
    """A rebuild after removals first merges away the removed photos' rows: the new index holds the
    photos left and nothing else (the same shards would otherwise name the same file, dead rows kept)."""
    root = make_folder(tmp_path, 400)
    out = tmp_path / "ix"
    ix = add(root, out, [root])
    graph = ann_file(out)
    gone = ix.ids[::5]  # 80 of 400: past a tenth
    for image_id in gone:
        (root / image_id).unlink()
    ix = add(root, out, [root / i for i in gone])
    assert len(ix) == 320 and ann_file(out) != graph and not graph.exists()
    searcher = ix._index()
    assert searcher.searcher.ntotal == 320 and len(searcher.uncovered) == 0  # no dead rows in it
    assert_ranks_like_exact_search(ix, np.stack([vector_of(f"query {i}".encode()) for i in range(20)]))
