"""On-disk feature cache keyed by content hash and model, so a second run over the same inputs is free.

Layout under the cache root (`$CBIR_CACHE_DIR`, else ~/.cache/cbir):
  `<namespace>/<uuid>.npy`  float32 rows of one `put_many`, memory-mapped on lookup: a lookup reads
                            its own row, never the whole cache.
  `cache.sqlite`            key -> (shard, row) per namespace, and each shard's size and last use.

The cache is bounded: after a write, least-recently-used shards (all namespaces together) are deleted
until it fits in `max_bytes` (`$CBIR_CACHE_MAX_BYTES`, default 2 GiB). Eviction works per shard: a
shard's last use is that of its most recently read row.

A shard is written to a hidden temporary and renamed into place inside the database transaction that
names it, so a killed run loses at most the shard it was writing, never a finished one, and its
temporary is never read. A shard that cannot be read is renamed aside (`*.damaged`) with a warning
naming it, and its rows are simply recomputed. Shards of the older layout (`*.npz`, every row loaded
into memory) are moved into this one the first time their namespace is opened.

Query photos are embedded inside `transient()`: what they compute is not written (an uploaded photo
is not kept on disk).
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import os
import sqlite3
import threading
import time
import uuid
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

DATABASE = "cache.sqlite"
MAX_BYTES_ENV = "CBIR_CACHE_MAX_BYTES"
DEFAULT_MAX_BYTES = 2 << 30
OPEN_SHARDS = 64  # memory maps kept open per namespace (the most recently read shards)
UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
SCHEMA = """
CREATE TABLE IF NOT EXISTS shards (namespace TEXT, name TEXT, bytes INTEGER, used INTEGER,
                                   PRIMARY KEY (namespace, name));
CREATE TABLE IF NOT EXISTS rows (namespace TEXT, key TEXT, shard TEXT, row INTEGER,
                                 PRIMARY KEY (namespace, key));
CREATE INDEX IF NOT EXISTS rows_of_shard ON rows (namespace, shard);
CREATE INDEX IF NOT EXISTS shards_by_use ON shards (used);
"""

_transient: contextvars.ContextVar[bool] = contextvars.ContextVar("cbir_cache_transient", default=False)


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


def parse_bytes(text: str, what: str = MAX_BYTES_ENV) -> int:
    """`2147483648`, `512M`, `2G` (binary units) as a number of bytes; a clear error otherwise."""
    value = text.strip().upper().removesuffix("B").removesuffix("I")
    number, unit = (value[:-1], value[-1]) if value[-1:] in UNITS else (value, "")
    try:
        size = int(float(number) * UNITS[unit])
    except ValueError:
        raise ValueError(f"{what}: '{text}' is not a size in bytes (e.g. 2147483648, 512M or 2G)") from None
    if size < 0:
        raise ValueError(f"{what}: '{text}' is negative")
    return size


def default_max_bytes() -> int:
    """The size cap: `$CBIR_CACHE_MAX_BYTES` when set, else 2 GiB."""
    env = os.environ.get(MAX_BYTES_ENV, "").strip()
    return parse_bytes(env) if env else DEFAULT_MAX_BYTES


@contextlib.contextmanager
def transient() -> Iterator[None]:
    """Within it (in this thread or task), features are read from the cache but never written to it."""
    token = _transient.set(True)
    try:
        yield
    finally:
        _transient.reset(token)


class FeatureCache:
    """Rows of float32 features under string keys, in one namespace (model + variant)."""

    _open: dict[Path, FeatureCache] = {}

    def __init__(self, namespace: str, root: Path | str | None = None, max_bytes: int | None = None):
        self.root = Path(root or default_cache_dir())
        self.namespace = namespace
        self.dir = self.root / namespace
        self.max_bytes = default_max_bytes() if max_bytes is None else max_bytes
        self._db: sqlite3.Connection | None = None
        self._lock = threading.RLock()
        self._maps: OrderedDict[str, np.ndarray] = OrderedDict()

    @classmethod
    def open(
        cls, namespace: str, root: Path | str | None = None, max_bytes: int | None = None
    ) -> FeatureCache:
        """The process's one instance for this namespace (one database connection, its open shards)."""
        directory = (Path(root or default_cache_dir()) / namespace).resolve()
        if directory not in cls._open:
            cls._open[directory] = cls(namespace, root, max_bytes)
        return cls._open[directory]

    # Database ---------------------------------------------------------------------------------
    def _connection(self) -> sqlite3.Connection:
        """Opened on first use; the first opening in a process also adopts legacy shards."""
        if self._db is None:
            self.root.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(
                self.root / DATABASE, timeout=60, isolation_level=None, check_same_thread=False
            )
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(SCHEMA)
            self._db = db
            self._adopt_legacy_shards()
        return self._db

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (a process-wide and machine-wide lock on the cache while it lasts)."""
        with self._lock:
            db = self._connection()
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def _forget(self, db: sqlite3.Connection, shards: Sequence[str]) -> None:
        for name in shards:
            db.execute("DELETE FROM rows WHERE namespace = ? AND shard = ?", (self.namespace, name))
            db.execute("DELETE FROM shards WHERE namespace = ? AND name = ?", (self.namespace, name))
            self._maps.pop(name, None)

    # Reading ----------------------------------------------------------------------------------
    def get(self, key: str) -> np.ndarray | None:
        return self.get_many([key]).get(key)

    def get_many(self, keys: Iterable[str]) -> dict[str, np.ndarray]:
        """The cached rows of these keys (copies), each read from its memory-mapped shard."""
        wanted = list(dict.fromkeys(keys))
        if not wanted:
            return {}
        with self._lock:
            db = self._connection()
            where = self._locate(db, wanted)
            found, used = {}, set()
            for key, shard, row in where:
                vector = self._row(shard, row)
                if vector is not None:
                    found[key] = vector
                    used.add(shard)
            if used:
                marks = ",".join("?" * len(used))
                db.execute(
                    f"UPDATE shards SET used = ? WHERE namespace = ? AND name IN ({marks})",
                    (time.time_ns(), self.namespace, *used),
                )
        return found

    def known(self, keys: Iterable[str]) -> set[str]:
        """The keys the cache holds rows of, found without reading the rows (a damaged shard shows only
        when a row of it is read)."""
        wanted = list(dict.fromkeys(keys))
        with self._lock:
            return {key for key, _, _ in self._locate(self._connection(), wanted)} if wanted else set()

    def _locate(self, db: sqlite3.Connection, keys: Sequence[str]) -> list[tuple[str, str, int]]:
        """(key, shard, row) of each of these keys the cache holds."""
        where: list[tuple[str, str, int]] = []
        for start in range(0, len(keys), 500):  # SQLite caps the parameters of one statement
            part = keys[start : start + 500]
            marks = ",".join("?" * len(part))
            where += db.execute(
                f"SELECT key, shard, row FROM rows WHERE namespace = ? AND key IN ({marks})",
                (self.namespace, *part),
            ).fetchall()
        return where

    def _row(self, shard: str, row: int) -> np.ndarray | None:
        """One row of a shard; None (and the shard forgotten) when it is gone or damaged."""
        rows = self._maps.get(shard)
        if rows is None:
            path = self.dir / shard
            try:
                rows = np.load(path, mmap_mode="r", allow_pickle=False)
            except FileNotFoundError:  # evicted by another process meanwhile
                self._forget_now([shard])
                return None
            except (OSError, ValueError, EOFError) as e:
                self._set_aside(path, e)
                return None
            self._maps[shard] = rows
            while len(self._maps) > OPEN_SHARDS:
                self._maps.popitem(last=False)
        self._maps.move_to_end(shard)
        if not 0 <= row < len(rows):
            self._set_aside(self.dir / shard, IndexError(f"row {row} of {len(rows)}"))
            return None
        return np.array(rows[row], dtype=np.float32)

    def _forget_now(self, shards: Sequence[str]) -> None:
        with self._write() as db:
            self._forget(db, shards)

    def _set_aside(self, shard: Path, error: Exception) -> None:
        """A damaged shard only costs recomputation; it is kept, renamed, for whoever wants to look."""
        aside = shard.with_name(shard.name + ".damaged")
        try:
            os.replace(shard, aside)
            where = f"set aside as {aside.name}"
        except OSError:
            where = "left in place (cannot rename it)"
        if shard.suffix == ".npy":
            self._forget_now([shard.name])
        warnings.warn(
            f"{shard}: damaged feature-cache shard ({error or type(error).__name__}), {where}; "
            "its features will be recomputed",
            stacklevel=4,
        )

    def __len__(self) -> int:
        with self._lock:
            (n,) = (
                self._connection()
                .execute("SELECT COUNT(*) FROM rows WHERE namespace = ?", (self.namespace,))
                .fetchone()
            )
        return n

    def nbytes(self) -> int:
        """Bytes of shards the whole cache holds (every namespace): what `max_bytes` bounds."""
        with self._lock:
            (total,) = self._connection().execute("SELECT COALESCE(SUM(bytes), 0) FROM shards").fetchone()
        return total

    # Writing ----------------------------------------------------------------------------------
    def put_many(self, keys: Sequence[str], rows: np.ndarray) -> None:
        """One new shard holding these rows, then eviction down to the cap; nothing inside `transient()`."""
        if len(keys) and not _transient.get():
            self._put(keys, rows)
            self.evict()

    def _put(self, keys: Sequence[str], rows: np.ndarray) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        rows = np.asarray(rows, dtype=np.float32)
        name = f"{uuid.uuid4().hex}.npy"
        tmp = self.dir / f".{name}.tmp"
        with tmp.open("wb") as f:  # a file object: numpy adds no suffix that the shard glob would match
            np.save(f, rows)
        with self._write() as db:
            db.execute(
                "INSERT INTO shards VALUES (?, ?, ?, ?)",
                (self.namespace, name, tmp.stat().st_size, time.time_ns()),
            )
            db.executemany(
                "INSERT OR REPLACE INTO rows VALUES (?, ?, ?, ?)",
                [(self.namespace, key, name, i) for i, key in enumerate(keys)],
            )
            os.replace(tmp, self.dir / name)  # published with the rows that name it

    def evict(self) -> list[Path]:
        """Delete least-recently-used shards until the cache fits in `max_bytes`; the files deleted."""
        with self._write() as db:
            total = db.execute("SELECT COALESCE(SUM(bytes), 0) FROM shards").fetchone()[0]
            if total <= self.max_bytes:
                return []
            victims = []
            for namespace, name, size in db.execute(
                "SELECT namespace, name, bytes FROM shards ORDER BY used"
            ):
                if total <= self.max_bytes:
                    break
                victims.append((namespace, name))
                total -= size
            for namespace, name in victims:
                db.execute("DELETE FROM rows WHERE namespace = ? AND shard = ?", (namespace, name))
                db.execute("DELETE FROM shards WHERE namespace = ? AND name = ?", (namespace, name))
        deleted = [self.root / namespace / name for namespace, name in victims]
        for path in deleted:
            path.unlink(missing_ok=True)
        with self._lock:
            for namespace, name in victims:
                if namespace == self.namespace:
                    self._maps.pop(name, None)
        return deleted

    def _adopt_legacy_shards(self) -> None:
        """`.npz` shards of the older layout become shards of this one (unreadable ones are set aside)."""
        if not self.dir.is_dir():
            return
        for shard in sorted(p for p in self.dir.glob("*.npz") if not p.name.startswith(".")):
            try:
                with np.load(shard, allow_pickle=False) as z:
                    keys, rows = z["keys"].tolist(), z["rows"]
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
                self._set_aside(shard, e)
                continue
            if keys:
                self._put(keys, rows)
            shard.unlink()
