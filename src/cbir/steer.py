"""A steered search over one index: query arithmetic, relevance feedback, filters, then one page.

`SearchIndex.find` is the entry point; the CLI, the HTTP API and the page all go through it, so a
query means the same everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cbir.ann import best_first
from cbir.feedback import DEFAULT_FEEDBACK, Rocchio
from cbir.filters import Filters
from cbir.query import QueryError, Term, combine, image_term, parse_query, photo_share, unit

if TYPE_CHECKING:
    from cbir.index import SearchIndex, SearchResult


def query_terms(query: str | Sequence[str] | None, image: Path | str | bytes | None) -> list[Term]:
    """The parsed query plus `image` (a separate example photo) as one more `+` term."""
    terms = parse_query(query) if _given(query) else []
    if image is not None:
        terms.append(Term("bytes", "upload") if isinstance(image, bytes | bytearray) else image_term(image))
    return terms


def _given(query: str | Sequence[str] | None) -> bool:
    if query is None:
        return False
    return bool(query.strip()) if isinstance(query, str) else any(q.strip() for q in query)


def embed_terms(
    index: SearchIndex, terms: Sequence[Term], image: Path | str | bytes | None, allow_files: bool
) -> np.ndarray:
    """One query vector from the terms; `allow_files=False` (the server) refuses `img:` paths."""

    def embed(term: Term) -> np.ndarray:
        if term.kind == "text":
            return index.embed_text(term.value)
        if term.kind == "id":
            return index.vector(known_id(index, term.value))
        if term.kind == "bytes":
            return index.embed_image(image)  # type: ignore[arg-type]
        if not allow_files:
            raise QueryError(f"img:{term.value}: file paths are not accepted here; upload the photo instead")
        return index.embed_image(term.value)

    return combine(terms, embed)


def known_id(index: SearchIndex, image_id: str) -> str:
    """The index's id of a photo named as searches show it (`printable` for names that are not UTF-8)."""
    try:
        return index.id_of(image_id)
    except KeyError:
        raise QueryError(
            f"no image '{image_id}' in this index (ids are paths relative to {index.root})"
        ) from None


def steered_vector(
    index: SearchIndex,
    query: str | Sequence[str] | None = None,
    image: Path | str | bytes | None = None,
    more_like: Sequence[str] = (),
    less_like: Sequence[str] = (),
    feedback: Rocchio = DEFAULT_FEEDBACK,
    allow_files: bool = True,
) -> tuple[np.ndarray, float]:
    """The query vector after arithmetic and feedback, and how much of it is photos (`photo_share`,
    for the scores' calibration)."""
    terms = query_terms(query, image)
    if not terms and not more_like:
        raise QueryError('give a query, an example photo, or photos marked good (e.g. "a dog" + "beach")')
    vector = embed_terms(index, terms, image, allow_files) if terms else None
    share = photo_share(terms) if terms else None
    if not more_like and not less_like:
        return vector, share  # type: ignore[return-value]
    refined = feedback.refine(vector, vectors_of(index, more_like), vectors_of(index, less_like))
    return refined, feedback.photo_share(share, bool(more_like), bool(less_like))


def vectors_of(index: SearchIndex, ids: Sequence[str]) -> np.ndarray:
    """The indexed vectors of the photos marked, one row each (0 rows when none is)."""
    rows = [index.vector(known_id(index, i)) for i in ids]
    return np.stack(rows) if rows else np.zeros((0, index.vectors.shape[1]), dtype=np.float32)


def rank_rows(
    index: SearchIndex,
    vector: np.ndarray,
    rows: np.ndarray,
    n: int,
    min_score: float | None,
    photo_share: float = 0.0,
) -> list[SearchResult]:
    """The n best of the given index rows, exactly (a filtered search), scored and ranked as every
    search is (P(match) for a calibrated model, ranks from 1)."""
    from cbir.calibration import match_scores

    similarities = np.asarray(index.vectors[rows], dtype=np.float32) @ unit(vector)
    best = best_first(similarities, n)
    chosen = similarities[best]
    return index._results(match_scores(index.model, chosen, photo_share), chosen, rows[best], min_score)


def search_page(
    index: SearchIndex,
    vector: np.ndarray,
    filters: Filters | None,
    k: int,
    offset: int,
    min_score: float | None,
    photo_share: float = 0.0,
) -> list[SearchResult]:
    """Results `offset+1 … offset+k` of the ranking, among the photos that pass the filters."""
    if offset < 0 or k < 0:
        raise ValueError("k and offset must not be negative")
    if not filters:
        return index.search_vector(vector, offset + k, min_score, photo_share)[offset:]
    rows = np.flatnonzero(filters.allowed(index.ids, index.meta, index.mtimes_ns, index.root))
    return rank_rows(index, vector, rows, offset + k, min_score, photo_share)[offset:]
