"""IVF-PQ for the largest indexes: recall against exact search, its file, and every search on top of
it (filters before ranking, pages) through a real index directory."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import cbir.index as ix
import cbir.indexing as ing
from cbir import ann
from cbir.filters import Filters
from cbir.manifest import LEGACY_MANIFEST
from cbir.steer import search_page


def clustered(n: int, dim: int, rng: np.random.Generator, centres: np.ndarray) -> np.ndarray:
    """Unit vectors around topic centres: neighbour structure as in real embeddings."""
    x = centres[rng.integers(0, len(centres), n)] + 0.35 * rng.standard_normal((n, dim), dtype=np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / truth.shape[1] for a, b in zip(found, truth, strict=True)]))


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((300, 64), dtype=np.float32) / 4
    return clustered(20_000, 64, rng, centres), clustered(100, 64, rng, centres)


def test_kind_follows_collection_size():
    assert ann.kind_for(ann.ANN_THRESHOLD - 1) is None
    assert ann.kind_for(ann.ANN_THRESHOLD) == "hnsw"
    assert ann.kind_for(ann.IVFPQ_THRESHOLD) == "ivfpq"
    assert ann.ivf_cells(1_000_000) == 1024 and ann.ivf_cells(20_000) == 128 and ann.ivf_cells(10) == 1


def test_exact_search_answers_as_faiss_flat_index_did():
    """`ann.Exact` (NumPy, no FAISS import on a cold search) gives FAISS IndexFlatIP's rows and
    similarities: batches, k up to and past the collection, scored prefixes of memory-mapped rows."""
    import faiss

    rng = np.random.default_rng(3)
    vectors = clustered(500, 48, rng, rng.standard_normal((20, 48), dtype=np.float32))
    queries = clustered(7, 48, rng, rng.standard_normal((5, 48), dtype=np.float32))
    for width in (48, 16):
        part = vectors[:, :width]  # a strided view, as the zero-shot model's text prefix
        flat = faiss.IndexFlatIP(width)
        flat.add(np.ascontiguousarray(part))
        for k in (1, 20, 500):
            similarities, rows = ann.Exact(part).search(queries[:, :width], k)
            expected_similarities, expected_rows = flat.search(np.ascontiguousarray(queries[:, :width]), k)
            assert rows.dtype == np.int64 and rows.shape == (7, k)
            np.testing.assert_array_equal(rows, expected_rows)
            np.testing.assert_allclose(similarities, expected_similarities, rtol=0, atol=1e-5)
    similarities, rows = ann.Exact(vectors).search(queries, 600)  # more than there are: all of them
    assert rows.shape == (7, 500) and (np.diff(similarities, axis=1) <= 0).all()


def test_exact_search_ranks_equal_similarities_alike_for_every_k():
    """Duplicate vectors (copies of a photo) score alike: the k best are the first k of one ranking,
    equal ones in row order, whatever k, so pages of a search continue one another."""
    rng = np.random.default_rng(5)
    vectors = clustered(300, 16, rng, rng.standard_normal((8, 16), dtype=np.float32))
    copies = rng.choice(300, 40, replace=False)
    vectors[copies[20:]] = vectors[copies[:20]]  # 20 photos saved twice
    queries = np.concatenate([vectors[copies[:3]], clustered(3, 16, rng, vectors[:3])])
    exact = ann.Exact(vectors)
    similarities = queries @ vectors.T
    ranking = np.argsort(-similarities, axis=1, kind="stable")
    for k in range(1, 301):
        rows = exact.search(queries, k)[1]
        np.testing.assert_array_equal(rows, ranking[:, :k], err_msg=f"k={k}")


def test_ivfpq_recall_at_20_against_exact_search_and_its_file(data, tmp_path):
    base, queries = data
    truth = np.argsort(-(queries @ base.T), axis=1, kind="stable")[:, :20]
    index = ann.IVFPQIndex.train(base)
    similarities, found = index.search(queries, 20)
    assert recall_at(found, truth) >= 0.9
    # re-ranked on the vectors: the scores are the exact inner products, best first
    np.testing.assert_allclose(similarities, np.take_along_axis(queries @ base.T, found, 1), rtol=1e-5)
    assert (np.diff(similarities, axis=1) <= 0).all()
    codes_only = ann.IVFPQIndex(index.index, index.config).search(queries, 20)[1]
    assert recall_at(codes_only, truth) < recall_at(found, truth)  # what the refine step buys
    # the file keeps the index and its search parameters
    index = ann.IVFPQIndex(index.index, {**index.config, "nprobe": 7}, base)
    index.write(tmp_path / "a.ivfpq")
    again = ann.open_searcher(tmp_path / "a.ivfpq", base)
    assert again.config == index.config and again._ivf().nprobe == 7
    np.testing.assert_array_equal(again.search(queries, 20)[1], index.search(queries, 20)[1])
    with pytest.raises(ann.AnnFileError, match="holds 20000 vectors, its shard 10"):
        ann.open_searcher(tmp_path / "a.ivfpq", base[:10])
    (tmp_path / "a.ivfpq").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ann.AnnFileError, match=r"a\.ivfpq: damaged IVF-PQ index"):
        ann.open_searcher(tmp_path / "a.ivfpq", base)


@pytest.fixture(scope="module")
def ivfpq_index(data, tmp_path_factory):
    """An index directory of 2,000 vectors in folders a/ and b/, searched through IVF-PQ."""
    from cbir.models import create_model

    mp = pytest.MonkeyPatch()
    mp.setattr(ann, "ANN_THRESHOLD", 100)
    mp.setattr(ann, "IVFPQ_THRESHOLD", 100)
    root = tmp_path_factory.mktemp("ivfpq")
    (root / ix.SHARDS).mkdir()
    vectors = data[0][:2000]
    checksum = ing._write_npy_atomic(root / ix.SHARDS / "s.npy", vectors)
    create_model("zero-shot").fit().save(root / "model-x")
    entries = [
        {"id": f"{'ab'[i % 2]}/{i:04d}.jpg", "size": 1, "mtime_ns": 0, "sha1": "", "shard": "s.npy", "row": i}
        for i in range(len(vectors))
    ]
    manifest = {
        "format": "cbir-index",
        "version": 1,
        "root": str(root / "photos"),
        "model_dir": "model-x",
    }
    manifest |= {"entries": entries, "failed": [], "shards": {"s.npy": checksum}}
    (root / LEGACY_MANIFEST).write_text(json.dumps(manifest))  # opens as is: no writer ran
    ann.write(vectors, ix._ann_path(root, entries), "ivfpq")  # as written before the manifest named it
    yield ix.SearchIndex.open(root), vectors
    mp.undo()


def test_searches_over_an_ivfpq_index_rank_like_exact_search(ivfpq_index, data):
    index, vectors = ivfpq_index
    assert index.approximate and index._ann.suffix == ".ivfpq"
    assert isinstance(index._index().searcher, ann.IVFPQIndex)
    assert sorted(os.listdir(index.path / ix.SHARDS)) == sorted([index._ann.name, "s.npy"])
    hits = 0
    for query in data[1][:20]:
        exact = np.argsort(-(vectors @ query), kind="stable")[:10]
        found = index.search_vector(query, k=10)
        hits += len({index.ids[r] for r in exact} & {r.id for r in found})
        np.testing.assert_allclose(
            [r.similarity for r in found], [vectors[index._row[r.id]] @ query for r in found], rtol=1e-5
        )
        # pages: results 6-10 are the second half of the top 10
        assert [r.id for r in search_page(index, query, None, 5, 5, None)] == [r.id for r in found[5:]]
    assert hits / 200 >= 0.95


def test_filters_apply_before_ranking_over_an_ivfpq_index(ivfpq_index, data):
    index, vectors = ivfpq_index
    query = data[1][0]
    in_b = np.array([i.startswith("b/") for i in index.ids])
    order = np.flatnonzero(in_b)[np.argsort(-(vectors[in_b] @ query), kind="stable")]
    page = search_page(index, query, Filters(folder="b"), k=7, offset=3, min_score=None)
    assert [r.id for r in page] == [index.ids[i] for i in order[3:10]]
    assert [r.rank for r in page] == list(range(4, 11))  # ranks count from the top of the ranking
