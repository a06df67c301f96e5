"""A searchable index of a photo folder: build it incrementally, open it, query it by text or image.

On disk an index is a directory:
  `index.json`   manifest: the indexed folder, the model folder, and one entry per image (id, size,
                 mtime, content hash, and where its vector lives: shard file + row); unreadable files too.
  `shards/*.npy` float32 vectors, one shard per committed chunk (compacted into one at the end).
  `shards/*.hnsw` an approximate (HNSW) FAISS index of a compacted shard, only above `ANN_THRESHOLD` images.
  `model-<fingerprint>/`  a copy of the model that embedded the images (the shipped default unless
                 named), so an index is self-contained and queries are embedded by the same model.

Every change is written to new files first and published by `os.replace` of the manifest, so the
index on disk is always consistent: a killed run loses at most the chunk it was embedding, and a
rerun finds what is done, embeds only new or changed files, and drops deleted ones. Files are never
changed once written, and the manifest names every file a reader opens (model folder and shards), so a
reader gets one consistent snapshot. A new model (or folder) is built aside, under the manifest's
`next`, while readers keep the complete old index; one manifest write switches them over. One writer
at a time holds `.cbir-lock`; readers take no lock and reread the manifest if a file they listed is gone.
The manifest records a SHA-1 per shard: opening an index verifies it (up to `VERIFY_ON_OPEN_MAX_BYTES`),
every rerun verifies all, and re-embeds the images of a damaged shard (from the feature cache).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tempfile
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cbir.encoders.cache import file_hash
from cbir.lockfile import exclusive_lock

if TYPE_CHECKING:
    from cbir.filters import Filters

MANIFEST = "index.json"
SHARDS = "shards"
LOCK_FILE = ".cbir-lock"
TMP_SUFFIX = ".cbir-tmp"  # every temporary file or folder the index writes ends so; nothing else is swept
MODEL_DIR = "model"  # the model folder of indexes written before it was named by fingerprint
NEXT = "next"  # the manifest key of a generation being built for a new model or folder
ANN_SUFFIX = ".hnsw"
FORMAT = "cbir-index"
VERSION = 1
# Above this many images, search goes through an HNSW graph instead of exact inner products.
ANN_THRESHOLD = 50_000
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 64
HNSW_EF_SEARCH = 128
CHUNK_SIZE = 256
# Opening verifies shard checksums up to this many bytes of shards (~40k 1,664-d images; SHA-1 runs at
# 0.7-1.4 GB/s here, see BENCHMARKS.md); larger indexes are verified by every `cbir index` rerun.
VERIFY_ON_OPEN_MAX_BYTES = 256 << 20
OPEN_ATTEMPTS = 5  # a reader rereads a manifest that changed under it this many times at most


class IndexFormatError(ValueError):
    """A path that is not a usable index directory; the message says which file and why."""


class ShardError(IndexFormatError):
    """A vector shard that is missing or damaged; a rerun of `cbir index` rebuilds it."""

    def __init__(self, path: Path, problem: str):
        self.problem = f"{path}: {problem}"
        super().__init__(f"{self.problem}; rerun `cbir index` on the same folder and --out to rebuild it")


@dataclass
class SearchResult:
    rank: int  # 1 = best, as everywhere a rank is shown (CLI, --json, HTTP, page)
    score: float  # P(match) for a calibrated model (cbir.calibration), else the similarity
    id: str  # image path relative to the indexed folder, posix
    path: Path  # absolute path of the image file
    similarity: float | None = None  # the raw inner product of the unit query and the image vector

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "path": str(self.path)}


@dataclass
class IndexReport:
    """What one `build_index` run did, for the CLI to print."""

    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    unchanged: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # id -> reason (corrupt, unreadable)
    damaged: dict[str, str] = field(default_factory=dict)  # shard -> error naming its file
    repaired: list[str] = field(default_factory=list)  # re-embedded because their shard was damaged


def printable(name: Path | str) -> str:
    """A file name or path as valid text that any terminal, JSON reader or URL takes: the bytes of a
    name that is not UTF-8 appear as \\xNN (the exact name is `os.fsencode` of the id, with its \\udcNN
    escapes). `SearchIndex.id_of` maps a printable id back to the image."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def _tmp_path(path: Path) -> Path:
    """A hidden sibling for writing `path` before publishing it; only such names are ever swept."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}{TMP_SUFFIX}")


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = _tmp_path(path)
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _write_npy_atomic(path: Path, array: np.ndarray) -> str:
    """Write a shard and return the SHA-1 of its bytes, for the manifest."""
    tmp = _tmp_path(path)
    with tmp.open("wb") as f:
        np.save(f, np.ascontiguousarray(array, dtype=np.float32))
    digest = file_hash(tmp)
    os.replace(tmp, path)
    return digest


def model_fingerprint(model_dir: Path) -> str:
    """Content hash of a model directory: an index re-embeds everything when its model changes."""
    h = hashlib.sha1()
    for f in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        h.update(f.relative_to(model_dir).as_posix().encode())
        h.update(file_hash(f).encode())
    return h.hexdigest()


def read_manifest(path: Path) -> dict[str, Any]:
    file = path / MANIFEST
    if not path.is_dir():
        raise IndexFormatError(
            f"{path}: no such index directory; build one with `cbir index FOLDER --out {path}`"
        )
    if not file.is_file():
        raise IndexFormatError(f"{path}: not an index directory (no {MANIFEST}); build one with `cbir index`")
    try:
        manifest = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise IndexFormatError(f"{file}:{e.lineno}: malformed JSON: {e.msg}") from e
    if manifest.get("format") != FORMAT:
        raise IndexFormatError(f"{file}: not a cbir index manifest (format={manifest.get('format')!r})")
    return manifest


def _source_of(manifest: dict[str, Any]) -> str:
    """The model an index was built with; indexes written before the shipped default recorded the
    zero-shot model as no source."""
    return manifest.get("model_source") or "zero-shot"


def _model_dir_of(manifest: dict[str, Any]) -> str:
    return manifest.get("model_dir") or MODEL_DIR


def _is_model_dir(name: str) -> bool:
    return name == MODEL_DIR or name.startswith(f"{MODEL_DIR}-")


def _install_model(index_dir: Path, model: Path | str | None) -> dict[str, str]:
    """Put the model into `index_dir/model-<fingerprint>` (a checked copy of its directory, or the
    zero-shot model written out), beside any model the manifest still names; the manifest keys."""
    from cbir.models import ZERO_SHOT_MODEL, create_model, load_model, model_dir, model_source

    staging = _tmp_path(index_dir / MODEL_DIR)
    source, path = model_source(model), model_dir(model)
    if path is None:
        create_model(ZERO_SHOT_MODEL).fit().save(staging)
    else:
        load_model(model)  # a clear error before anything is copied
        shutil.copytree(path, staging)
    fingerprint = model_fingerprint(staging)
    target = index_dir / f"{MODEL_DIR}-{fingerprint[:16]}"
    if target.is_dir():  # installed by an earlier run (folders appear only whole, by rename)
        shutil.rmtree(staging)
    else:
        os.replace(staging, target)
    return {"model_source": source, "model_fingerprint": fingerprint, "model_dir": target.name}


def _load_shard(index_dir: Path, name: str, checksum: str | None, mmap: bool = True) -> np.ndarray:
    """One shard's rows, its checksum verified first when the manifest has one; errors name the file."""
    path = index_dir / SHARDS / name
    try:
        if checksum is None or file_hash(path) == checksum:
            return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        problem = "damaged shard (checksum mismatch)"
    except FileNotFoundError:
        problem = "shard missing"
    except (OSError, ValueError, EOFError) as e:
        problem = f"damaged shard ({e})"
    raise ShardError(path, problem)


def _vectors_of(
    index_dir: Path,
    entries: Sequence[dict[str, Any]],
    checksums: dict[str, str] | None = None,
    mmap: bool = True,
) -> np.ndarray:
    """Vectors in entry order; one compacted shard is memory-mapped, several are gathered."""
    if not entries:
        return np.zeros((0, 0), dtype=np.float32)
    sums = checksums or {}
    loaded = {s: _load_shard(index_dir, s, sums.get(s), mmap) for s in {e["shard"] for e in entries}}
    rows = np.fromiter((e["row"] for e in entries), dtype=np.int64, count=len(entries))
    try:
        if len(loaded) > 1:
            return np.stack([loaded[e["shard"]][e["row"]] for e in entries]).astype(np.float32)
        (arr,) = loaded.values()
        if len(arr) == len(rows) and np.array_equal(rows, np.arange(len(rows))):
            return arr
        return np.asarray(arr[rows])
    except IndexError as e:
        raise IndexFormatError(f"{index_dir / MANIFEST}: an entry points past the end of its shard") from e


def build_index(
    folder: Path | str, out: Path | str, model: Path | str | None = None, **options: Any
) -> SearchIndex:
    """Index every image below `folder` into `out` (created or updated), then open it.

    `model` is a model directory from `cbir train` or a model name (`default`, the shipped model, which
    None also means; `zero-shot`, no training); `options` are those of `update_index`.
    """
    return update_index(folder, out, model, **options)[0]


def update_index(
    folder: Path | str,
    out: Path | str,
    model: Path | str | None = None,
    progress: bool = True,
    chunk_size: int = CHUNK_SIZE,
    on_chunk: Callable[[int, int], None] | None = None,
    wait: float = 0.0,
) -> tuple[SearchIndex, IndexReport]:
    """`build_index` that also says what changed: added, changed, removed, failed, repaired files.

    One writer at a time: another run on the same `out` is waited for up to `wait` seconds, then
    `LockBusyError` names it. Readers are never blocked.
    """
    from cbir.datasets import DatasetError

    root = Path(folder).expanduser().resolve()
    if not root.is_dir():
        raise DatasetError("no such folder to index", root)
    index_dir = Path(out).expanduser().resolve()
    _check_out_folder(index_dir, another_writer_may_be_starting=True)  # before the lock file goes in
    index_dir.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(index_dir / LOCK_FILE, wait, what=f"the index {index_dir}"):
        _check_out_folder(index_dir)
        return _update_locked(root, index_dir, model, progress, chunk_size, on_chunk)


def _check_out_folder(index_dir: Path, another_writer_may_be_starting: bool = False) -> None:
    """Refuse an --out that is neither an index nor empty (hidden entries count): the index sweeps
    the files it made, so it must never move in with someone else's. Before the lock is held, a
    writer that is creating the index may have made its folders but not yet its manifest: those
    names pass then, and the check under the lock decides."""
    if index_dir.exists() and not index_dir.is_dir():
        raise IndexFormatError(f"{index_dir}: exists and is not a folder; choose a new --out folder")
    if not index_dir.is_dir() or (index_dir / MANIFEST).exists():
        return

    def starting(name: str) -> bool:
        return another_writer_may_be_starting and (name in (MANIFEST, SHARDS) or _is_model_dir(name))

    foreign = sorted(p.name for p in index_dir.iterdir() if not _is_ours(p.name) and not starting(p.name))
    if foreign:
        shown = ", ".join(foreign[:3]) + (", …" if len(foreign) > 3 else "")
        raise IndexFormatError(
            f"{index_dir}: exists and is not an index (it holds {shown}); choose an empty or new --out folder"
        )


def _is_ours(name: str) -> bool:
    """Names the indexer leaves in a folder before its first manifest: the lock and temporaries."""
    return name == LOCK_FILE or name.endswith(TMP_SUFFIX)


def _new_manifest(index_dir: Path, root: Path) -> dict[str, Any]:
    """An empty manifest, published first: a run killed early leaves an index, not a foreign folder."""
    manifest = {"format": FORMAT, "version": VERSION, "root": str(root), "entries": [], "failed": []}
    _write_json_atomic(index_dir / MANIFEST, manifest)
    return manifest


def _prepare(
    index_dir: Path, root: Path, model: Path | str | None, manifest: dict[str, Any]
) -> tuple[dict[str, str], dict[str, Any]]:
    """The model to index with (installed when new: its manifest keys), and the generation whose
    entries carry over: the live one, one an interrupted model switch left under `next`, or none."""
    from cbir.models import model_dir, model_source

    wanted_source, wanted_dir = model_source(model), model_dir(model)
    wanted_fingerprint = None if wanted_dir is None else model_fingerprint(wanted_dir)  # retrained in place?
    generations = (manifest, manifest.get(NEXT) or {})
    installed = next(
        (g for g in generations if _has_model(index_dir, g, wanted_source, wanted_fingerprint)), None
    )
    if installed is None:
        model_keys = _install_model(index_dir, model)
    else:
        model_keys = {
            "model_source": wanted_source,
            "model_fingerprint": installed["model_fingerprint"],
            "model_dir": _model_dir_of(installed),
        }
    fingerprint, folder = model_keys["model_fingerprint"], str(root)
    kept = (g for g in generations if g.get("model_fingerprint") == fingerprint and g.get("root") == folder)
    return model_keys, next(kept, {})


def _has_model(index_dir: Path, generation: dict[str, Any], source: str, fingerprint: str | None) -> bool:
    """Whether a manifest generation's model folder is there and is the model wanted (by source,
    and by content when it is a directory)."""
    have = generation.get("model_fingerprint")
    return (
        have is not None
        and (index_dir / _model_dir_of(generation)).is_dir()
        and _source_of(generation) == source
        and fingerprint in (None, have)
    )


def _serving_meanwhile(manifest: dict[str, Any], kept: dict[str, Any]) -> dict[str, Any] | None:
    """The live index to keep publishing while a new model or folder is built aside under `next`, so
    readers search it whole until the final commit; None builds in place (the live index is the one
    being updated, or holds nothing)."""
    if kept is manifest or not manifest.get("entries"):
        return None
    return {k: v for k, v in manifest.items() if k != NEXT}


def _damaged_shards(index_dir: Path, names: set[str], checksums: dict[str, str]) -> dict[str, str]:
    """Shards that are missing, unreadable or fail their checksum: name -> the error naming the file."""
    damaged = {}
    for name in sorted(names):
        try:
            _load_shard(index_dir, name, checksums.get(name))
        except ShardError as e:
            damaged[name] = e.problem
    return damaged


def _scan(
    root: Path,
    old_entries: dict[str, dict[str, Any]],
    old_failed: dict[str, dict[str, Any]],
    redo: set[str],
    report: IndexReport,
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]], list[Todo]]:
    """What is on disk now, against what the index holds: (kept entries, kept failures, to embed).
    Only file sizes and times are read here: a file to embed is read (and hashed) once, by `embed`."""
    from cbir.datasets import list_images

    entries: dict[str, dict[str, Any]] = {}
    failed: dict[str, dict[str, Any]] = {}
    todo: list[Todo] = []
    for path in list_images(root):
        image_id = path.relative_to(root).as_posix()
        try:
            st = path.stat()
        except OSError as e:
            link = "broken symbolic link" if path.is_symlink() else "cannot read"
            report.failed[image_id] = f"{link}: {e.strerror or e}"
            continue
        old = None if image_id in redo else old_entries.get(image_id) or old_failed.get(image_id)
        if old and old["size"] == st.st_size and old["mtime_ns"] == st.st_mtime_ns:
            if image_id in old_entries:
                entries[image_id] = _with_meta(old, path)
                report.unchanged += 1
            else:
                failed[image_id] = old
                report.failed[image_id] = old["reason"]
            continue
        if old and image_id in old_entries:
            entries[image_id] = old  # still served until its new content is embedded
        todo.append(Todo(image_id, path, st, old, image_id in redo))
    report.removed = sorted(set(old_entries) - set(entries) - {t.image_id for t in todo})
    return entries, failed, todo


@dataclass
class Todo:
    """A file to embed: new, changed size or time (`old`: its entry or failure), or in a damaged shard."""

    image_id: str
    path: Path
    stat: os.stat_result
    old: dict[str, Any] | None
    repair: bool

    def entry(self, digest: str) -> dict[str, Any]:
        """What a rerun compares to decide whether the file changed."""
        return {
            "id": self.image_id,
            "size": self.stat.st_size,
            "mtime_ns": self.stat.st_mtime_ns,
            "sha1": digest,
        }


def _embed_chunk(
    loaded: Any,
    root: Path,
    chunk: Sequence[Todo],
    entries: dict[str, dict[str, Any]],
    failed: dict[str, dict[str, Any]],
    report: IndexReport,
) -> tuple[list[tuple[Todo, str]], np.ndarray]:
    """Embed one chunk (each file read and hashed once) and record what it found; (the files to
    write with their content keys, their vectors). A file only touched (same content) keeps its entry."""
    from cbir.datasets import Dataset

    data = Dataset.from_paths([t.path for t in chunk], root)
    embedding = loaded.embed(data)
    keep = []
    for row, (t, key) in enumerate(zip(chunk, embedding.keys, strict=True)):
        stat_entry = t.entry(key)
        reason = embedding.failed.get(data.image_ids[row])
        if reason is not None:
            failed[t.image_id] = {**stat_entry, "reason": reason}
            entries.pop(t.image_id, None)
            report.failed[t.image_id] = reason
        elif t.old is not None and t.old["sha1"] == key and "shard" in t.old:  # touched, not changed
            entries[t.image_id] = _with_meta(
                {**t.old, "size": t.stat.st_size, "mtime_ns": t.stat.st_mtime_ns}, t.path
            )
            report.unchanged += 1
        else:
            (report.changed if t.old else report.repaired if t.repair else report.added).append(t.image_id)
            keep.append(row)
    return [(chunk[row], embedding.keys[row]) for row in keep], embedding.vectors[keep]


def _update_locked(
    root: Path,
    index_dir: Path,
    model: Path | str | None,
    progress: bool,
    chunk_size: int,
    on_chunk: Callable[[int, int], None] | None,
) -> tuple[SearchIndex, IndexReport]:
    """`update_index` once it holds the lock."""
    from cbir.models import load_model
    from cbir.progress import progress_bar

    has_manifest = (index_dir / MANIFEST).exists()
    manifest = read_manifest(index_dir) if has_manifest else _new_manifest(index_dir, root)
    (index_dir / SHARDS).mkdir(exist_ok=True)
    model_keys, kept = _prepare(index_dir, root, model, manifest)
    serving = _serving_meanwhile(manifest, kept)
    old_entries = {e["id"]: e for e in kept.get("entries", [])}
    checksums: dict[str, str] = dict(kept.get("shards", {}))
    report = IndexReport()
    report.damaged = _damaged_shards(index_dir, {e["shard"] for e in old_entries.values()}, checksums)
    redo = {i for i, e in old_entries.items() if e["shard"] in report.damaged}
    old_failed = {f["id"]: f for f in kept.get("failed", [])}
    entries, failed, todo = _scan(root, old_entries, old_failed, redo, report)
    manifest_dim = kept.get("dim")

    def commit(final: bool = False) -> dict[str, Any]:
        """Publish progress (under `next` while building aside); the final commit compacts and goes live."""
        ordered = [entries[k] for k in sorted(entries)]
        if final and ordered and not _is_compact(index_dir, ordered):
            name = f"{uuid.uuid4().hex}.npy"
            vectors = _vectors_of(index_dir, ordered, checksums, mmap=False)
            checksums[name] = _write_npy_atomic(index_dir / SHARDS / name, vectors)
            ordered = [{**e, "shard": name, "row": i} for i, e in enumerate(ordered)]
        live = sorted({e["shard"] for e in ordered})
        for name in live:  # an index written before checksums gets them now
            checksums.setdefault(name, file_hash(index_dir / SHARDS / name))
        data = {
            "format": FORMAT,
            "version": VERSION,
            "root": str(root),
            **model_keys,
            "dim": manifest_dim,
            "shards": {name: checksums[name] for name in live},
            "entries": ordered,
            "failed": [failed[k] for k in sorted(failed)],
        }
        published = data if final or serving is None else {**serving, NEXT: data}
        _write_json_atomic(index_dir / MANIFEST, published)
        return data

    commit()  # publish removals (and a fresh manifest) before the long part

    if todo:
        loaded = load_model(index_dir / model_keys["model_dir"])
        with progress_bar("indexing images", len(todo), enabled=progress) as advance:
            for start in range(0, len(todo), chunk_size):
                chunk = todo[start : start + chunk_size]
                ok, vectors = _embed_chunk(loaded, root, chunk, entries, failed, report)
                if ok:
                    manifest_dim = int(vectors.shape[1])
                    name = f"{uuid.uuid4().hex}.npy"
                    checksums[name] = _write_npy_atomic(index_dir / SHARDS / name, vectors)
                    for row, (t, key) in enumerate(ok):
                        failed.pop(t.image_id, None)
                        entries[t.image_id] = _with_meta({**t.entry(key), "shard": name, "row": row}, t.path)
                commit()
                advance(len(chunk))
                if on_chunk is not None:
                    on_chunk(start + len(chunk), len(todo))

    final = commit(final=True)
    _write_ann(index_dir, final)
    _remove_orphans(index_dir, final)
    for listed in (report.added, report.changed, report.repaired):  # a file that failed was not added
        listed[:] = [i for i in listed if i not in report.failed]
    return SearchIndex.open(index_dir), report


def _with_meta(entry: dict[str, Any], path: Path) -> dict[str, Any]:
    """The entry with the photo's capture date and camera (for filters), read once per file version:
    entries of indexes written before they were recorded get them on the next run."""
    from cbir.filters import photo_metadata

    return entry if "meta" in entry else {**entry, "meta": photo_metadata(path)}


def _is_compact(index_dir: Path, entries: Sequence[dict[str, Any]]) -> bool:
    """One shard holding exactly the entries, in order: what `SearchIndex` can memory-map as is."""
    shard = entries[0]["shard"]
    if any(e["shard"] != shard or e["row"] != i for i, e in enumerate(entries)):
        return False
    return len(_load_shard(index_dir, shard, None)) == len(entries)


def _remove_orphans(index_dir: Path, manifest: dict[str, Any]) -> None:
    """What the published manifest no longer names: shards (replaced, compacted, or left by a killed
    run) and their HNSW graphs, older model folders, an older layout's `ann.faiss`, and the
    temporaries of killed runs. Only names the index writes, under its lock."""
    live = {e["shard"] for e in manifest["entries"]}
    live_ann = {_ann_path(index_dir, name).name for name in live}
    for f in [*(index_dir / SHARDS).glob("*.npy"), *(index_dir / SHARDS).glob(f"*{ANN_SUFFIX}")]:
        if f.name not in live | live_ann:
            f.unlink(missing_ok=True)
    old_models = [d for d in index_dir.iterdir() if _is_model_dir(d.name) and d.name != manifest["model_dir"]]
    for f in [*index_dir.glob(f".*{TMP_SUFFIX}"), *(index_dir / SHARDS).glob(f".*{TMP_SUFFIX}"), *old_models]:
        if f.is_dir():
            shutil.rmtree(f, ignore_errors=True)
        else:
            f.unlink(missing_ok=True)
    for legacy in ("ann.faiss", "ann.faiss.source"):
        (index_dir / legacy).unlink(missing_ok=True)


def _ann_path(index_dir: Path, shard: str) -> Path:
    """The HNSW graph of a compacted shard is named after it: it always matches the vectors."""
    return (index_dir / SHARDS / shard).with_suffix(ANN_SUFFIX)


def _write_ann(index_dir: Path, manifest: dict[str, Any]) -> None:
    """The HNSW graph for large collections (readers search exactly until it is there)."""
    entries = manifest["entries"]
    if len(entries) < ANN_THRESHOLD:
        return
    ann = _ann_path(index_dir, entries[0]["shard"])
    if ann.exists():
        return
    import faiss

    vectors = np.ascontiguousarray(_vectors_of(index_dir, entries, manifest.get("shards")), dtype=np.float32)
    graph = faiss.IndexHNSWFlat(vectors.shape[1], HNSW_M, faiss.METRIC_INNER_PRODUCT)
    graph.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    graph.add(vectors)
    tmp = _tmp_path(ann)
    faiss.write_index(graph, str(tmp))
    os.replace(tmp, ann)


def vector_search(vectors: np.ndarray, exact: bool = True):
    """A FAISS index over unit-scale vectors: exact inner product (`IndexFlatIP`) or HNSW."""
    import faiss

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if exact:
        index = faiss.IndexFlatIP(vectors.shape[1])
    else:
        index = faiss.IndexHNSWFlat(vectors.shape[1], HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    index.add(vectors)
    return index


def _checksums_to_verify(index_dir: Path, manifest: dict[str, Any]) -> dict[str, str] | None:
    """The manifest's shard checksums, unless the shards are too large to hash on every open."""
    sums = manifest.get("shards") or {}
    shards = [index_dir / SHARDS / name for name in sums]
    size = sum(p.stat().st_size for p in shards if p.exists())
    return sums if size <= VERIFY_ON_OPEN_MAX_BYTES else None


class SearchIndex:
    """An opened index: the model loads once here, then each query is one embedding + one FAISS search."""

    def __init__(self, path: Path, manifest: dict[str, Any]):
        from cbir.models import load_model

        self.path = path
        self.root = Path(manifest["root"])
        self.model_source = _source_of(manifest)
        self.ids: list[str] = [e["id"] for e in manifest["entries"]]
        self.failed: dict[str, str] = {f["id"]: f["reason"] for f in manifest.get("failed", [])}
        self._indexed_stat = {e["id"]: (e["size"], e["mtime_ns"]) for e in manifest["entries"]}
        # For filters: EXIF capture date and camera (None in indexes written before they were recorded).
        self.meta: list[dict[str, Any] | None] = [e.get("meta") for e in manifest["entries"]]
        self.mtimes_ns: list[int] = [e["mtime_ns"] for e in manifest["entries"]]
        self._row = {image_id: i for i, image_id in enumerate(self.ids)}
        # Ids that are not valid UTF-8, by their printable name (an exact id of that spelling wins).
        self._printable = {printable(i): i for i in self.ids if printable(i) != i}
        self.vectors = (
            _vectors_of(path, manifest["entries"], _checksums_to_verify(path, manifest))
            if self.ids
            else np.zeros((0, 1), np.float32)
        )
        self.model_dir = path / _model_dir_of(manifest)
        self.model = load_model(self.model_dir)
        large = len(self.ids) >= ANN_THRESHOLD
        self._ann = _ann_path(path, manifest["entries"][0]["shard"]) if large else None
        self._faiss = None
        self._prefix_faiss: dict[int, Any] = {}

    @classmethod
    def open(cls, path: Path | str) -> SearchIndex:
        """Open without a lock: if a writer published a new manifest (and swept the shards or model
        folder of the old one) while this was reading, read again; only a fault that persists is an
        error (IndexFormatError, or ModelError: both ValueError)."""
        index_dir = Path(path).expanduser().resolve()
        manifest = read_manifest(index_dir)
        for _ in range(OPEN_ATTEMPTS - 1):
            try:
                return cls(index_dir, manifest)
            except (ValueError, OSError):
                latest = read_manifest(index_dir)
                if latest == manifest:
                    raise
                manifest = latest
        return cls(index_dir, manifest)

    @property
    def approximate(self) -> bool:
        return self._ann is not None and self._ann.exists()

    def _index(self):
        if self._faiss is None:
            import faiss

            # One query at a time: OpenMP threads only add spin-wait overhead (badly so on a busy machine).
            faiss.omp_set_num_threads(1)
            if self.approximate:
                self._faiss = faiss.read_index(str(self._ann))
                self._faiss.hnsw.efSearch = HNSW_EF_SEARCH
            else:
                self._faiss = vector_search(self.vectors, exact=True)
        return self._faiss

    def _prefix_of(self, query: np.ndarray) -> slice:
        """Queries that are zero past some dimension (text queries of the zero-shot model) are scored
        on the leading dimensions only: the same inner products for a fraction of the work."""
        nonzero = np.flatnonzero(query)
        end = int(nonzero[-1]) + 1 if len(nonzero) else 1
        return slice(0, end if end < query.shape[0] and not self.approximate else query.shape[0])

    def _index_for(self, query: np.ndarray):
        end = self._prefix_of(query).stop
        if end == query.shape[0]:
            return self._index()
        if end not in self._prefix_faiss:
            self._index()  # sets the thread count
            self._prefix_faiss[end] = vector_search(self.vectors[:, :end], exact=True)
        return self._prefix_faiss[end]

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._row

    def __repr__(self) -> str:
        model = self.model_source
        return f"SearchIndex({self.path}: {len(self)} images of {self.root}, model {model})"

    def id_of(self, name: str) -> str:
        """The id of an image given by its id or by its `printable` name (how HTTP clients see it)."""
        if name in self._row:
            return name
        if name in self._printable:
            return self._printable[name]
        raise KeyError(name)

    def image_path(self, image_id: str) -> Path:
        if image_id not in self._row:
            raise KeyError(image_id)
        return self.root / image_id

    def indexed_file(self, image_id: str) -> Path:
        """The image file, only if it is still the regular file that was indexed (same size and
        modification time): a photo since replaced, by a symlink to /etc/passwd say, is not served."""
        path = self.image_path(image_id)
        try:
            st = path.stat()
        except OSError as e:
            raise FileNotFoundError(f"{path}: {e.strerror or e}") from e
        if not stat.S_ISREG(st.st_mode) or (st.st_size, st.st_mtime_ns) != self._indexed_stat[image_id]:
            raise FileNotFoundError(f"{path}: changed since it was indexed; rerun `cbir index`")
        return path

    def vector(self, image_id: str) -> np.ndarray:
        return np.asarray(self.vectors[self._row[image_id]], dtype=np.float32)

    # Query embeddings -----------------------------------------------------------------------
    def embed_text(self, text: str) -> np.ndarray:
        return self.embed_texts([text])[0]

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Query sentences' vectors, in one batch."""
        from threadpoolctl import threadpool_limits

        if not all(t.strip() for t in texts):
            raise ValueError("empty text query")
        # Short sentences: BLAS threads cost far more than they save (10x on a busy machine).
        with threadpool_limits(1, user_api="blas"):
            return self.model.embed_texts(list(texts))

    def embed_image(self, image: Path | str | bytes) -> np.ndarray:
        """A query image's vector: a file path, or raw bytes of an uploaded file."""
        from cbir.datasets import Dataset

        with tempfile.TemporaryDirectory() as tmp:
            if isinstance(image, bytes | bytearray):
                path = Path(tmp) / "query"
                path.write_bytes(image)
            else:
                path = Path(image).expanduser()
                if not path.is_file():
                    raise FileNotFoundError(f"{path}: no such image file")
            embedding = self.model.embed(Dataset.from_paths([path]))
        for reason in embedding.failed.values():
            shown = "the uploaded image" if isinstance(image, bytes | bytearray) else path
            raise ValueError(f"{shown}: {reason}")
        return embedding.vectors[0]

    # Searches ---------------------------------------------------------------------------------
    def search_vector(
        self, query: np.ndarray, k: int = 20, min_score: float | None = None
    ) -> list[SearchResult]:
        """The k best images for a query vector. Scores are the model's calibrated P(match) of the inner
        product with the query scaled to unit length (the similarity itself for an uncalibrated model): the
        one score scale of every search (text, image, similar, combined; CLI, API, page)."""
        return self.search_vectors(np.asarray(query, dtype=np.float32)[None], k, min_score)[0]

    def search_vectors(
        self, queries: np.ndarray, k: int = 20, min_score: float | None = None
    ) -> list[list[SearchResult]]:
        """`search_vector` for a batch of query rows at once: one FAISS call per group of queries that
        share a scored prefix (the server batches concurrent requests through this)."""
        from cbir.calibration import match_scores

        queries = np.asarray(queries, dtype=np.float32)
        if not len(self) or k <= 0:
            return [[] for _ in range(len(queries))]
        queries = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
        groups: dict[int, list[int]] = {}
        for i, query in enumerate(queries):
            groups.setdefault(self._prefix_of(query).stop, []).append(i)
        found: list[list[SearchResult]] = [[] for _ in range(len(queries))]
        for end, members in groups.items():
            index = self._index_for(queries[members[0]])
            similarities, rows = index.search(np.ascontiguousarray(queries[members, :end]), min(k, len(self)))
            for i, raw, id_row in zip(members, similarities, rows, strict=True):
                found[i] = self._results(match_scores(self.model, raw), raw, id_row, min_score)
        return found

    def _results(
        self, scores: np.ndarray, similarities: np.ndarray, rows: np.ndarray, min_score: float | None
    ) -> list[SearchResult]:
        results = []
        for score, similarity, row in zip(scores, similarities, rows, strict=True):
            if row < 0 or (min_score is not None and score < min_score):
                continue
            image_id = self.ids[row]
            path = self.root / image_id
            results.append(SearchResult(len(results) + 1, float(score), image_id, path, float(similarity)))
        return results

    @property
    def calibrated(self) -> bool:
        """Whether scores are P(match) (the model carries a calibration) rather than raw similarities."""
        return self.model.calibration is not None

    def search_text(self, query: str, k: int = 20, min_score: float | None = None) -> list[SearchResult]:
        return self.search_vector(self.embed_text(query), k, min_score)

    def search_image(
        self, image: Path | str | bytes, k: int = 20, min_score: float | None = None
    ) -> list[SearchResult]:
        return self.search_vector(self.embed_image(image), k, min_score)

    def search_similar(
        self, image_id: str, k: int = 20, min_score: float | None = None
    ) -> list[SearchResult]:
        if image_id not in self._row:
            raise KeyError(image_id)
        return self.search_vector(self.vector(image_id), k, min_score)

    def find(
        self,
        query: str | Sequence[str] | None = None,
        *,
        image: Path | str | bytes | None = None,
        more_like: Sequence[str] = (),
        less_like: Sequence[str] = (),
        filters: Filters | None = None,
        k: int = 20,
        offset: int = 0,
        min_score: float | None = None,
        allow_files: bool = True,
    ) -> list[SearchResult]:
        """A steered search: query arithmetic (`"a dog" + "beach" - "people"`, `snow:0.5`, `img:PATH`,
        `id:IMAGE_ID`; see `cbir.query`), relevance feedback (ids of photos marked good / bad),
        filters applied before ranking, and results `offset+1 … offset+k`."""
        from cbir.steer import search_page, steered_vector

        vector = steered_vector(self, query, image, more_like, less_like, allow_files=allow_files)
        return search_page(self, vector, filters, k, offset, min_score)

    def search(
        self,
        text: str | None = None,
        image: Path | str | bytes | None = None,
        k: int = 20,
        min_score: float | None = None,
    ) -> list[SearchResult]:
        """Text, image, or both: the query is the sum of the unit text and unit image vectors."""
        parts = []
        if text is not None and text.strip():
            parts.append(self.embed_text(text))
        if image is not None:
            parts.append(self.embed_image(image))
        if not parts:
            raise ValueError("give a text query, an image, or both")
        query = sum(p / max(float(np.linalg.norm(p)), 1e-12) for p in parts)
        return self.search_vector(query, k, min_score)
