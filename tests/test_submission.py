"""Kaggle cs5785 submissions on the real mini layout, ranked by models whose scores are set by hand,
so every rank (and so every MAP@20) is known exactly."""

import dataclasses

import numpy as np
import pytest

from cbir.datasets import DatasetError
from cbir.models import RetrievalModel
from cbir.submission import (
    HEADER,
    rank_test_images,
    read_submission,
    score_submission,
    write_submission,
)
from tests.conftest import KAGGLE_MINI

ANSWERS = KAGGLE_MINI / "answers_test.csv"
HEADER_MESSAGE = "first line must be the header Descritpion_ID,Top_20_Image_IDs"
ROW_MESSAGE = "expected 'N.txt,<image names separated by spaces>'"


class FixedScores(RetrievalModel):
    """Scores a fixed (captions x images) matrix: a caption embeds as its row, images as identity."""

    method = "fixed-scores"

    def __init__(self, captions: list[str], scores: np.ndarray):
        super().__init__()
        self.row = {c: i for i, c in enumerate(captions)}
        self.scores = np.asarray(scores, dtype=np.float32)

    def embed_texts(self, texts):
        return self.scores[[self.row[t] for t in texts]]

    def embed_images(self, images):
        return np.eye(len(images), self.scores.shape[1], dtype=np.float32)


def truth_at_rank(test, rank_of) -> FixedScores:
    """Caption i's own image ranked at rank_of(i): other images score 1, 1 - 1/n, ... in order."""
    n = len(test)
    scores = np.zeros((len(test.captions), n))
    for i, own in enumerate(test.caption_image):
        others = [j for j in range(n) if j != own]
        order = others[: rank_of(i)] + [own] + others[rank_of(i) :]
        scores[i, order] = np.linspace(1.0, 0.0, n)
    return FixedScores(test.captions, scores)


def test_perfect_scores_put_the_answer_first_and_score_one(kaggle_mini, tmp_path):
    test = kaggle_mini.split("test")
    out = write_submission(truth_at_rank(test, lambda i: 0), kaggle_mini, tmp_path / "new" / "dir" / "s.csv")
    text = out.read_bytes().decode()
    assert text.startswith("Descritpion_ID,Top_20_Image_IDs\n") and "\r" not in text
    ranked = read_submission(out)
    assert list(ranked) == [f"{i}.txt" for i in range(79)]  # numeric order: 10.txt after 9.txt
    truth = dict(line.split(",") for line in ANSWERS.read_text().split()[1:])
    assert all(ranked[d][0] == truth[d] for d in ranked)
    assert score_submission(out, ANSWERS) == 1.0


def test_map20_follows_the_rank_of_the_answer(kaggle_mini, tmp_path):
    """Description i has its image at rank i % 25: ranks 20-24 are outside the top 20 and score 0."""
    model = truth_at_rank(kaggle_mini.split("test"), lambda i: i % 25)
    out = write_submission(model, kaggle_mini, tmp_path / "s.csv")
    ranks = [i % 25 for i in range(79)]
    expected = sum(1 / (1 + r) for r in ranks if r < 20) / 79
    assert score_submission(out, ANSWERS) == pytest.approx(expected, abs=1e-12)
    rows = dict(rank_test_images(model, kaggle_mini))
    assert rows["3.txt"][3] == read_submission(out)["3.txt"][3] == "28.jpg"  # 3.txt's answer
    assert all(len(images) == 20 and len(set(images)) == 20 for images in rows.values())


def test_ties_keep_image_order(kaggle_mini):
    """Many tied scores (three levels): tied images keep their order, so a ranking is reproducible."""
    test = kaggle_mini.split("test")
    levels = np.random.default_rng(0).integers(0, 3, size=(79, 79)).astype(np.float32)
    names = [p.name for p in test.images]
    rows = dict(rank_test_images(FixedScores(test.captions, levels), kaggle_mini, k=79))
    for i, description in enumerate(test.caption_ids):
        expected = sorted(range(79), key=lambda j: (-levels[i, j], j))
        assert rows[description] == [names[j] for j in expected]


def test_rows_follow_the_description_number_then_the_name(kaggle_mini):
    """Numbered descriptions in numeric order; others (no number) first, by name."""
    test = kaggle_mini.split("test")
    renamed = {"0.txt": "b.txt", "2.txt": "a.txt"}
    ids = [
        renamed.get(c, c) if s == "test" else c
        for c, s in zip(kaggle_mini.caption_ids, kaggle_mini.caption_split, strict=True)
    ]
    data = dataclasses.replace(kaggle_mini, caption_ids=ids)
    rows = rank_test_images(truth_at_rank(test, lambda i: 0), data)
    assert [d for d, _ in rows][:4] == ["a.txt", "b.txt", "1.txt", "3.txt"]
    assert [d for d, _ in rows][-2:] == ["77.txt", "78.txt"]


def test_missing_rows_and_unknown_answers_score_zero(kaggle_mini, tmp_path):
    out = write_submission(
        truth_at_rank(kaggle_mini.split("test"), lambda i: 0), kaggle_mini, tmp_path / "s.csv"
    )
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[:40]) + "\n")  # header + descriptions 0..38
    assert score_submission(out, ANSWERS) == pytest.approx(39 / 79)
    answers = tmp_path / "answers.csv"
    answers.write_text("Descritpion_ID,Image_ID\n0.txt, 65.jpg\n1.txt,50.jpg\n\nnotes,ignored\n")
    assert score_submission(out, answers) == pytest.approx(0.5)  # 0.txt first, 50.jpg not in 1.txt's 20


@pytest.mark.parametrize(
    ("content", "message", "line"),
    [
        ("", HEADER_MESSAGE, 1),
        ("Description_ID,Top_20_Image_IDs\n", HEADER_MESSAGE, 1),
        ("{header}\n0.txt\n", ROW_MESSAGE, 2),
        ("{header}\n0.txt,{twenty},x\n", ROW_MESSAGE, 2),
        ("{header}\n0.txt,{twenty}\n1.txt,{nineteen}\n", "expected 20 distinct image names, got 19", 3),
        ("{header}\n0.txt,{nineteen} 0.jpg\n", "expected 20 distinct image names, got 19", 2),
        ("{header}\n0.txt,{twenty} 20.jpg\n", "expected 20 distinct image names, got 21", 2),
        ("{header}\n0.txt,{twenty}\n0.txt,{twenty}\n", "description 0.txt listed twice", 3),
    ],
)
def test_malformed_submissions_name_the_line(tmp_path, content, message, line):
    names = [f"{i}.jpg" for i in range(20)]
    bad = tmp_path / "bad.csv"
    bad.write_text(
        content.format(header=",".join(HEADER), twenty=" ".join(names), nineteen=" ".join(names[:19]))
    )
    with pytest.raises(DatasetError) as caught:
        read_submission(bad)
    assert str(caught.value) == f"{bad}:{line}: {message}"


def test_a_split_that_cannot_be_submitted_is_refused(kaggle_mini):
    test = kaggle_mini.split("test")
    model = truth_at_rank(test, lambda i: 0)
    no_files = f"{kaggle_mini.root}: no test descriptions (descriptions_test/N.txt) to rank images for"
    with pytest.raises(DatasetError) as caught:  # captions not read from N.txt files
        rank_test_images(model, dataclasses.replace(kaggle_mini, caption_ids=None))
    assert str(caught.value) == no_files
    keep = [i for i, split in enumerate(kaggle_mini.caption_split) if split != "test"]
    untested = dataclasses.replace(
        kaggle_mini,
        captions=[kaggle_mini.captions[i] for i in keep],
        caption_image=kaggle_mini.caption_image[keep],
        caption_ids=[kaggle_mini.caption_ids[i] for i in keep],
        caption_split=[kaggle_mini.caption_split[i] for i in keep],
        augmented=None,
    )
    with pytest.raises(DatasetError) as caught:
        rank_test_images(model, untested)
    assert str(caught.value) == no_files
    with pytest.raises(DatasetError) as caught:
        rank_test_images(model, kaggle_mini, k=80)
    assert (
        str(caught.value)
        == f"{kaggle_mini.root}: a submission lists 80 images per description; the test split has 79"
    )
    assert len(rank_test_images(model, kaggle_mini, k=79)[0][1]) == 79
