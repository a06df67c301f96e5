"""Query arithmetic: `a dog + on the beach - people`, weighted terms (`snow:0.5`), example photos.

One grammar for the CLI, the Python API and the HTTP API. A query is a list of terms joined by `+` and
`-` standing on their own (surrounded by spaces, or at the start), so `well-lit` and `t-shirt` stay
words. A term is

  `TEXT`            words, optionally in double quotes (`"on the beach"`)
  `img:PATH`        an example photo file (CLI and Python only: the server refuses paths)
  `id:IMAGE_ID`     an indexed photo, by its id (its path relative to the indexed folder)

each optionally followed by `:WEIGHT` (a positive number; 1 when absent). The query vector is the
weighted sum of the terms' unit vectors, `-` terms subtracted: a plain sentence gives the same vector
as before this grammar existed.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

OPERATORS = ("+", "-")
KINDS = ("text", "img", "id")
# `:WEIGHT` at the end of a term: a number (`id:15.jpg` is a photo, `id:15.jpg:2` one weighted 2).
WEIGHT_SUFFIX = re.compile(r":([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)$")
OPERATOR_SPLIT = re.compile(r"(?:^|\s)([+-])(?=\s|$)")


class QueryError(ValueError):
    """A query that cannot be parsed; the message quotes the offending part and shows the grammar."""


HELP = 'e.g. "a dog" + "on the beach" - "people", "snow":0.5, img:photo.jpg, id:trip/0.jpg'


@dataclass(frozen=True)
class Term:
    kind: str  # "text", "img" (a file path) or "id" (an indexed photo)
    value: str
    weight: float = 1.0  # negative for a `-` term

    def __str__(self) -> str:
        sign = "-" if self.weight < 0 else "+"
        prefix = "" if self.kind == "text" else f"{self.kind}:"
        return f"{sign} {prefix}{self.value}:{abs(self.weight):g}"


def parse_query(query: str | Sequence[str]) -> list[Term]:
    """The terms of a query string, or of command-line words (joined by spaces first)."""
    text = query if isinstance(query, str) else " ".join(query)
    if not text.strip():
        raise QueryError(f"empty query ({HELP})")
    pieces = OPERATOR_SPLIT.split(text)  # [term, op, term, op, term, ...]
    if not pieces[0].strip():
        pieces = pieces[1:]  # a leading operator: "- people + dogs"
    else:
        pieces = ["+", *pieces]
    terms = [_term(pieces[i + 1], sign=-1.0 if pieces[i] == "-" else 1.0) for i in range(0, len(pieces), 2)]
    if not any(t.weight > 0 for t in terms):
        raise QueryError(
            f"'{text}': a query needs at least one term to look for, not only `-` terms ({HELP})"
        )
    return terms


def is_plain(terms: Sequence[Term]) -> bool:
    """One sentence looked for at weight 1: a search that needs no arithmetic."""
    return len(terms) == 1 and terms[0].kind == "text" and terms[0].weight == 1.0


def query_words(query: str | Sequence[str] | None) -> str | None:
    """The words of a query's text terms that look for something (not `-` ones): what an
    explanation weighs. None when there are none (an example photo, feedback only)."""
    if not query or (isinstance(query, str) and not query.strip()):
        return None
    words = [t.value for t in parse_query(query) if t.kind == "text" and t.weight > 0]
    return " ".join(words) or None


def _term(raw: str, sign: float) -> Term:
    word = raw.strip()
    if not word:
        raise QueryError(f"an operator with nothing after it ({HELP})")
    weight = 1.0
    match = WEIGHT_SUFFIX.search(word)
    if match:
        weight = float(match.group(1))
        if not weight > 0 or not np.isfinite(weight):
            raise QueryError(f"'{word}': a weight must be a positive number; use `-` to subtract ({HELP})")
        word = word[: match.start()].strip()
    kind, _, rest = word.partition(":")
    if kind in KINDS[1:]:
        word = rest.strip()
    else:
        kind = "text"
    word = _unquote(word)
    if not word:
        raise QueryError(f"'{raw.strip()}': an empty term ({HELP})")
    return Term(kind, word, sign * weight)


def _unquote(word: str) -> str:
    if len(word) >= 2 and word[0] == word[-1] and word[0] in "\"'":
        return word[1:-1].strip()
    if word.count('"') % 2:
        raise QueryError(f"'{word}': unbalanced double quote ({HELP})")
    return word


def unit(vector: np.ndarray) -> np.ndarray:
    vector = np.asarray(vector, dtype=np.float32)
    return vector / max(float(np.linalg.norm(vector)), 1e-12)


def combine(terms: Sequence[Term], embed: Callable[[Term], np.ndarray]) -> np.ndarray:
    """The query vector: the weighted sum of each term's unit vector."""
    return sum(t.weight * unit(embed(t)) for t in terms)


def photo_share(terms: Sequence[Term]) -> float:
    """The share of the query's weight (added or subtracted) that photos carry: 0 for words only, 1
    for photos only; it picks the calibration curve that scores the query (cbir.calibration)."""
    total = sum(abs(t.weight) for t in terms)
    return sum(abs(t.weight) for t in terms if t.kind != "text") / total if total else 0.0


def image_term(path: Path | str) -> Term:
    """An `img:` term for a file given apart from the query (`--image FILE`)."""
    return Term("img", str(path))
