"""Search-time re-ranking over the top results of an inner-product search (issue 15, item 3).

Every re-ranker takes a query batch's scores against a gallery (rows: queries, columns: gallery items,
higher is better) and returns new scores of the same shape; only each query's `n` best items are
re-scored, and they stay above the rest, whose order is kept. Comparisons within one modality (gallery
item to gallery item, query to bank caption) are cosines of unit-length vectors (`unit_rows`, computed
once at index time), whatever extra coordinates a model folds into its vectors.

- `query_expansion`: the query is moved towards its `k` best results (average query expansion,
  cross-modal here: a text query is averaged with its top photos) and the top `n` scored again.
- `database_augmentation`: each gallery item is replaced by itself plus its `k` nearest gallery
  neighbours (DBA); it changes the gallery vectors once, at index time, and costs a query nothing.
- `neighbour_jaccard`: the overlap (Jaccard) of the query's top `k` with each candidate's own `k`
  nearest gallery neighbours, mixed into the score (the set similarity of k-reciprocal re-ranking).
- `bank_augmentation`: cross-modal; each gallery item is described by its `k` nearest captions of a
  bank from the training data, and the query's similarity to those captions (same modality, so
  well-behaved) is mixed into the score.
- `inverted_softmax`: each score normalised over the *query batch* (dual softmax, in log form); it
  needs every query at once, so it is an evaluation-only device, never a search option.
"""

from __future__ import annotations

import numpy as np

from cbir.models.base import unit_rows


def top_n(scores: np.ndarray, n: int) -> np.ndarray:
    """(n_queries, min(n, n_gallery)) column indices of each row's best scores, best first."""
    scores = np.asarray(scores)
    n = min(n, scores.shape[1])
    part = np.argpartition(-scores, n - 1, axis=1)[:, :n]
    order = np.argsort(-np.take_along_axis(scores, part, 1), axis=1, kind="stable")
    return np.take_along_axis(part, order, 1)


def rescore_top(scores: np.ndarray, new_scores: np.ndarray, n: int) -> np.ndarray:
    """`scores` with each row's top `n` items replaced by their `new_scores`, lifted above the rest of
    the row (whose order is kept): re-ranking reorders the shortlist and never pulls in other items."""
    scores = np.asarray(scores, dtype=np.float32)
    top = top_n(scores, n)
    out = scores.copy()
    fresh = np.take_along_axis(np.asarray(new_scores, dtype=np.float32), top, 1)
    lift = scores.max(1, keepdims=True) - fresh.min(1, keepdims=True) + 1.0
    np.put_along_axis(out, top, fresh + lift, 1)
    return out


def neighbours(gallery: np.ndarray, k: int) -> np.ndarray:
    """(n_gallery, k) each gallery item's k nearest other items by cosine, nearest first: computed
    once per gallery (index time)."""
    unit = unit_rows(gallery)
    sims = unit @ unit.T
    np.fill_diagonal(sims, -np.inf)
    return top_n(sims, k)


def query_expansion(scores: np.ndarray, unit: np.ndarray, k: int, weight: float, n: int) -> np.ndarray:
    """Average query expansion: score' = score + weight * cos(mean of the query's top-k items, item).
    `unit` is the gallery scaled to unit length."""
    expansion = unit[top_n(scores, k)].mean(1)
    return rescore_top(scores, scores + weight * (expansion @ unit.T), n)


def database_augmentation(gallery: np.ndarray, k: int, weight: float) -> np.ndarray:
    """Gallery vectors with `weight` times the mean of their k nearest neighbours added (DBA): the
    inner product with a query then also counts the item's neighbourhood."""
    gallery = np.asarray(gallery, dtype=np.float32)
    return gallery + weight * gallery[neighbours(gallery, k)].mean(1)


def neighbour_jaccard(scores: np.ndarray, near: np.ndarray, k: int, weight: float, n: int) -> np.ndarray:
    """score' = score + weight * Jaccard(query's top k, item's k nearest + itself) over the top n.
    `near` is `neighbours(gallery, >= k - 1)`."""
    top = top_n(scores, n)
    query_sets = np.zeros(scores.shape, dtype=bool)
    np.put_along_axis(query_sets, top[:, :k], True, 1)
    item_sets = np.concatenate([np.arange(len(near))[:, None], near[:, : k - 1]], 1)  # (n_gallery, k)
    shared = np.take_along_axis(query_sets[:, None, :], item_sets[top], 2).sum(2)  # (n_queries, n)
    jaccard = np.zeros(scores.shape, dtype=np.float32)
    np.put_along_axis(jaccard, top, (shared / (2 * k - shared)).astype(np.float32), 1)  # |A&B| / |A|B|
    return rescore_top(scores, scores + weight * jaccard, n)


def bank_neighbours(gallery: np.ndarray, bank: np.ndarray, k: int) -> np.ndarray:
    """(n_gallery, k) the bank entries (the queries' modality, e.g. training captions for photos)
    nearest to each gallery item by cross-modal score: computed once per gallery (index time)."""
    return top_n(np.asarray(gallery, np.float32) @ np.asarray(bank, np.float32).T, k)


def bank_augmentation(
    scores: np.ndarray,
    queries: np.ndarray,
    unit_bank: np.ndarray,
    near_bank: np.ndarray,
    weight: float,
    n: int,
) -> np.ndarray:
    """score' = score + weight * mean cos(query, the bank entries nearest each item), over the top n.

    `unit_bank` is the bank (the query's modality: captions for text queries) scaled to unit length;
    `near_bank` is `bank_neighbours(gallery, bank, k)`.
    """
    to_bank = unit_rows(queries) @ unit_bank.T  # (n_queries, n_bank)
    top = top_n(scores, n)
    described = np.take_along_axis(to_bank[:, None, :], near_bank[top], 2).mean(2)
    extra = np.zeros(scores.shape, dtype=np.float32)
    np.put_along_axis(extra, top, described.astype(np.float32), 1)
    return rescore_top(scores, scores + weight * extra, n)


def inverted_softmax(scores: np.ndarray, temperature: float) -> np.ndarray:
    """Evaluation only: each score less the temperature-scaled log-sum-exp of its column over the
    *query batch* (the log form of dual softmax, whose row term does not change a query's ranking):
    a gallery item that many queries like (a hub) is ranked down. Needs all queries at once."""
    z = np.asarray(scores, dtype=np.float64) / temperature
    top = z.max(0, keepdims=True)
    log_sum = top + np.log(np.exp(z - top).sum(0, keepdims=True))
    return (scores - temperature * log_sum).astype(np.float32)
