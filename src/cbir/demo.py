"""`cbir demo`: the main job end to end, on the shipped default model and a captioned test split.

The test photos become a plain folder (as a user's would be), which is indexed and searched with a
few everyday queries; because the photos have reference captions, each result can be shown with its
caption and the model scored on the whole split (R@K, mR, MAP@20).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from cbir.datasets import Dataset

DEMO_QUERIES = (
    "a dog running on the beach",
    "children playing in the snow",
    "a man riding a bike on a dirt path",
)


def link_or_copy(src: Path, dst: Path) -> None:
    """`dst` becomes the same file as `src`: a hard link where the file system allows, else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def photo_folder(data: Dataset, folder: Path) -> Path:
    """The split's photos in one folder, as a user's photo folder would be."""
    folder.mkdir(parents=True, exist_ok=True)
    for src in data.images:
        if not (folder / src.name).exists():
            link_or_copy(src, folder / src.name)
    return folder


def reference_captions(data: Dataset) -> dict[str, str]:
    """File name -> the photo's first reference caption."""
    first: dict[str, str] = {}
    for caption, image in zip(data.captions, data.caption_image, strict=True):
        if image >= 0:
            first.setdefault(data.images[image].name, caption)
    return first
