"""The helpers every method's model selection shares: is there a usable val split, which fold."""

import dataclasses

import numpy as np
import pytest

from cbir.models import ModelError
from cbir.models.base import fold_of_images, has_scored_val


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
