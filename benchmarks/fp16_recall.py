"""Would float16 shards cost recall? (issue 16: fp16 storage only where it costs nothing)

    PYTHONPATH=src OMP_NUM_THREADS=2 python -m benchmarks.fp16_recall

The shipped default model embeds Flickr8k's 1,000 test photos and its 5,000 test captions (features
from the cache, ~/.cache/cbir, when there). Each caption searches the photos exactly twice: against the
float32 vectors an index stores today, and against the same vectors rounded to float16 (what fp16
shards would hold). Printed: recall@20 of the float16 top 20 against the float32 top 20, the queries
whose top 20 differ (as a set, and in order), and text->image R@1 / R@20 with each.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
FLICKR8K = REPO.parent / "shared" / "datasets" / "flickr8k"
K = 20


def top_k(queries: np.ndarray, vectors: np.ndarray, k: int) -> np.ndarray:
    scores = queries @ vectors.T
    best = np.argpartition(-scores, k, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, best, axis=1), axis=1, kind="stable")
    return np.take_along_axis(best, order, axis=1)


def recall_at(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    return 100.0 * float(np.mean([t in row[:k] for row, t in zip(found, truth, strict=True)]))


def main() -> None:
    from cbir.datasets import load_dataset
    from cbir.models import load_model

    test = load_dataset(FLICKR8K).split("test")
    model = load_model("default")
    images = model.embed(test, progress=True).vectors.astype(np.float32)
    texts = np.asarray(model.embed_texts(test.captions), dtype=np.float32)
    texts /= np.maximum(np.linalg.norm(texts, axis=1, keepdims=True), 1e-12)  # as SearchIndex does
    half = images.astype(np.float16).astype(np.float32)
    exact, rounded = top_k(texts, images, K), top_k(texts, half, K)
    overlap = np.mean([len(set(a) & set(b)) / K for a, b in zip(exact, rounded, strict=True)])
    as_set = int(sum(set(a) != set(b) for a, b in zip(exact, rounded, strict=True)))
    in_order = int(np.sum(np.any(exact != rounded, axis=1)))
    print(f"{len(texts)} caption queries over {len(images)} photos, {images.shape[1]}-d, top {K}")
    print(f"recall@{K} of float16 against float32: {overlap:.5f}")
    print(f"queries whose top {K} differ: {as_set} as a set, {in_order} in order")
    print(f"max abs rounding error of a vector entry: {np.abs(images - half).max():.2e}")
    for name, found in (("float32", exact), ("float16", rounded)):
        r1 = recall_at(found, test.caption_image, 1)
        r20 = recall_at(found, test.caption_image, K)
        print(f"text->image with {name}: R@1 {r1:.2f}  R@{K} {r20:.2f}")


if __name__ == "__main__":
    main()
