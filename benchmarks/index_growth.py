"""Time to add 1,000 photos to an index of 10k and of 1M photos, stage by stage (issue 16): flat.

    PYTHONPATH=src OMP_NUM_THREADS=2 python -m benchmarks.index_growth --sizes 10000 1000000 --add 1000

Each index is synthetic: N entries written straight into the SQLite manifest (EXIF meta already
recorded), random unit vectors in one shard (its checksum recorded as checked), the shipped default
model copied in. Then, for each run kind of `--runs`, `--rounds` times, `--add` new (real, small) files
appear and are indexed: `add` names them to `cbir.indexing.add_paths` (what `cbir index --add` does);
`full` runs `cbir.indexing.index_folder` on the folder (what `cbir index` does, without opening the
result), which lists the folder and reads every entry. Two stages are stubbed so that the figure is the
index's own cost: the encode stage returns random vectors (not the network), and the N existing photos
are not files: the scan lists them from memory with the sizes and times the manifest holds (a real
scan stats every file, see `--scan-files`), next to the new files it really lists. The approximate
index is off (`ANN_THRESHOLD` above N) unless `--ann`: then the vectors (old and added) are clustered
like real embeddings (`benchmarks.search.clustered_vectors`), the index's approximate index (IVF-PQ
from 200k) is built once before the rounds (timed), the rounds show whether `_finish` keeps it, and
after them `--queries` queries from the same mixture are searched one at a time through the index's
searcher (approximate index + exact search of the photos added since), for p50/p99 latency and
recall@20 against exact search; then once more after a forced rebuild, for comparison.
Indexes go under runs/bench-index-growth/ (git-ignored) and are deleted after each size.
`--scan-files K` also times the real scan of K files on this disk.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import shutil
import statistics
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from cbir.manifest import ShardInfo

REPO = Path(__file__).resolve().parents[1]
RUNS = REPO / "runs" / "bench-index-growth"
PER_FOLDER = 1000
STAGES = (
    "photos_below",
    "prepare_generation",
    "check_shards",
    "lookup",
    "scan_folder",
    "plan_update",
    "commit_plan",
    "encode_and_commit",
    "compact",
    "_finish",
)


def write_files(root: Path, start: int, n: int) -> list[Path]:
    """`n` small files named after their number."""
    made = []
    for i in range(start, start + n):
        folder = root / f"d{i // PER_FOLDER:04d}"
        if i % PER_FOLDER == 0 or i == start:
            folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"p{i:07d}.jpg"
        path.write_bytes(i.to_bytes(4, "little"))
        made.append(path)
    return made


class Stat:
    """What the plan reads of a file's `os.stat_result`."""

    def __init__(self, size: int, mtime_ns: int):
        self.st_size, self.st_mtime_ns = size, mtime_ns


def synthetic_files(root: Path, n: int) -> list[tuple[str, Path, Stat]]:
    """The scan's listing of `n` photos that are not on disk: (id, path, stat)."""
    ids = (f"old/d{i // PER_FOLDER:04d}/p{i:07d}.jpg" for i in range(n))
    return [(i, root / i, Stat(4, 1_700_000_000_000_000_000 + row)) for row, i in enumerate(ids)]


def unit_vectors(m: int, dim: int, rng: np.random.Generator, centres: np.ndarray | None) -> np.ndarray:
    """Random unit vectors: isotropic, or around topic centres like real embeddings when given."""
    from benchmarks.search import clustered_vectors

    if centres is not None:
        return clustered_vectors(m, dim, rng, centres)
    block = rng.standard_normal((m, dim), dtype=np.float32)
    return block / np.linalg.norm(block, axis=1, keepdims=True)


def write_vectors(index_dir: Path, n: int, dim: int, rng: np.random.Generator, centres: np.ndarray | None):
    """One shard of `n` random unit vectors, written in blocks (a 1M x 898 shard is 3.6 GB)."""
    from cbir import indexing
    from cbir.manifest import ShardInfo, stat_signature

    name = f"{n}-synthetic.npy"
    path = index_dir / indexing.SHARDS / name
    out = np.lib.format.open_memmap(path, "w+", np.float32, (n, dim))
    for start in range(0, n, 50_000):
        out[start : start + min(50_000, n - start)] = unit_vectors(min(50_000, n - start), dim, rng, centres)
    out.flush()
    del out
    return ShardInfo(name, n, 0, -1, indexing.file_hash(path), stat_signature(path)), dim


def synthetic_index(
    index_dir: Path,
    root: Path,
    files: list[tuple[str, Path, Stat]],
    dim: int,
    rng: np.random.Generator,
    centres: np.ndarray | None,
) -> None:
    """An index of `files` (listed, not on disk) with random unit vectors, the shipped model copied in."""
    from cbir.indexing import SHARDS

    root.mkdir(parents=True)
    (index_dir / SHARDS).mkdir(parents=True)
    meta = {"taken": None, "camera": None}
    entries = (
        {"id": i, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha1": f"{row:040x}", "meta": meta}
        for row, (i, _, st) in enumerate(files)
    )
    write_manifest(
        index_dir, root, entries, write_vectors(index_dir, len(files), dim, rng, centres), "default"
    )


def write_manifest(
    index_dir: Path, root: Path, entries: Iterable[dict], shard: tuple[ShardInfo, int], model: Path | str
) -> None:
    """A new index: `entries` (id, size, mtime_ns, sha1, meta), row by row of one shard (with its
    vector size), and a copy of `model`, written through the manifest's own functions."""
    from cbir import indexing
    from cbir.manifest import ManifestWriter, add_shard, create_manifest, put_entries

    info, dim = shard
    create_manifest(index_dir, root)
    keys = indexing._install_model(index_dir, model)
    writer = ManifestWriter(index_dir)
    try:
        gen = writer.start({"root": str(root), **keys, "dim": dim}, live=True)
        with writer.commit() as conn:
            add_shard(conn, gen, info)
            put_entries(conn, gen, ({**e, "shard": info.name, "row": row} for row, e in enumerate(entries)))
    finally:
        writer.close()


def random_encode(dim: int, rng: np.random.Generator, centres: np.ndarray | None):
    """A stub `EncodeStage`: random unit vectors for every chunk, content keys from the file names."""
    from cbir.models.base import ImageEmbedding

    def encode(model_dir: Path, root: Path, chunks):
        for number, chunk in enumerate(chunks):
            vectors = unit_vectors(len(chunk), dim, rng, centres)
            keys = [hashlib.sha1(Path(p).name.encode()).hexdigest() for p in chunk]
            yield number, ImageEmbedding(vectors, keys, {})

    return encode


@contextlib.contextmanager
def stage_timers(seconds: dict[str, float], existing: list[tuple[str, Path, Stat]]):
    """Time each stage function of `cbir.indexing` (wrapped for the run, then restored); the scan
    lists `existing` from memory and the folder's real files."""
    from cbir import indexing
    from cbir.manifest import ManifestWriter

    real = {name: getattr(indexing, name) for name in STAGES}
    scan = indexing.scan_folder
    real["scan_folder"] = lambda root, report: [*existing, *scan(root, report)]
    real_load = ManifestWriter.load

    def timed(name):
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return real[name](*args, **kwargs)
            finally:
                seconds[name] += time.perf_counter() - start

        return run

    originals = {name: getattr(indexing, name) for name in STAGES}
    for name in STAGES:
        setattr(indexing, name, timed(name))
    real["load"] = real_load
    ManifestWriter.load = timed("load")
    try:
        yield
    finally:
        for name, function in originals.items():
            setattr(indexing, name, function)
        ManifestWriter.load = real_load


def refresh_ann(index_dir: Path) -> str | None:
    """`cbir.indexing.refresh_ann` on the live generation, timed: the approximate index's file name."""
    from cbir.indexing import refresh_ann
    from cbir.manifest import ManifestWriter

    writer = ManifestWriter(index_dir)
    try:
        start = time.perf_counter()
        name = refresh_ann(writer, writer.generations()[0]["gen"], index_dir)
        print(f"  approximate index {name} ready in {time.perf_counter() - start:.1f}s", flush=True)
        return name
    finally:
        writer.close()


def search_report(index_dir: Path, queries: np.ndarray, label: str) -> None:
    """Recall@20 against exact search and latency of one query at a time through the index's searcher."""
    from benchmarks.ann_scale import exact_neighbours, recall, timed_search
    from cbir.index import SearchIndex

    ix = SearchIndex.open(index_dir)
    searcher = ix._index()
    found, seconds = timed_search(searcher, queries)
    kind = type(searcher.searcher).__name__
    print(
        f"  {label}: {len(ix):,} photos, {len(searcher.uncovered):,} searched exactly beside {kind};"
        f" recall@20 {recall(found, exact_neighbours(ix.vectors, queries)):.4f} over {len(queries)} queries,"
        f" p50 {1e3 * np.median(seconds):.2f} ms, p99 {1e3 * np.percentile(seconds, 99):.2f} ms",
        flush=True,
    )


def measure(
    n: int, add: int, rounds: int, dim: int, runs: Sequence[str], queries: int = 0
) -> dict[str, list[dict[str, float]]]:
    """Build an index of `n`, then add `add` photos `rounds` times by each run kind; seconds per stage
    of each round, by run kind. `queries`: with the approximate index on, search that many (`--ann`)."""
    import cbir.ann
    from benchmarks.search import LATENT_DIM
    from cbir.indexing import add_paths, index_folder

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((1000, LATENT_DIM), dtype=np.float32) if queries else None
    base = RUNS / f"n{n}"
    shutil.rmtree(base, ignore_errors=True)
    root, index_dir = base / "photos", base / "index"
    start = time.perf_counter()
    existing = synthetic_files(root, n)
    synthetic_index(index_dir, root, existing, dim, rng, centres)
    print(f"synthetic index of {n:,} photos written in {time.perf_counter() - start:.1f}s", flush=True)
    if queries:
        built = refresh_ann(index_dir)
    else:
        cbir.ann.ANN_THRESHOLD = 10 * (n + add * rounds * len(runs))
    results: dict[str, list[dict[str, float]]] = {kind: [] for kind in runs}
    indexed = n
    for kind in runs:
        for r in range(rounds):
            new = write_files(root, indexed, add)
            options = {"progress": False, "encode": random_encode(dim, rng, centres)}
            seconds: dict[str, float] = defaultdict(float)
            with stage_timers(seconds, existing):
                start = time.perf_counter()
                if kind == "add":
                    report = add_paths(root, index_dir, new, "default", **options)
                else:
                    report = index_folder(root, index_dir, "default", **options)
                seconds["total"] = time.perf_counter() - start
            assert len(report.added) == add and report.unchanged == (indexed if kind == "full" else 0), report
            indexed += add
            results[kind].append(dict(seconds))
            print(f"  n={n:,} {kind} round {r + 1}: {seconds['total']:.2f}s", flush=True)
    if queries:
        from benchmarks.search import clustered_vectors
        from cbir.manifest import read_manifest

        kept = read_manifest(index_dir)["ann"]["name"] == built
        print(f"  after the rounds the approximate index is {'the same file' if kept else 'rebuilt'}")
        asked = clustered_vectors(queries, dim, rng, centres)
        search_report(index_dir, asked, "with the photos added since")
        cbir.ann.MAX_DELTA_SHARE = -1.0  # forces a rebuild over everything
        refresh_ann(index_dir)
        search_report(index_dir, asked, "right after a rebuild")
    shutil.rmtree(base, ignore_errors=True)
    return results


def real_scan_seconds(n: int) -> None:
    """The scan stage on `n` real files of this disk: seconds per file."""
    from cbir.indexing import IndexReport, scan_folder

    root = RUNS / "scan"
    shutil.rmtree(root, ignore_errors=True)
    write_files(root, 0, n)
    start = time.perf_counter()
    found = scan_folder(root, IndexReport())
    seconds = time.perf_counter() - start
    assert len(found) == n
    print(f"scan of {n:,} real files: {seconds:.2f}s, {1e6 * seconds / n:.0f} µs per file", flush=True)
    shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 1_000_000])
    parser.add_argument("--add", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", nargs="+", choices=("add", "full"), default=["add", "full"])
    parser.add_argument("--dim", type=int, default=None, help="vector size (default: the shipped model's)")
    parser.add_argument("--scan-files", type=int, default=0, help="also time a real scan of this many files")
    parser.add_argument("--ann", action="store_true", help="with the approximate index (clustered vectors)")
    parser.add_argument("--queries", type=int, default=200, help="searched with --ann")
    args = parser.parse_args()
    if args.scan_files:
        real_scan_seconds(args.scan_files)
    from cbir.models import load_model

    dim = args.dim or int(load_model("default").embed_texts(["a photo"]).shape[1])
    queries = args.queries if args.ann else 0
    table = {n: measure(n, args.add, args.rounds, dim, args.runs, queries) for n in args.sizes}
    rounds = f"median of {args.rounds} rounds [min-max]"
    for kind in args.runs:
        print(f"\nadding {args.add:,} photos by a {kind} run ({dim}-d vectors), seconds, {rounds}")
        print(f"| stage | {' | '.join(f'index of {n:,}' for n in args.sizes)} |")
        print(f"|---|{'---|' * len(args.sizes)}")
        for stage in ("load", *STAGES, "total"):
            cells = []
            for n in args.sizes:
                values = [r.get(stage, 0.0) for r in table[n][kind]]
                cells.append(f"{statistics.median(values):.3f} [{min(values):.3f}-{max(values):.3f}]")
            print(f"| {stage} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
