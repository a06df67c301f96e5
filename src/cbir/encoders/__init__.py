"""Image and text feature extractors, and `image_features`: one place that turns a dataset into an
image representation, computed by EfficientNet-Lite0 or read from the dataset's precomputed CSVs."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
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


@dataclass
class EncodedImages:
    """A dataset's image files encoded: the dataset with the computed features of each view attached
    (where `image_features` finds them), the content key of each file, and the files that failed."""

    dataset: Dataset
    keys: list[str]  # SHA-1 of each file's bytes; "" where it could not be read
    failed: dict[int, str]  # image row -> reason; its features are zero


class UnreadableImagesWarning(UserWarning):
    """Images that `image_features` could not read, so they are zero rows (training, evaluation)."""


def computed_features_key(view: str) -> str:
    """Where a dataset holds the computed features of one view, beside its precomputed kinds."""
    return f"effnet@{view}"


def encode_images(
    dataset: Dataset, views: Sequence[str] = ("center",), progress: bool = True
) -> EncodedImages:
    """Every view of each image file from one read and one hash of it; the failures are returned,
    not reported anywhere."""
    return attach_features(dataset, shared_image_encoder().encode(dataset.images, views, progress))


def attach_features(dataset: Dataset, feats: ImageFeatures) -> EncodedImages:
    """The dataset with its images' computed features attached, wherever they were computed (here, or
    on Ray workers from files decoded there)."""
    attached = {computed_features_key(view): rows for view, rows in feats.views.items()}
    return EncodedImages(
        replace(dataset, features={**dataset.features, **attached}), feats.keys, feats.failed
    )


def _computed_rows(dataset: Dataset, view: str, progress: bool) -> np.ndarray:
    """The dataset's computed features of `view`: attached by `encode_images`, or encoded now and
    kept on the dataset (so training reads each file once), with a warning naming unreadable files."""
    key = computed_features_key(view)
    if key not in dataset.features:
        encoded = encode_images(dataset, (view,), progress)
        if encoded.failed:
            shown = "; ".join(
                f"{dataset.images[i]}: {reason}" for i, reason in list(encoded.failed.items())[:5]
            )
            more = f" (and {len(encoded.failed) - 5} more)" if len(encoded.failed) > 5 else ""
            warnings.warn(
                f"{len(encoded.failed)} image(s) not embedded (zero vectors): {shown}{more}",
                UnreadableImagesWarning,
                stacklevel=3,
            )
        dataset.features[key] = encoded.dataset.features[key]
    return dataset.features[key]


def image_features(
    dataset: Dataset, kind: str = DEFAULT_COMPUTED, view: str = "center", progress: bool = True
) -> np.ndarray:
    """(n_images, d) float32 features of one representation, or of several joined by '+' side by side
    (`effnet-pool+effnet-logits`: one network pass serves all computed kinds); unreadable images get
    zero rows."""
    kinds = kind.split("+")
    check_kinds(kinds)
    blocks = []
    for k in kinds:
        if FEATURE_KINDS[k].computed:
            blocks.append(_computed_rows(dataset, view, progress)[:, computed_columns(k)])
        elif k in dataset.features:
            blocks.append(dataset.features[k])
        else:
            raise ValueError(
                f"{k} features are precomputed CSVs that {dataset.root} does not have; "
                "use an effnet-* representation for this data"
            )
    return blocks[0] if len(blocks) == 1 else np.concatenate(blocks, 1)


__all__ = [
    "EncodedImages",
    "UnreadableImagesWarning",
    "VIEWS",
    "FeatureCache",
    "attach_features",
    "ImageEncoder",
    "ImageFeatures",
    "TextEncoder",
    "default_cache_dir",
    "encode_images",
    "image_features",
    "resolve_image_representation",
    "shared_image_encoder",
    "shared_text_encoder",
]
