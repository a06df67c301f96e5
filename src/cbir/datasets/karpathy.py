"""Karpathy-format caption JSON (`dataset_coco.json`, `dataset_flickr30k.json`, `dataset_rsicd.json`)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np

from cbir.datasets.base import Dataset, DatasetError, DatasetParts, read_text

SPLIT_ALIASES = {"restval": "train"}
KNOWN_SPLITS = ("train", "val", "test", "restval")


def find_json(root: Path) -> Path | None:
    found = sorted(root.glob("dataset_*.json"))
    return found[0] if found else None


def _image_dir(root: Path, filename: str, filepath: str | None) -> Path:
    for candidate in (
        root / (filepath or "") / filename,
        root / "images" / (filepath or "") / filename,
        root / "images" / filename,
        root / filename,
    ):
        if candidate.is_file():
            return candidate
    return root / "images" / (filepath or "") / filename


def _check_entry(entry: object, where: str, path: Path) -> dict:
    """An `images[k]` entry of the expected shape; a wrong type is named, never a traceback later."""
    if not isinstance(entry, dict) or entry.get("filename") is None:
        raise DatasetError(f"{where} has no 'filename'", path)
    for key, kind, name in (
        ("filename", str, "a string"),
        ("filepath", str, "a string"),
        ("split", str, "a string"),
        ("sentences", list, "a list"),
        ("tags", list, "a list"),
    ):
        value = entry.get(key)
        if value is not None and not isinstance(value, kind):
            raise DatasetError(f"{where}: '{key}' must be {name}, not {type(value).__name__}", path)
    for j, s in enumerate(entry.get("sentences") or []):
        if not isinstance(s, dict) or not isinstance(s.get("raw", ""), str):
            raise DatasetError(f"{where}.sentences[{j}]: expected an object with a string 'raw'", path)
    return entry


def read_karpathy(root: Path) -> Dataset:
    path = find_json(root)
    if path is None:
        raise DatasetError("no dataset_*.json here", root)
    try:
        doc = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise DatasetError(f"malformed JSON: {e.msg}", path, e.lineno) from e
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise DatasetError("expected an object with an 'images' list (Karpathy format)", path)
    parts = DatasetParts()
    report = parts.report
    augmented: list[bool] = []
    unknown_splits: Counter[str] = Counter()
    for k, entry in enumerate(doc["images"]):
        where = f"{path.name} images[{k}]"
        entry = _check_entry(entry, where, path)
        file = _image_dir(root, entry["filename"], entry.get("filepath"))
        if not file.is_file():
            report.skip(f"{where}: image file missing", file)
            continue
        split = entry.get("split") or "train"
        split = SPLIT_ALIASES.get(split, split)
        if split not in KNOWN_SPLITS:
            unknown_splits[split] += 1
        sents = [s for s in entry.get("sentences") or [] if str(s.get("raw", "")).strip()]
        if not sents:
            report.skip(f"{where}: no captions; kept as an uncaptioned image", file)
        idx = parts.add_image(file, split, [str(t) for t in entry.get("tags") or []])
        for s in sents:
            parts.add_caption(str(s["raw"]).strip(), idx)
            augmented.append(bool(s.get("augmented", False)))
    for split, n in sorted(unknown_splits.items()):
        report.skip(
            f"split '{split}' ({n} image(s)) is none of {', '.join(KNOWN_SPLITS)}; kept under that name", path
        )
    return parts.build(root, "karpathy", augmented=np.array(augmented, dtype=bool))
