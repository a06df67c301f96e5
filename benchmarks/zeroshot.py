"""Zero-shot (ConSE) text -> image retrieval: tune class texts, temperature and top-k on cs5785-mini
TRAIN captions, report R@1/5/10 on TEST (and on RSICD test with --rsicd, for reference).

    PYTHONPATH=src python -m benchmarks.zeroshot [--rsicd]
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

from cbir.datasets import load_dataset
from cbir.encoders import image_features, shared_text_encoder
from cbir.metrics import retrieval_metrics
from cbir.models import create_model

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
CLASS_TEXTS = ("photo", "description", "ensemble")
TEMPERATURES = (1.0, 2.0, 4.0)
TOP_K = (5, 10, 50, 1000)
CENTRE = (False, True)


def conse_scores(model, data) -> dict[str, float]:
    """t2i metrics of the ConSE part only (what text queries score against)."""
    images = model.concept_embeddings(image_features(data, "effnet-logits", progress=False))
    texts = shared_text_encoder().encode(data.captions, progress=False)
    return retrieval_metrics(texts @ images.T, data.caption_image)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rsicd", action="store_true", help="also score RSICD test (1,093 images)")
    args = parser.parse_args()
    mini = load_dataset(SHARED / "cs5785-mini")
    train, test = mini.split("train"), mini.split("test")
    rows = []
    for texts in CLASS_TEXTS:
        base = create_model("zero-shot", class_texts=texts).fit()
        for t, k, c in itertools.product(TEMPERATURES, TOP_K, CENTRE):
            model = create_model("zero-shot", class_texts=texts, temperature=t, top_k=k, centre=c)
            model.class_embeddings_ = base.class_embeddings_
            m = conse_scores(model, train)
            t2i = (m["t2i_r1"] + m["t2i_r5"] + m["t2i_r10"]) / 3
            rows.append(
                {"class_texts": texts, "temperature": t, "top_k": k, "centre": c, "train_t2i_mean": t2i}
            )
    best = max(rows, key=lambda r: r["train_t2i_mean"])
    print("best on train:", json.dumps(best))
    default = create_model("zero-shot").params
    report = {}
    uncentred = {**default, "centre": False, "temperature": 1.0, "top_k": 10}
    for label, cfg in (("plain ConSE (T=1, k=10)", uncentred), ("default", default), ("best on train", best)):
        params = {k: cfg[k] for k in ("class_texts", "temperature", "top_k", "centre")}
        model = create_model("zero-shot", **params).fit()
        report[label] = {"params": params, "cs5785-mini test": conse_scores(model, test)}
        if args.rsicd:
            rsicd_test = load_dataset(SHARED / "rsicd").split("test")
            report[label]["rsicd test"] = conse_scores(model, rsicd_test)
    for texts in CLASS_TEXTS:  # the effect of the class texts alone, at the tuned T and k
        params = {k: best[k] for k in ("temperature", "top_k", "centre")}
        model = create_model("zero-shot", class_texts=texts, **params).fit()
        report[f"class_texts={texts}"] = {"cs5785-mini test": conse_scores(model, test)}
    print(f"{'config':28} {'data':18} {'R@1':>6} {'R@5':>6} {'R@10':>6} {'mR':>6}")
    for label, entry in report.items():
        for data, m in entry.items():
            if data != "params":
                recalls = " ".join(f"{m[key]:6.2f}" for key in ("t2i_r1", "t2i_r5", "t2i_r10", "mR"))
                print(f"{label:28} {data:18} {recalls}")
    print(json.dumps({k: v.get("params") for k, v in report.items() if "params" in v}))


if __name__ == "__main__":
    main()
