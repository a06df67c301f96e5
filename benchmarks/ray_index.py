"""Indexing speed: the local encode stage against a local Ray (cbir.distributed) with 2 workers; with
`--task train-features`, the same for filling the feature cache before training (`cbir train --ray`).

    python -m benchmarks.ray_index [--dataset ../shared/datasets/flickr8k] [--n 200] [--workers 2]
    python -m benchmarks.ray_index --task train-features --dataset ../shared/datasets/cs5785-mini

The same n Flickr8k photos (copied into a temporary folder) are indexed with the default model twice,
one after the other in one run, each in a new process with its own empty feature cache: locally, then on
a local Ray started by that process (each actor one thread; the local run as OMP_NUM_THREADS says,
by default all cores). Prints photos/s over the whole run (start-up included) and, for
Ray, also after Ray is up (its start-up apart), and the ratio Ray / local. `train-features` times, the
same way, computing the features the default `contrastive` method reads of the dataset (of `--n` photos
per split when given): locally as `fit` would, or on Ray into the cache (`fill_feature_cache`).
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


def run_one(task: str, mode: str, source: Path, out: Path, workers: int, n: int) -> None:
    """In this (new) process: index the folder `source` or compute the training features of the
    dataset `source`, locally or on a new local Ray; print the timings as JSON."""
    start = time.perf_counter()
    if mode == "ray":
        from cbir.distributed import connect

        connect(workers=workers)
    up = time.perf_counter()
    if task == "index":
        images, failed = index_folder(mode, source, out, workers)
    else:
        images, failed = training_features(mode, source, workers, n)
    end = time.perf_counter()
    print(json.dumps({"images": images, "failed": failed, "total_s": end - start, "up_s": up - start}))


def index_folder(mode: str, folder: Path, out: Path, workers: int) -> tuple[int, int]:
    from cbir.distributed import ray_encode_chunks
    from cbir.index import update_index

    encode = ray_encode_chunks(workers=workers) if mode == "ray" else None
    ix, report = update_index(folder, out, progress=False, encode=encode)
    return len(ix), len(report.failed)


def training_features(mode: str, dataset: Path, workers: int, n: int) -> tuple[int, int]:
    """The features `cbir train --method contrastive` reads, computed into the (empty) cache."""
    from cbir.cli import training_splits
    from cbir.datasets import load_dataset
    from cbir.distributed import fill_feature_cache
    from cbir.encoders import encode_images
    from cbir.models import create_model

    data = load_dataset(dataset)
    needs = create_model("contrastive").fit_image_views(*training_splits(data.sample(n) if n else data))
    if mode == "ray":
        failed = fill_feature_cache(needs, workers=workers, progress=False).failed
    else:
        failed = sum(len(encode_images(images, views, progress=False).failed) for images, views in needs)
    return len({path for images, _ in needs for path in images.images}), failed


def measure(task: str, mode: str, source: Path, tmp: Path, workers: int, n: int) -> dict[str, float]:
    env = {**os.environ, "CBIR_CACHE_DIR": str(tmp / f"cache-{mode}"), "CBIR_NO_PROGRESS": "1"}
    if mode == "ray":  # Ray gives each 1-CPU actor one thread unless OMP_NUM_THREADS says otherwise
        env.pop("OMP_NUM_THREADS", None)
    args = [sys.executable, "-m", "benchmarks.ray_index", "--task", task, "--one", mode]
    args += ["--folder", str(source), "--out", str(tmp / f"index-{mode}"), "--workers", str(workers)]
    args += ["--n", str(n)]
    done = subprocess.run(args, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"{mode} run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, default=FLICKR8K)
    parser.add_argument("--task", choices=("index", "train-features"), default="index")
    parser.add_argument("--n", type=int, default=None, help="photos (index: 200), or photos per split")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--one", choices=("local", "ray"), help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        run_one(args.task, args.one, args.folder, args.out, args.workers, args.n or 0)
        return
    with tempfile.TemporaryDirectory(prefix="cbir-ray-bench-") as name:
        tmp = Path(name)
        source, n = args.dataset, args.n or 0
        if args.task == "index":
            source, n = tmp / "photos", args.n or 200
            source.mkdir()
            for photo in sorted((args.dataset / "images").glob("*.jpg"))[:n]:
                shutil.copy(photo, source / photo.name)
        local = measure(args.task, "local", source, tmp, args.workers, n)
        ray = measure(args.task, "ray", source, tmp, args.workers, n)
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
