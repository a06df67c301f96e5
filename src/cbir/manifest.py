"""The index manifest, in SQLite: what a reader opens and what each chunk of a writer commits.

One file, `index.sqlite` (WAL mode), holds generations of an index: the folder and model of each, the
vector shards with their SHA-1, one entry per image (size, mtime, content hash, shard + row, EXIF meta)
and the files that failed. The pointer `live` names the generation readers open; `next` names one being
built aside (another model or folder) while readers keep the live one, and one transaction switches
them. A writer commits each chunk in one transaction that touches only that chunk's rows, so adding N
photos costs O(N) whatever the size of the collection; a reader reads one snapshot in one read
transaction, so it never sees a half-written state and never waits for the writer. Each shard keeps
the count of entries in it (`live`, kept by triggers on `entries`) and the stat signature its file had
when its SHA-1 last matched (`verified`), so neither needs a pass over all entries or all shard bytes.
The table `ann` names each generation's approximate index and the shards it covers (with their rows in
use when it was built), so a writer decides from the shard counters alone whether it still serves.

Indexes written before (a JSON manifest, `index.json`, rewritten whole per chunk) still open; the next
`cbir index` run upgrades them (`upgrade_legacy`).
"""

from __future__ import annotations

import json
import os
import sqlite3
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MANIFEST = "index.sqlite"
LEGACY_MANIFEST = "index.json"
SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")
TMP_SUFFIX = ".cbir-tmp"  # every temporary file or folder the index writes ends so; nothing else is swept
FORMAT = "cbir-index"
VERSION = 2
NEXT = "next"  # the key under which `read_manifest` shows a generation being built aside
HEADER = ("root", "model_source", "model_fingerprint", "model_dir", "dim")

SCHEMA = """
CREATE TABLE info (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE generations (gen INTEGER PRIMARY KEY, root BLOB NOT NULL, model_source TEXT,
    model_fingerprint TEXT, model_dir TEXT, dim INTEGER);
CREATE TABLE pointers (name TEXT PRIMARY KEY, gen INTEGER NOT NULL);
CREATE TABLE shards (gen INTEGER NOT NULL, name TEXT NOT NULL, sha1 TEXT, rows INTEGER NOT NULL,
    seq INTEGER NOT NULL, live INTEGER NOT NULL DEFAULT 0, verified TEXT, PRIMARY KEY (gen, name));
CREATE TABLE entries (gen INTEGER NOT NULL, id BLOB NOT NULL, size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL, sha1 TEXT NOT NULL, shard TEXT NOT NULL, row INTEGER NOT NULL, meta TEXT,
    PRIMARY KEY (gen, id));
CREATE INDEX entries_by_shard ON entries (gen, shard, row);
CREATE TABLE failed (gen INTEGER NOT NULL, id BLOB NOT NULL, size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL, sha1 TEXT NOT NULL, reason TEXT NOT NULL, PRIMARY KEY (gen, id));
"""
# The approximate index of a generation: its file in `shards/` and the shards it holds, every row of
# each ([name, rows] in order); created by the first writer of a manifest written before it.
ANN_TABLE = (
    "CREATE TABLE IF NOT EXISTS ann (gen INTEGER PRIMARY KEY, name TEXT NOT NULL, shards TEXT NOT NULL)"
)
# Rows in use per shard, kept by every change to `entries` (an entry moved by an upsert counts too).
SHARD_COUNTERS = (
    "CREATE TRIGGER entry_added AFTER INSERT ON entries BEGIN"
    " UPDATE shards SET live = live + 1 WHERE gen = NEW.gen AND name = NEW.shard; END;",
    "CREATE TRIGGER entry_removed AFTER DELETE ON entries BEGIN"
    " UPDATE shards SET live = live - 1 WHERE gen = OLD.gen AND name = OLD.shard; END;",
    "CREATE TRIGGER entry_moved AFTER UPDATE OF shard ON entries WHEN OLD.shard IS NOT NEW.shard BEGIN"
    " UPDATE shards SET live = live - 1 WHERE gen = OLD.gen AND name = OLD.shard;"
    " UPDATE shards SET live = live + 1 WHERE gen = NEW.gen AND name = NEW.shard; END;",
)
ENTRIES = (
    "SELECT e.id, e.size, e.mtime_ns, e.sha1, e.shard, e.row, e.meta FROM entries e"
    " JOIN shards s ON s.gen = e.gen AND s.name = e.shard WHERE e.gen = ? {where} ORDER BY s.seq, e.row"
)
ENTRY_ROWS = "SELECT id, size, mtime_ns, sha1, shard, row, meta FROM entries"
FAILED = "SELECT id, size, mtime_ns, sha1, reason FROM failed"
LOOKUP_BATCH = 500  # ids per lookup query (SQLite's limit on bound values may be as low as 999)


class IndexFormatError(ValueError):
    """A path that is not a usable index directory; the message says which file and why."""


def tmp_path(path: Path) -> Path:
    """A hidden sibling for writing `path` before publishing it; only such names are ever swept."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}{TMP_SUFFIX}")


def is_index(index_dir: Path) -> bool:
    """Whether a folder holds an index manifest (this format or the JSON one before it)."""
    return (index_dir / MANIFEST).is_file() or (index_dir / LEGACY_MANIFEST).is_file()


def _key(image_id: str) -> bytes:
    """Ids are stored as the bytes of the file name: names that are not UTF-8 survive unchanged."""
    return os.fsencode(image_id)


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, timeout=60)
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


@contextmanager
def _transaction(conn: sqlite3.Connection, kind: str = "IMMEDIATE") -> Iterator[sqlite3.Connection]:
    conn.execute(f"BEGIN {kind}")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


# Reading ----------------------------------------------------------------------------------------
def read_manifest(path: Path, *, raw_meta: bool = False) -> dict[str, Any]:
    """The live generation as plain data (root, model keys, dim, shards, entries in vector order,
    failed), with the header of a generation built aside under `NEXT`; one consistent snapshot.
    `raw_meta`: each entry's SQLite meta as its JSON text, for a reader that decodes it only if a
    filter asks (decoding all of it is a quarter of reading a manifest)."""
    if not path.is_dir():
        raise IndexFormatError(
            f"{path}: no such index directory; build one with `cbir index FOLDER --out {path}`"
        )
    if (path / MANIFEST).is_file():
        return _read_sqlite(path / MANIFEST, raw_meta)
    if (path / LEGACY_MANIFEST).is_file():
        try:
            return read_legacy(path / LEGACY_MANIFEST)
        except FileNotFoundError:  # upgraded to SQLite since the check above
            return _read_sqlite(path / MANIFEST, raw_meta)
    raise IndexFormatError(f"{path}: not an index directory (no {MANIFEST}); build one with `cbir index`")


def read_legacy(file: Path) -> dict[str, Any]:
    """A manifest of the JSON format, as `read_manifest` shows it."""
    try:
        manifest = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise IndexFormatError(f"{file}:{e.lineno}: malformed JSON: {e.msg}") from e
    if manifest.get("format") != FORMAT:
        raise IndexFormatError(f"{file}: not a cbir index manifest (format={manifest.get('format')!r})")
    return manifest


def _read_sqlite(file: Path, raw_meta: bool = False) -> dict[str, Any]:
    try:
        with closing(_connect(file)) as conn, _transaction(conn, "DEFERRED"):
            live, next_gen = _pointers(conn)
            manifest = {"format": FORMAT, "version": VERSION, **load_generation(conn, live, raw_meta)}
            if next_gen is not None:
                manifest[NEXT] = header(conn, next_gen)
            return manifest
    except sqlite3.DatabaseError as e:
        raise IndexFormatError(f"{file}: not a readable cbir index manifest ({e})") from e


def _pointers(conn: sqlite3.Connection) -> tuple[int, int | None]:
    found = dict(conn.execute("SELECT name, gen FROM pointers"))
    if "live" not in found:
        raise sqlite3.DatabaseError("no live generation")
    return found["live"], found.get(NEXT)


def header(conn: sqlite3.Connection, gen: int) -> dict[str, Any]:
    """A generation's folder, model keys and vector dimension."""
    row = conn.execute(f"SELECT {', '.join(HEADER)} FROM generations WHERE gen = ?", (gen,)).fetchone()
    if row is None:
        raise sqlite3.DatabaseError(f"generation {gen} is missing")
    data = dict(zip(HEADER, row, strict=True))
    data["root"] = os.fsdecode(data["root"])
    return {"gen": gen, **data}


def load_generation(conn: sqlite3.Connection, gen: int, raw_meta: bool = False) -> dict[str, Any]:
    """A generation whole: header, shard checksums, entries (in vector order) and failures."""
    shards = dict(conn.execute("SELECT name, sha1 FROM shards WHERE gen = ? ORDER BY seq", (gen,)))
    entries = entries_of(conn, gen, raw_meta=raw_meta)
    failed = [_failure(*row) for row in conn.execute(f"{FAILED} WHERE gen = ? ORDER BY id", (gen,))]
    generation = {**header(conn, gen), "shards": shards, "entries": entries, "failed": failed}
    return {**generation, "ann": ann_of(conn, gen)}


def ann_of(conn: sqlite3.Connection, gen: int) -> dict[str, Any] | None:
    """A generation's approximate index: its file name and the shards it covers ([name, rows], in its
    row order); None when it has none (or the manifest predates them)."""
    if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'ann'").fetchone() is None:
        return None
    row = conn.execute("SELECT name, shards FROM ann WHERE gen = ?", (gen,)).fetchone()
    return None if row is None else {"name": row[0], "shards": json.loads(row[1])}


def set_ann(conn: sqlite3.Connection, gen: int, ann: dict[str, Any] | None) -> None:
    """Name a generation's approximate index (None: it has none)."""
    conn.execute("DELETE FROM ann WHERE gen = ?", (gen,))
    if ann is not None:
        shards = json.dumps(ann["shards"])
        conn.execute("INSERT INTO ann VALUES (?, ?, ?)", (gen, ann["name"], shards))


def entries_of(
    conn: sqlite3.Connection, gen: int, shards: Sequence[str] | None = None, raw_meta: bool = False
) -> list[dict[str, Any]]:
    """A generation's entries (of some shards only, when named), in vector order: shard, then row."""
    where = "" if shards is None else f"AND e.shard IN ({', '.join('?' * len(shards))})"
    rows = conn.execute(ENTRIES.format(where=where), (gen, *(shards or ())))
    return [_entry(*row, raw_meta=raw_meta) for row in rows]


def lookup(conn: sqlite3.Connection, gen: int, ids: Iterable[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The entries and the failures of these image ids only, by id: each looked up by its key, so the
    cost is that of the ids asked for, whatever the size of the generation."""
    keys = [_key(i) for i in dict.fromkeys(ids)]
    entries, failed = {}, {}
    for start in range(0, len(keys), LOOKUP_BATCH):
        batch = keys[start : start + LOOKUP_BATCH]
        where = f"WHERE gen = ? AND id IN ({', '.join('?' * len(batch))})"
        for row in conn.execute(f"{ENTRY_ROWS} {where}", (gen, *batch)):
            entries[os.fsdecode(row[0])] = _entry(*row)
        for row in conn.execute(f"{FAILED} {where}", (gen, *batch)):
            failed[os.fsdecode(row[0])] = _failure(*row)
    return entries, failed


def ids_below(conn: sqlite3.Connection, gen: int, folder: str) -> list[str]:
    """The ids of the entries and failures below `folder` (relative to the indexed folder; "." for
    all), by a range of the ids' index: the cost is theirs, not the generation's."""
    if folder in ("", "."):
        where, args = "WHERE gen = ?", (gen,)
    else:
        low = _key(folder.rstrip("/") + "/")
        where, args = "WHERE gen = ? AND id >= ? AND id < ?", (gen, low, low[:-1] + b"0")  # "0" follows "/"
    rows = []
    for table in ("entries", "failed"):
        rows += conn.execute(f"SELECT id FROM {table} {where}", args).fetchall()
    return [os.fsdecode(image_id) for (image_id,) in rows]


def _failure(image_id: bytes, size: int, mtime_ns: int, sha1: str, reason: str) -> dict[str, Any]:
    return {"id": os.fsdecode(image_id), "size": size, "mtime_ns": mtime_ns, "sha1": sha1, "reason": reason}


def _entry(
    image_id: bytes,
    size: int,
    mtime_ns: int,
    sha1: str,
    shard: str,
    row: int,
    meta: str | None,
    raw_meta: bool = False,
) -> dict[str, Any]:
    entry = {"id": os.fsdecode(image_id), "size": size, "mtime_ns": mtime_ns, "sha1": sha1}
    entry.update(shard=shard, row=row)
    if meta is not None:
        entry["meta"] = meta if raw_meta else json.loads(meta)
    return entry


# Writing ----------------------------------------------------------------------------------------
@dataclass
class ShardInfo:
    """A vector shard of a generation: its file rows, how many of them entries use, its order."""

    name: str
    rows: int
    live: int
    seq: int
    sha1: str | None = None
    verified: str | None = None  # the file's `stat_signature` when its SHA-1 last matched


def create_manifest(index_dir: Path, root: Path) -> None:
    """An empty index, published whole by rename: a run killed early leaves an index, not a foreign
    folder."""
    _publish_new(index_dir, {"live": {"root": str(root), "entries": [], "failed": []}})


def upgrade_legacy(index_dir: Path) -> None:
    """Rewrite a JSON manifest (and the generation it built aside) as SQLite, then drop the JSON."""
    legacy = read_legacy(index_dir / LEGACY_MANIFEST)
    _publish_new(index_dir, {"live": legacy, NEXT: legacy.get(NEXT)})
    (index_dir / LEGACY_MANIFEST).unlink()


def _publish_new(index_dir: Path, generations: dict[str, dict[str, Any] | None]) -> None:
    """A manifest holding these generations (by pointer name), written aside and renamed into place."""
    target = index_dir / MANIFEST
    staging = tmp_path(target)
    with closing(_connect(staging)) as conn:
        conn.executescript(SCHEMA + f"{ANN_TABLE};\n" + "\n".join(SHARD_COUNTERS))
        with _transaction(conn):
            info = [("format", FORMAT), ("version", str(VERSION))]
            conn.executemany("INSERT INTO info VALUES (?, ?)", info)
            for name, generation in generations.items():
                if generation:
                    gen = _insert_generation(conn, generation)
                    conn.execute("INSERT INTO pointers VALUES (?, ?)", (name, gen))
                    _import_rows(conn, gen, generation)
        conn.execute("PRAGMA journal_mode=WAL")
    for side in SQLITE_SIDE_FILES:  # never let a stray log of some earlier file apply to this one
        (index_dir / f"{MANIFEST}{side}").unlink(missing_ok=True)
    os.replace(staging, target)


def _insert_generation(conn: sqlite3.Connection, generation: dict[str, Any]) -> int:
    values = [os.fsencode(generation["root"]), *(generation.get(k) for k in HEADER[1:])]
    cursor = conn.execute(f"INSERT INTO generations ({', '.join(HEADER)}) VALUES (?, ?, ?, ?, ?)", values)
    return int(cursor.lastrowid)


def _import_rows(conn: sqlite3.Connection, gen: int, generation: dict[str, Any]) -> None:
    """A JSON generation's shards (ordered by first use; checksums where it had them), entries and
    failures."""
    entries = generation.get("entries", [])
    rows: dict[str, int] = {}
    for e in entries:
        rows[e["shard"]] = max(rows.get(e["shard"], 0), e["row"] + 1)
    sums = generation.get("shards") or {}
    conn.executemany(
        "INSERT INTO shards (gen, name, sha1, rows, seq) VALUES (?, ?, ?, ?, ?)",
        [(gen, name, sums.get(name), n, seq) for seq, (name, n) in enumerate(rows.items())],
    )
    put_entries(conn, gen, entries)
    put_failed(conn, gen, generation.get("failed", []))


def put_entries(conn: sqlite3.Connection, gen: int, entries: Iterable[dict[str, Any]]) -> None:
    """Insert or update entries (an update, not a replace: the shard counters see a moved entry)."""
    conn.executemany(
        "INSERT INTO entries VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (gen, id) DO UPDATE SET"
        " size = excluded.size, mtime_ns = excluded.mtime_ns, sha1 = excluded.sha1,"
        " shard = excluded.shard, row = excluded.row, meta = excluded.meta",
        [
            (gen, _key(e["id"]), e["size"], e["mtime_ns"], e["sha1"], e["shard"], e["row"], _meta(e))
            for e in entries
        ],
    )


def _meta(entry: dict[str, Any]) -> str | None:
    return json.dumps(entry["meta"]) if "meta" in entry else None


def put_failed(conn: sqlite3.Connection, gen: int, failed: Iterable[dict[str, Any]]) -> None:
    conn.executemany(
        "INSERT OR REPLACE INTO failed VALUES (?, ?, ?, ?, ?, ?)",
        [(gen, _key(f["id"]), f["size"], f["mtime_ns"], f["sha1"], f["reason"]) for f in failed],
    )


def delete(conn: sqlite3.Connection, gen: int, table: str, ids: Iterable[str]) -> None:
    """Drop rows of `entries` or `failed` by image id."""
    assert table in ("entries", "failed")
    conn.executemany(f"DELETE FROM {table} WHERE gen = ? AND id = ?", [(gen, _key(i)) for i in ids])


class ManifestWriter:
    """The writer's connection (it holds the index lock): generations and per-chunk transactions."""

    def __init__(self, index_dir: Path):
        self.conn = _connect(index_dir / MANIFEST)
        _add_shard_counters(self.conn)
        self.conn.execute(ANN_TABLE)

    def close(self) -> None:
        self.conn.close()

    def generations(self) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """The headers of the live generation and of one built aside (None when there is none)."""
        live, aside = _pointers(self.conn)
        return header(self.conn, live), None if aside is None else header(self.conn, aside)

    def count(self, gen: int) -> int:
        """Entries of a generation, from the shard counters (not a count over the entries)."""
        query = "SELECT COALESCE(SUM(live), 0) FROM shards WHERE gen = ?"
        return self.conn.execute(query, (gen,)).fetchone()[0]

    def ann(self, gen: int) -> dict[str, Any] | None:
        return ann_of(self.conn, gen)

    def checksums(self, gen: int) -> dict[str, str | None]:
        """The generation's shards (in order) and their SHA-1 (None where never recorded)."""
        return dict(self.conn.execute("SELECT name, sha1 FROM shards WHERE gen = ? ORDER BY seq", (gen,)))

    def load(self, gen: int) -> dict[str, Any]:
        with _transaction(self.conn, "DEFERRED"):
            return load_generation(self.conn, gen)

    def start(self, generation: dict[str, str], live: bool) -> int:
        """A new, empty generation: live at once (when nothing is served meanwhile; every other one is
        dropped), else aside under `next`, replacing any earlier one there."""
        with _transaction(self.conn) as conn:
            gen = _insert_generation(conn, generation)
            if live:
                _make_live(conn, gen)
            else:
                _, aside = _pointers(conn)
                conn.execute("INSERT OR REPLACE INTO pointers VALUES (?, ?)", (NEXT, gen))
                if aside is not None:
                    _drop_generation(conn, aside)
        return gen

    def go_live(self, gen: int) -> None:
        """One transaction switches readers to `gen` (built aside, or live already) and drops the
        generations it replaces."""
        with _transaction(self.conn) as conn:
            _make_live(conn, gen)

    @contextmanager
    def commit(self) -> Iterator[sqlite3.Connection]:
        """One transaction (a chunk, the removals of a run, a compaction): all or nothing."""
        with _transaction(self.conn) as conn:
            yield conn

    def shards(self, gen: int) -> list[ShardInfo]:
        """The generation's shards in order, with how many of their rows are in use."""
        rows = self.conn.execute(
            "SELECT name, rows, live, seq, sha1, verified FROM shards WHERE gen = ? ORDER BY seq", (gen,)
        )
        return [ShardInfo(*row) for row in rows]


def add_shard(conn: sqlite3.Connection, gen: int, shard: ShardInfo) -> None:
    """A new shard (no entries yet), after every shard the generation has."""
    seq = conn.execute("SELECT COALESCE(MAX(seq), -1) + 1 FROM shards WHERE gen = ?", (gen,)).fetchone()[0]
    conn.execute(
        "INSERT INTO shards (gen, name, sha1, rows, seq, verified) VALUES (?, ?, ?, ?, ?, ?)",
        (gen, shard.name, shard.sha1, shard.rows, seq, shard.verified),
    )


def set_checksums(conn: sqlite3.Connection, gen: int, checksums: dict[str, str]) -> None:
    conn.executemany(
        "UPDATE shards SET sha1 = ? WHERE gen = ? AND name = ?", [(s, gen, n) for n, s in checksums.items()]
    )


def set_verified(conn: sqlite3.Connection, gen: int, signatures: dict[str, str]) -> None:
    """Record the stat signature of shard files whose SHA-1 was just checked (or written)."""
    conn.executemany(
        "UPDATE shards SET verified = ? WHERE gen = ? AND name = ?",
        [(sig, gen, name) for name, sig in signatures.items()],
    )


def stat_signature(path: Path) -> str | None:
    """What changes whenever a file's bytes are rewritten in place or replaced (size, modification and
    change times, inode); None when it is gone."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}"


def update_header(conn: sqlite3.Connection, gen: int, values: dict[str, Any]) -> None:
    """Set a generation's model keys or vector dimension."""
    assert set(values) <= set(HEADER[1:])
    for key, value in values.items():
        conn.execute(f"UPDATE generations SET {key} = ? WHERE gen = ?", (value, gen))


def set_meta(conn: sqlite3.Connection, gen: int, meta: dict[str, dict[str, Any]]) -> None:
    """Record the EXIF meta (capture date, camera) of entries, by image id."""
    conn.executemany(
        "UPDATE entries SET meta = ? WHERE gen = ? AND id = ?",
        [(json.dumps(m), gen, _key(i)) for i, m in meta.items()],
    )


def drop_unused_shards(conn: sqlite3.Connection, gen: int) -> None:
    """Forget shards no entry points to any more (their files are swept at the end of the run)."""
    conn.execute("DELETE FROM shards WHERE gen = ? AND live <= 0", (gen,))


def _add_shard_counters(conn: sqlite3.Connection) -> None:
    """Give a manifest written before the shard counters its `live` and `verified` columns (counted once,
    here) and the triggers that keep `live`; nothing when it has them."""
    with _transaction(conn):
        if "live" in {row[1] for row in conn.execute("PRAGMA table_info(shards)")}:
            return
        conn.execute("ALTER TABLE shards ADD COLUMN live INTEGER NOT NULL DEFAULT 0")
        conn.execute("ALTER TABLE shards ADD COLUMN verified TEXT")
        conn.execute(
            "UPDATE shards SET live = (SELECT COUNT(*) FROM entries e"
            " WHERE e.gen = shards.gen AND e.shard = shards.name)"
        )
        for trigger in SHARD_COUNTERS:
            conn.execute(trigger)


def _make_live(conn: sqlite3.Connection, gen: int) -> None:
    conn.execute("INSERT OR REPLACE INTO pointers VALUES ('live', ?)", (gen,))
    conn.execute("DELETE FROM pointers WHERE name = ?", (NEXT,))
    for (other,) in conn.execute("SELECT gen FROM generations WHERE gen != ?", (gen,)).fetchall():
        _drop_generation(conn, other)


def _drop_generation(conn: sqlite3.Connection, gen: int) -> None:
    for table in ("shards", "entries", "failed", "ann", "generations"):  # shards first: no counter to keep
        conn.execute(f"DELETE FROM {table} WHERE gen = ?", (gen,))
