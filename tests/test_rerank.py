"""Re-rankers on hand-made cases whose right answer is known."""

from __future__ import annotations

import numpy as np

from cbir import rerank
from cbir.models.base import unit_rows

# Four photos in a 4-d space; the query is text about a dog in a street.
DOG = [1.0, 0.0, 0.0, 0.0]
OTHER = [0.3, 0.95, 0.0, 0.0]  # mostly street, yet it scores above DOG_TWIN for the query
DOG_TWIN = [0.95, 0.0, 0.0, 0.31]  # a near-duplicate of DOG seen from another angle (axis 3)
STREET = [0.0, 0.95, 0.31, 0.0]  # OTHER's nearest neighbour
GALLERY = np.array([DOG, OTHER, DOG_TWIN, STREET], np.float32)
QUERY = np.array([[0.8, 0.55, 0.0, -0.24]], np.float32)  # DOG 0.80, OTHER 0.76, DOG_TWIN 0.69, STREET 0.52


def order(scores: np.ndarray) -> list[int]:
    return rerank.top_n(scores, scores.shape[1])[0].tolist()


def test_the_hand_made_case_starts_with_the_twin_below_the_unrelated_photo():
    assert order(QUERY @ GALLERY.T) == [0, 1, 2, 3]


def test_query_expansion_pulls_the_near_duplicate_of_the_best_hit_up():
    scores = QUERY @ GALLERY.T
    assert order(rerank.query_expansion(scores, unit_rows(GALLERY), k=1, weight=0.5, n=4)) == [0, 2, 1, 3]


def test_database_augmentation_pulls_the_near_duplicate_up():
    augmented = rerank.database_augmentation(GALLERY, k=1, weight=0.5)
    assert order(QUERY @ augmented.T) == [0, 2, 1, 3]


def test_neighbour_jaccard_favours_items_that_share_the_query_neighbourhood():
    scores = QUERY @ GALLERY.T
    near = rerank.neighbours(GALLERY, 2)
    assert near[:, 0].tolist() == [2, 3, 0, 1]  # DOG and its twin are each other's nearest
    assert order(rerank.neighbour_jaccard(scores, near, k=3, weight=0.5, n=4)) == [0, 2, 1, 3]


def test_bank_augmentation_uses_the_captions_nearest_each_photo():
    bank_texts = np.array([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]], np.float32)  # "a dog", "a street"
    near = rerank.bank_neighbours(GALLERY, bank_texts, k=1)
    assert near[:, 0].tolist() == [0, 1, 0, 1]
    scores = QUERY @ GALLERY.T
    ranked = rerank.bank_augmentation(scores, QUERY, bank_texts, near, weight=0.5, n=4)
    assert order(ranked) == [0, 2, 1, 3]


def test_re_ranking_touches_only_the_shortlist():
    rng = np.random.default_rng(0)
    gallery, queries = rng.normal(size=(60, 8)), rng.normal(size=(5, 8))
    scores = queries @ gallery.T
    before, after = (
        rerank.top_n(scores, 60),
        rerank.top_n(rerank.query_expansion(scores, unit_rows(gallery), 3, 5.0, 10), 60),
    )
    assert (before[:, 10:] == after[:, 10:]).all()
    assert (np.sort(before[:, :10]) == np.sort(after[:, :10])).all()
    assert (before[:, :10] != after[:, :10]).any()


def test_inverted_softmax_ranks_down_a_photo_every_query_likes():
    hub_first = np.array([[0.9, 0.85, 0.1], [0.95, 0.1, 0.8], [0.95, 0.1, 0.1]], np.float32)
    assert rerank.top_n(hub_first, 1)[:, 0].tolist() == [0, 0, 0]
    assert rerank.top_n(rerank.inverted_softmax(hub_first, 0.05), 1)[:, 0].tolist() == [1, 2, 0]
