"""Image and text feature extractors, and `image_features`: one place that turns a dataset into an
image representation, computed by EfficientNet-Lite0 or read from the dataset's precomputed CSVs."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from cbir.encoders.cache import FeatureCache, default_cache_dir
from cbir.encoders.image import VIEWS, ImageEncoder, ImageFeatures
from cbir.encoders.text import TextEncoder

if TYPE_CHECKING:
    from cbir.datasets import Dataset

# name -> (dimension, source): "effnet" kinds are computed; the others come with the dataset.
IMAGE_REPRESENTATIONS = {
    "effnet-pool": 1280,
    "effnet-logits": 1000,
    "effnet-stages": 784,
    "resnet2048": 2048,
    "resnet1000": 1000,
}

_shared: dict[str, object] = {}


def shared_image_encoder() -> ImageEncoder:
    """One encoder per process, so the network is loaded once however many models ask."""
    return _shared.setdefault("image", ImageEncoder())  # type: ignore[return-value]


def shared_text_encoder() -> TextEncoder:
    return _shared.setdefault("text", TextEncoder())  # type: ignore[return-value]


def resolve_image_representation(name: str, dataset: Dataset, computed: str = "effnet-pool") -> str:
    """`auto` = the dataset's precomputed ResNet pool5 features when it has them, else `computed`."""
    if name != "auto":
        return name
    return "resnet2048" if "resnet2048" in dataset.features else computed


def image_features(
    dataset: Dataset, kind: str = "effnet-pool", view: str = "center", progress: bool = True
) -> np.ndarray:
    """(n_images, d) float32 features of one representation; failed images get zero rows (reported)."""
    if kind not in IMAGE_REPRESENTATIONS:
        raise ValueError(f"unknown image representation '{kind}' (known: {', '.join(IMAGE_REPRESENTATIONS)})")
    if kind.startswith("resnet"):
        if kind not in dataset.features:
            raise ValueError(
                f"{kind} features are precomputed CSVs that {dataset.root} does not have; "
                "use an effnet-* representation for this data"
            )
        return dataset.features[kind]
    feats = shared_image_encoder().encode(dataset.images, view=view, progress=progress)
    for reason in feats.failed.values():
        dataset.report.skip("image not embedded (zero vector)", reason)
    return {"effnet-pool": feats.pooled, "effnet-logits": feats.logits, "effnet-stages": feats.stages}[kind]


__all__ = [
    "IMAGE_REPRESENTATIONS",
    "VIEWS",
    "FeatureCache",
    "ImageEncoder",
    "ImageFeatures",
    "TextEncoder",
    "default_cache_dir",
    "image_features",
    "resolve_image_representation",
    "shared_image_encoder",
    "shared_text_encoder",
]
