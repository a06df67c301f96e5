"""Search filters: folder (path prefix), date (EXIF capture date, else file date), camera.

The capture date and camera are read from each photo's EXIF when it is indexed and stored in its
manifest entry (`meta`), so filtering needs no file access. A filter narrows the photos before
ranking: top-k of a filtered search is k photos that pass (when that many do).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

# EXIF tags: DateTimeOriginal and DateTimeDigitized live in the Exif sub-IFD, DateTime/Make/Model in IFD0.
EXIF_IFD = 0x8769
DATE_TAGS = (36867, 36868)  # DateTimeOriginal, DateTimeDigitized
DATETIME, MAKE, MODEL = 306, 271, 272
EXIF_DATE_FORMAT = "%Y:%m:%d %H:%M:%S"
DATE_FORMATS = ("%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M", "%Y-%m-%d", "%Y-%m", "%Y")
REINDEX_HINT = "rerun `cbir index` on its folder to record them (no photo is embedded again)"


class FilterError(ValueError):
    """A filter that cannot be applied: a malformed date, or an index that lacks the metadata."""


def photo_metadata(path: Path) -> dict[str, str | None]:
    """What filters need from a photo's EXIF: its capture date (ISO) and camera, None when absent."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            exif = im.getexif()
    except Exception:  # Pillow raises many types for unreadable files; the file is then skipped anyway
        return {"taken": None, "camera": None}
    sub = exif.get_ifd(EXIF_IFD)
    raw_date = next((sub[t] for t in DATE_TAGS if sub.get(t)), None) or exif.get(DATETIME)
    camera = " ".join(_text(exif.get(tag)) for tag in (MAKE, MODEL) if _text(exif.get(tag)))
    return {"taken": _exif_date(raw_date), "camera": camera or None}


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return str(value).strip("\x00 ").strip() if value else ""


def _exif_date(raw: Any) -> str | None:
    try:
        return datetime.strptime(_text(raw)[:19], EXIF_DATE_FORMAT).isoformat()
    except ValueError:
        return None


def parse_date(text: str, option: str = "date") -> datetime:
    """`2024`, `2024-05`, `2024-05-01` or an ISO date and time; the start of that period."""
    for fmt in DATE_FORMATS:
        try:
            return datetime.strptime(text.strip(), fmt)
        except ValueError:
            continue
    raise FilterError(f"{option}: '{text}' is not a date (use YYYY, YYYY-MM, YYYY-MM-DD or YYYY-MM-DDTHH:MM)")


@dataclass(frozen=True)
class Filters:
    """Which photos a search may return. `after` is inclusive, `before` exclusive (a May search:
    after 2024-05, before 2024-06); dates are the EXIF capture date, else the file's modification date."""

    folder: str | None = None  # path prefix relative to the indexed folder (`trip` matches `trip/…`)
    after: datetime | None = None
    before: datetime | None = None
    camera: str | None = None  # case-insensitive part of the EXIF make and model

    @classmethod
    def parse(
        cls,
        folder: str | None = None,
        after: str | None = None,
        before: str | None = None,
        camera: str | None = None,
    ) -> Filters:
        """Filters from user text (CLI options, HTTP parameters); empty strings mean no filter."""
        return cls(
            folder=folder.strip() or None if folder else None,
            after=parse_date(after, "--after") if after else None,
            before=parse_date(before, "--before") if before else None,
            camera=camera.strip() or None if camera else None,
        )

    def __bool__(self) -> bool:
        return any(v is not None for v in (self.folder, self.after, self.before, self.camera))

    def allowed(
        self, ids: Sequence[str], meta: Sequence[dict[str, Any] | None], mtimes_ns: Sequence[int], root: Path
    ) -> np.ndarray:
        """A boolean mask over the index rows: True where the photo passes every filter."""
        keep = np.ones(len(ids), dtype=bool)
        if self.folder is not None:
            prefix = _relative_prefix(self.folder, root)
            keep &= np.array([not prefix or i == prefix or i.startswith(prefix + "/") for i in ids], bool)
        if self.after is not None or self.before is not None:
            dates = [_date_of(m, t) for m, t in zip(_require(meta, "capture dates"), mtimes_ns, strict=True)]
            if self.after is not None:
                keep &= np.array([d >= self.after for d in dates], bool)
            if self.before is not None:
                keep &= np.array([d < self.before for d in dates], bool)
        if self.camera is not None:
            wanted = self.camera.lower()
            cameras = [(m or {}).get("camera") or "" for m in _require(meta, "cameras")]
            keep &= np.array([wanted in c.lower() for c in cameras], bool)
        return keep


def _relative_prefix(folder: str, root: Path) -> str:
    """A folder filter as an id prefix: relative to the indexed folder, or an absolute path below it."""
    path = Path(folder).expanduser()
    if path.is_absolute():
        try:
            path = path.resolve().relative_to(root)
        except ValueError:
            raise FilterError(f"--folder: {folder} is not inside the indexed folder {root}") from None
    return path.as_posix().strip("/").removeprefix("./").rstrip("/") if str(path) != "." else ""


def _require(meta: Sequence[dict[str, Any] | None], what: str) -> Sequence[dict[str, Any]]:
    if any(m is None for m in meta):
        raise FilterError(f"this index was built before {what} were recorded; {REINDEX_HINT}")
    return meta  # type: ignore[return-value]


def _date_of(meta: dict[str, Any], mtime_ns: int) -> datetime:
    if meta.get("taken"):
        return datetime.fromisoformat(meta["taken"])
    return datetime.fromtimestamp(mtime_ns / 1e9)
