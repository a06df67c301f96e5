"""Image representations for the classical models: encoder features and object tags, standardised.

Kinds (joined with `+`): the feature kinds of `cbir.feature_kinds`, `auto` (the precomputed pool5
features when the dataset has them, else the computed pooled features) and `tags` (bag of the
image's tag words, as the cs5785 competitors used them; images without tags get zeros). Every column
is standardised with the training images' mean and spread.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cbir.datasets import Dataset
from cbir.encoders import image_features, resolve_image_representation
from cbir.feature_kinds import CLIP_KIND, FEATURE_KINDS
from cbir.models.classical.text_features import parse_kinds, words

IMAGE_KINDS = (*FEATURE_KINDS, "auto", "tags", CLIP_KIND)


class ImageFeaturizer:
    """Fits the column statistics (and tag vocabulary) on training images; `transform` embeds any."""

    def __init__(self, kinds: str = "auto"):
        parse_kinds(kinds, IMAGE_KINDS, "image representation")
        self.spec = kinds
        self.kinds: list[str] = []
        self.tag_words: dict[str, int] = {}
        self.mean = self.scale = np.zeros(0, dtype=np.float32)

    def kinds_of(self, images: Dataset) -> list[str]:
        """The kinds `fit` on these images uses (`auto` resolved)."""
        return [resolve_image_representation(k, images) for k in parse_kinds(self.spec, IMAGE_KINDS, "")]

    def fit(self, images: Dataset) -> ImageFeaturizer:
        self.kinds = self.kinds_of(images)
        if "tags" in self.kinds:
            vocab = sorted({w for tags in images.tags or [] for tag in tags for w in words(tag)})
            self.tag_words = {w: i for i, w in enumerate(vocab)}
        raw = self._raw(images)
        self.mean = raw.mean(0)
        self.scale = raw.std(0) + 1e-6
        return self

    def _tags(self, images: Dataset) -> np.ndarray:
        out = np.zeros((len(images), len(self.tag_words)), dtype=np.float32)
        for i, tags in enumerate(images.tags or [[]] * len(images)):
            for tag in tags:
                for w in words(tag):
                    if w in self.tag_words:
                        out[i, self.tag_words[w]] = 1.0
        return out

    def _raw(self, images: Dataset) -> np.ndarray:
        blocks = [self._tags(images) if k == "tags" else image_features(images, k) for k in self.kinds]
        return np.concatenate(blocks, axis=1).astype(np.float32)

    def transform(self, images: Dataset) -> np.ndarray:
        return (self._raw(images) - self.mean) / self.scale

    @property
    def representation(self) -> str:
        return "+".join(self.kinds)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"image.mean": self.mean, "image.scale": self.scale}

    def state(self) -> dict[str, Any]:
        return {"representation": self.representation, "tag_words": list(self.tag_words)}

    def restore(self, arrays: dict[str, np.ndarray], state: dict[str, Any]) -> None:
        self.mean, self.scale = arrays["image.mean"], arrays["image.scale"]
        self.kinds = state["representation"].split("+")
        self.tag_words = {w: i for i, w in enumerate(state["tag_words"])}
