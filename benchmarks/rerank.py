"""Search-time re-ranking (issue 15, item 3): each re-ranker of `cbir.rerank`, its parameters chosen on
val, against the plain inner-product ranking of the same model.

    python -m benchmarks.rerank --model src/cbir/models/default --dataset ../shared/datasets/flickr8k
    python -m benchmarks.rerank --model /tmp/rsicd-model --dataset ../shared/datasets/rsicd
    ... --split test --only none --only "dba k=2 w=0.1"     # configurations chosen on val, once on test

Both directions are re-ranked the same way (text->image: captions query photos, the gallery's
neighbours are photos and the bank holds training captions; image->text: the roles swapped), so mR
stays the mean of the six recalls. The bank: `--bank-size` training captions and photos (seeded),
embedded by the model. Per-query cost: one text query at a time against the split's photos on one BLAS
thread, the re-ranker's query-time work only (what is computed once per gallery, at index time, is
left out), median over `--timed` queries, beside the plain search (NumPy scores + top 100; no FAISS).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from cbir import rerank
from cbir.datasets import Dataset, load_dataset
from cbir.metrics import retrieval_metrics
from cbir.models import load_model
from cbir.models.base import unit_rows

SHORTLIST = 100  # every re-ranker re-scores each query's top 100


@dataclass
class Side:
    """One search direction: queries against a gallery, and a bank of training items in the queries'
    modality (captions for text queries), which describes each gallery item by its nearest entries."""

    queries: np.ndarray
    gallery: np.ndarray
    bank: np.ndarray


@dataclass
class Reranker:
    """`prepare` is the index-time part, once per gallery: the vectors searched and what the query-time
    part `apply(prepared, scores, queries)` needs."""

    prepare: Callable[[Side], tuple[np.ndarray, Any]]
    apply: Callable[[Any, np.ndarray, np.ndarray], np.ndarray]
    batch_only: bool = False

    def scores(self, side: Side) -> np.ndarray:
        gallery, prepared = self.prepare(side)
        return self.apply(prepared, side.queries @ gallery.T, side.queries)


def plain(side: Side) -> tuple[np.ndarray, Any]:
    return side.gallery, unit_rows(side.gallery)


def unchanged(prepared: Any, scores: np.ndarray, queries: np.ndarray) -> np.ndarray:
    return scores


def configurations() -> dict[str, Reranker]:
    """Name -> re-ranker; the grids are small on purpose (val has 500-1,100 photos)."""
    n = SHORTLIST
    configs: dict[str, Reranker] = {"none": Reranker(plain, unchanged)}
    for k in (1, 2, 3, 5, 10):
        for w in (0.1, 0.2, 0.3, 0.5, 1.0):
            configs[f"qe k={k} w={w}"] = Reranker(
                plain, lambda g, s, q, k=k, w=w: rerank.query_expansion(s, g, k, w, n)
            )
    for k in (1, 2, 3, 5):
        for w in (0.1, 0.2, 0.3, 0.5):
            configs[f"dba k={k} w={w}"] = Reranker(
                lambda side, k=k, w=w: (rerank.database_augmentation(side.gallery, k, w), None), unchanged
            )
    for k in (5, 10, 20):
        for w in (0.05, 0.1, 0.2, 0.5):
            configs[f"jaccard k={k} w={w}"] = Reranker(
                lambda side, k=k: (side.gallery, rerank.neighbours(side.gallery, k)),
                lambda near, s, q, k=k, w=w: rerank.neighbour_jaccard(s, near, k, w, n),
            )
    for k in (3, 5, 10):
        for w in (0.1, 0.2, 0.5, 1.0):
            configs[f"bank k={k} w={w}"] = Reranker(
                lambda side, k=k: (
                    side.gallery,
                    (unit_rows(side.bank), rerank.bank_neighbours(side.gallery, side.bank, k)),
                ),
                lambda b, s, q, w=w: rerank.bank_augmentation(s, q, b[0], b[1], w, n),
            )
    for t in (0.01, 0.02, 0.05, 0.1):
        configs[f"inverted softmax t={t} (batch)"] = Reranker(
            plain, lambda g, s, q, t=t: rerank.inverted_softmax(s, t), batch_only=True
        )
    return configs


def two_way_metrics(t2i: np.ndarray, i2t: np.ndarray, caption_image: np.ndarray) -> dict[str, float]:
    """Text->image figures from `t2i` (captions x photos), image->text from `i2t` (photos x captions),
    mR the mean of the six recalls."""
    forward, backward = retrieval_metrics(t2i, caption_image), retrieval_metrics(i2t.T, caption_image)
    out = {k: v for k, v in forward.items() if not k.startswith("i2t")}
    out.update({k: v for k, v in backward.items() if k.startswith("i2t")})
    out["mR"] = float(np.mean([out[f"{d}_r{k}"] for d in ("t2i", "i2t") for k in (1, 5, 10)]))
    return out


def bank(model, dataset: Dataset, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`size` training captions and photos (seeded), embedded by the model."""
    train = dataset.split("train")
    rng = np.random.default_rng(seed)
    captions = rng.choice(len(train.captions), min(size, len(train.captions)), replace=False)
    photos = np.sort(rng.choice(len(train.images), min(size, len(train.images)), replace=False))
    texts = model.embed_texts([train.captions[i] for i in captions])
    return texts, model.embed_images(train.subset(photos))


def per_query_ms(reranker: Reranker, side: Side, timed: int) -> tuple[float, float]:
    """Median ms per text query, one at a time: the plain search (scores + top 100) and the re-ranker's
    query-time work; its index-time part (`prepare`) is done before the clock starts."""
    if reranker.batch_only:
        return float("nan"), float("nan")
    gallery, prepared = reranker.prepare(side)
    search, extra = [], []
    with threadpool_limits(1, user_api="blas"):  # as SearchIndex embeds: one query, one thread
        for q in side.queries[:timed]:
            q = q[None]
            start = time.perf_counter()
            s = q @ gallery.T
            rerank.top_n(s, SHORTLIST)
            middle = time.perf_counter()
            rerank.top_n(reranker.apply(prepared, s, q), SHORTLIST)
            search.append(middle - start)
            extra.append(time.perf_counter() - middle)
    return 1000 * float(np.median(search)), 1000 * float(np.median(extra))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--dataset", type=Path, required=True)
    parser.add_argument("--split", default="val")
    parser.add_argument("--only", action="append", default=[], help="configuration name (prefix)")
    parser.add_argument("--bank-size", type=int, default=1000)
    parser.add_argument("--timed", type=int, default=200, help="queries timed one at a time")
    parser.add_argument("--out", type=Path, default=Path("runs/rerank.json"))
    args = parser.parse_args()

    model, dataset = load_model(args.model), load_dataset(args.dataset)
    data = dataset.split(args.split)
    texts, images = model.embed_texts(data.captions), model.embed_images(data)
    bank_texts, bank_images = bank(model, dataset, args.bank_size)
    t2i = Side(texts, images, bank_texts)
    i2t = Side(images, texts, bank_images)
    configs = {
        k: v for k, v in configurations().items() if not args.only or any(k.startswith(o) for o in args.only)
    }
    rows = []
    print(
        f"{args.model} on {args.dataset.name} ({args.split}):",
        f"{len(data.images)} photos, {len(texts)} captions",
    )
    print(
        f"| re-ranker | mR | {' | '.join(f'{d} R@{k}' for d in ('t2i', 'i2t') for k in (1, 5, 10))} | ",
        end="",
    )
    print("search ms | re-rank ms |\n|---|---|---|---|---|---|---|---|---|---|")
    for name, reranker in configs.items():
        m = two_way_metrics(reranker.scores(t2i), reranker.scores(i2t), data.caption_image)
        plain_ms, extra_ms = per_query_ms(reranker, t2i, args.timed)
        rows.append({"name": name, **m, "search_ms": plain_ms, "rerank_ms": extra_ms})
        print(
            f"| {name} | {m['mR']:.2f} | {m['t2i_r1']:.2f} | {m['t2i_r5']:.2f} | {m['t2i_r10']:.2f} | "
            f"{m['i2t_r1']:.2f} | {m['i2t_r5']:.2f} | {m['i2t_r10']:.2f} | {plain_ms:.3f} | {extra_ms:.3f} |",
            flush=True,
        )
    for family in dict.fromkeys(r["name"].split()[0] for r in rows):  # the best of each re-ranker
        best = max((r for r in rows if r["name"].split()[0] == family), key=lambda r: r["mR"])
        print(f"best {family} on {args.split}: {best['name']} (mR {best['mR']:.2f})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
