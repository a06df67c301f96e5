"""Train and evaluate every classical method (issue 3) on RSICD (official test split) and cs5785-mini.

    PYTHONPATH=src python benchmarks/classical.py [--only rsicd|kaggle] [--out runs/classical]

Each configuration is fitted on the train split (hyperparameters by validation mR on RSICD, by 3-fold
cross-validation on cs5785-mini, which has no validation split), saved under OUT/<dataset>/<name>,
and scored on the test split. Prints a Markdown table and writes OUT/<dataset>.json. Image and caption
features come from the feature cache (~/.cache/cbir); a cold cache adds their computation once.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from cbir.datasets import load_dataset
from cbir.evaluation import evaluate
from cbir.models import create_model

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
POOL_LOGITS = "effnet-pool+effnet-logits"

# name -> (method, params); fusion members name earlier entries (their saved directories).
TFIDF = {"text_features": "tfidf", "ngrams": 2}
RSICD_CONFIGS: dict[str, tuple[str, dict]] = {
    "ridge": ("ridge", {}),
    "ridge-bow": ("ridge", {"text_features": "bow", "image_features": POOL_LOGITS}),
    "ridge-tfidf-2gram": ("ridge", {**TFIDF, "image_features": POOL_LOGITS}),
    "ridge-word2vec": ("ridge", {"text_features": "word2vec", "image_features": POOL_LOGITS}),
    "ridge-glove": ("ridge", {"text_features": "glove", "image_features": POOL_LOGITS}),
    "ridge-i2t": ("ridge", {**TFIDF, "image_features": POOL_LOGITS, "direction": "image-to-text"}),
    "pls": ("pls", {**TFIDF, "image_features": POOL_LOGITS}),
    "cca": ("cca", {**TFIDF, "image_features": POOL_LOGITS}),
    "cca-euclidean": ("cca", {**TFIDF, "image_features": POOL_LOGITS, "metric": "euclidean"}),
    "kernel-ridge": ("kernel-ridge", {**TFIDF, "image_features": POOL_LOGITS}),
    "kernel-ridge-poly": ("kernel-ridge", {**TFIDF, "image_features": POOL_LOGITS, "kernel": "poly"}),
    "kernel-ridge-t2i": (
        "kernel-ridge",
        {**TFIDF, "image_features": POOL_LOGITS, "direction": "text-to-image"},
    ),
    "ridge-minilm-tfidf": ("ridge", {"text_features": "minilm+tfidf", "image_features": POOL_LOGITS}),
    "kernel-ridge-minilm": ("kernel-ridge", {"text_features": "minilm+tfidf", "image_features": POOL_LOGITS}),
    "fusion": ("fusion", {"members": ["ridge-tfidf-2gram", "ridge-i2t", "cca", "pls"]}),
}
# cs5785-mini: 80 training images, so every config is cheap; object tags join the image side.
KAGGLE_CONFIGS: dict[str, tuple[str, dict]] = {
    "ridge": ("ridge", {}),
    "ridge-tfidf-tags": ("ridge", {"text_features": "tfidf", "image_features": "effnet-pool+tags"}),
    "ridge-i2t": (
        "ridge",
        {"text_features": "minilm+tfidf", "image_features": "effnet-pool+tags", "direction": "image-to-text"},
    ),
    "pls": ("pls", {"text_features": "minilm+tfidf", "image_features": "effnet-pool+tags"}),
    "cca": ("cca", {"text_features": "minilm+tfidf", "image_features": "effnet-pool+tags"}),
    "kernel-ridge": ("kernel-ridge", {"text_features": "minilm+tfidf", "image_features": "effnet-pool+tags"}),
    "kernel-ridge-word2vec": (
        "kernel-ridge",
        {"text_features": "word2vec+glove", "image_features": "effnet-pool+tags"},
    ),
    "fusion": ("fusion", {"members": ["ridge-i2t", "cca", "kernel-ridge"]}),
}


def run(
    dataset_path: Path, configs: dict[str, tuple[str, dict]], out: Path, names: list[str] | None
) -> list[dict]:
    data = load_dataset(dataset_path)
    train = data.split("train")
    val = data.split("val") if "val" in data.splits else None
    rows: list[dict] = []
    out.mkdir(parents=True, exist_ok=True)
    for name, (method, params) in configs.items():
        if names and name not in names:
            continue
        params = dict(params)
        if method == "fusion":
            # RSICD: the members' saved models, weighted on val. Kaggle (no val): their configs,
            # so the weights can be chosen by cross-validation.
            params["members"] = [
                str(out / m) if val is not None else {"method": configs[m][0], **configs[m][1]}
                for m in params["members"]
            ]
        start = time.perf_counter()
        model = create_model(method, **params).fit(train, val)
        seconds = time.perf_counter() - start
        model.save(out / name)
        metrics = evaluate(model, data, "test")
        chosen = getattr(model, "hyperparameters_", None) or {"weights": getattr(model, "weights_", None)}
        rows.append(
            {
                "name": name,
                "method": method,
                "params": params,
                "chosen": chosen,
                "train_s": seconds,
                **metrics,
            }
        )
        print(json.dumps(rows[-1], default=str), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    head = "| config | method | t2i R@1 | R@5 | R@10 | i2t R@1 | R@5 | R@10 | mR | MAP@20 | train s |"
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        cells = [r["name"], r["method"]]
        cells += [f"{r[f'{d}_r{k}']:.2f}" for d in ("t2i", "i2t") for k in (1, 5, 10)]
        cells += [f"**{r['mR']:.2f}**", f"{r['map20']:.4f}", f"{r['train_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/classical"))
    parser.add_argument("--only", choices=("rsicd", "kaggle"))
    parser.add_argument("--configs", nargs="*", help="run only these config names (fusion needs its members)")
    args = parser.parse_args()
    for key, path, configs in (
        ("rsicd", SHARED / "rsicd", RSICD_CONFIGS),
        ("kaggle", SHARED / "cs5785-mini", KAGGLE_CONFIGS),
    ):
        if args.only and key != args.only:
            continue
        rows = run(path, configs, args.out / key, args.configs)
        results = args.out / f"{key}.json"
        earlier = json.loads(results.read_text()) if results.is_file() else []
        fresh = {r["name"] for r in rows}
        rows = [r for r in earlier if r["name"] not in fresh] + rows  # a partial rerun updates its rows
        results.write_text(json.dumps(rows, indent=2, default=str) + "\n")
        print(f"\n{path.name} (test split)\n\n{table(rows)}\n", flush=True)


if __name__ == "__main__":
    main()
