"""Retrieval metrics as the RSICD literature and the Kaggle competition compute them.

Ranks are 0-based (0 = first). Ties are broken *against* the relevant item: an item tied with the
truth counts as ranked above it, so a constant scorer gets the worst rank, never a lucky one. A NaN
score (a diverged model) is the lowest possible score: a NaN truth ranks last, never first.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

RECALL_KS = (1, 5, 10, 20)


def _nan_as_lowest(scores: np.ndarray) -> np.ndarray:
    """NaN compares false with everything, which would rank a NaN truth first; make it -inf."""
    scores = np.asarray(scores, dtype=np.float64)
    return np.where(np.isnan(scores), -np.inf, scores)


def text_to_image_ranks(scores: np.ndarray, caption_image: np.ndarray) -> np.ndarray:
    """scores (n_captions, n_images); rank of each caption's own image among all images."""
    scores = _nan_as_lowest(scores)
    truth = scores[np.arange(len(scores)), caption_image]
    return (scores >= truth[:, None]).sum(1) - 1


def image_to_text_ranks(scores: np.ndarray, caption_image: np.ndarray) -> np.ndarray:
    """scores (n_captions, n_images); per image, the rank of its best-ranked caption among all captions.

    A hit at K when any of the image's captions is in the top K. Images without captions get -1.
    """
    scores = _nan_as_lowest(scores)
    n_images = scores.shape[1]
    ranks = np.full(n_images, -1, dtype=np.int64)
    for i in range(n_images):
        col = scores[:, i]
        own = caption_image == i
        if not own.any():
            continue
        best = col[own].max()
        ranks[i] = int((col[~own] >= best).sum())
    return ranks


def recall_at(ranks: np.ndarray, k: int) -> float:
    """Share of queries (percent) whose truth ranks within the top k."""
    ranks = np.asarray(ranks)
    return float(100.0 * (ranks < k).mean()) if len(ranks) else 0.0


def mr_standard_error(scores: np.ndarray, caption_image: Sequence[int] | np.ndarray) -> float:
    """Standard error of mR, captions and images taken as independent samples: val mR differences
    below it are noise, so model selection may prefer the simpler or more robust model within it.

    mR is the mean of the two directions' per-query hit rates, each query's being its mean R@1/5/10 hit
    (percent), so the error is half the root of the two means' squared standard errors."""
    caption_image = np.asarray(caption_image, dtype=np.int64)
    i2t = image_to_text_ranks(scores, caption_image)
    per_query = [_mean_hit(text_to_image_ranks(scores, caption_image)), _mean_hit(i2t[i2t >= 0])]
    return float(0.5 * np.sqrt(sum(np.var(h, ddof=1) / len(h) for h in per_query)))


def _mean_hit(ranks: np.ndarray) -> np.ndarray:
    return 100.0 * np.mean([ranks < k for k in (1, 5, 10)], axis=0)


def map_at_20(ranks: np.ndarray) -> float:
    """Kaggle cs5785's MAP@20 with one relevant image: 1/(1+rank) inside the top 20, else 0."""
    ranks = np.asarray(ranks)
    return float(np.where(ranks < 20, 1.0 / (1.0 + ranks), 0.0).mean()) if len(ranks) else 0.0


def mrr(ranks: np.ndarray) -> float:
    return float((1.0 / (1.0 + np.asarray(ranks))).mean()) if len(ranks) else 0.0


def median_rank(ranks: np.ndarray) -> float:
    """Median 1-based rank (the literature's medr)."""
    return float(np.median(np.asarray(ranks) + 1)) if len(ranks) else 0.0


def retrieval_metrics(scores: np.ndarray, caption_image: Sequence[int] | np.ndarray) -> dict[str, float]:
    """Every reported number from one (captions x images) score matrix.

    Keys: t2i_r1/5/10/20, i2t_r1/5/10/20 (percent), mR (mean of the six R@1/5/10), map20, mrr,
    r20 (= t2i_r20), medr (text->image), i2t_medr, n_images, n_queries.
    """
    caption_image = np.asarray(caption_image, dtype=np.int64)
    if (caption_image < 0).any():
        raise ValueError("every caption needs its image to be scored (caption_image >= 0)")
    t2i = text_to_image_ranks(scores, caption_image)
    i2t = image_to_text_ranks(scores, caption_image)
    i2t = i2t[i2t >= 0]
    out: dict[str, float] = {}
    for k in RECALL_KS:
        out[f"t2i_r{k}"] = recall_at(t2i, k)
    for k in RECALL_KS:
        out[f"i2t_r{k}"] = recall_at(i2t, k)
    out["mR"] = float(np.mean([out[f"{d}_r{k}"] for d in ("t2i", "i2t") for k in (1, 5, 10)]))
    out["map20"] = map_at_20(t2i)
    out["mrr"] = mrr(t2i)
    out["r20"] = out["t2i_r20"]
    out["medr"] = median_rank(t2i)
    out["i2t_medr"] = median_rank(i2t)
    out["n_images"] = int(scores.shape[1])
    out["n_queries"] = int(scores.shape[0])
    return out
