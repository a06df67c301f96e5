"""On-disk feature cache keyed by content hash and model, so a second run over the same inputs is free.

Each `put` writes one shard (`.npz` of keys and rows) atomically; a reader loads every shard of its
namespace. A killed run loses at most the shard it was writing, never a finished one: its hidden
temporary is never read. A shard that cannot be read is renamed aside (`*.npz.damaged`) with a
warning naming it, and its rows are simply recomputed.
"""

from __future__ import annotations

import hashlib
import os
import uuid
import warnings
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np


def default_cache_dir() -> Path:
    return Path(os.environ.get("CBIR_CACHE_DIR", Path.home() / ".cache" / "cbir"))


def content_key(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def text_key(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def file_hash(path: Path) -> str:
    """SHA-1 of a file's bytes, read in blocks (a large file is never held whole)."""
    h = hashlib.sha1()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class FeatureCache:
    """Rows of float32 features under string keys, in one namespace (model + variant)."""

    _open: dict[Path, FeatureCache] = {}

    def __init__(self, namespace: str, root: Path | str | None = None):
        self.dir = Path(root or default_cache_dir()) / namespace
        self._rows: dict[str, np.ndarray] | None = None

    @classmethod
    def open(cls, namespace: str, root: Path | str | None = None) -> FeatureCache:
        """The process's one instance for this namespace: its shards are read from disk once, not on
        every encode call (indexing a folder encodes chunk after chunk against a growing cache)."""
        directory = (Path(root or default_cache_dir()) / namespace).resolve()
        if directory not in cls._open:
            cls._open[directory] = cls(namespace, root)
        return cls._open[directory]

    def _load(self) -> dict[str, np.ndarray]:
        if self._rows is None:
            self._rows = {}
            for shard in self._shards():
                try:
                    with np.load(shard, allow_pickle=False) as z:
                        self._rows.update(zip(z["keys"].tolist(), z["rows"], strict=True))
                except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
                    self._set_aside(shard, e)
        return self._rows

    def _shards(self) -> list[Path]:
        """Finished shards only: temporaries are hidden (and older runs named them `.*.tmp.npz`)."""
        if not self.dir.is_dir():
            return []
        return sorted(p for p in self.dir.glob("*.npz") if not p.name.startswith("."))

    @staticmethod
    def _set_aside(shard: Path, error: Exception) -> None:
        """A damaged shard only costs recomputation; it is kept, renamed, for whoever wants to look."""
        aside = shard.with_name(shard.name + ".damaged")
        try:
            os.replace(shard, aside)
            where = f"set aside as {aside.name}"
        except OSError:
            where = "left in place (cannot rename it)"
        warnings.warn(
            f"{shard}: damaged feature-cache shard ({error or type(error).__name__}), {where}; "
            "its features will be recomputed",
            stacklevel=3,
        )

    def get(self, key: str) -> np.ndarray | None:
        return self._load().get(key)

    def get_many(self, keys: Iterable[str]) -> dict[str, np.ndarray]:
        rows = self._load()
        return {k: rows[k] for k in keys if k in rows}

    def put_many(self, keys: Sequence[str], rows: np.ndarray) -> None:
        if len(keys) == 0:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        rows = np.asarray(rows, dtype=np.float32)
        name = uuid.uuid4().hex
        tmp = self.dir / f".{name}.npz.tmp"
        with tmp.open("wb") as f:  # a file object: numpy adds no `.npz` that the shard glob would match
            np.savez(f, keys=np.array(keys), rows=rows)
        os.replace(tmp, self.dir / f"{name}.npz")
        self._load().update(zip(keys, rows, strict=True))

    def __len__(self) -> int:
        return len(self._load())
