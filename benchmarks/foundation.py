"""Foundation benchmarks (issue 2): image-feature throughput of the full pipeline against the network
alone, text-embedding throughput, and the first method (`ridge`) on the RSICD test split.

    python -m benchmarks.foundation [--images 512] [--texts 2000] [--rounds 3] [--skip-ridge]

The pipeline (read file, hash, decode, resize, network) and the network alone on pre-made tensors are
timed in alternating rounds over the same images, so both see the same machine load; the ratio is
what is reported. Prints a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from datetime import date
from pathlib import Path

import numpy as np

os.environ.setdefault("CBIR_NO_PROGRESS", "1")
RSICD = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "rsicd"


def image_throughput(paths: list[Path], rounds: int) -> tuple[float, float]:
    from cbir.encoders.image import ImageEncoder, preprocess

    enc = ImageEncoder(cache=False)
    pixels = np.stack([preprocess(p.read_bytes()) for p in paths])
    net = enc._network()
    enc.encode(paths[: enc.batch_size * 2], progress=False)  # warm-up
    pipeline_s = model_s = 0.0
    for _ in range(rounds):
        start = time.perf_counter()
        enc.encode(paths, progress=False)
        pipeline_s += time.perf_counter() - start
        start = time.perf_counter()
        for i in range(0, len(pixels), enc.batch_size):
            net(pixels[i : i + enc.batch_size])
        model_s += time.perf_counter() - start
    n = len(paths) * rounds
    return n / pipeline_s, n / model_s


def text_throughput(texts: list[str]) -> float:
    from cbir.encoders import TextEncoder

    enc = TextEncoder(cache=False)
    enc.encode(texts[:8], progress=False)
    start = time.perf_counter()
    enc.encode(texts, progress=False)
    return len(texts) / (time.perf_counter() - start)


def ridge_on_rsicd() -> tuple[dict[str, float], float]:
    from cbir.datasets import load_dataset
    from cbir.evaluation import evaluate
    from cbir.models import create_model

    data = load_dataset(RSICD)
    start = time.perf_counter()
    model = create_model("ridge").fit(data.split("train"), data.split("val"))
    return evaluate(model, data, "test"), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--texts", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-ridge", action="store_true")
    args = parser.parse_args()

    from cbir.datasets import load_dataset

    data = load_dataset(RSICD)
    paths = data.sample(args.images).split("train").images[: args.images]
    texts = data.split("test").captions[: args.texts]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; date {date.today()}")
    pipe, model = image_throughput(paths, args.rounds)
    print(f"| image features, full pipeline (read+decode+resize+network) | {pipe:.1f} images/s |")
    print(f"| image features, network alone on pre-made tensors | {model:.1f} images/s |")
    print(f"| pipeline / network-alone | {100 * pipe / model:.1f} % |")
    rate = text_throughput(texts)
    print(f"| text embeddings (MiniLM, NumPy), {len(texts)} RSICD captions | {rate:.1f} sentences/s |")
    if not args.skip_ridge:
        m, seconds = ridge_on_rsicd()
        print("| method | t2i R@1 | R@5 | R@10 | i2t R@1 | R@5 | R@10 | mR | MAP@20 | medr | train+eval s |")
        print(
            f"| ridge | {m['t2i_r1']:.2f} | {m['t2i_r5']:.2f} | {m['t2i_r10']:.2f} | {m['i2t_r1']:.2f} | "
            f"{m['i2t_r5']:.2f} | {m['i2t_r10']:.2f} | {m['mR']:.2f} | {m['map20']:.4f} | {m['medr']:g} | "
            f"{seconds:.0f} |"
        )


if __name__ == "__main__":
    main()
