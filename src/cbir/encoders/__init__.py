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
    """(n_images, d) float32 features of one representation, or of several joined by '+' side by side
    (`effnet-pool+effnet-logits`: one network pass serves all effnet kinds); failed images get zero
    rows (reported)."""
    kinds = kind.split("+")
    unknown = [k for k in kinds if k not in IMAGE_REPRESENTATIONS]
    if unknown:
        raise ValueError(
            f"unknown image representation '{unknown[0]}' (known: {', '.join(IMAGE_REPRESENTATIONS)})"
        )
    computed = None
    blocks = []
    for k in kinds:
        if k.startswith("resnet"):
            if k not in dataset.features:
                raise ValueError(
                    f"{k} features are precomputed CSVs that {dataset.root} does not have; "
                    "use an effnet-* representation for this data"
                )
            blocks.append(dataset.features[k])
            continue
        if computed is None:
            computed = shared_image_encoder().encode(dataset.images, view=view, progress=progress)
            for reason in computed.failed.values():
                dataset.report.skip("image not embedded (zero vector)", reason)
        blocks.append(
            {
                "effnet-pool": computed.pooled,
                "effnet-logits": computed.logits,
                "effnet-stages": computed.stages,
            }[k]
        )
    return blocks[0] if len(blocks) == 1 else np.concatenate(blocks, 1)


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
