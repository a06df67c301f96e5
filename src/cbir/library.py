"""A photo folder that keeps itself indexed: a default index location per folder, finding it again
from where you stand, bringing an index up to date, and following a folder for new photos.

Where an index goes when `cbir index FOLDER` has no `--out`: `FOLDER/.cbir` (hidden folders are never
indexed), or, when FOLDER is not writable, `DATA/indexes/NAME-HASH` where DATA is `$CBIR_DATA_DIR`,
else `$XDG_DATA_HOME/cbir`, else `~/.local/share/cbir`, and HASH is taken from the folder's path.
Where `cbir search` (and `show`, `serve`) looks when it has no `--index`: the default index of the
current folder or the nearest folder above it that has one, else the index built last (`DATA/last-index`).
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable
from pathlib import Path

from cbir.index import IndexFormatError, SearchIndex, read_manifest, update_index
from cbir.indexing import add_paths
from cbir.manifest import is_index

FOLDER_INDEX = ".cbir"
LAST_INDEX = "last-index"
WATCH_INTERVAL = 2.0  # seconds between two looks at a watched folder


def data_dir() -> Path:
    if os.environ.get("CBIR_DATA_DIR"):
        return Path(os.environ["CBIR_DATA_DIR"])
    xdg = os.environ.get("XDG_DATA_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "share") / "cbir"


def _keyed_dir(folder: Path) -> Path:
    digest = hashlib.sha1(str(folder).encode("utf-8", "surrogateescape")).hexdigest()[:12]
    return data_dir() / "indexes" / f"{folder.name or 'root'}-{digest}"


def default_index_dir(folder: Path | str) -> Path:
    """Where `folder`'s index lives when none is named: inside it if it is writable, else in DATA."""
    folder = Path(folder).expanduser().resolve()
    inside = folder / FOLDER_INDEX
    if inside.is_dir() or os.access(folder, os.W_OK):
        return inside
    return _keyed_dir(folder)


def remember(index_dir: Path) -> None:
    """Record the index built last, for a `cbir search` run outside any indexed folder."""
    target = data_dir() / LAST_INDEX
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(str(index_dir))


def find_index(start: Path | None = None) -> Path:
    """The index a command without `--index` means (see the module docstring), or a clear error."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        for candidate in (folder / FOLDER_INDEX, _keyed_dir(folder)):
            if is_index(candidate):
                return candidate
    last = data_dir() / LAST_INDEX
    if last.is_file() and is_index(Path(last.read_text().strip())):
        return Path(last.read_text().strip())
    raise IndexFormatError(
        f"no index found for {here} or the folders above it, and none built before: "
        "run `cbir index FOLDER` first, or pass --index"
    )


def model_of(index_dir: Path) -> str | Path:
    """The model an index was built with, to update it with the same one: its recorded source, or the
    index's own copy when that source (a trained model directory) is gone."""
    from cbir.index import MODEL_DIR, _source_of

    source = _source_of(read_manifest(index_dir))
    if source in ("default", "zero-shot") or Path(source).is_dir():
        return source
    return index_dir / MODEL_DIR


def refresh(index_dir: Path, progress: bool = False):
    """Bring an index up to date with its folder (new, changed, deleted photos); (index, report)."""
    index_dir = Path(index_dir).expanduser().resolve()
    root = Path(read_manifest(index_dir)["root"])
    return update_index(root, index_dir, model_of(index_dir), progress=progress)


def folder_changes(index: SearchIndex) -> list[Path]:
    """The photos where the indexed folder differs from the index: added, removed, or with another size
    or modification time (the cheap look a watcher takes before it updates)."""
    from cbir.datasets import list_images

    seen = {}
    for path in list_images(index.root):
        image_id = path.relative_to(index.root).as_posix()
        if image_id in index.failed:
            continue
        try:
            st = path.stat()
        except OSError:
            continue
        seen[image_id] = (st.st_size, st.st_mtime_ns)
    changed = {i for i, st in seen.items() if index._indexed_stat.get(i) != st}
    return [index.root / i for i in sorted(changed | (set(index.ids) - set(seen)))]


class Watcher(threading.Thread):
    """Follows an index's folder by polling: on a change, updates the index for the photos that changed
    (`add_paths`: neither the other entries nor unchanged shards are read again) and hands the new
    snapshot to `publish` (the server swaps it in under its search lock)."""

    def __init__(
        self,
        index: SearchIndex,
        publish: Callable[[SearchIndex], None],
        interval: float = WATCH_INTERVAL,
        on_error: Callable[[Exception], None] | None = None,
    ):
        super().__init__(name=f"cbir-watch {index.root}", daemon=True)
        self.index, self.publish, self.interval, self.on_error = index, publish, interval, on_error
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                changed = folder_changes(self.index)
                if changed:
                    self._update(changed)
                    self.index = SearchIndex.open(self.index.path)
                    self.publish(self.index)
            except Exception as e:  # a failed round is reported and retried at the next interval
                if self.on_error is not None:
                    self.on_error(e)

    def _update(self, changed: list[Path]) -> None:
        """The changed photos added; a full update when `add_paths` refuses because the index's model
        changed since it was built (retrained in place, a new cbir's default): a rebuild with it."""
        try:
            add_paths(self.index.root, self.index.path, changed, model_of(self.index.path), progress=False)
        except IndexFormatError:
            refresh(self.index.path)

    def stop(self) -> None:
        self.stopped.set()
