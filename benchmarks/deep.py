"""Deep methods (issue 4) on RSICD: train on the train split (val split for early stopping), score the
test split, and print one Markdown table row per configuration.

    python -m benchmarks.deep                       # every configuration below
    python -m benchmarks.deep --only contrastive    # those whose name starts with it

Columns: text->image and image->text R@1/5/10, mR, MAP@20 (every test caption queries the 1,093
test images), training time (wall clock and process CPU time; features already cached), and R@20 on
a 1,000-image pool (the first 1,000 test images, every caption of theirs as a query) to compare with
the original approach's ~65% "within the top 20" on 1,000 images.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from benchmarks.tables import chosen, config_args, print_table
from cbir.datasets import load_dataset
from cbir.evaluation import score_split
from cbir.metrics import retrieval_metrics
from cbir.models import create_model

RSICD = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "rsicd"
POOL = 1000
# Earlier configurations name their inputs explicitly, so their rows stay reproducible as defaults move.
FIRST_DROPOUT = {"dropout": 0.2, "input_dropout": 0.1}
POOL_MINILM = {
    "image_features": "effnet-pool",
    "text_features": "minilm",
    **FIRST_DROPOUT,
    "epochs": 12,
    "patience": 3,
}
POOL_LOGITS_4x20 = {
    "image_features": "effnet-pool+effnet-logits",
    "text_features": "minilm",
    **FIRST_DROPOUT,
    "ensemble": 4,
    "epochs": 20,
    "patience": 4,
}
ROTATIONS = ["center", "rot90", "rot180", "rot270"]
CONFIGS: dict[str, tuple[str, dict]] = {
    "autoencoder, MSE": ("autoencoder", {"loss": "mse"}),
    "autoencoder, triplet (semi-hard)": ("autoencoder", {"loss": "triplet"}),
    "contrastive, pool, MiniLM, 1 head, no bank": (
        "contrastive",
        {**POOL_MINILM, "ensemble": 1, "bank_size": 0},
    ),
    "contrastive, pool, MiniLM, 2 heads, bank": ("contrastive", {**POOL_MINILM}),
    "contrastive, pool+logits, MiniLM, 4 heads, 20 epochs, center view": (
        "contrastive",
        {**POOL_LOGITS_4x20},
    ),
    "contrastive, pool+logits, MiniLM, 4 heads, 20 epochs, rot90+hflip views": (
        "contrastive",
        {**POOL_LOGITS_4x20, "views": ["center", "rot90", "hflip"]},
    ),
    "contrastive, pool+logits, MiniLM, 4 heads, 20 epochs, rot90 view": (
        "contrastive",
        {**POOL_LOGITS_4x20, "views": ["center", "rot90"]},
    ),
    "contrastive, default but pool+logits only": (
        "contrastive",
        {"image_features": "effnet-pool+effnet-logits"},
    ),
    "contrastive, default but MiniLM only": ("contrastive", {"text_features": "minilm"}),
    "contrastive, default but dropout 0.2 / input 0.1": (
        "contrastive",
        {**FIRST_DROPOUT},
    ),
    "contrastive (default: pool+logits+stages, MiniLM+LSA, 2 heads)": ("contrastive", {}),
    "contrastive, default + 4 rotation views, center embedding": ("contrastive", {"views": ROTATIONS}),
    "contrastive, default + 4 rotation views, embed views 4 rotations": (
        "contrastive",
        {"views": ROTATIONS, "embed_views": ROTATIONS},
    ),
    "contrastive, default + 4 heads, 4 rotation views, embed views 4 rotations": (
        "contrastive",
        {"ensemble": 4, "views": ROTATIONS, "embed_views": ROTATIONS},
    ),
    # Issue 15: the levers that paid on everyday photos (Flickr8k), here on aerial ones.
    "contrastive, default on Lite2": ("contrastive", {"image_backbone": "lite2"}),
    "contrastive, default but 1 head": ("contrastive", {"ensemble": 1}),
    "contrastive, default but 1 head + MiniLM's last 2 layers tuned": (
        "contrastive",
        {"ensemble": 1, "text_tune_layers": 2},
    ),
}


def pool_recall_at_20(scores: np.ndarray, caption_image: np.ndarray) -> float:
    """Text->image R@20 among the first POOL test images, their captions as queries."""
    keep = caption_image < POOL
    return retrieval_metrics(scores[keep][:, :POOL], caption_image[keep])["t2i_r20"]


def run(name: str, method: str, params: dict, dataset) -> dict:
    model = create_model(method, **params)
    start, cpu_start = time.perf_counter(), time.process_time()
    model.fit(dataset.split("train"), dataset.split("val"))
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    test = dataset.split("test")
    scores = score_split(model, test)
    metrics = retrieval_metrics(scores, test.caption_image)
    metrics.update(name=name, method=method, params=params, train_s=seconds, train_cpu_s=cpu_seconds)
    metrics["pool1000_r20"] = pool_recall_at_20(scores, test.caption_image)
    return metrics


def row(m: dict) -> str:
    cells = [m["name"]]
    cells += [f"{m[f'{d}_r{k}']:.2f}" for d in ("t2i", "i2t") for k in (1, 5, 10)]
    cells += [
        f"**{m['mR']:.2f}**",
        f"{m['map20']:.4f}",
        f"{m['train_s']:.0f} s / {m['train_cpu_s']:.0f} s",
        f"{m['pool1000_r20']:.1f}",
    ]
    return "| " + " | ".join(cells) + " |"


HEADER = (
    "| configuration | t2i R@1 | t2i R@5 | t2i R@10 | i2t R@1 | i2t R@5 | i2t R@10 | mR | MAP@20 "
    "| train time (wall / CPU) | R@20, 1,000-image pool |\n|" + "---|" * 11
)


def main() -> None:
    args = config_args(__doc__, RSICD, Path("runs/bench-deep.json"))
    dataset = load_dataset(args.dataset)
    selected = chosen(CONFIGS, args.only)
    results = []
    for name, (method, params) in selected.items():
        results.append(run(name, method, params, dataset))
        print(row(results[-1]), flush=True)
    print_table(results, row, HEADER, args.out)


if __name__ == "__main__":
    main()
