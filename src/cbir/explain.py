"""Why a photo matched: the query words that carried the score, and what the photo shows.

- **Query words**: leave-one-word-out. The query is embedded again without each of its words (one
  batch); a word's weight is its share of what the words' removals cost the result's similarity
  (the search's raw score, before calibration, which would flatten the drops of a near-certain
  match), summed over the words whose removal costs something. Words under `MIN_SHARE` are left out.
- **Seen in the photo**: its top ImageNet classes, from the EfficientNet logits `cbir index` computed
  (cached by content hash, so explaining costs no network pass for an indexed photo), and the words of
  a visual vocabulary nearest to the photo in the model's own space, each scored as a one-word query
  would score the photo. The vocabulary is the words that name or describe ImageNet classes (in two
  classes or more; stop words out) and `PEOPLE_AND_PLACES`, which ImageNet lacks; it is embedded
  once per model and process (MiniLM's part is also cached on disk).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from cbir.index import SearchIndex, SearchResult
    from cbir.models.base import RetrievalModel

TOP_QUERY_WORDS = 3
WORD_PROMPT = "a photo of {}"  # words are embedded in a short caption, as the models were trained on
MIN_SHARE = 0.05  # a query word is shown when it carries at least this share of the score
TOP_CLASSES = 3
TOP_WORDS = 5
MIN_CLASSES = 2  # a word of the ImageNet names and descriptions joins the vocabulary from this many classes
PEOPLE_AND_PLACES = (
    "man", "men", "woman", "women", "girl", "girls", "boy", "boys", "child", "children", "people", "person",
    "baby", "family", "crowd", "player", "rider", "street", "city", "park", "beach", "snow", "grass", "field",
    "mountain", "river", "lake", "sea", "sky", "sunset", "night", "forest", "desert", "road", "building",
    "airport", "bridge", "farm", "playground", "stadium", "pool", "garden", "house", "church",
)  # fmt: skip
MAX_QUERY_WORDS = 24  # longer queries: only the first ones are left out in turn
WORD = re.compile(r"[\w'-]+")


@dataclass
class Explanation:
    """One result's explanation: (query word, share of the score), (ImageNet class, probability),
    (vocabulary word, similarity with the photo)."""

    query_words: list[tuple[str, float]] = field(default_factory=list)
    classes: list[tuple[str, float]] = field(default_factory=list)
    words: list[tuple[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "query_words": [{"word": w, "weight": round(s, 4)} for w, s in self.query_words],
            "classes": [{"label": c, "probability": round(p, 4)} for c, p in self.classes],
            "words": [{"word": w, "similarity": round(s, 4)} for w, s in self.words],
        }

    def line(self) -> str:
        """One line for a terminal or a tooltip."""
        parts = []
        if self.query_words:
            parts.append("matched " + ", ".join(f"{w} {s:.0%}" for w, s in self.query_words))
        if self.classes:
            parts.append("sees " + ", ".join(f"{c} {p:.0%}" for c, p in self.classes))
        if self.words:
            parts.append("near " + ", ".join(w for w, _ in self.words))
        return " · ".join(parts)


def query_words(text: str) -> list[str]:
    """The words of a query that can carry meaning: stop words ("a", "on", "the") are never left out."""
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    return [w for w in WORD.findall(text) if w.lower() not in ENGLISH_STOP_WORDS][:MAX_QUERY_WORDS]


def word_contributions(
    model: RetrievalModel, text: str, images: np.ndarray, top: int = TOP_QUERY_WORDS
) -> list[list[tuple[str, float]]]:
    """Per image row of `images`: the query words whose removal lowers its similarity most, each with
    its share of the summed drops."""
    from cbir.models.base import unit_rows

    words = query_words(text)
    if not words or not len(images):
        return [[] for _ in range(len(images))]
    if len(words) == 1:
        return [[(words[0], 1.0)] for _ in range(len(images))]
    variants = [_without(text, word) for word in words]
    queries = unit_rows(embed_words(model, [text, *variants]))
    similarities = np.asarray(images, dtype=np.float32) @ queries.T  # as a search scores them
    drops = np.clip(similarities[:, :1] - similarities[:, 1:], 0, None)
    shares = drops / np.maximum(drops.sum(1, keepdims=True), 1e-12)
    out = []
    for row in shares:
        order = [i for i in np.argsort(-row, kind="stable")[:top] if row[i] >= MIN_SHARE]
        out.append([(words[i], float(row[i])) for i in order])
    return out


def _without(text: str, word: str) -> str:
    """The query with one occurrence of `word` taken out (its other words as they were)."""
    head, _, tail = text.partition(word)
    return " ".join((head + tail).split())


def embed_words(model: RetrievalModel, texts: list[str]) -> np.ndarray:
    """Short texts embedded on one BLAS thread: more threads cost far more than they save on words
    (as for search queries, `SearchIndex.embed_texts`)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, user_api="blas"):
        return model.embed_texts(texts)


@lru_cache(maxsize=1)
def class_names() -> list[str]:
    from cbir.models.zeroshot import imagenet_classes

    return [c["names"][0] for c in imagenet_classes()]


def top_classes(paths: Sequence[Path], top: int = TOP_CLASSES) -> list[list[tuple[str, float]]]:
    """The `top` ImageNet classes of each photo with their softmax probability (empty if unreadable)."""
    from cbir.encoders import shared_image_encoder

    features = shared_image_encoder().encode(list(paths), progress=False)
    logits = features.logits.astype(np.float64)
    probabilities = np.exp(logits - logits.max(1, keepdims=True))
    probabilities /= probabilities.sum(1, keepdims=True)
    names = class_names()
    out = []
    for i, row in enumerate(probabilities):
        order = np.argsort(-row)[:top]
        out.append([] if i in features.failed else [(names[j], float(row[j])) for j in order])
    return out


@lru_cache(maxsize=1)
def vocabulary() -> tuple[str, ...]:
    """Visual words: those of the ImageNet class names and descriptions used by `MIN_CLASSES` classes
    or more (alphabetic, three letters or more, no stop words), and `PEOPLE_AND_PLACES`; sorted."""
    from collections import Counter

    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    from cbir.models.zeroshot import imagenet_classes

    counts: Counter[str] = Counter()
    for c in imagenet_classes():
        counts.update(set(re.findall(r"[a-z]+", " ".join([*c["names"], c["description"]]).lower())))
    words = {w for w, n in counts.items() if n >= MIN_CLASSES and len(w) >= 3 and w not in ENGLISH_STOP_WORDS}
    return tuple(sorted(words | set(PEOPLE_AND_PLACES)))


_vocabulary_vectors: dict[int, np.ndarray] = {}
_vocabulary_lock = threading.Lock()


def vocabulary_vectors(model: RetrievalModel) -> np.ndarray:
    """The vocabulary embedded by `model` (unit rows), once per model per process."""
    from cbir.models.base import unit_rows

    with _vocabulary_lock:
        if id(model) not in _vocabulary_vectors:
            phrases = [WORD_PROMPT.format(w) for w in vocabulary()]
            _vocabulary_vectors[id(model)] = unit_rows(embed_words(model, phrases))
        return _vocabulary_vectors[id(model)]


def nearest_words(
    model: RetrievalModel, images: np.ndarray, top: int = TOP_WORDS
) -> list[list[tuple[str, float]]]:
    """The vocabulary words nearest each image row in the model's space, with their similarity."""
    from cbir.models.base import unit_rows

    if not len(images):
        return []
    similarity = unit_rows(images) @ vocabulary_vectors(model).T
    words = vocabulary()
    order = np.argsort(-similarity, axis=1)[:, :top]
    return [[(words[j], float(similarity[i, j])) for j in row] for i, row in enumerate(order)]


def explain(
    index: SearchIndex, results: Sequence[SearchResult], text: str | None = None
) -> list[Explanation]:
    """An explanation per result of a search of `index` (by `text`, when the query had words)."""
    if not results:
        return []
    images = np.stack([index.vector(r.id) for r in results])
    contributions = word_contributions(index.model, text, images) if text and text.strip() else None
    classes = top_classes([r.path for r in results])
    words = nearest_words(index.model, images)
    return [
        Explanation(contributions[i] if contributions else [], classes[i], words[i])
        for i in range(len(results))
    ]
