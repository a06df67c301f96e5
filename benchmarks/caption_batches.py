"""How captions are batched: same-shape bulk batches against padded ones, packed tuning steps against padded.

    PYTHONPATH=src python -m benchmarks.caption_batches [--dataset ../shared/datasets/flickr8k] [--n 5000]

Part 1, bulk encoding (the forward passes of `TextEncoder._encode_distinct`'s batches): the same `n`
Flickr8k test captions, cache off, in padded batches of 64 sorted by length (how cached rows were
computed before) and in `same_shape_batches` (now), in ONNX Runtime and torch; sentences/s for each,
and how many rows change in their last bits when a random 900 of the first 1,200 captions are
encoded again without the others.
Part 2, tuning steps: forward and backward of MiniLM's last 2 layers over random batches of 256
Flickr8k train captions, padded (`torch_encoder_layer` without positions) against packed (the real
tokens only, `tunable_top`), seconds per step; and the largest difference of the pooled outputs.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from cbir.datasets import load_dataset
from cbir.encoders.text import (
    BULK_ROWS,
    TextEncoder,
    padded,
    padded_batches,
    same_shape_batches,
    torch_encoder_layer,
    torch_mean_pool,
)

FLICKR8K = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "flickr8k"


def encode(forward, ids: list[list[int]], batching: str) -> np.ndarray:
    """Rows of `ids` through `forward`, batched as `batching` says."""
    lengths = [len(t) for t in ids]
    batches = padded_batches(lengths, 64) if batching == "padded" else same_shape_batches(lengths, BULK_ROWS)
    out = np.zeros((len(ids), 384), np.float32)
    for chunk, real in batches:
        out[chunk[:real]] = forward(*padded([ids[j] for j in chunk]))[:real]
    return out


def bulk_encoding(captions: list[str]) -> None:
    encoder = TextEncoder(cache=False)
    network, ids = encoder.network(), encoder.token_ids(captions)
    again = np.random.default_rng(0).permutation(min(1200, len(ids)))[:900]
    for runtime in ("onnx", "torch"):
        forward = getattr(network, f"forward_{runtime}")
        forward(*padded(ids[:2]))  # load or export first
        for batching in ("padded", "same-shape"):
            start = time.perf_counter()
            rows = encode(forward, ids, batching)
            seconds = time.perf_counter() - start
            alone = encode(forward, [ids[j] for j in again], batching)
            changed = int((alone != rows[again]).any(1).sum())
            print(
                f"{runtime:5s} {batching:10s} {len(ids) / seconds:7.1f} sentences/s; "
                f"re-encoded without the others: {changed} of {len(again)} rows differ"
            )


def tuning_steps(captions: list[str], steps: int = 8) -> None:
    from cbir.models.text_tuning import CaptionStates

    encoder = TextEncoder(cache=False)
    network = encoder.network()
    states = CaptionStates(encoder, captions, below=network.layers - 2)
    top = network.tunable_top(2)

    def padded_top(x, keep):
        w = {name.replace("/", "."): v for name, v in top.params.items()}
        d = x.shape[-1]
        for i in range(network.layers - 2, network.layers):
            x = torch_encoder_layer(x, keep, w, f"encoder.layer.{i}.", network.heads, network.eps, d)
        return torch_mean_pool(x, keep)

    rng = np.random.default_rng(0)
    batch = states.batch(rng.choice(len(states), 256, replace=False))
    difference = (top(*batch) - padded_top(*batch)).abs().max().item()
    for name, forward in (("padded", padded_top), ("packed", top)):
        start = time.perf_counter()
        for _ in range(steps):
            forward(*states.batch(rng.choice(len(states), 256, replace=False))).sum().backward()
        print(f"tuning step {name:6s} {(time.perf_counter() - start) / steps:.3f} s")
    print(f"largest difference packed vs padded pooled output: {difference:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, default=FLICKR8K)
    parser.add_argument("--n", type=int, default=5000, help="test captions encoded in part 1")
    args = parser.parse_args()
    dataset = load_dataset(args.dataset)
    bulk_encoding(list(dict.fromkeys(dataset.split("test").captions))[: args.n])
    tuning_steps(dataset.split("train").captions[:4096])


if __name__ == "__main__":
    main()
