"""Search speed and ANN recall (issue 5).

    PYTHONPATH=src python -m benchmarks.search throughput   # indexing images/s, empty feature cache
    PYTHONPATH=src python -m benchmarks.search latency      # warm text->top-20 over RSICD (10,921 images)
    PYTHONPATH=src python -m benchmarks.search cold         # wall and CPU time of a `cbir search` process
    PYTHONPATH=src python -m benchmarks.search cold --src ../old/src --src src   # two trees, run in turn
    PYTHONPATH=src python -m benchmarks.search ann --sizes 100000 1000000   # HNSW recall@20 vs exact
    PYTHONPATH=src python -m benchmarks.search verify --sizes 10921 80000   # shard checksum cost per open

Indexes are written under runs/bench-search/ (git-ignored).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets"
RUNS = REPO / "runs" / "bench-search"
LATENT_DIM = 32  # intrinsic dimension of the synthetic embeddings


def rsicd_index(model: str = "default"):
    """The index of all RSICD images with `model` (built once; later runs only check the files)."""
    from cbir.index import build_index

    name = "rsicd-index" if model == "default" else f"rsicd-index-{model}"
    return build_index(SHARED / "rsicd" / "images", RUNS / name, model=model, progress=True)


def index_seconds(folder: Path, model: str, tmp: Path) -> float:
    """Wall time of indexing `folder` with `model` in a new process with an empty feature cache."""
    env = {**os.environ, "CBIR_CACHE_DIR": str(tmp / f"empty-cache-{model}"), "CBIR_NO_PROGRESS": "1"}
    code = (
        "import sys, time; t = time.perf_counter(); from cbir.index import build_index; "
        "build_index(sys.argv[1], sys.argv[2], sys.argv[3], progress=False); "
        "print(time.perf_counter() - t)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(folder), str(tmp / f"ix-{model}"), model],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


def throughput(n: int) -> None:
    """Images/s of the shipped default and of zero-shot, on the same Flickr8k photos, in one run."""
    from cbir.datasets import list_images

    files = list_images(SHARED / "flickr8k" / "images")[::7][:n]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"
        folder.mkdir()
        for f in files:
            (folder / f.name).symlink_to(f)
        speed = {m: len(files) / index_seconds(folder, m, Path(tmp)) for m in ("zero-shot", "default")}
    for model, rate in speed.items():
        print(f"indexing {len(files)} Flickr8k photos (empty cache, {model}): {rate:.1f} img/s")
    print(f"default / zero-shot: {speed['default'] / speed['zero-shot']:.2f}")


def latency(queries: int) -> None:
    from cbir.datasets import load_dataset

    ix = rsicd_index()
    captions = load_dataset(SHARED / "rsicd").split("test").captions[: queries + 10]
    for q in captions[:10]:  # warm-up
        ix.search_text(q, k=20)
    times, encode = [], []
    for q in captions[10:]:
        t0 = time.perf_counter()
        v = ix.embed_text(q)
        t1 = time.perf_counter()
        ix.search_vector(v, k=20)
        t2 = time.perf_counter()
        times.append((t2 - t0) * 1000)
        encode.append((t1 - t0) * 1000)
    p = np.percentile(times, [50, 99])
    print(
        f"warm text->top-20 over {len(ix)} images ({ix.vectors.shape[1]}-d, exact), "
        f"{len(times)} queries: "
        f"p50 {p[0]:.1f} ms, p99 {p[1]:.1f} ms (text encoding p50 {np.percentile(encode, 50):.1f} ms)"
    )


def cold(runs: int, model: str, sources: list[Path]) -> None:
    """Wall and CPU (user + sys) time of `cbir search` in a new process, for each source tree (this
    checkout's `src` unless named; several are run in turn, run by run, so a changing load on a shared
    machine weighs on each alike). Sources are compiled to bytecode first, as an install is: a checkout
    run with PYTHONDONTWRITEBYTECODE set would otherwise compile every module of cbir in each run
    (~0.13 s on the 2-core machine)."""
    import compileall

    ix = rsicd_index(model)
    query = ["search", "many planes parked at an airport", "--index", str(ix.path)]
    times: dict[Path, list[tuple[float, float]]] = {src: [] for src in sources}
    for src in sources:
        compileall.compile_dir(src, quiet=1)
    for _ in range(runs):
        for src, measured in times.items():
            measured.append(search_process_seconds(query, src))
    for src, measured in times.items():
        walls, cpus = zip(*measured, strict=True)
        print(
            f"cold `cbir search` over {len(ix)} images (model {model}, {src}), {runs} runs: "
            f"median {statistics.median(walls):.2f}s (min {min(walls):.2f}s, max {max(walls):.2f}s); "
            f"CPU user+sys median {statistics.median(cpus):.2f}s (min {min(cpus):.2f}s, max {max(cpus):.2f}s)"
        )


def search_process_seconds(args: list[str], src: Path) -> tuple[float, float]:
    """Wall and CPU (user + sys) seconds of one `cbir` process running from the source tree `src`."""
    import resource

    env = {**os.environ, "PYTHONPATH": str(src), "CBIR_NO_PROGRESS": "1"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "cbir.cli", *args], env=env, check=True, capture_output=True)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime


def clustered_vectors(n: int, dim: int, rng: np.random.Generator, centres: np.ndarray) -> np.ndarray:
    """Unit vectors with the structure of real embeddings: a mixture of topics in a low-dimensional
    latent space (the centres' width), mapped into `dim` dimensions by a fixed projection, plus a
    little full-rank noise. (Isotropic noise in all 384 dimensions has no neighbour structure to find.)"""
    latent_dim = centres.shape[1]
    projection = np.random.default_rng(1).standard_normal((latent_dim, dim), dtype=np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        z = centres[rng.integers(0, len(centres), m)] + 0.5 * rng.standard_normal(
            (m, latent_dim), dtype=np.float32
        )
        x = z @ projection + 0.5 * rng.standard_normal((m, dim), dtype=np.float32)
        out[start : start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def ann(sizes: list[int], dim: int, queries: int) -> None:
    import faiss

    from cbir.ann import HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH, HNSW_M

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((1000, LATENT_DIM), dtype=np.float32)
    print(
        f"HNSW M={HNSW_M} efConstruction={HNSW_EF_CONSTRUCTION}, {dim}-d, "
        f"{faiss.omp_get_max_threads()} threads"
    )
    print(f"{'n':>9} {'build s':>8} {'efSearch':>8} {'recall@20':>9} {'ms/query':>8} {'exact ms/q':>10}")
    for n in sizes:
        base = clustered_vectors(n, dim, rng, centres)
        q = clustered_vectors(queries, dim, rng, centres)
        exact = faiss.IndexFlatIP(dim)
        exact.add(base)
        t = time.perf_counter()
        _, truth = exact.search(q, 20)
        exact_ms = (time.perf_counter() - t) * 1000 / queries
        graph = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        graph.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        t = time.perf_counter()
        graph.add(base)
        build = time.perf_counter() - t
        for ef in sorted({64, HNSW_EF_SEARCH, 256}):
            graph.hnsw.efSearch = ef
            t = time.perf_counter()
            _, found = graph.search(q, 20)
            ms = (time.perf_counter() - t) * 1000 / queries
            recall = np.mean([len(set(a) & set(b)) / 20 for a, b in zip(found, truth, strict=True)])
            print(f"{n:>9} {build:>8.1f} {ef:>8} {recall:>9.4f} {ms:>8.3f} {exact_ms:>10.3f}", flush=True)
        del graph, exact, base


def verify(sizes: list[int], dim: int) -> None:
    """What verifying shard checksums adds to opening an index: SHA-1 of one compacted shard
    (page cache warm, median of 5), for `dim`-d float32 vectors."""
    from cbir.index import file_hash

    with tempfile.TemporaryDirectory(dir=RUNS) as tmp:
        for n in sizes:
            path = Path(tmp) / f"{n}.npy"
            np.save(path, np.random.default_rng(0).random((n, dim), dtype=np.float32))
            times = []
            for _ in range(5):
                t = time.perf_counter()
                file_hash(path)
                times.append(time.perf_counter() - t)
            mb = path.stat().st_size / 1e6
            print(
                f"{n:>9} images, {dim}-d: {mb:8.1f} MB, sha1 median {statistics.median(times) * 1000:7.1f} ms"
            )
            path.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("what", choices=["throughput", "latency", "cold", "ann", "verify"])
    parser.add_argument(
        "--n", type=int, default=200, help="images (throughput), queries (latency), runs (cold, at most 30)"
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--model", default="default", help="cold: the index's model (default, zero-shot)")
    parser.add_argument(
        "--src",
        type=Path,
        action="append",
        help="cold: a source tree to time (repeatable, run in turn; default: this checkout's src)",
    )
    args = parser.parse_args()
    RUNS.mkdir(parents=True, exist_ok=True)
    if args.what == "throughput":
        throughput(args.n)
    elif args.what == "latency":
        latency(args.n)
    elif args.what == "cold":
        cold(min(args.n, 30), args.model, [p.resolve() for p in args.src or [REPO / "src"]])
    elif args.what == "verify":
        verify(args.sizes, args.dim)
    else:
        ann(args.sizes, args.dim, args.queries)


if __name__ == "__main__":
    main()
