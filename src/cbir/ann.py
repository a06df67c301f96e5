"""Approximate nearest-neighbour search for large indexes: which kind for how many vectors, how to
build it from the vectors, and how to open it for search.

  below `ANN_THRESHOLD`     exact inner products (`Exact`, in NumPy), nothing written;
  up to `IVFPQ_THRESHOLD`   an HNSW graph (`<shard>.hnsw`): fast and exact in practice, but it holds
                            a full copy of the vectors (3.9 KB a 896-d vector);
  above                     IVF-PQ (`<shard>.ivfpq`): PCA to `PCA_DIM`, an inverted file over `nlist`
                            k-means cells (HNSW coarse quantizer), 4-bit product-quantized codes
                            (`PQ_SUBQUANTIZERS`, SIMD "fast scan": quick to train and to scan),
                            trained on a sample. Each search takes `refine` × k candidates from the
                            codes and ranks them by their exact inner product with the vectors of
                            the memory-mapped shard, which makes up for the codes' coarseness.
                            Memory holds the codes (46 B a vector at 1M); the shard is read a few
                            hundred rows per query.

An index that grows keeps its approximate index across small changes (`DeltaSearcher`, the "base +
delta" of search engines): the file covers whole shards, the rows of shards written since are searched
exactly, and rows of photos removed since are dropped from its results; a writer builds a new one once
either share passes `MAX_DELTA_SHARE` (`delta_fits`).

An `.ivfpq` file is one `.npz`: the FAISS index bytes and a versioned JSON config (nlist, nprobe,
refine, …), so search parameters travel with the index. Thresholds and defaults come from
`benchmarks/ann_scale.py` (BENCHMARKS.md, "IVF-PQ at scale").
"""

from __future__ import annotations

import json
import math
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

ANN_THRESHOLD = 50_000  # from here on, an approximate index
IVFPQ_THRESHOLD = 200_000  # from here on, IVF-PQ instead of HNSW
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 64
HNSW_EF_SEARCH = 128
PCA_DIM = 256  # vectors wider than this are rotated and cut to it before the inverted file
PQ_SUBQUANTIZERS = 64  # 4-bit codes (FAISS fast scan): half a byte each, 32 bytes a vector at most
KMEANS_ITERATIONS = 10
REFINE = 20  # candidates from the codes per result wanted, re-ranked exactly (40: FAISS fast scan slows ~30x)
MIN_NPROBE = 32
SAMPLE_PER_CELL = 64  # training vectors per k-means cell
MIN_PER_CELL = 39  # fewer than this a cell, FAISS's k-means is unreliable
IVFPQ_FORMAT = 1
# An approximate index is kept while the rows it does not cover, and the rows of photos removed since it
# was built, are each at most this share of the collection: exact search over the uncovered rows costs at
# most a tenth of an exact search of all, and a rebuild (O(collection): 90 s at 1M) comes only after the
# collection changed by a tenth, so adding N photos costs O(N) amortized.
MAX_DELTA_SHARE = 0.10
SUFFIXES = {"hnsw": ".hnsw", "ivfpq": ".ivfpq"}


class AnnFileError(ValueError):
    """An approximate index file that cannot be used; the message names it."""


def kind_for(n: int) -> str | None:
    """The approximate index for a collection of n vectors; None: exact search."""
    if n < ANN_THRESHOLD:
        return None
    return "hnsw" if n < IVFPQ_THRESHOLD else "ivfpq"


def delta_fits(covers: Sequence[Sequence[Any]], live: dict[str, int]) -> bool:
    """Whether an approximate index over `covers` ([shard, rows, live rows when built], …) still serves
    shards with these live rows: the rows of other shards, and the rows of its shards removed since it
    was built, are each at most `MAX_DELTA_SHARE` of the collection."""
    limit = MAX_DELTA_SHARE * sum(live.values())
    built = {name: was for name, _, was in covers}
    uncovered = sum(n for name, n in live.items() if name not in built)
    removed = sum(was - live.get(name, 0) for name, was in built.items())
    return uncovered <= limit and removed <= limit


class Exact:
    """Exact inner-product search that answers like a FAISS index (`search(queries, k) -> (similarities,
    rows)`, best first). In NumPy over the vectors where they lie (a memory-mapped shard is not copied
    into an `IndexFlatIP`), so an exact search does not import FAISS: ~65 ms CPU of a cold `cbir search`
    of 10,921 photos, whose whole search then takes ~5 ms."""

    def __init__(self, vectors: np.ndarray):
        self.vectors = vectors
        self.ntotal = len(vectors)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        similarities = np.asarray(queries, dtype=np.float32) @ self.vectors.T
        rows = np.empty((len(similarities), min(k, self.ntotal)), dtype=np.int64)
        for i, row in enumerate(similarities):
            rows[i] = best_first(row, k)
        return np.take_along_axis(similarities, rows, 1), rows


def best_first(similarities: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k largest similarities, best first, equal ones in position order: the first k
    of one ranking whatever k, so a page (`offset + k` results less the first `offset`) continues the
    one before it even through duplicate photos (equal similarities), which `argpartition` orders
    differently for each k."""
    key = -similarities
    candidates = np.arange(len(key))
    if 0 < k < len(key):
        kth = np.partition(key, k - 1)[k - 1]
        candidates = np.flatnonzero(~(key > kth))  # every tie of the k-th (and NaN, sorted last)
    return candidates[np.argsort(key[candidates], kind="stable")][:k]


def hnsw(vectors: np.ndarray):
    """An HNSW graph over the vectors (a copy of them inside), inner-product metric."""
    import faiss

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    index = faiss.IndexHNSWFlat(vectors.shape[1], HNSW_M, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    index.add(vectors)
    return index


def write(vectors: np.ndarray, path: Path, kind: str) -> None:
    """Build an index of this kind (`hnsw`, `ivfpq`) over the vectors and write it to `path`."""
    import faiss

    if kind == "ivfpq":
        IVFPQIndex.train(vectors).write(path)
    else:
        faiss.write_index(hnsw(vectors), str(path))


def open_searcher(path: Path, vectors: np.ndarray | None):
    """The index in `path`, ready to search (`.search(queries, k) -> (similarities, rows)`); IVF-PQ
    re-ranks on `vectors` when given."""
    import faiss

    if path.suffix == SUFFIXES["ivfpq"]:
        return IVFPQIndex.read(path, vectors)
    index = faiss.read_index(str(path))
    index.hnsw.efSearch = HNSW_EF_SEARCH
    return index


def ivf_cells(n: int) -> int:
    """k-means cells for n vectors: the power of two nearest √n (a cell holds about √n vectors), and
    at least `MIN_PER_CELL` training vectors a cell."""
    near_root = 2 ** round(math.log2(max(n, 1)) / 2)
    return int(max(1, min(65_536, near_root, n // MIN_PER_CELL)))


def _factory(dim: int, nlist: int) -> str:
    """PCA down to an even width of at most `PCA_DIM`, the inverted file, 4-bit PQ over that width."""
    width = min(PCA_DIM, dim - dim % 2)
    pca = f"PCAR{width}," if width != dim else ""
    m = max(m for m in range(2, PQ_SUBQUANTIZERS + 1, 2) if width % m == 0)
    return f"{pca}IVF{nlist}_HNSW32,PQ{m}x4fs"


class IVFPQIndex:
    """IVF-PQ codes plus exact re-ranking over the (memory-mapped) vectors they were built from."""

    def __init__(self, index: Any, config: dict[str, Any], vectors: np.ndarray | None = None):
        self.index, self.config, self.vectors = index, config, vectors
        self._ivf().nprobe = int(config["nprobe"])

    def _ivf(self):
        import faiss

        return faiss.extract_index_ivf(self.index)

    @classmethod
    def train(
        cls, vectors: np.ndarray, nlist: int | None = None, nprobe: int | None = None, seed: int = 0
    ) -> IVFPQIndex:
        """Train on a sample of the vectors (64 a cell), then add them all."""
        import faiss

        n, dim = vectors.shape
        nlist = nlist or ivf_cells(n)
        factory = _factory(dim, nlist)
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        faiss.extract_index_ivf(index).cp.niter = KMEANS_ITERATIONS
        take = min(n, max(SAMPLE_PER_CELL * nlist, 16_384))
        sample = np.sort(np.random.default_rng(seed).choice(n, take, replace=False))
        index.train(np.ascontiguousarray(vectors[sample], dtype=np.float32))
        for start in range(0, n, 65_536):  # a memory-mapped shard is read a slice at a time
            index.add(np.ascontiguousarray(vectors[start : start + 65_536], dtype=np.float32))
        config = {
            "format_version": IVFPQ_FORMAT,
            "kind": "ivfpq",
            "factory": factory,
            "nlist": nlist,
            "nprobe": nprobe or max(MIN_NPROBE, nlist // 16),
            "refine": REFINE,
            "ntotal": n,
            "dim": dim,
            "trained_on": take,
        }
        return cls(index, config, vectors)

    def write(self, path: Path) -> None:
        import faiss

        config = np.frombuffer(json.dumps(self.config).encode(), dtype=np.uint8)
        with path.open("wb") as f:  # a file object: numpy adds no `.npz` suffix
            np.savez(f, faiss=faiss.serialize_index(self.index), config=config)

    @classmethod
    def read(cls, path: Path, vectors: np.ndarray | None) -> IVFPQIndex:
        import faiss

        try:
            with np.load(path, allow_pickle=False) as z:
                config = json.loads(z["config"].tobytes())
                if config.get("format_version", 0) > IVFPQ_FORMAT:
                    raise AnnFileError(f"{path}: written by a newer cbir (format {config['format_version']})")
                index = faiss.deserialize_index(z["faiss"])
        except (OSError, ValueError, KeyError, EOFError, RuntimeError, zipfile.BadZipFile) as e:
            if isinstance(e, AnnFileError):
                raise
            raise AnnFileError(f"{path}: damaged IVF-PQ index ({e}); delete it and rerun `cbir index`") from e
        if vectors is not None and len(vectors) != index.ntotal:
            raise AnnFileError(f"{path}: holds {index.ntotal} vectors, its shard {len(vectors)}")
        return cls(index, config, vectors)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, rows) of the k best per query, like a FAISS index; rows are -1 past the
        candidates found. Similarities are exact inner products when the vectors are at hand."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        wanted = k * int(self.config["refine"]) if self.vectors is not None else k
        approx, candidates = self.index.search(queries, min(wanted, self.ntotal))
        if self.vectors is None:
            return approx[:, :k], candidates[:, :k]
        return rerank(queries, candidates, self.vectors, k)


def rerank(
    queries: np.ndarray, candidates: np.ndarray, vectors: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, rows) of the k best of each query's candidate rows of `vectors` (-1: none), by
    their exact inner product; rows are -1 past the candidates."""
    similarities = np.full((len(queries), k), -np.inf, dtype=np.float32)
    rows = np.full((len(queries), k), -1, dtype=np.int64)
    for i, (query, found) in enumerate(zip(queries, candidates, strict=True)):
        found = np.unique(found[found >= 0])  # in file order: fewer, sequential page reads
        exact = np.asarray(vectors[found], dtype=np.float32) @ query
        best = np.argsort(-exact, kind="stable")[:k]
        similarities[i, : len(best)], rows[i, : len(best)] = exact[best], found[best]
    return similarities, rows


class DeltaSearcher:
    """Search over every row of `vectors`: an approximate index over the rows it covers (`to_global`:
    the row of `vectors` of each of its rows, -1 where that photo was removed since) and exact inner
    products over the `uncovered` rows, merged by exact similarity."""

    def __init__(self, searcher: Any, to_global: np.ndarray, vectors: np.ndarray, uncovered: np.ndarray):
        self.searcher, self.vectors, self.uncovered = searcher, vectors, uncovered
        # -1 appended: FAISS's "no result" (-1) maps to no row
        self._global = np.append(to_global, -1).astype(np.int64)
        self._delta_rows = np.append(uncovered, -1).astype(np.int64)
        self._delta = Exact(np.asarray(vectors[uncovered])) if len(uncovered) else None
        self._live = int((to_global >= 0).sum())
        self._per_result = int(searcher.config["refine"]) if isinstance(searcher, IVFPQIndex) else 1

    @classmethod
    def open(
        cls, path: Path, vectors: np.ndarray, to_global: np.ndarray, uncovered: np.ndarray
    ) -> DeltaSearcher:
        """The approximate index in `path` (its rows mapped by `to_global`) and the uncovered rows."""
        searcher = open_searcher(path, None)
        if searcher.ntotal != len(to_global):
            raise AnnFileError(f"{path}: holds {searcher.ntotal} vectors, its shards {len(to_global)}")
        return cls(searcher, to_global, vectors, uncovered)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, rows of `vectors`) of the k best per query, like a FAISS index."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        candidates = self._covered(queries, k)
        if self._delta is not None:
            _, found = self._delta.search(queries, min(k, len(self.uncovered)))
            candidates = np.concatenate([candidates, self._delta_rows[found]], axis=1)
        return rerank(queries, candidates, self.vectors, k)

    def _covered(self, queries: np.ndarray, k: int) -> np.ndarray:
        """The approximate index's candidates as rows of `vectors` (-1: removed photos), asked for more
        until each query has k live ones. IVF-PQ gives no more than its probed cells hold; an HNSW
        graph asked for (nearly) all its rows may find fewer, and then every live row is a candidate."""
        ntotal = len(self._global) - 1
        fetch = min(ntotal, k * self._per_result)
        while True:
            _, found = self.searcher.search(queries, fetch)
            rows = self._global[found]
            short = (rows >= 0).sum(axis=1) < min(k, self._live)
            if not short.any() or (self._per_result > 1 and (found[short] < 0).any()):
                return rows
            if fetch >= ntotal:
                every = self._global[:-1][self._global[:-1] >= 0]
                return np.concatenate([rows, np.where(short[:, None], every[None, :], -1)], axis=1)
            fetch = min(ntotal, 4 * fetch)


def memory_bytes(index: Any) -> int:
    """Bytes the index holds in memory (its serialized size; the IVF-PQ index without the shard)."""
    import faiss

    return int(faiss.serialize_index(index.index if isinstance(index, IVFPQIndex) else index).size)
