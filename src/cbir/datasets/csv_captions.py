"""A CSV of `image,caption` rows (Flickr8k's `captions.txt`); splits by a stable hash of the image name."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from cbir.datasets.base import Dataset, DatasetError, DatasetParts, hash_split, read_text

CSV_NAMES = ("captions.txt", "captions.csv")


def find_csv(root: Path) -> Path | None:
    for name in CSV_NAMES:
        if (root / name).is_file():
            return root / name
    return None


def read_csv_captions(root: Path) -> Dataset:
    path = find_csv(root)
    if path is None:
        raise DatasetError(f"no {' or '.join(CSV_NAMES)} here", root)
    img_dirs = [d for d in (root / "Images", root / "images", root) if d.is_dir()]
    parts = DatasetParts()
    report = parts.report
    index_of: dict[str, int] = {}
    rows = csv.reader(io.StringIO(read_text(path)))
    next_line = 1  # a quoted field may span lines: count where each row starts
    for row in rows:
        lineno, next_line = next_line, rows.line_num + 1
        if any("\n" in c for c in row):  # no caption spans lines: a quote was left open
            raise DatasetError(
                f"unclosed quote: this row runs on to line {rows.line_num} (close the quote or remove it)",
                path,
                lineno,
            )
        if lineno == 1 and [c.strip().lower() for c in row[:2]] == ["image", "caption"]:
            continue
        if not row or not any(c.strip() for c in row):
            continue
        if len(row) < 2:
            raise DatasetError("expected 'image,caption'", path, lineno)
        name, text = row[0].strip(), ",".join(row[1:]).strip()
        if name not in index_of:
            file = next((d / name for d in img_dirs if (d / name).is_file()), None)
            if file is None:
                report.skip(f"image '{name}' not found", path, lineno)
                index_of[name] = -1
            else:
                index_of[name] = parts.add_image(file, hash_split(name))
        if index_of[name] < 0:
            continue
        if not text:
            report.skip("empty caption", path, lineno)
            continue
        parts.add_caption(text, index_of[name])
    return parts.build(root, "csv")
