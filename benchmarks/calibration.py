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

Photo queries (search by photo, "more like this") are scored by the model's second curve: on the
test split every photo with captions queries itself and 10 random others, the target of a pair being
the text curve's mean P(match) of the query photo's captions with the other photo (cbir.calibration).
Their ECE is given for the photo curve and, for comparison, for the sentence curve (what photo
queries were scored by before they had their own). On data with scene classes (RSICD tags) the
share of photo-query pairs of the same class is given among pairs scored at or above 0.5 and below.
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


def photo_case(model, test, embedded) -> dict:
    """How photo-query scores fare on test: ECE of the photo curve and of the sentence curve, and on
    data with scene classes, how often the pairs at or above even odds share the query's class."""
    from cbir.calibration import photo_pair_rows, photo_pairs, reliability

    c = model.calibration
    pairs = photo_pairs(embedded, c)
    photo = c.probability(pairs.similarities, photo_share=1.0)
    report = {
        "photo_pairs": len(pairs.labels),
        "photo_similarity_at_even_odds": -c.photo_intercept / c.photo_slope,
        "photo_ece": reliability(photo, pairs)[0],
        "photo_ece_text_curve": reliability(c.probability(pairs.similarities), pairs)[0],
        "photo_mean_p_own_others": [float(photo[::11].mean()), float(np.delete(photo, np.s_[::11]).mean())],
    }
    classes = np.array([tags[0] if tags else "" for tags in test.tags or [()] * len(test.images)])
    if (classes != "").any():
        rows = photo_pair_rows(embedded)
        same = (classes[rows] == classes[rows[:, :1]]).ravel()
        tagged = ((classes[rows] != "") & (classes[rows[:, :1]] != "")).ravel()
        likely = photo >= 0.5
        report["photo_same_class_over_under_half"] = [
            float(same[tagged & likely].mean()),
            float(same[tagged & ~likely].mean()),
        ]
    return report


def score_case(spec: str) -> dict:
    from cbir.calibration import Embedded, reliability, text_pairs
    from cbir.datasets import load_dataset
    from cbir.models import load_model

    model_spec, _, dataset = spec.rpartition("@")
    model = load_model(model_spec)
    if model.calibration is None:
        sys.exit(f"error: {model_spec} has no calibration; add one with `cbir calibrate`")
    data = load_dataset(dataset)
    test = data.split("test")
    embedded = Embedded.of(model, test)
    pairs = text_pairs(embedded)
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
        **(photo_case(model, test, embedded) if c.photo_slope is not None else {}),
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


def print_photo_table(results: list[dict]) -> None:
    if not results:
        return
    print(
        "\n| model | test photo pairs | similarity at P=0.5 | ECE, photo curve | ECE, sentence curve "
        "| mean P: itself / others | same scene class: P ≥ 0.5 / P < 0.5 |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        classes = r.get("photo_same_class_over_under_half")
        shown = f"{classes[0]:.0%} / {classes[1]:.0%}" if classes else "(no classes)"
        own, others = r["photo_mean_p_own_others"]
        print(
            f"| {r['method']} ({r['model']}) on {r['dataset']} | {r['photo_pairs']} | "
            f"{r['photo_similarity_at_even_odds']:.3f} | **{r['photo_ece']:.3f}** | "
            f"{r['photo_ece_text_curve']:.3f} | {own:.2f} / {others:.2f} | {shown} |"
        )


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
    print_photo_table([r for r in results if "photo_ece" in r])
    diagram(results, args.png)
    print(f"reliability diagram → {args.png}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
