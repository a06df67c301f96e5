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
        if (d / file_name).exists():
            return d / file_name
    return split_dirs[0] / file_name if split_dirs else root / file_name


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
        if not isinstance(doc, dict) or "images" not in doc or "annotations" not in doc:
            raise DatasetError("expected 'images' and 'annotations' (COCO captions format)", path)
        split = _split_of(path)
        year = path.stem.split("_", 1)[-1]  # e.g. train2017
        dirs = [d for d in (root / year, root / "images" / year, root / "images", root) if d.is_dir()]
        index_of: dict[int, int] = {}
        for k, im in enumerate(doc["images"]):
            if "id" not in im or "file_name" not in im:
                raise DatasetError(f"images[{k}] lacks 'id' or 'file_name'", path)
            file = _locate(root, im["file_name"], dirs)
            if not file.exists():
                report.skip(f"images[{k}]: image file missing", file)
                continue
            index_of[im["id"]] = parts.add_image(file, split)
        for k, ann in enumerate(doc["annotations"]):
            text = str(ann.get("caption", "")).strip()
            if ann.get("image_id") not in index_of:
                report.skip(f"annotations[{k}]: caption of an unknown or missing image", path)
            elif not text:
                report.skip(f"annotations[{k}]: empty caption", path)
            else:
                parts.add_caption(text, index_of[ann["image_id"]])
    return parts.build(root, "coco")
