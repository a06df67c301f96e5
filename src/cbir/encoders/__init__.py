"""Image and text feature extractors, and `image_features`: one place that turns a dataset into an
image representation, computed by an EfficientNet-Lite (Lite0 unless a model names another backbone)
or a user's CLIP checkpoint, or read from the dataset's precomputed CSVs."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cbir.encoders.cache import FeatureCache, default_cache_dir
from cbir.encoders.text import TextEncoder
from cbir.feature_kinds import (
    AUTO_PRECOMPUTED,
    DEFAULT_BACKBONE,
    DEFAULT_COMPUTED,
    FEATURE_KINDS,
    VIEWS,
    absolute_clip_kind,
    check_kinds,
    clip_checkpoint,
    computed_columns,
)

if TYPE_CHECKING:
    from cbir.datasets import Dataset
    from cbir.encoders.clip import ClipEncoder
    from cbir.encoders.image import ImageEncoder, ImageFeatures

_shared: dict[str, object] = {}
IMAGE_NAMES = ("ImageEncoder", "ImageFeatures")


def __getattr__(name: str) -> Any:
    """The image encoder's names, from `cbir.encoders.image` on first use: a text query never needs
    it, and importing it (PIL, a thread pool) is ~25 ms of a cold `cbir search`."""
    if name in IMAGE_NAMES:
        from cbir.encoders import image

        return getattr(image, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def shared_image_encoder(backbone: str = DEFAULT_BACKBONE) -> ImageEncoder:
    """One encoder per backbone and process, so each network is loaded once however many models ask."""
    from cbir.encoders.image import ImageEncoder

    key = f"image:{backbone}"
    if key not in _shared:
        _shared[key] = ImageEncoder(backbone=backbone)
    return _shared[key]  # type: ignore[return-value]


def shared_text_encoder() -> TextEncoder:
    return _shared.setdefault("text", TextEncoder())  # type: ignore[return-value]


def shared_clip_encoder(path: Path | str) -> ClipEncoder:
    """One encoder per CLIP checkpoint and process; the checkpoint is checked now (a missing or
    malformed one is a `ClipCheckpointError` naming the file) and its weights loaded on first use."""
    from cbir.encoders.clip import ClipCheckpoint, ClipEncoder

    checkpoint = ClipCheckpoint.open(path)
    key = f"clip:{checkpoint.stamps}"  # changed files: a new encoder
    if key not in _shared:
        _shared[key] = ClipEncoder(checkpoint)
    return _shared[key]  # type: ignore[return-value]


def resolve_image_representation(name: str, dataset: Dataset, computed: str = DEFAULT_COMPUTED) -> str:
    """`auto` = the dataset's precomputed ResNet pool5 features when it has them, else `computed`; a
    `clip:PATH` part gets its absolute path, so a saved model finds the checkpoint from anywhere."""
    if name == "auto":
        return AUTO_PRECOMPUTED if AUTO_PRECOMPUTED in dataset.features else computed
    return "+".join(absolute_clip_kind(k) for k in name.split("+"))


def encoder_views(kind: str, views: Sequence[str]) -> list[str]:
    """What `encode_images` computes for representation `kind` seen in `views`: each `clip:PATH` part,
    and the EfficientNet `views` unless every part is a CLIP one."""
    parts = kind.split("+")
    clip_parts = [k for k in parts if clip_checkpoint(k)]
    return clip_parts + ([] if len(clip_parts) == len(parts) else list(views))


def computed_views(kind: str, views: Sequence[str]) -> list[str]:
    """`encoder_views` of the parts of `kind` that are computed from the photos: none when every part
    is precomputed (or `tags`), so there is nothing to encode."""
    parts = kind.split("+")
    computed = [k for k in parts if clip_checkpoint(k) or (k in FEATURE_KINDS and FEATURE_KINDS[k].computed)]
    return encoder_views("+".join(computed), views) if computed else []


@dataclass
class EncodedImages:
    """A dataset's image files encoded: the dataset with the computed features of each view attached
    (where `image_features` finds them), the content key of each file, and the files that failed."""

    dataset: Dataset
    keys: list[str]  # SHA-1 of each file's bytes; "" where it could not be read
    failed: dict[int, str]  # image row -> reason; its features are zero


class UnreadableImagesWarning(UserWarning):
    """Images that `image_features` could not read, so they are zero rows (training, evaluation)."""


def computed_features_key(view: str, backbone: str = DEFAULT_BACKBONE) -> str:
    """Where a dataset holds the computed features of one view by one backbone, beside its precomputed
    kinds; a `clip:PATH` kind is held under its own name."""
    return view if clip_checkpoint(view) else f"effnet-{backbone}@{view}"


def encode_images(
    dataset: Dataset,
    views: Sequence[str] = ("center",),
    progress: bool = True,
    backbone: str = DEFAULT_BACKBONE,
) -> EncodedImages:
    """Every view of each image file from one read and one hash of it per encoder; the failures are
    returned, not reported anywhere. A view may be a `clip:PATH` kind: that checkpoint's embeddings;
    the others are computed by the EfficientNet-Lite `backbone`."""
    clip_kinds = [v for v in views if clip_checkpoint(v)]
    effnet_views = [v for v in views if not clip_checkpoint(v)]
    runs = [
        (v, shared_clip_encoder(clip_checkpoint(v)).encode(dataset.images, "center", progress))
        for v in clip_kinds
    ]
    if effnet_views or not runs:
        runs.append(("", shared_image_encoder(backbone).encode(dataset.images, effnet_views, progress)))
    attached: dict[str, np.ndarray] = {}
    for kind, feats in runs:
        attached.update(
            {computed_features_key(kind or view, backbone): rows for view, rows in feats.views.items()}
        )
    failed = {row: reason for _, feats in runs for row, reason in feats.failed.items()}
    return EncodedImages(replace(dataset, features={**dataset.features, **attached}), runs[0][1].keys, failed)


def attach_features(dataset: Dataset, feats: ImageFeatures) -> EncodedImages:
    """The dataset with its images' computed features attached, wherever they were computed (here, or
    on Ray workers from files decoded there)."""
    attached = {computed_features_key(view, feats.backbone): rows for view, rows in feats.views.items()}
    return EncodedImages(
        replace(dataset, features={**dataset.features, **attached}), feats.keys, feats.failed
    )


def _computed_rows(dataset: Dataset, view: str, progress: bool, backbone: str) -> np.ndarray:
    """The dataset's computed features of `view` (or `clip:PATH` kind): attached by `encode_images`, or
    encoded now and kept on the dataset (so training reads each file once), with a warning naming
    unreadable files."""
    key = computed_features_key(view, backbone)
    if key not in dataset.features:
        encoded = encode_images(dataset, (view,), progress, backbone)
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
    dataset: Dataset,
    kind: str = DEFAULT_COMPUTED,
    view: str = "center",
    progress: bool = True,
    backbone: str = DEFAULT_BACKBONE,
) -> np.ndarray:
    """(n_images, d) float32 features of one representation, or of several joined by '+' side by side
    (`effnet-pool+effnet-logits`: one pass of the `backbone` network serves all computed kinds);
    unreadable images get zero rows."""
    kinds = kind.split("+")
    check_kinds(kinds)
    blocks = []
    for k in kinds:
        if clip_checkpoint(k):
            if view != "center":
                raise ValueError(f"{k}: CLIP features have only the center view, not {view}")
            blocks.append(_computed_rows(dataset, k, progress, backbone))
        elif FEATURE_KINDS[k].computed:
            blocks.append(_computed_rows(dataset, view, progress, backbone)[:, computed_columns(k, backbone)])
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
    "computed_views",
    "encoder_views",
    "image_features",
    "resolve_image_representation",
    "shared_clip_encoder",
    "shared_image_encoder",
    "shared_text_encoder",
]
