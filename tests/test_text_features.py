"""Caption features counted without SciPy (`TextFeaturizer`): the same numbers, to the last bit, as the
sparse products the shipped models were trained with, and a one-query search that never imports SciPy."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from cbir.datasets import load_dataset
from cbir.models import load_model
from tests.conftest import FLICKR8K


def sparse_reference(featurizer, texts: list[str], kind: str) -> np.ndarray:
    """The features as SciPy computed them before (a CSR matrix of the sublinear TF-IDF)."""
    from scipy.sparse import csr_matrix

    rows = featurizer._weights(texts, idf=kind != "bow")
    indptr = np.concatenate([[0], np.cumsum([len(i) for i, _ in rows])])
    data = np.concatenate([w for _, w in rows]).astype(np.float32)
    x = csr_matrix(
        (data, np.concatenate([i for i, _ in rows]), indptr), shape=(len(texts), len(featurizer.vocabulary))
    )
    if kind != "lsa":
        return x.toarray()
    norms = np.sqrt(np.asarray(x.multiply(x).sum(axis=1), dtype=np.float32))
    return np.asarray(x @ featurizer.lsa_components.T) / np.maximum(norms, 1e-12)


@pytest.mark.parametrize("kind", ["lsa", "tfidf", "bow"])
def test_caption_features_equal_the_sparse_products_bit_for_bit(kind):
    featurizer = load_model("default").text_
    captions = load_dataset(FLICKR8K).split("val").captions[:800] + ["", "zzz qqq", "a dog a dog a dog"]
    np.testing.assert_array_equal(
        featurizer.block(kind, captions), sparse_reference(featurizer, captions, kind)
    )


def test_a_text_query_does_not_import_scipy():
    code = (
        "import sys; from cbir.models import load_model; "
        "load_model('default').embed_texts(['a dog running on the beach']); "
        "print('scipy' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_block_columns_locate_a_block_without_computing_the_blocks_after_it(monkeypatch):
    """What text tuning replaces: the MiniLM columns of `transform`'s rows. Blocks after it are never
    computed for this (a CLIP kind there would load its checkpoint)."""
    from cbir.models.classical.text_features import TextFeaturizer

    captions = load_dataset(FLICKR8K).split("val").captions[:200]
    featurizer = TextFeaturizer("bow+minilm+lsa", lsa_dim=16).fit(captions)
    columns = featurizer.block_columns("minilm")
    assert (columns.start, columns.stop) == (len(featurizer.vocabulary), len(featurizer.vocabulary) + 384)
    rows = featurizer.transform(captions[:5])
    np.testing.assert_allclose(rows[:, columns], featurizer.block("minilm", captions[:5]), atol=1e-6)
    computed = []
    block = featurizer.block
    monkeypatch.setattr(featurizer, "block", lambda kind, texts: computed.append(kind) or block(kind, texts))
    featurizer.block_columns("minilm")
    assert computed == ["bow", "minilm"]
