r"""Exact, HNSW and IVF-PQ search at 100k and 1M vectors: recall@20 against exact search, p50 / p99
latency of one query on one thread (as `SearchIndex` searches), memory per vector, build time.

    OMP_NUM_THREADS=2 OMP_WAIT_POLICY=PASSIVE PYTHONPATH=src \
        python -m benchmarks.ann_scale --sizes 100000 1000000
    PYTHONPATH=src python -m benchmarks.ann_scale --manifest 200000   # bytes per photo of the manifest

(OMP_WAIT_POLICY=PASSIVE: on a machine shared with other jobs, OpenMP threads that spin at barriers
made the IVF-PQ build several times slower here: BENCHMARKS.md, "IVF-PQ at scale".)

Vectors: `benchmarks.search.clustered_vectors` (a mixture of topics in a 32-d latent space plus
full-rank noise) at 896-d, the width of the shipped model's image vectors. They are written as a
`.npy` shard and memory-mapped, as an index holds them, so IVF-PQ re-ranks from the mapped file. HNSW
is skipped above `--hnsw-max` vectors (its build alone takes longer than the rest of the run).
Files go under runs/bench-ann/ (git-ignored) and are deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np

from benchmarks.search import LATENT_DIM, clustered_vectors

REPO = Path(__file__).resolve().parents[1]
RUNS = REPO / "runs" / "bench-ann"
K = 20


def exact_neighbours(base: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """The true top-K rows of each query, from blocks of the (memory-mapped) vectors."""
    best_scores = np.full((len(queries), K), -np.inf, dtype=np.float32)
    best_rows = np.zeros((len(queries), K), dtype=np.int64)
    for start in range(0, len(base), 100_000):
        scores = queries @ np.asarray(base[start : start + 100_000]).T
        scores = np.concatenate([best_scores, scores], 1)
        rows = np.concatenate(
            [best_rows, np.arange(start, start + scores.shape[1] - K)[None].repeat(len(queries), 0)], 1
        )
        top = np.argpartition(-scores, K - 1, axis=1)[:, :K]
        best_scores, best_rows = np.take_along_axis(scores, top, 1), np.take_along_axis(rows, top, 1)
    return best_rows


def timed_search(index, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows found and per-query seconds, one query at a time on one thread."""
    import faiss

    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    rows, seconds = [], []
    for query in queries:
        t = time.perf_counter()
        _, found = index.search(query[None], K)
        seconds.append(time.perf_counter() - t)
        rows.append(found[0])
    faiss.omp_set_num_threads(threads)
    return np.array(rows), np.array(seconds)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / K for a, b in zip(found, truth, strict=True)]))


def report(n: int, name: str, build: float, bytes_per_vector: float, found, seconds, truth) -> None:
    p50, p99 = np.percentile(seconds, [50, 99]) * 1000
    print(
        f"{n:>9} {name:<26} {build:>8.1f} {bytes_per_vector:>9.1f} {recall(found, truth):>9.4f} "
        f"{p50:>8.2f} {p99:>8.2f}",
        flush=True,
    )


def run_size(
    n: int, dim: int, n_queries: int, hnsw_max: int, nprobes: list[int], refines: list[int], folder: Path
) -> None:
    import faiss

    from cbir import ann

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((1000, LATENT_DIM), dtype=np.float32)
    np.save(folder / "shard.npy", clustered_vectors(n, dim, rng, centres))
    base = np.load(folder / "shard.npy", mmap_mode="r")
    queries = clustered_vectors(n_queries, dim, rng, centres)
    truth = exact_neighbours(base, queries)

    flat = faiss.IndexFlatIP(dim)
    flat.add(np.ascontiguousarray(base, dtype=np.float32))
    found, seconds = timed_search(flat, queries[: max(10, n_queries // 10)])
    report(n, "exact (IndexFlatIP)", 0.0, 4 * dim, found, seconds, truth[: len(found)])
    del flat

    if n <= hnsw_max:
        t = time.perf_counter()
        graph = ann.hnsw(base)
        build = time.perf_counter() - t
        graph.hnsw.efSearch = ann.HNSW_EF_SEARCH
        found, seconds = timed_search(graph, queries)
        report(
            n,
            f"HNSW M{ann.HNSW_M} ef{ann.HNSW_EF_SEARCH}",
            build,
            ann.memory_bytes(graph) / n,
            found,
            seconds,
            truth,
        )
        del graph
    else:
        print(f"{n:>9} HNSW skipped (above --hnsw-max {hnsw_max})", flush=True)

    t = time.perf_counter()
    index = ann.IVFPQIndex.train(base)
    build = time.perf_counter() - t
    stored = index.config["nprobe"]
    for nprobe in sorted({*nprobes, stored}):
        for refine in sorted({*refines, ann.REFINE}):
            index._ivf().nprobe, index.config["refine"] = nprobe, refine
            found, seconds = timed_search(index, queries)
            name = f"IVF-PQ nprobe{nprobe} refine{refine}" + (
                " *" if (nprobe, refine) == (stored, ann.REFINE) else ""
            )
            report(n, name, build, ann.memory_bytes(index) / n, found, seconds, truth)
    print(
        f"{n:>9} IVF-PQ: {index.config['factory']}, trained on {index.config['trained_on']} vectors",
        flush=True,
    )


def manifest_memory(n: int) -> None:
    """Bytes per photo of a manifest entry (JSON) and of what `SearchIndex` keeps per photo in Python
    (ids, row and stat maps, EXIF meta, mtimes), for the 10M / 100M estimate."""
    import tracemalloc

    entries = [
        {
            **{"id": f"2024/trip{i // 1000}/IMG_{i:07d}.jpg", "size": 2_345_678 + i},
            **{"mtime_ns": 1_714_567_890_123_456_789 + i, "sha1": f"{i:040x}", "shard": f"{0:032x}.npy"},
            **{"row": i, "meta": {"taken": f"2024-05-01T12:{i % 60:02d}:00", "camera": "Canon EOS 80D"}},
        }
        for i in range(n)
    ]
    text = json.dumps({"entries": entries}, indent=1)
    del entries
    tracemalloc.start()
    manifest = json.loads(text)
    parsed = tracemalloc.get_traced_memory()[0]
    ids = [e["id"] for e in manifest["entries"]]
    kept = [ids, {i: r for r, i in enumerate(ids)}, [e.get("meta") for e in manifest["entries"]]]
    kept += [{e["id"]: (e["size"], e["mtime_ns"]) for e in manifest["entries"]}]
    kept += [[e["mtime_ns"] for e in manifest["entries"]]]
    peak = tracemalloc.get_traced_memory()[0]
    del manifest
    resident = tracemalloc.get_traced_memory()[0]
    print(
        f"{n} photos: manifest JSON {len(text) / n:.0f} B/photo; parsed {parsed / n:.0f} B/photo; "
        f"SearchIndex keeps {resident / n:.0f} B/photo (peak while opening {peak / n:.0f})"
    )
    del kept


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=896)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--hnsw-max", type=int, default=200_000)
    parser.add_argument("--nprobe", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--refine", type=int, nargs="+", default=[10, 20, 40])
    parser.add_argument("--manifest", type=int, help="only measure manifest bytes per photo over this many")
    args = parser.parse_args()
    if args.manifest:
        manifest_memory(args.manifest)
        return
    import faiss

    print(
        f"{args.dim}-d clustered vectors, {args.queries} queries, "
        f"build on {faiss.omp_get_max_threads()} threads, search on 1"
    )
    print(
        "B/vector: held in memory (IVF-PQ: codes + ids + cells; "
        "its re-ranking reads rows of the shard, 4*dim bytes/vector on disk)"
    )
    print("* = the defaults stored with the index")
    print(
        f"{'n':>9} {'method':<26} {'build s':>8} {'B/vector':>9} {'recall@20':>9} {'p50 ms':>8} {'p99 ms':>8}"
    )
    RUNS.mkdir(parents=True, exist_ok=True)
    for n in args.sizes:
        folder = RUNS / str(n)
        folder.mkdir(exist_ok=True)
        try:
            run_size(n, args.dim, args.queries, args.hnsw_max, args.nprobe, args.refine, folder)
        finally:
            shutil.rmtree(folder)


if __name__ == "__main__":
    main()
