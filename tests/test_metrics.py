"""Metrics on hand-computed cases, ties included."""

import numpy as np
import pytest

from cbir.metrics import (
    image_to_text_ranks,
    map_at_20,
    median_rank,
    mr_standard_error,
    mrr,
    recall_at,
    retrieval_metrics,
    text_to_image_ranks,
)
from tests.conftest import EVALUATE_JSON_KEYS


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
    # image 0 owns caption 1; caption 0 ties with it
    assert image_to_text_ranks(np.array([[0.5, 0.0], [0.5, 0.0]]), np.array([1, 0])).tolist() == [1, 1]
    # image 0 owns captions 0 (0.3) and 1 (0.6): its best caption ties with caption 2 and beats caption 3
    scores = np.array([[0.3, 0.0], [0.6, 0.0], [0.6, 0.9], [0.4, 0.8]])
    assert image_to_text_ranks(scores, np.array([0, 0, 1, 1])).tolist() == [1, 0]


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
    assert set(EVALUATE_JSON_KEYS) <= set(m)
    assert m["t2i_r1"] == 100 and m["i2t_r1"] == 100 and m["mR"] == 100
    assert m["map20"] == 1.0 and m["medr"] == 1.0
    assert (m["n_images"], m["n_queries"]) == (3, 4)


def test_unpaired_captions_are_refused():
    with pytest.raises(
        ValueError, match=r"^every caption needs its image to be scored \(caption_image >= 0\)$"
    ):
        retrieval_metrics(np.zeros((2, 2)), [0, -1])


def test_mrr_and_empty_rank_lists():
    assert mrr(np.array([0, 1, 3])) == pytest.approx((1 + 1 / 2 + 1 / 4) / 3)
    empty = np.array([], dtype=np.int64)
    assert recall_at(empty, 5) == map_at_20(empty) == mrr(empty) == median_rank(empty) == 0.0


def test_images_without_captions_are_left_out_of_image_to_text():
    """Image 1 has no caption: its rank is -1, images after it are still ranked, and the
    image-to-text numbers average over the two captioned images only."""
    scores = np.array([[0.9, 0.5, 0.1], [0.2, 0.6, 0.8]])  # caption 0 -> image 0, caption 1 -> image 2
    ranks = image_to_text_ranks(scores, np.array([0, 2]))
    assert ranks.tolist() == [0, -1, 0] and ranks.dtype.kind == "i"
    m = retrieval_metrics(scores, [0, 2])
    assert m["i2t_r1"] == 100.0 and m["i2t_medr"] == 1.0 and m["n_images"] == 3


def test_summary_numbers_by_hand():
    """Four captions over five images (two uncaptioned), ranks worked out in the comments."""
    scores = np.array(
        [
            [0.9, 0.1, 0.2, 0.0, 0.0],  # image 0: rank 0
            [0.5, 0.1, 0.6, 0.7, 0.0],  # image 0: rank 2
            [0.3, 0.4, 0.8, 0.0, 0.0],  # image 1: rank 1
            [0.1, 0.2, 0.3, 0.4, 0.05],  # image 4: rank 4
        ]
    )
    caption_image = [0, 0, 1, 4]
    m = retrieval_metrics(scores, caption_image)
    assert text_to_image_ranks(scores, np.array(caption_image)).tolist() == [0, 2, 1, 4]
    # image 0: best own 0.9, nothing above; image 1: own 0.4, caption 0..3 at 0.1, 0.1, -, 0.2 -> 0;
    # image 4: own 0.05, caption 0..2 at 0.0 -> 0; images 2 and 3 have no captions
    assert image_to_text_ranks(scores, np.array(caption_image)).tolist() == [0, 0, -1, -1, 0]
    assert m["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 2 + 1 / 5) / 4)
    assert m["map20"] == pytest.approx(m["mrr"])
    assert m["medr"] == 2.5 and m["i2t_medr"] == 1.0
    assert m["r20"] == m["t2i_r20"] == 100.0 and m["t2i_r1"] == 25.0 and m["t2i_r5"] == 100.0
    assert (m["n_images"], m["n_queries"]) == (5, 4)


def test_mr_is_the_mean_of_r1_r5_r10_both_ways():
    """25 images, two identical captions each: a caption of image i finds it at rank i, image i finds
    its captions at rank 2i. Every recall below is distinct, so averaging any other set shows."""
    n = 25
    scores = np.zeros((n, n))
    for i in range(n):
        scores[i, [j for j in range(n) if j != i]] = np.linspace(2.0, 1.0, n - 1)  # others, descending
        scores[i, i] = 2.0 - (i - 0.5) / (n - 2)  # own image just above the i-th other one
    scores, caption_image = np.repeat(scores, 2, axis=0), np.repeat(np.arange(n), 2)
    assert text_to_image_ranks(scores, caption_image).tolist() == caption_image.tolist()
    assert image_to_text_ranks(scores, caption_image).tolist() == list(range(0, 2 * n, 2))
    m = retrieval_metrics(scores, caption_image)
    assert [m[f"t2i_r{k}"] for k in (1, 5, 10, 20)] == pytest.approx([4, 20, 40, 80])
    assert [m[f"i2t_r{k}"] for k in (1, 5, 10, 20)] == pytest.approx([4, 12, 20, 40])
    assert m["mR"] == pytest.approx((4 + 20 + 40 + 4 + 12 + 20) / 6)


def test_mr_standard_error_by_hand():
    """t2i ranks 0, 0, 2, 2 and i2t ranks 0, 0, 0, 1: per-query mean R@1/5/10 hits below; the error is
    half the root of the two directions' squared standard errors (sample variance over n)."""
    scores = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0.9, 0, 0.5, 0.9], [0.9, 0.9, 0, 0.5]])
    t2i, i2t = np.array([100, 100, 200 / 3, 200 / 3]), np.array([100, 100, 100, 200 / 3])
    assert retrieval_metrics(scores, range(4))["mR"] == pytest.approx((t2i.mean() + i2t.mean()) / 2)
    expected = 0.5 * np.sqrt(np.var(t2i, ddof=1) / 4 + np.var(i2t, ddof=1) / 4)
    assert mr_standard_error(scores, range(4)) == pytest.approx(expected)
    assert mr_standard_error(np.eye(4), range(4)) == 0.0
