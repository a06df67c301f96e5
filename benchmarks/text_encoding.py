"""Caption encoding speed: MiniLM in NumPy (the cold query path) against torch and ONNX Runtime.

    OMP_NUM_THREADS=2 python benchmarks/text_encoding.py [--dataset ../shared/datasets/flickr8k] [--n 2000]

All encode the same Flickr8k captions, cache off, in one run; prints sentences/s for each in batches
(the bulk path), their ratio to NumPy and the largest difference to the NumPy embeddings; then one
sentence at a time (a search query, on one BLAS thread as search runs it) in NumPy and ONNX Runtime,
and the wall time of a new process that embeds one query (the cold start), each way.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from cbir.datasets import load_dataset
from cbir.encoders.text import TextEncoder

FLICKR8K = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "flickr8k"
RUNTIMES = ("numpy", "torch", "onnx")
# A new process that embeds one query the way `cbir search` does (`runtime` substituted).
COLD = (
    "import time; t = time.perf_counter(); from cbir.encoders.text import TextEncoder; "
    "e = TextEncoder(cache=False); e._load(); "
    "e._embed([e._tokenizer.encode('a dog running on the beach').ids], '{runtime}'); "
    "print(time.perf_counter() - t)"
)


def rate(encoder: TextEncoder, tokens: list[list[int]], runtime: str, batch: int) -> tuple[float, np.ndarray]:
    """Sentences per second through `_embed` in batches of `batch`, and the vectors."""
    out = np.zeros((len(tokens), encoder.dim), np.float32)
    start = time.perf_counter()
    for i in range(0, len(tokens), batch):
        out[i : i + batch] = encoder._embed(tokens[i : i + batch], runtime)
    return len(tokens) / (time.perf_counter() - start), out


def cold_seconds(runtime: str, runs: int) -> float:
    code = COLD.replace("{runtime}", runtime)
    times = [
        float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
        for _ in range(runs)
    ]
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, default=FLICKR8K)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--queries", type=int, default=50, help="single sentences timed one by one")
    parser.add_argument("--cold-runs", type=int, default=3)
    args = parser.parse_args()
    captions = sorted(load_dataset(args.dataset).captions[: args.n], key=len)  # batches of like length
    encoder = TextEncoder(cache=False)
    encoder._load()
    tokens = [e.ids for e in encoder._tokenizer.encode_batch(captions)]
    for runtime in RUNTIMES:  # warm-up: imports, weight conversion, the export on a first run
        rate(encoder, tokens[:64], runtime, encoder.batch_size)
    rates, vectors = {}, {}
    for runtime in RUNTIMES:
        rates[runtime], vectors[runtime] = rate(encoder, tokens, runtime, encoder.batch_size)
    print(f"{len(captions)} captions in batches of {encoder.batch_size}:")
    for runtime in RUNTIMES:
        diff = np.abs(vectors[runtime] - vectors["numpy"]).max()
        ratio = rates[runtime] / rates["numpy"]
        print(f"  {runtime:6s} {rates[runtime]:6.0f}/s  {ratio:5.2f}x  max |diff| {diff:.1e}")
    queries = tokens[:: max(1, len(tokens) // args.queries)][: args.queries]
    for runtime in ("numpy", "onnx"):
        with threadpool_limits(1, user_api="blas"):  # as `SearchIndex.embed_texts` runs a query
            ms = [1000 / rate(encoder, [q], runtime, 1)[0] for q in queries]
        cold = cold_seconds(runtime, args.cold_runs)
        warm = statistics.median(ms)
        print(f"one query, {runtime}: p50 {warm:.1f} ms warm; new process {cold:.2f} s (median)")


if __name__ == "__main__":
    main()
