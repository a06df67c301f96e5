"""Metrics on hand-computed cases, ties included."""

import numpy as np
import pytest

from cbir.metrics import (
    image_to_text_ranks,
    map_at_20,
    median_rank,
    recall_at,
    retrieval_metrics,
    text_to_image_ranks,
)


def test_text_to_image_ranks_by_hand():
    scores = np.array(
        [
            [0.9, 0.1, 0.5],  # truth 0 -> rank 0
            [0.9, 0.1, 0.5],  # truth 2 -> rank 1
            [0.9, 0.1, 0.5],  # truth 1 -> rank 2
        ]
    )
    assert text_to_image_ranks(scores, np.array([0, 2, 1])).tolist() == [0, 1, 2]


def test_ties_count_against_the_truth():
    scores = np.array([[0.5, 0.5, 0.5, 0.1]])
    # Two other images tie with the truth: both count as ranked above it.
    assert text_to_image_ranks(scores, np.array([0])).tolist() == [2]
    constant = np.zeros((4, 4))
    assert (text_to_image_ranks(constant, np.arange(4)) == 3).all()


def test_image_to_text_uses_the_best_caption():
    # captions 0,1 describe image 0; caption 2 image 1
    scores = np.array(
        [
            [0.2, 0.9],
            [0.8, 0.1],
            [0.3, 0.7],
        ]
    )
    ranks = image_to_text_ranks(scores, np.array([0, 0, 1]))
    # image 0: best own caption scores 0.8, no other caption >= 0.8 -> rank 0
    # image 1: own caption 0.7; caption 0 (0.9) is above -> rank 1
    assert ranks.tolist() == [0, 1]


def test_image_to_text_ties_with_other_captions_count_against():
    scores = np.array([[0.5], [0.5]])
    # image 0 owns caption 1; caption 0 ties with it
    assert image_to_text_ranks(np.array([[0.5, 0.0], [0.5, 0.0]]), np.array([1, 0])).tolist() == [1, 1]
    assert image_to_text_ranks(scores, np.array([0, 0])).tolist() == [0]


def test_recall_map_and_median():
    ranks = np.array([0, 1, 4, 19, 20, 100])
    assert recall_at(ranks, 1) == pytest.approx(100 / 6)
    assert recall_at(ranks, 5) == pytest.approx(300 / 6)
    assert recall_at(ranks, 20) == pytest.approx(400 / 6)
    assert map_at_20(ranks) == pytest.approx((1 + 1 / 2 + 1 / 5 + 1 / 20) / 6)
    assert median_rank(np.array([0, 2, 9])) == 3.0


def test_retrieval_metrics_keys_and_perfect_scores():
    scores = np.eye(3)[[0, 0, 1, 2]]  # 4 captions, image 0 has two
    m = retrieval_metrics(scores, [0, 0, 1, 2])
    for key in (
        "t2i_r1",
        "t2i_r5",
        "t2i_r10",
        "i2t_r1",
        "i2t_r5",
        "i2t_r10",
        "mR",
        "map20",
        "r20",
        "medr",
        "n_images",
        "n_queries",
    ):
        assert key in m
    assert m["t2i_r1"] == 100 and m["i2t_r1"] == 100 and m["mR"] == 100
    assert m["map20"] == 1.0 and m["medr"] == 1.0
    assert (m["n_images"], m["n_queries"]) == (3, 4)


def test_unpaired_captions_are_refused():
    with pytest.raises(ValueError):
        retrieval_metrics(np.zeros((2, 2)), [0, -1])
