"""The competition task at full size on everyday photos: Flickr8k in the Kaggle cs5785 layout (issue 11).

    python -m benchmarks.kaggle_flickr8k [--only ridge ...]

Lays Flickr8k out as the competition did: `images_train/` + `descriptions_train/` from train and val
(6,091 photos, five captions each, no tags), `images_test/` from the 1,000 test photos, and one
description file per test photo (its five captions) in a shuffled order, with `answers_test.csv` as the
answer key. Then, for every method, runs the real commands, `cbir train` and `cbir submit`, and scores
each submission's MAP@20 with the project's scorer. Photos are hard links, so the layout costs no
space. The shipped default and zero-shot need no training (the default was trained on Flickr8k train,
a subset of this training set, never on its test photos).
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from cbir.datasets import Dataset, load_dataset
from cbir.demo import link_or_copy
from cbir.submission import score_submission

FLICKR8K = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "flickr8k"
TRAINED = ("ridge", "fusion", "autoencoder", "contrastive")
# Fusion's members, as configs so that their weights come from 3-fold cross-validation (no val split
# in this layout): the MiniLM -> image ridge and the image -> caption-words ridge.
FUSION_MEMBERS = [
    {"method": "ridge"},
    {"method": "ridge", "text_features": "minilm+tfidf", "direction": "image-to-text"},
]
NAMED = ("default", "zero-shot")
SEED = 0


def lay_out(data: Dataset, out: Path, seed: int = SEED) -> Path:
    """Write the Kaggle layout of `data` into `out` (train+val → train, test → shuffled test)."""
    shutil.rmtree(out, ignore_errors=True)
    for folder in ("images_train", "descriptions_train", "tags_train", "images_test", "descriptions_test"):
        (out / folder).mkdir(parents=True)
    train = [i for i, s in enumerate(data.splits) if s in ("train", "val")]
    for n, i in enumerate(train):
        link_or_copy(data.images[i], out / "images_train" / f"{n}.jpg")
        (out / "descriptions_train" / f"{n}.txt").write_text("\n".join(data.captions_of(i)) + "\n")
        (out / "tags_train" / f"{n}.txt").write_text("")
    test = [i for i, s in enumerate(data.splits) if s == "test"]
    order = np.random.default_rng(seed).permutation(len(test))
    with open(out / "answers_test.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Descritpion_ID", "Image_ID"])
        for n, i in enumerate(test):
            link_or_copy(data.images[i], out / "images_test" / f"{n}.jpg")
        for d, n in enumerate(order):
            (out / "descriptions_test" / f"{d}.txt").write_text("\n".join(data.captions_of(test[n])) + "\n")
            writer.writerow([f"{d}.txt", f"{n}.jpg"])
    return out


def cbir(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "cbir.cli", *args], check=True)


def run(method: str, kaggle: Path, work: Path) -> dict:
    model, train_s = method, 0.0
    if method not in NAMED:
        model = str(work / method)
        start = time.perf_counter()
        extra = ["-p", f"members={json.dumps(FUSION_MEMBERS)}"] if method == "fusion" else []
        cbir(
            "train", "--dataset", str(kaggle), "--method", method, "--out", model, "--seed", str(SEED), *extra
        )
        train_s = time.perf_counter() - start
    submission = work / f"submission-{method}.csv"
    start = time.perf_counter()
    cbir("submit", "--model", model, "--dataset", str(kaggle), "--out", str(submission))
    submit_s = time.perf_counter() - start
    score = score_submission(submission, kaggle / "answers_test.csv")
    return {"method": method, "map20": score, "train_s": train_s, "submit_s": submit_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, default=FLICKR8K)
    parser.add_argument("--work", type=Path, default=Path("runs/kaggle-flickr8k"))
    parser.add_argument("--only", action="append", help="method (repeatable; default: all)")
    args = parser.parse_args()
    kaggle = lay_out(load_dataset(args.dataset), args.work / "data")
    results = []
    for method in args.only or [*NAMED, *TRAINED]:
        results.append(run(method, kaggle, args.work))
        r = results[-1]
        print(
            f"| {method} | **{r['map20']:.4f}** | {r['train_s']:.0f} s | {r['submit_s']:.0f} s |", flush=True
        )
    (args.work / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
