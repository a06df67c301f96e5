"""COCO captions JSON (`annotations/captions_train2017.json` and friends) beside the image folders."""

from __future__ import annotations

import json
from pathlib import Path

from cbir.datasets.base import Dataset, DatasetError, DatasetParts, read_text


def find_caption_files(root: Path) -> list[Path]:
    return sorted(root.glob("captions_*.json")) + sorted(root.glob("annotations/captions_*.json"))


def _split_of(path: Path) -> str:
    stem = path.stem.lower()
    if "train" in stem:
        return "train"
    if "test" in stem:
        return "test"
    return "val"


def _locate(root: Path, file_name: str, split_dirs: list[Path]) -> Path:
    for d in split_dirs:
        if (d / file_name).is_file():
            return d / file_name
    return split_dirs[0] / file_name if split_dirs else root / file_name


def _check_shape(doc: object, path: Path) -> None:
    """The COCO captions shape, checked before use: a wrong type is named by its entry, never a
    traceback later."""
    if not isinstance(doc, dict) or not all(isinstance(doc.get(k), list) for k in ("images", "annotations")):
        raise DatasetError("expected 'images' and 'annotations' lists (COCO captions format)", path)
    for k, im in enumerate(doc["images"]):
        if not (
            isinstance(im, dict)
            and isinstance(im.get("id"), int | str)
            and isinstance(im.get("file_name"), str)
        ):
            raise DatasetError(f"images[{k}]: expected an object with an 'id' and a string 'file_name'", path)
    for k, ann in enumerate(doc["annotations"]):
        if not (isinstance(ann, dict) and isinstance(ann.get("caption", ""), str)):
            raise DatasetError(f"annotations[{k}]: expected an object with a string 'caption'", path)
        if not isinstance(ann.get("image_id"), int | str | None):
            raise DatasetError(f"annotations[{k}]: 'image_id' must be a number or string", path)


def read_coco(root: Path) -> Dataset:
    files = find_caption_files(root)
    if not files:
        raise DatasetError("no captions_*.json here or in annotations/", root)
    parts = DatasetParts()
    report = parts.report
    for path in files:
        try:
            doc = json.loads(read_text(path))
        except json.JSONDecodeError as e:
            raise DatasetError(f"malformed JSON: {e.msg}", path, e.lineno) from e
        _check_shape(doc, path)
        split = _split_of(path)
        year = path.stem.split("_", 1)[-1]  # e.g. train2017
        dirs = [d for d in (root / year, root / "images" / year, root / "images", root) if d.is_dir()]
        index_of: dict[int, int] = {}
        for k, im in enumerate(doc["images"]):
            file = _locate(root, im["file_name"], dirs)
            if not file.is_file():
                report.skip(f"images[{k}]: image file missing", file)
                continue
            index_of[im["id"]] = parts.add_image(file, split)
        for k, ann in enumerate(doc["annotations"]):
            text = ann.get("caption", "").strip()
            if ann.get("image_id") not in index_of:
                report.skip(f"annotations[{k}]: caption of an unknown or missing image", path)
            elif not text:
                report.skip(f"annotations[{k}]: empty caption", path)
            else:
                parts.add_caption(text, index_of[ann["image_id"]])
    return parts.build(root, "coco")
