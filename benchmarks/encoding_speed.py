"""Photo encoding speed: torch as before against ONNX Runtime, decoding in turn or overlapped (issue 16).

    OMP_NUM_THREADS=2 python benchmarks/encoding_speed.py [--n 200] [--threads 1 2]
    OMP_NUM_THREADS=2 python benchmarks/encoding_speed.py --backbones lite0 lite2 [--rounds 3]

The same Flickr8k photos, in one run, through `ImageEncoder.encode` with an empty feature cache for
each configuration (the network is loaded, and warmed up on other photos, before the clock starts);
then the network alone on the same photos already decoded. Prints photos/s of each, the ratio to
torch as before, the pipeline's rate against the network alone, and the largest difference between
the torch and ONNX Runtime features. With `--backbones`, the packaged EfficientNet-Lites instead, each
in ONNX Runtime with 2 decode threads (the default pipeline) and alone, taking turns in one run (issue 15).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from cbir.encoders.image import ImageEncoder
from cbir.feature_kinds import BACKBONES, DEFAULT_BACKBONE

FLICKR8K = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "flickr8k"
WARMUP = 16


def encoder(
    runtime: str, decode_threads: int, cache_dir: Path, backbone: str = DEFAULT_BACKBONE
) -> ImageEncoder:
    """A loaded, warmed-up encoder over an empty feature cache (the exported network is shared)."""
    enc = ImageEncoder(cache_dir=cache_dir, runtime=runtime, decode_threads=decode_threads, backbone=backbone)
    backbone_rate(enc, decoded(enc, warmup_photos()))
    return enc


def decoded(enc: ImageEncoder, photos: list[Path]) -> np.ndarray:
    """The photos' center views as `enc` reads them."""
    return np.stack([enc.prepare(p.read_bytes(), "center") for p in photos])


def warmup_photos() -> list[Path]:
    return sorted((FLICKR8K / "images").glob("*.jpg"))[-WARMUP:]


def pipeline_rate(enc: ImageEncoder, photos: list[Path]) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    feats = enc.encode(photos, progress=False)
    return len(photos) / (time.perf_counter() - start), feats.rows


def backbone_rate(enc: ImageEncoder, pixels: np.ndarray) -> float:
    """The network alone on decoded photos, in the pipeline's batches."""
    start = time.perf_counter()
    for i in range(0, len(pixels), enc.batch_size):
        enc._forward(pixels[i : i + enc.batch_size])
    return len(pixels) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="decode threads to try")
    parser.add_argument("--backbones", nargs="+", choices=list(BACKBONES), help="compare these networks")
    parser.add_argument("--rounds", type=int, default=3, help="turns each network takes (--backbones)")
    args = parser.parse_args()
    photos = sorted((FLICKR8K / "images").glob("*.jpg"))[: args.n]
    if args.backbones:
        compare_backbones(photos, args.backbones, args.rounds)
        return
    ImageEncoder(runtime="onnx")._network()  # exports the network on a first run (not timed)
    print(f"{len(photos)} Flickr8k photos, load average {os.getloadavg()[0]:.1f} at the start")
    configs = [("torch, 1 decode thread (as before)", "torch", 1), ("onnx, decoding in turn", "onnx", 0)]
    configs += [(f"onnx, {t} decode thread(s)", "onnx", t) for t in args.threads]
    rates, rows = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, runtime, threads) in enumerate(configs):
            enc = encoder(runtime, threads, Path(tmp) / str(i))
            rates[label], rows[runtime] = pipeline_rate(enc, photos)
            if runtime == "torch" or threads == 0:
                rates[f"{runtime} network alone"] = backbone_rate(enc, decoded(enc, photos))
    before = rates[configs[0][0]]
    for label, rate in rates.items():
        print(f"{label:38s} {rate:6.1f} photos/s  {rate / before:5.2f}x")
    best = max((label for label, _, t in configs[2:]), key=rates.__getitem__)
    print(f"best overlapped pipeline / onnx network alone: {rates[best] / rates['onnx network alone']:.2f}")
    print(f"max |torch - onnx| over the features: {np.abs(rows['torch'] - rows['onnx']).max():.1e}")
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


def compare_backbones(photos: list[Path], backbones: list[str], rounds: int) -> None:
    """Each network's pipeline (ONNX Runtime, 2 decode threads) and network-alone rates on the same
    photos, the networks taking turns for `rounds` rounds (so a change of load falls on all of them);
    the median of each. Exports happen before the clock starts."""
    encoders = {name: ImageEncoder(runtime="onnx", backbone=name) for name in backbones}
    for enc in encoders.values():
        enc._network()
    print(f"{len(photos)} Flickr8k photos, load average {os.getloadavg()[0]:.1f} at the start")
    rates: dict[str, list[tuple[float, float]]] = {name: [] for name in backbones}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(rounds):
            for name in backbones:
                enc = encoder("onnx", 2, Path(tmp) / f"{name}-{round_}", name)
                rate, _ = pipeline_rate(enc, photos)
                rates[name].append((rate, backbone_rate(enc, decoded(enc, photos))))
    for name, runs in rates.items():
        pipeline, alone = np.median(runs, axis=0)
        each = ", ".join(f"{r:.1f}/{a:.1f}" for r, a in runs)
        print(
            f"{name} ({BACKBONES[name].input_size} px): pipeline {pipeline:5.1f} photos/s, network alone "
            f"{alone:5.1f} photos/s (median of {rounds} rounds: {each})"
        )
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
