"""Kaggle cs5785 submissions: write the 20 best test images per test description, and score a
submission file against `answers_test.csv` the competition's way (MAP@20, one relevant image)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from cbir.datasets import Dataset, DatasetError
from cbir.datasets.base import read_text
from cbir.metrics import map_at_20
from cbir.models import RetrievalModel

HEADER = ("Descritpion_ID", "Top_20_Image_IDs")  # the competition's own spelling
TOP_K = 20


def rank_test_images(model: RetrievalModel, dataset: Dataset, k: int = TOP_K) -> list[tuple[str, list[str]]]:
    """(description file, its k best test image file names, best first), by description number."""
    test = dataset.split("test")
    if test.caption_ids is None or not test.captions:
        raise DatasetError("no test descriptions (descriptions_test/N.txt) to rank images for", dataset.root)
    if len(test) < k:
        raise DatasetError(
            f"a submission lists {k} images per description; the test split has {len(test)}", dataset.root
        )
    scores = model.score(model.embed_texts(test.captions), model.embed_images(test))
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    names = [p.name for p in test.images]
    rows = [(cid, [names[j] for j in order]) for cid, order in zip(test.caption_ids, top, strict=True)]
    return sorted(rows, key=lambda r: (int(Path(r[0]).stem) if Path(r[0]).stem.isdigit() else 0, r[0]))


def write_submission(model: RetrievalModel, dataset: Dataset, out: Path | str) -> Path:
    """The competition's CSV: header, then `N.txt,<20 space-separated image names>` per description."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(HEADER)
    for description, images in rank_test_images(model, dataset):
        writer.writerow([description, " ".join(images)])
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(buf.getvalue())
    return path


def read_submission(path: Path | str) -> dict[str, list[str]]:
    """description -> ranked image names; malformed rows are errors naming the line."""
    path = Path(path)
    rows = list(csv.reader(io.StringIO(read_text(path))))
    if not rows or tuple(rows[0]) != HEADER:
        raise DatasetError(f"first line must be the header {','.join(HEADER)}", path, 1)
    out: dict[str, list[str]] = {}
    for lineno, row in enumerate(rows[1:], start=2):
        if len(row) != 2:
            raise DatasetError("expected 'N.txt,<image names separated by spaces>'", path, lineno)
        images = row[1].split()
        if len(images) != TOP_K or len(set(images)) != TOP_K:
            raise DatasetError(f"expected {TOP_K} distinct image names, got {len(set(images))}", path, lineno)
        if row[0] in out:
            raise DatasetError(f"description {row[0]} listed twice", path, lineno)
        out[row[0]] = images
    return out


def score_submission(submission: Path | str, answers: Path | str) -> float:
    """MAP@20 of a submission against `Descritpion_ID,Image_ID` answers (a missing row scores 0)."""
    ranked = read_submission(submission)
    answers = Path(answers)
    truth = [
        [c.strip() for c in row]
        for row in csv.reader(io.StringIO(read_text(answers)))
        if row and row[0].endswith(".txt")
    ]
    ranks = [ranked[d].index(img) if img in ranked.get(d, []) else TOP_K for d, img in truth]
    return map_at_20(np.array(ranks))
