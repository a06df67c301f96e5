"""Caption encoding speed: MiniLM in NumPy (the cold query path) against torch (the bulk path).

    python benchmarks/text_encoding.py [--dataset ../shared/datasets/flickr8k] [--n 2000]

Both encode the same Flickr8k captions, cache off, in one run; prints sentences/s for each, their
ratio and the largest difference between the two embeddings.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from cbir.datasets import load_dataset
from cbir.encoders.text import TextEncoder

FLICKR8K = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "flickr8k"


def rate(encoder: TextEncoder, captions: list[str], bulk: bool) -> tuple[float, np.ndarray]:
    """Sentences per second through `_embed` in batches, as `encode` batches them, and the vectors."""
    tokens = [e.ids for e in encoder._tokenizer.encode_batch(captions)]
    out = np.zeros((len(captions), encoder.dim), np.float32)
    start = time.perf_counter()
    for i in range(0, len(tokens), encoder.batch_size):
        out[i : i + encoder.batch_size] = encoder._embed(tokens[i : i + encoder.batch_size], bulk=bulk)
    return len(captions) / (time.perf_counter() - start), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, default=FLICKR8K)
    parser.add_argument("--n", type=int, default=2000)
    args = parser.parse_args()
    captions = sorted(load_dataset(args.dataset).captions[: args.n], key=len)  # batches of like length
    encoder = TextEncoder(cache=False)
    encoder._load()
    rate(encoder, captions[:64], bulk=True)  # warm-up: torch import, weight conversion
    numpy_rate, numpy_vectors = rate(encoder, captions, bulk=False)
    torch_rate, torch_vectors = rate(encoder, captions, bulk=True)
    diff = np.abs(numpy_vectors - torch_vectors).max()
    print(f"{len(captions)} captions: numpy {numpy_rate:.0f}/s, torch {torch_rate:.0f}/s, ", end="")
    print(f"ratio {torch_rate / numpy_rate:.2f}x, max |diff| {diff:.1e}")


if __name__ == "__main__":
    main()
