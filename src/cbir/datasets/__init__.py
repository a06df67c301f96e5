"""Dataset readers, one per format, all yielding `Dataset`; `load_dataset` picks the format."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from cbir.datasets.base import Dataset, DatasetError, LoadReport, hash_split
from cbir.datasets.coco import find_caption_files, read_coco
from cbir.datasets.csv_captions import find_csv, read_csv_captions
from cbir.datasets.folder import list_images, read_folder
from cbir.datasets.kaggle import is_kaggle, read_kaggle
from cbir.datasets.karpathy import find_json, read_karpathy

# Checked in order; the plain folder comes last since any folder of images qualifies.
READERS: dict[str, tuple[Callable[[Path], bool], Callable[[Path], Dataset]]] = {
    "karpathy": (lambda p: find_json(p) is not None, read_karpathy),
    "kaggle": (is_kaggle, read_kaggle),
    "coco": (lambda p: bool(find_caption_files(p)), read_coco),
    "csv": (lambda p: find_csv(p) is not None, read_csv_captions),
    "folder": (lambda p: True, read_folder),
}


def detect_format(path: Path | str) -> str:
    root = Path(path)
    if not root.exists():
        raise DatasetError("no such folder", root)
    if not root.is_dir():
        raise DatasetError("a dataset is a folder (Karpathy JSON, Kaggle layout, COCO, CSV or images)", root)
    return next(name for name, (accepts, _) in READERS.items() if accepts(root))


def load_dataset(path: Path | str, format: str | None = None) -> Dataset:
    """Read a dataset folder in any supported format, detected from its files unless given."""
    root = Path(path).expanduser().resolve()
    fmt = format or detect_format(root)
    if fmt not in READERS:
        raise DatasetError(f"unknown format '{fmt}' (known: {', '.join(READERS)})", root)
    return READERS[fmt][1](root)


__all__ = [
    "Dataset",
    "DatasetError",
    "LoadReport",
    "READERS",
    "detect_format",
    "hash_split",
    "list_images",
    "load_dataset",
]
