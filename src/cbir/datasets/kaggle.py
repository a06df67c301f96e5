"""The Kaggle cs5785-fall19-final layout.

`images_{split}/N.jpg`, `descriptions_{split}/N.txt` (one caption a line), `tags_{split}/N.txt`
(`supercategory:category` a line), optional `features_{split}/features_resnet1000*_{split}.csv`.
Test descriptions are shuffled against test images: `descriptions_test/N.txt` is one query (its
lines joined) whose image is known only from `answers_test.csv`, when that file is present.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from cbir.datasets.base import Dataset, DatasetError, DatasetParts, read_text
from cbir.feature_kinds import FEATURE_KINDS, PRECOMPUTED_KINDS

KAGGLE_SPLITS = ("train", "test")
ANSWERS_FILE = "answers_test.csv"
# feature name -> (file stem, width)
FEATURE_FILES = {name: (FEATURE_KINDS[name].csv_stem, FEATURE_KINDS[name].dim) for name in PRECOMPUTED_KINDS}


def is_kaggle(root: Path) -> bool:
    return (root / "images_train").is_dir() or (root / "images_test").is_dir()


def _numbered(folder: Path, suffix: str) -> list[Path]:
    files = [p for p in folder.iterdir() if p.suffix.lower() == suffix and p.stem.isdecimal()]
    return sorted(files, key=lambda p: int(p.stem))


def _lines(path: Path) -> list[str]:
    return [line.strip() for line in read_text(path).splitlines() if line.strip()]


def read_feature_csv(path: Path, width: int, row_of: dict[str, int]) -> np.ndarray:
    """Rows `images_x/N.jpg,v1,...,v_width` in any order, placed by image; every image needs one."""
    out = np.full((len(row_of), width), np.nan, dtype=np.float32)
    text = read_text(path)
    for lineno, line in enumerate(io.StringIO(text), start=1):
        line = line.strip()
        if not line:
            continue
        name, _, rest = line.partition(",")
        name = name.strip().strip('"')
        try:
            values = np.array(rest.split(","), dtype=np.float32)
        except ValueError as e:
            raise DatasetError(f"non-numeric feature value ({e})", path, lineno) from e
        if values.shape[0] != width:
            raise DatasetError(
                f"expected {width} feature values after the image name, got {values.shape[0]}", path, lineno
            )
        if name not in row_of:
            raise DatasetError(f"row names an unknown image '{name}'", path, lineno)
        out[row_of[name]] = values
    missing = [n for n, i in row_of.items() if np.isnan(out[i, 0])]
    if missing:
        raise DatasetError(f"no feature row for {len(missing)} image(s), e.g. {missing[0]}", path)
    return out


def read_kaggle(root: Path) -> Dataset:
    parts = DatasetParts()
    report, images = parts.report, parts.images
    caption_ids: list[str] = []
    caption_split: list[str] = []
    features: dict[str, list[np.ndarray]] = {}
    missing_for: dict[str, list[Path]] = {}
    answers = _read_answers(root / ANSWERS_FILE) if (root / ANSWERS_FILE).exists() else {}
    for split in KAGGLE_SPLITS:
        img_dir = root / f"images_{split}"
        if not img_dir.is_dir():
            continue
        first = len(images)
        by_number: dict[int, int] = {}
        for p in _numbered(img_dir, ".jpg"):
            tag_file = root / f"tags_{split}" / f"{p.stem}.txt"
            by_number[int(p.stem)] = parts.add_image(p, split, _lines(tag_file) if tag_file.exists() else [])
        desc_dir = root / f"descriptions_{split}"
        if desc_dir.is_dir():
            for d in _numbered(desc_dir, ".txt"):
                lines = _lines(d)
                if not lines:
                    report.skip("empty description file", d, 1)
                    continue
                if split == "test":
                    # One query per file; its image is unknown unless the answers say.
                    parts.add_caption(" ".join(lines), by_number.get(answers.get(d.name, -1), -1))
                    caption_ids.append(d.name)
                    caption_split.append(split)
                    continue
                if int(d.stem) not in by_number:
                    report.skip(f"no image {d.stem}.jpg in {img_dir.name}", d)
                    continue
                for k, line in enumerate(lines):
                    parts.add_caption(line, by_number[int(d.stem)])
                    caption_ids.append(f"{d.name}#{k}")
                    caption_split.append(split)
        row_of = {images[i].relative_to(root).as_posix(): i - first for i in range(first, len(images))}
        for name, (stem, width) in FEATURE_FILES.items():
            f = root / f"features_{split}" / f"{stem}_{split}.csv"
            if f.exists():
                features.setdefault(name, []).append(read_feature_csv(f, width, row_of))
            else:
                missing_for.setdefault(name, []).append(f)
    if not images:
        raise DatasetError("no images_train/ or images_test/ images", root)
    for name, files in missing_for.items():
        if name in features:
            raise DatasetError(f"{name} features exist for another split but this file is missing", files[0])
    return parts.build(
        root,
        "kaggle",
        caption_ids=caption_ids,
        caption_split=caption_split,
        features={k: np.concatenate(v) for k, v in features.items()},
    )


def _read_answers(path: Path) -> dict[str, int]:
    """`Descritpion_ID,Image_ID` rows (the competition's spelling) -> description file -> image number."""
    rows = list(csv.reader(io.StringIO(read_text(path))))
    out: dict[str, int] = {}
    for lineno, row in enumerate(rows, start=1):
        if lineno == 1 and row and not row[0].endswith(".txt"):
            continue  # header
        if len(row) != 2 or not row[1].strip().removesuffix(".jpg").isdecimal():
            raise DatasetError("expected 'N.txt,M.jpg'", path, lineno)
        out[row[0].strip()] = int(row[1].strip().removesuffix(".jpg"))
    return out
