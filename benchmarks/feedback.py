"""Relevance feedback (Rocchio) with simulated users on RSICD: precision@20 before and after feedback.

Every caption of a split queries that split's photos. A photo is relevant when its scene class (the
RSICD tag) is the class of the caption's own photo. One round of feedback marks the 20 results shown
good or bad by class and re-ranks with `cbir.feedback.Rocchio`; a second round marks the 20 results of
the re-ranked list too (all marks so far count). The Rocchio weights are tuned on val, reported on test.

    PYTHONPATH=src python -m benchmarks.feedback --model runs/rsicd-contrastive
    # cbir train --dataset ../shared/datasets/rsicd --method contrastive --out runs/rsicd-contrastive
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np

from cbir.datasets import load_dataset
from cbir.feedback import DEFAULT_FEEDBACK, Rocchio
from cbir.models import load_model

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
SHOWN = 20  # results a user sees and marks, and the depth of precision
BETAS = (0.25, 0.5, 1.0, 2.0, 4.0)
GAMMAS = (0.0, 0.25, 0.5, 1.0)
QUERY_BLOCK = 1024  # queries scored at once (memory: block x images floats)


def unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def top(queries: np.ndarray, images: np.ndarray, n: int = SHOWN) -> np.ndarray:
    """Row indices of the n best images per query, best first."""
    scores = unit_rows(queries) @ images.T
    best = np.argpartition(-scores, n - 1, axis=1)[:, :n]
    order = np.argsort(-np.take_along_axis(scores, best, axis=1), axis=1, kind="stable")
    return np.take_along_axis(best, order, axis=1)


def refine(rocchio: Rocchio, queries: np.ndarray, images: np.ndarray, marks: np.ndarray) -> np.ndarray:
    """Rocchio for every query at once; `marks` is +1 good / -1 bad / 0 unmarked, per query x image."""
    good, bad = (marks > 0).astype(np.float32), (marks < 0).astype(np.float32)
    mean_good = (good @ images) / np.maximum(good.sum(1, keepdims=True), 1)
    mean_bad = (bad @ images) / np.maximum(bad.sum(1, keepdims=True), 1)
    return rocchio.alpha * unit_rows(queries) + rocchio.beta * mean_good - rocchio.gamma * mean_bad


def simulate(rocchio: Rocchio, queries: np.ndarray, images: np.ndarray, relevant: np.ndarray) -> list[float]:
    """Mean precision@20 before feedback, after one round and after two rounds."""
    precisions = np.zeros(3)
    for start in range(0, len(queries), QUERY_BLOCK):
        q, rel = queries[start : start + QUERY_BLOCK], relevant[start : start + QUERY_BLOCK]
        marks = np.zeros(rel.shape, dtype=np.int8)
        shown = top(q, images)
        rows = np.arange(len(q))[:, None]
        precisions[0] += rel[rows, shown].sum()
        for round_ in (1, 2):
            marks[rows, shown] = np.where(rel[rows, shown], 1, -1)
            shown = top(refine(rocchio, q, images, marks), images)
            precisions[round_] += rel[rows, shown].sum()
    return list(100 * precisions / (len(queries) * SHOWN))


def split_vectors(
    model, data, split: str, query_images: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(caption vectors, unit image vectors, relevance captions x images) of the tagged captions; with
    `query_images` 0 or 1, only the captions of the even or odd photos query (all photos are searched)."""
    part = data.split(split)
    classes = np.array([tags[0] if tags else "" for tags in part.tags])
    keep = np.flatnonzero((part.caption_image >= 0) & (classes[np.maximum(part.caption_image, 0)] != ""))
    if query_images is not None:
        keep = keep[part.caption_image[keep] % 2 == query_images]
    images = unit_rows(model.embed_images(part))
    queries = model.embed_texts([part.captions[j] for j in keep])
    relevant = classes[part.caption_image[keep]][:, None] == classes[None, :]
    return queries, images, relevant & (classes[None, :] != "")


def tune(queries: np.ndarray, images: np.ndarray, relevant: np.ndarray) -> tuple[Rocchio, list[dict]]:
    """The Rocchio weights with the best precision after one round (alpha fixed at 1)."""
    rows = []
    for beta, gamma in itertools.product(BETAS, GAMMAS):
        p0, p1, p2 = simulate(Rocchio(1.0, beta, gamma), queries, images, relevant)
        rows.append({"beta": beta, "gamma": gamma, "p20": p0, "p20_round1": p1, "p20_round2": p2})
    best = max(rows, key=lambda r: r["p20_round1"])
    return Rocchio(1.0, best["beta"], best["gamma"]), rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="runs/rsicd-contrastive", help="model directory trained on RSICD")
    parser.add_argument("--dataset", type=Path, default=SHARED / "rsicd")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-feedback.json"))
    parser.add_argument(
        "--val-only",
        action="store_true",
        help="no test split: tune on the captions of val's even photos, report on those of its odd photos",
    )
    args = parser.parse_args()
    start = time.perf_counter()
    model, data = load_model(args.model), load_dataset(args.dataset)
    val = split_vectors(model, data, "val", 0 if args.val_only else None)
    tuned, grid = tune(*val)
    test = split_vectors(model, data, "val", 1) if args.val_only else split_vectors(model, data, "test")
    report = {
        "model": str(args.model),
        "queries": {"val": len(val[0]), "test": len(test[0])},
        "tuned_on_val": {"alpha": tuned.alpha, "beta": tuned.beta, "gamma": tuned.gamma},
        "val_grid": grid,
        "test": {
            "tuned": simulate(tuned, *test),
            "shipped default": simulate(DEFAULT_FEEDBACK, *test),
        },
        "seconds": round(time.perf_counter() - start, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"tuned on val: alpha=1 beta={tuned.beta} gamma={tuned.gamma} ({len(val[0])} captions)")
    print("| Rocchio weights (alpha, beta, gamma) | P@20 before | after 1 round | after 2 rounds |")
    print("|---|---:|---:|---:|")
    for label, rocchio in (("tuned on val", tuned), ("shipped default", DEFAULT_FEEDBACK)):
        p0, p1, p2 = report["test"]["tuned" if label == "tuned on val" else "shipped default"]
        weights = f"{rocchio.alpha:g}, {rocchio.beta:g}, {rocchio.gamma:g}"
        print(f"| {label}: {weights} | {p0:.2f} | {p1:.2f} (+{p1 - p0:.2f}) | {p2:.2f} (+{p2 - p0:.2f}) |")
    reported = "val captions of the odd photos" if args.val_only else "test captions"
    print(f"({len(test[0])} {reported}, {report['seconds']} s) → {args.out}")


if __name__ == "__main__":
    main()
