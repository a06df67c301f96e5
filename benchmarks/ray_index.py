"""Indexing speed: the local encode stage against a local Ray (cbir.distributed) with 2 workers.

    python -m benchmarks.ray_index [--dataset ../shared/datasets/flickr8k] [--n 200] [--workers 2]

The same n Flickr8k photos (copied into a temporary folder) are indexed with the default model twice,
one after the other in one run, each in a new process with its own empty feature cache: locally, then on
a local Ray started by that process (each actor one thread; the local run as OMP_NUM_THREADS says,
by default all cores). Prints photos/s over the whole run (start-up included) and, for
Ray, also after Ray is up (its start-up apart), and the ratio Ray / local.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FLICKR8K = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "flickr8k"


def run_one(mode: str, folder: Path, out: Path, workers: int) -> None:
    """In this (new) process: index `folder`, locally or on a new local Ray; print the timings as JSON."""
    start = time.perf_counter()
    encode = None
    if mode == "ray":
        from cbir.distributed import connect, ray_encode_chunks

        connect(workers=workers)
        encode = ray_encode_chunks(workers=workers)
    up = time.perf_counter()
    from cbir.index import update_index

    ix, report = update_index(folder, out, progress=False, encode=encode)
    end = time.perf_counter()
    print(
        json.dumps(
            {"images": len(ix), "failed": len(report.failed), "total_s": end - start, "up_s": up - start}
        )
    )


def measure(mode: str, folder: Path, tmp: Path, workers: int) -> dict[str, float]:
    env = {**os.environ, "CBIR_CACHE_DIR": str(tmp / f"cache-{mode}"), "CBIR_NO_PROGRESS": "1"}
    if mode == "ray":  # Ray gives each 1-CPU actor one thread unless OMP_NUM_THREADS says otherwise
        env.pop("OMP_NUM_THREADS", None)
    args = [sys.executable, "-m", "benchmarks.ray_index", "--one", mode, "--folder", str(folder)]
    args += ["--out", str(tmp / f"index-{mode}"), "--workers", str(workers)]
    done = subprocess.run(args, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"{mode} run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, default=FLICKR8K)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--one", choices=("local", "ray"), help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        run_one(args.one, args.folder, args.out, args.workers)
        return
    with tempfile.TemporaryDirectory(prefix="cbir-ray-bench-") as name:
        tmp = Path(name)
        folder = tmp / "photos"
        folder.mkdir()
        for source in sorted((args.dataset / "images").glob("*.jpg"))[: args.n]:
            shutil.copy(source, folder / source.name)
        local = measure("local", folder, tmp, args.workers)
        ray = measure("ray", folder, tmp, args.workers)
    n = local["images"]
    local_rate, ray_rate = n / local["total_s"], n / ray["total_s"]
    ray_up_rate = n / (ray["total_s"] - ray["up_s"])
    lines = [
        f"{n} photos, empty caches: local {local_rate:.1f}/s ({local['total_s']:.1f} s)",
        f"Ray, {args.workers} workers: {ray_rate:.1f}/s ({ray['total_s']:.1f} s, "
        f"Ray start-up {ray['up_s']:.1f} s "
        f"of it; {ray_up_rate:.1f}/s once up)",
        f"ratio Ray / local: {ray_rate / local_rate:.2f} ({ray_up_rate / local_rate:.2f} once Ray is up)",
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
