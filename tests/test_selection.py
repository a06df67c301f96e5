"""The helpers every method's model selection shares: is there a usable val split, which fold, the
grid search."""

import dataclasses
import re

import numpy as np
import pytest

from cbir.models import ModelError
from cbir.models.base import fold_of_images, grid_search, has_scored_val


def test_val_split_is_used_only_when_it_can_score(rsicd_slice):
    val = rsicd_slice.split("val")
    assert has_scored_val(val)
    assert not has_scored_val(None)
    assert not has_scored_val(dataclasses.replace(val, captions=[], caption_image=np.zeros(0, np.int64)))
    unpaired = dataclasses.replace(
        val, caption_image=np.where(np.arange(len(val.captions)) == 3, -1, val.caption_image)
    )
    assert not has_scored_val(unpaired)  # a caption without its image cannot be ranked


def test_folds_are_seeded_balanced_and_refused_when_too_small():
    folds = fold_of_images(40, 3, seed=0)
    np.testing.assert_array_equal(folds, fold_of_images(40, 3, seed=0))
    assert not np.array_equal(folds, fold_of_images(40, 3, seed=1))
    assert sorted(np.bincount(folds).tolist()) == [13, 13, 14]
    assert len(set(fold_of_images(6, 3, seed=0).tolist())) == 3
    with pytest.raises(ModelError, match="5 training images are too few for 3-fold cross-validation"):
        fold_of_images(5, 3, seed=0)


def test_grid_search_returns_the_best_candidate_the_first_of_equals_and_every_score():
    seen = []

    def score(c):
        seen.append(c)
        return -abs(c - 4)

    best, scores = grid_search([1, 3, 4, 5, 4.0], score, "test", progress=False)
    assert best == 4 and type(best) is int  # the first of the two best, not the last
    assert scores == [-3.0, -1.0, 0.0, -1.0, 0.0] and seen == [1, 3, 4, 5, 4.0]
    assert grid_search(["only"], lambda c: 0.5, "test", progress=False) == ("only", [0.5])
    with pytest.raises(ValueError, match="no candidates"):
        grid_search([], lambda c: 0.0, "test", progress=False)


@pytest.mark.parametrize(
    "method, params",
    [
        ("ridge", {}),
        ("kernel-ridge", {}),
        ("cca", {}),
        ("pls", {}),
        ("fusion", {"members": [{"method": "ridge"}, {"method": "cca"}]}),
        ("autoencoder", {}),
        ("contrastive", {}),
    ],
)
def test_fit_refuses_training_data_without_captioned_images(rsicd_slice, method, params):
    """The Python API refuses, as the CLI does, before any feature is computed."""
    from cbir.datasets import DatasetError
    from cbir.models import create_model

    train = rsicd_slice.split("train")
    no_captions = dataclasses.replace(
        train, captions=[], caption_image=np.zeros(0, np.int64), caption_split=None
    )
    unpaired = dataclasses.replace(train, caption_image=np.full(len(train.captions), -1), caption_split=None)
    for data in (no_captions, unpaired):
        with pytest.raises(
            DatasetError, match=re.escape(f"{data.root}: the train split has no captions paired with images")
        ):
            create_model(method, **params).fit(data)


def test_grid_search_shows_one_progress_line_for_the_grid(monkeypatch):
    import contextlib

    import cbir.models.base as base

    calls: list = []

    @contextlib.contextmanager
    def recording(label, total, enabled=True):
        calls.append((label, total, enabled))
        yield lambda n=1, **fields: calls.append((n, fields))

    monkeypatch.setattr(base, "progress_bar", recording)
    grid_search([1, 2], lambda c: c / 4, "choosing")
    assert calls == [("choosing", 2, True), (1, {"mR": 0.25}), (1, {"mR": 0.5})]
    calls.clear()
    grid_search([1], lambda c: 0.0, "one")  # a single candidate: nothing to show
    assert calls[0] == ("one", 1, False)
    calls.clear()
    grid_search([1, 2], lambda c: 0.0, "quiet", progress=False)
    assert calls[0] == ("quiet", 2, False)
