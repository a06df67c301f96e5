"""The one `Dataset` type every reader yields, and the errors and reports readers share."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp", ".gif"})
SPLITS = ("train", "val", "test")


class DatasetError(ValueError):
    """Input that cannot be read; the message names the file (and line when there is one)."""

    def __init__(self, message: str, path: Path | str | None = None, line: int | None = None):
        where = ""
        if path is not None:
            where = f"{path}:{line}: " if line is not None else f"{path}: "
        super().__init__(where + message)
        self.path = path
        self.line = line


@dataclass
class LoadReport:
    """What a reader skipped and why, so nothing is dropped silently."""

    skipped: list[str] = field(default_factory=list)

    def skip(self, message: str, path: Path | str, line: int | None = None) -> None:
        where = f"{path}:{line}" if line is not None else str(path)
        self.skipped.append(f"{where}: {message}")

    def __len__(self) -> int:
        return len(self.skipped)


@dataclass
class Dataset:
    """Images with their captions, optional tags and precomputed features, and a split per image.

    Captions are a flat list; `caption_image[j]` is the index of the image caption j describes,
    or -1 where the pairing is unknown (the Kaggle layout's shuffled test descriptions without
    an answer file). `caption_ids` names captions where the format has names (Kaggle `0.txt`).
    """

    root: Path
    format: str
    images: list[Path]
    splits: list[str]
    captions: list[str] = field(default_factory=list)
    caption_image: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    caption_ids: list[str] | None = None
    caption_split: list[str] | None = None
    augmented: np.ndarray | None = None
    tags: list[list[str]] | None = None
    features: dict[str, np.ndarray] = field(default_factory=dict)
    report: LoadReport = field(default_factory=LoadReport)

    def __post_init__(self) -> None:
        self.caption_image = np.asarray(self.caption_image, dtype=np.int64)
        if len(self.splits) != len(self.images):
            raise ValueError("one split per image is required")
        if len(self.caption_image) != len(self.captions):
            raise ValueError("one caption_image entry per caption is required")
        if self.caption_split is None:
            self.caption_split = [self.splits[i] if i >= 0 else "" for i in self.caption_image]

    @property
    def name(self) -> str:
        return self.root.name

    def __len__(self) -> int:
        return len(self.images)

    def __repr__(self) -> str:
        counts = {s: self.splits.count(s) for s in dict.fromkeys(self.splits)}
        return (
            f"Dataset({self.format} at {self.root}: {len(self.images)} images {counts}, "
            f"{len(self.captions)} captions, features={sorted(self.features)})"
        )

    @property
    def image_ids(self) -> list[str]:
        """Image paths relative to the dataset root: stable names for results and files."""
        out = []
        for p in self.images:
            try:
                out.append(p.relative_to(self.root).as_posix())
            except ValueError:
                out.append(str(p))
        return out

    def split(self, name: str) -> Dataset:
        """The images of one split (`train`, `val`, `test`, or `all`) and their captions.

        Captions whose image is unknown belong to the split given by `caption_split`.
        """
        if name == "all":
            return self
        if name not in self.splits and name not in (self.caption_split or []):
            have = sorted(set(self.splits))
            raise DatasetError(f"no '{name}' split here (splits: {', '.join(have)})", self.root)
        keep = [i for i, s in enumerate(self.splits) if s == name]
        return self.subset(keep, caption_split=name)

    def subset(self, image_indices: Sequence[int], caption_split: str | None = None) -> Dataset:
        """A dataset of the given images, their captions, tags and features, re-indexed."""
        idx = np.asarray(image_indices, dtype=np.int64)
        remap = np.full(len(self.images), -1, dtype=np.int64)
        remap[idx] = np.arange(len(idx))
        cap_img = self.caption_image
        in_subset = (cap_img >= 0) & (remap[np.maximum(cap_img, 0)] >= 0)
        unknown_here = (cap_img < 0) & np.array(
            [caption_split is not None and s == caption_split for s in self.caption_split], dtype=bool
        )
        cap_keep = np.flatnonzero(in_subset | unknown_here)
        return Dataset(
            root=self.root,
            format=self.format,
            images=[self.images[i] for i in idx],
            splits=[self.splits[i] for i in idx],
            captions=[self.captions[j] for j in cap_keep],
            caption_image=np.where(cap_img[cap_keep] >= 0, remap[np.maximum(cap_img[cap_keep], 0)], -1),
            caption_ids=None if self.caption_ids is None else [self.caption_ids[j] for j in cap_keep],
            caption_split=[self.caption_split[j] for j in cap_keep],
            augmented=None if self.augmented is None else self.augmented[cap_keep],
            tags=None if self.tags is None else [self.tags[i] for i in idx],
            features={k: v[idx] for k, v in self.features.items()},
            report=self.report,
        )

    def sample(self, n_per_split: int) -> Dataset:
        """Up to n images of every split, evenly spread over it: small, representative real slices
        for tests and quick runs (files are often ordered by scene, so the first n would not be)."""
        keep: list[int] = []
        for s in dict.fromkeys(self.splits):
            idx = [i for i, x in enumerate(self.splits) if x == s]
            step = max(1, len(idx) / n_per_split)
            keep.extend(idx[int(k * step)] for k in range(min(n_per_split, len(idx))))
        return self.subset(sorted(keep))

    def captions_of(self, image_index: int) -> list[str]:
        return [self.captions[j] for j in np.flatnonzero(self.caption_image == image_index)]

    @classmethod
    def from_paths(cls, paths: Sequence[Path | str], root: Path | str | None = None) -> Dataset:
        """Uncaptioned images, for indexing a folder or embedding one query image."""
        images = [Path(p).resolve() for p in paths]
        base = Path(root).resolve() if root is not None else (images[0].parent if images else Path("."))
        return cls(root=base, format="paths", images=images, splits=[""] * len(images))


@dataclass
class DatasetParts:
    """What a reader collects, image by image and caption by caption; `build` makes the Dataset."""

    report: LoadReport = field(default_factory=LoadReport)
    images: list[Path] = field(default_factory=list)
    splits: list[str] = field(default_factory=list)
    tags: list[list[str]] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    caption_image: list[int] = field(default_factory=list)

    def add_image(self, path: Path, split: str, tags: list[str] | None = None) -> int:
        """Append an image; its index, for the captions that describe it."""
        self.images.append(path)
        self.splits.append(split)
        self.tags.append(tags or [])
        return len(self.images) - 1

    def add_caption(self, text: str, image: int) -> None:
        self.captions.append(text)
        self.caption_image.append(image)

    def build(self, root: Path, format: str, **extra: Any) -> Dataset:
        """The Dataset; tags only when some image has them, `extra` fields as given."""
        return Dataset(
            root=root,
            format=format,
            images=self.images,
            splits=self.splits,
            captions=self.captions,
            caption_image=np.array(self.caption_image, dtype=np.int64),
            tags=self.tags if any(self.tags) else None,
            report=self.report,
            **extra,
        )


def hash_split(key: str, val_share: float = 0.1, test_share: float = 0.1) -> str:
    """A deterministic train/val/test split for formats that carry none (stable across runs)."""
    h = int.from_bytes(hashlib.sha1(key.encode()).digest()[:4], "big") / 2**32
    if h < test_share:
        return "test"
    if h < test_share + val_share:
        return "val"
    return "train"


def read_text(path: Path) -> str:
    """UTF-8 text or a DatasetError naming the file and the line of the first bad byte."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DatasetError(f"cannot read: {e.strerror or e}", path) from e
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DatasetError(
            f"not UTF-8 text (byte {e.start}: {data[e.start : e.start + 1]!r})", path, line
        ) from e
