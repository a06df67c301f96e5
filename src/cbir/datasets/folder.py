"""A plain folder of photos without captions, walked recursively (for indexing a collection)."""

from __future__ import annotations

from pathlib import Path

from cbir.datasets.base import IMAGE_SUFFIXES, Dataset, DatasetError


def list_images(root: Path) -> list[Path]:
    """Image files below root in a stable order, hidden folders skipped. Broken (dangling or
    looping) symbolic links are listed too, so that reading them fails and they are reported."""
    found = [
        p
        for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES
        and (p.is_file() or (p.is_symlink() and not p.is_dir()))
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    ]
    return sorted(found)


def read_folder(root: Path) -> Dataset:
    images = list_images(root)
    if not images:
        raise DatasetError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) below this folder", root)
    return Dataset(root=root, format="folder", images=images, splits=[""] * len(images))
