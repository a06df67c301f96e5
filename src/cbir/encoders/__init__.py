"""Image and text feature extractors, and `image_features`: one place that turns a dataset into an
image representation, computed by EfficientNet-Lite0 or read from the dataset's precomputed CSVs."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from cbir.encoders.cache import FeatureCache, default_cache_dir
from cbir.encoders.image import VIEWS, ImageEncoder, ImageFeatures
from cbir.encoders.text import TextEncoder
from cbir.feature_kinds import (
    AUTO_PRECOMPUTED,
    DEFAULT_COMPUTED,
    FEATURE_KINDS,
    check_kinds,
    computed_columns,
)

if TYPE_CHECKING:
    from cbir.datasets import Dataset

_shared: dict[str, object] = {}


def shared_image_encoder() -> ImageEncoder:
    """One encoder per process, so the network is loaded once however many models ask."""
    return _shared.setdefault("image", ImageEncoder())  # type: ignore[return-value]


def shared_text_encoder() -> TextEncoder:
    return _shared.setdefault("text", TextEncoder())  # type: ignore[return-value]


def resolve_image_representation(name: str, dataset: Dataset, computed: str = DEFAULT_COMPUTED) -> str:
    """`auto` = the dataset's precomputed ResNet pool5 features when it has them, else `computed`."""
    if name != "auto":
        return name
    return AUTO_PRECOMPUTED if AUTO_PRECOMPUTED in dataset.features else computed


def image_features(
    dataset: Dataset, kind: str = DEFAULT_COMPUTED, view: str = "center", progress: bool = True
) -> np.ndarray:
    """(n_images, d) float32 features of one representation, or of several joined by '+' side by side
    (`effnet-pool+effnet-logits`: one network pass serves all effnet kinds); failed images get zero
    rows (reported)."""
    kinds = kind.split("+")
    check_kinds(kinds)
    computed = None
    blocks = []
    for k in kinds:
        if not FEATURE_KINDS[k].computed:
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
        blocks.append(computed.rows[:, computed_columns(k)])
    return blocks[0] if len(blocks) == 1 else np.concatenate(blocks, 1)


__all__ = [
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
