"""How well calibrated are the scores? Expected calibration error on the test split, and a diagram.

    python benchmarks/calibration.py [--case default@../shared/datasets/flickr8k]
                                     [--case runs/rsicd-contrastive@../shared/datasets/rsicd]
                                     [--png docs/calibration.png] [--json runs/calibration.json]

Each case is MODEL@DATASET: a model (directory or name) that carries a calibration fitted on the val
split (`cbir train`, `cbir calibrate`), scored on the test split of the dataset with the same pair
construction as the fit (every caption with its photo; 10 other photos per caption, weighted so both
classes weigh the same: the even prior of cbir.calibration). Prints, per case, the expected
calibration error (15 equal-width bins) of the calibrated scores and, for comparison, of the raw
similarity read as a probability, and draws a reliability diagram per case into one PNG.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATASETS = Path(os.path.relpath(REPO.parent / "shared" / "datasets"))
CASES = [f"default@{DATASETS / 'flickr8k'}", f"runs/rsicd-contrastive@{DATASETS / 'rsicd'}"]


def score_case(spec: str) -> dict:
    from cbir.calibration import reliability, scored_pairs
    from cbir.datasets import load_dataset
    from cbir.models import load_model

    model_spec, _, dataset = spec.rpartition("@")
    model = load_model(model_spec)
    if model.calibration is None:
        sys.exit(f"error: {model_spec} has no calibration; add one with `cbir calibrate`")
    data = load_dataset(dataset)
    pairs = scored_pairs(model, data.split("test"))
    probabilities = model.calibration.probability(pairs.similarities)
    ece, rows = reliability(probabilities, pairs)
    raw_ece, _ = reliability(np.clip(pairs.similarities, 0, 1), pairs)  # read as a probability
    match = pairs.labels == 1
    p_match, p_other = probabilities[match], probabilities[~match]
    c = model.calibration
    return {
        "model": model_spec, "method": model.method, "dataset": data.name,
        "fitted_on": f"{c.dataset} {c.split} ({c.positives} + {c.negatives} pairs)",
        "similarity_at_even_odds": -c.intercept / c.slope,
        "test_pairs": [int(match.sum()), int((~match).sum())],
        "ece": ece, "ece_raw_similarity": raw_ece,
        "mean_p_match": float(p_match.mean()), "mean_p_other": float(p_other.mean()),
        "match_over_half": float((p_match >= 0.5).mean()), "other_over_half": float((p_other >= 0.5).mean()),
        "bins": rows,
    }  # fmt: skip


def diagram(results: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.2 * len(results), 5), squeeze=False)
    for ax, r in zip(axes[0], results, strict=True):
        predicted = [b["predicted"] for b in r["bins"]]
        observed = [b["observed"] for b in r["bins"]]
        share = np.array([b["share"] for b in r["bins"]])
        ax.plot([0, 1], [0, 1], "--", color="#999999", label="perfectly calibrated")
        ax.plot(predicted, observed, "o-", color="#d73027", label="calibrated score")
        ax.bar(predicted, share, width=1 / 15, alpha=0.25, color="#4575b4", label="share of pairs")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("score (predicted P(match))")
        ax.set_ylabel("observed fraction of matches")
        ax.set_title(f"{r['method']} on {r['dataset']} test · ECE {r['ece']:.3f}", fontsize=11)
        ax.legend(loc="upper left", fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", action="append", help="MODEL@DATASET (repeatable)")
    parser.add_argument("--png", type=Path, default=REPO / "docs" / "calibration.png")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = [score_case(spec) for spec in args.case or CASES]
    print(
        "| model | test data | fitted on | similarity at P=0.5 | ECE | ECE of raw similarity "
        "| mean P: matches / others | P ≥ 0.5: matches / others |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['method']} ({r['model']}) | {r['dataset']} test, "
            f"{r['test_pairs'][0]} + {r['test_pairs'][1]} pairs | {r['fitted_on']} | "
            f"{r['similarity_at_even_odds']:.3f} | **{r['ece']:.3f}** | "
            f"{r['ece_raw_similarity']:.3f} | {r['mean_p_match']:.2f} / {r['mean_p_other']:.2f} | "
            f"{r['match_over_half']:.0%} / {r['other_over_half']:.0%} |"
        )
    diagram(results, args.png)
    print(f"reliability diagram → {args.png}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
