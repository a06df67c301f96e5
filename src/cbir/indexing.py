"""Building and updating an index, as stages along the data's way:

  scan (list the folder, stat each file) -> plan (added / changed / removed / unchanged / repair)
  -> encode (an `EncodeStage`: chunks of image paths in, embeddings out, possibly out of order)
  -> write shards -> commit the manifest (one SQLite transaction per chunk)
  -> compact the shards / keep or rebuild the approximate index -> sweep what no generation names.

Each stage is a function with its own tests (tests/test_index_stages.py); `update_index` runs them in
order under the index's writer lock. `add_paths` runs the same stages on named photos only: it looks up
just their entries and checks just the shards whose files changed, so adding N photos costs O(N)
whatever the size of the collection (a full run lists the folder and reads every entry). The encode
stage is pluggable: `local_encode_chunks` runs the model in this process, and any callable with its
signature (a cluster, a stub for benchmarks) can replace it.
On-disk layout, atomicity and what readers see: `cbir.index` and `cbir.manifest`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cbir import ann
from cbir.index import (
    CHUNK_SIZE,
    LOCK_FILE,
    MODEL_DIR,
    SHARDS,
    SearchIndex,
    ShardError,
    _is_model_dir,
    _load_shard,
    _model_dir_of,
    _source_of,
    _vectors_of,
    file_hash,
)
from cbir.lockfile import exclusive_lock
from cbir.manifest import (
    LEGACY_MANIFEST,
    MANIFEST,
    SQLITE_SIDE_FILES,
    TMP_SUFFIX,
    IndexFormatError,
    ManifestWriter,
    ShardInfo,
    add_shard,
    create_manifest,
    delete,
    drop_unused_shards,
    entries_of,
    ids_below,
    is_index,
    lookup,
    put_entries,
    put_failed,
    set_ann,
    set_checksums,
    set_meta,
    set_verified,
    stat_signature,
    tmp_path,
    update_header,
    upgrade_legacy,
)
from cbir.models.base import ImageEmbedding, RetrievalModel, read_model_dir

EncodeStage = Callable[[Path, Path, Sequence[Sequence[Path]]], Iterator[tuple[int, ImageEmbedding]]]
# An index this small is kept in one shard, which readers memory-map as is.
COMPACT_ALL_ROWS = 4096
# Above it, a shard is merged with all smaller ones once it holds less than this many times their rows:
# each vector is rewritten O(log n) times in all, and adding to a large index leaves its big shards be.
COMPACT_RATIO = 2


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
    size: int = 0  # images in the index after the run


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


@dataclass
class Plan:
    """What a run does to the index, decided from file sizes and times only."""

    todo: list[Todo] = field(default_factory=list)  # to embed, in folder order
    drop_entries: set[str] = field(default_factory=set)  # gone, or in a damaged shard
    drop_failed: set[str] = field(default_factory=set)  # gone or changed since they failed
    missing_meta: dict[str, Path] = field(default_factory=dict)  # unchanged, EXIF meta not yet recorded


@dataclass
class ChunkResult:
    """One embedded chunk, sorted out: the files to write (with their content keys) and their vectors,
    the files that failed, and entries only touched (same content, new size or time)."""

    ok: list[tuple[Todo, str]]
    vectors: np.ndarray
    failed: list[dict[str, Any]]
    touched: list[dict[str, Any]]


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
    encode: EncodeStage | None = None,
) -> tuple[SearchIndex, IndexReport]:
    """`build_index` that also says what changed: added, changed, removed, failed, repaired files.

    One writer at a time: another run on the same `out` is waited for up to `wait` seconds, then
    `LockBusyError` names it. Readers are never blocked. `encode` embeds the chunks of files to index
    (None: `local_encode_chunks`, in this process).
    """
    loaded: dict[Path, RetrievalModel] = {}  # the model the local stage loads opens the index too
    stage = encode or functools.partial(local_encode_chunks, loaded=loaded)
    options = {"progress": progress, "chunk_size": chunk_size, "on_chunk": on_chunk, "encode": stage}
    report = index_folder(folder, out, model, wait, **options)
    model_of_run = next(iter(loaded.values()), None)  # the live model now: the run's, under its lock
    return SearchIndex.open(Path(out).expanduser().resolve(), model_of_run), report


def add_paths(
    folder: Path | str,
    out: Path | str,
    paths: Sequence[Path | str],
    model: Path | str | None = None,
    wait: float = 0.0,
    **options: Any,
) -> IndexReport:
    """Bring the index `out` of `folder` up to date for the photos `paths` only (files, or folders
    searched as a full run would), without listing the folder or reading the other entries: new and
    changed photos are embedded, unchanged ones skipped, named ones that are gone dropped. The cost is
    that of the photos named, not of the collection. A path outside `folder`, or one a full run would
    not index, is an error; so is an index of another folder or model (a full run rebuilds it).
    `options`: those of `update_index`; the index is not opened (that reads all of it)."""
    return index_folder(folder, out, model, wait, paths=paths, **options)


def index_folder(
    folder: Path | str,
    out: Path | str,
    model: Path | str | None = None,
    wait: float = 0.0,
    paths: Sequence[Path | str] | None = None,
    **options: Any,
) -> IndexReport:
    """`update_index` without opening the result: the write path alone (`options`: its stage options);
    of the photos `paths` only, when given (`add_paths`)."""
    from cbir.datasets import DatasetError

    root = Path(folder).expanduser().resolve()
    if not root.is_dir():
        raise DatasetError("no such folder to index", root)
    photos = None if paths is None else photos_below(root, paths)  # checked before the lock is taken
    index_dir = Path(out).expanduser().resolve()
    _check_out_folder(index_dir, another_writer_may_be_starting=True)  # before the lock file goes in
    index_dir.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(index_dir / LOCK_FILE, wait, what=f"the index {index_dir}"):
        _check_out_folder(index_dir)
        _open_manifest(index_dir, root)
        writer = ManifestWriter(index_dir)
        try:
            return _run_stages(writer, root, index_dir, model, photos, **options)
        finally:
            writer.close()


def _check_out_folder(index_dir: Path, another_writer_may_be_starting: bool = False) -> None:
    """Refuse an --out that is neither an index nor empty (hidden entries count): the index sweeps
    the files it made, so it must never move in with someone else's. Before the lock is held, a
    writer that is creating the index may have made its folders but not yet its manifest: those
    names pass then, and the check under the lock decides."""
    if index_dir.exists() and not index_dir.is_dir():
        raise IndexFormatError(f"{index_dir}: exists and is not a folder; choose a new --out folder")
    if not index_dir.is_dir() or is_index(index_dir):
        return
    early = {MANIFEST, SHARDS, *(MANIFEST + side for side in SQLITE_SIDE_FILES)}

    def starting(name: str) -> bool:
        return another_writer_may_be_starting and (name in early or _is_model_dir(name))

    foreign = sorted(p.name for p in index_dir.iterdir() if not _is_ours(p.name) and not starting(p.name))
    if foreign:
        shown = ", ".join(foreign[:3]) + (", …" if len(foreign) > 3 else "")
        raise IndexFormatError(
            f"{index_dir}: exists and is not an index (it holds {shown}); choose an empty or new --out folder"
        )


def _is_ours(name: str) -> bool:
    """Names the indexer leaves in a folder before its first manifest: the lock and temporaries
    (with the side files SQLite keeps beside a manifest being written)."""
    return name == LOCK_FILE or name.endswith((TMP_SUFFIX, *(TMP_SUFFIX + s for s in SQLITE_SIDE_FILES)))


def _open_manifest(index_dir: Path, root: Path) -> None:
    """The manifest a run writes into: created empty, or upgraded from the JSON format."""
    if not (index_dir / MANIFEST).exists():
        if (index_dir / LEGACY_MANIFEST).exists():
            upgrade_legacy(index_dir)
        else:
            create_manifest(index_dir, root)
    (index_dir / SHARDS).mkdir(exist_ok=True)


def _run_stages(
    writer: ManifestWriter,
    root: Path,
    index_dir: Path,
    model: Path | str | None,
    photos: NamedPaths | None = None,
    progress: bool = True,
    chunk_size: int = CHUNK_SIZE,
    on_chunk: Callable[[int, int], None] | None = None,
    encode: EncodeStage | None = None,
) -> IndexReport:
    """`update_index` once it holds the lock: every stage, in order; `photos`: those of `add_paths`."""
    if photos is not None:
        _refuse_rebuild(writer, index_dir, root, model)  # before anything is written
    gen, model_dir = prepare_generation(writer, index_dir, root, model)
    report = IndexReport()
    if photos is None:
        plan = plan_folder(writer, gen, index_dir, root, report)
    else:
        plan = plan_photos(writer, gen, index_dir, root, photos, report)
    commit_plan(writer, gen, index_dir, plan)  # removals go live before the long part
    encode_and_commit(
        writer, gen, index_dir, root, model_dir, plan.todo, report, progress, chunk_size, on_chunk, encode
    )
    compact(writer, gen, index_dir)
    writer.go_live(gen)
    _finish(writer, gen, index_dir)
    report.size = writer.count(gen)
    for listed in (report.added, report.changed, report.repaired):  # a file that failed was not added
        listed[:] = [i for i in listed if i not in report.failed]
    return report


# Model and generation ---------------------------------------------------------------------------
def model_fingerprint(model_dir: Path) -> str:
    """Content hash of a model directory: an index re-embeds everything when its model changes."""
    h = hashlib.sha1()
    for f in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        h.update(f.relative_to(model_dir).as_posix().encode())
        h.update(file_hash(f).encode())
    return h.hexdigest()


def _install_model(index_dir: Path, model: Path | str | None) -> dict[str, str]:
    """Put the model into `index_dir/model-<fingerprint>` (a checked copy of its directory, or the
    zero-shot model written out), beside any model the manifest still names; the manifest keys."""
    from cbir.models import ZERO_SHOT_MODEL, load_model, model_dir, model_source

    staging = tmp_path(index_dir / MODEL_DIR)
    source, path = model_source(model), model_dir(model)
    if path is None:
        load_model(ZERO_SHOT_MODEL).save(staging)  # with the calibration the package keeps
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


def prepare_generation(
    writer: ManifestWriter, index_dir: Path, root: Path, model: Path | str | None
) -> tuple[int, Path]:
    """The generation this run writes into and the model folder to embed with (installed when new).
    The live generation, or one an interrupted switch left aside, carries over when it has this model
    and folder; else a new one starts: live at once when the live one holds nothing, else aside
    (readers keep the whole old index until `go_live`)."""
    from cbir.models import model_dir, model_source

    live, aside = writer.generations()
    generations = [g for g in (live, aside) if g is not None]
    wanted_source, wanted_dir = model_source(model), model_dir(model)
    wanted_fingerprint = None if wanted_dir is None else model_fingerprint(wanted_dir)  # retrained in place?
    installed = next(
        (g for g in generations if _has_model(index_dir, g, wanted_source, wanted_fingerprint)), None
    )
    if installed is None:
        keys = _install_model(index_dir, model)
    else:
        keys = {"model_source": wanted_source, "model_fingerprint": installed["model_fingerprint"]}
        keys["model_dir"] = _model_dir_of(installed)
    same = (g for g in generations if g["model_fingerprint"] == keys["model_fingerprint"])
    kept = next((g for g in same if g["root"] == str(root)), None)
    if kept is None:
        gen = writer.start({"root": str(root), **keys, "dim": None}, live=writer.count(live["gen"]) == 0)
    else:
        gen = kept["gen"]
        with writer.commit() as conn:
            update_header(conn, gen, keys)
    return gen, index_dir / keys["model_dir"]


def _has_model(index_dir: Path, generation: dict[str, Any], source: str, fingerprint: str | None) -> bool:
    """Whether a generation's model folder is there and is the model wanted (by source, and by content
    when it is a directory)."""
    return (index_dir / _model_dir_of(generation)).is_dir() and _built_with(
        index_dir, generation, source, fingerprint
    )


def _built_with(index_dir: Path, generation: dict[str, Any], source: str, fingerprint: str | None) -> bool:
    """Whether a generation was built with the model wanted: by source, and by content (a directory's
    fingerprint; for the zero-shot model, which has none, the calibration of its copy)."""
    have = generation.get("model_fingerprint")
    if have is None or _source_of(generation) != source:
        return False
    if fingerprint is not None:
        return fingerprint == have
    return _zero_shot_copy_is_current(index_dir / _model_dir_of(generation))


def _zero_shot_copy_is_current(folder: Path) -> bool:
    """The zero-shot model has no files to fingerprint: its copy in an index is current while it holds
    the calibration the package keeps (`cbir calibrate --model zero-shot` then reaches every index)."""
    from cbir.calibration import Calibration
    from cbir.models import zero_shot_calibration

    try:
        stored = read_model_dir(folder)[0].get("calibration")
        installed = None if stored is None else Calibration.from_json(stored)
    except ValueError:
        return False
    return installed == zero_shot_calibration()


def _refuse_rebuild(writer: ManifestWriter, index_dir: Path, root: Path, model: Path | str | None) -> None:
    """`add_paths` adds to the live generation: an index of another folder or model (or one retrained
    since) is rebuilt by a full run, so the add is refused before it writes anything (a rebuild left
    aside by an interrupted full run stays for that run to carry on)."""
    from cbir.models import model_dir, model_source

    live, _ = writer.generations()
    if writer.count(live["gen"]) == 0:
        return  # nothing to keep: the add starts the index
    wanted_dir = model_dir(model)
    fingerprint = None if wanted_dir is None else model_fingerprint(wanted_dir)
    if not _built_with(index_dir, live, model_source(model), fingerprint) or live["root"] != str(root):
        raise IndexFormatError(
            f"{index_dir}: indexes {live['root']} with the model {_source_of(live)}; photos are added to an "
            "index of the same folder with the same model (--model), or rerun `cbir index` without them "
            "to rebuild it"
        )


def check_shards(writer: ManifestWriter, gen: int, index_dir: Path, every: bool) -> dict[str, str]:
    """The generation's damaged shards (name -> the error naming the file). `every`: hash every shard
    (a full run, which lists the whole folder anyway); else only those whose file changed (size, times,
    inode) since their SHA-1 last matched, or that were never checked. Sound ones are recorded so."""
    damaged, sound = _damaged_shards(index_dir, writer.shards(gen), every)
    with writer.commit() as conn:
        set_verified(conn, gen, sound)
    return damaged


def _damaged_shards(
    index_dir: Path, shards: Sequence[ShardInfo], every: bool = True
) -> tuple[dict[str, str], dict[str, str]]:
    """Shards that are missing, unreadable or fail their checksum (name -> the error naming the file),
    and the stat signatures of those checked and found sound (with a checksum to match)."""
    damaged, sound = {}, {}
    for shard in sorted(shards, key=lambda s: s.name):
        signature = stat_signature(index_dir / SHARDS / shard.name)
        if not every and signature is not None and signature == shard.verified:
            continue
        try:
            _load_shard(index_dir, shard.name, shard.sha1)
        except ShardError as e:
            damaged[shard.name] = e.problem
            continue
        if shard.sha1 is not None and signature is not None:
            sound[shard.name] = signature
    return damaged, sound


# Scan and plan ----------------------------------------------------------------------------------
def plan_folder(writer: ManifestWriter, gen: int, index_dir: Path, root: Path, report: IndexReport) -> Plan:
    """The plan of a full run: every shard checked, the whole folder listed against every entry."""
    old = writer.load(gen)
    report.damaged = check_shards(writer, gen, index_dir, every=True)
    old_entries = {e["id"]: e for e in old["entries"]}
    redo = {i for i, e in old_entries.items() if e["shard"] in report.damaged}
    failures = {f["id"]: f for f in old["failed"]}
    return plan_update(scan_folder(root, report), old_entries, failures, redo, report)


def plan_photos(
    writer: ManifestWriter, gen: int, index_dir: Path, root: Path, named: NamedPaths, report: IndexReport
) -> Plan:
    """The plan of `add_paths`: the entries of the photos named (and of those indexed below the folders
    named, so that the ones gone from them are dropped) looked up by id, plus those of damaged shards
    (re-embedded); a named photo that is gone is dropped, or an error when it was never indexed."""
    from cbir.datasets import DatasetError

    report.damaged = check_shards(writer, gen, index_dir, every=False)
    redo = {e["id"]: e for e in entries_of(writer.conn, gen, sorted(report.damaged))}
    photos = list(named.photos)
    for folder in named.folders:
        below = [root / i for i in ids_below(writer.conn, gen, folder.relative_to(root).as_posix())]
        if not below and not folder.is_dir():
            raise DatasetError("no such folder (nor photos indexed below it)", folder)
        photos += [p for p in below if not os.path.lexists(p)]
    old_entries, failures = lookup(writer.conn, gen, [p.relative_to(root).as_posix() for p in photos])
    for path in photos:
        image_id = path.relative_to(root).as_posix()
        if not os.path.lexists(path) and image_id not in old_entries and image_id not in failures:
            raise DatasetError("no such photo (nor one indexed before)", path)
    looked_at = {*photos, *(root / i for i in redo)}
    found = _stat_all(root, sorted(p for p in looked_at if os.path.lexists(p)), report)
    return plan_update(found, {**old_entries, **redo}, failures, set(redo), report)


@dataclass
class NamedPaths:
    """What `add_paths` was given: photos (those in the folders named included), and the folders."""

    photos: list[Path]
    folders: list[Path]


def photos_below(root: Path, paths: Sequence[Path | str]) -> NamedPaths:
    """The photos `paths` name below `root` (a folder: the images a full run finds in it), in folder
    order, and the folders named (a path gone that is not an image file may have been one); a path
    elsewhere, hidden or not an image is an error (a full run would not index it)."""
    from cbir.datasets import DatasetError, list_images
    from cbir.datasets.base import IMAGE_SUFFIXES

    photos: dict[Path, None] = {}
    folders: dict[Path, None] = {}
    for given in paths:
        path = Path(os.path.abspath(Path(given).expanduser()))
        path = path.parent.resolve() / path.name  # as a scan of `root` spells it: the folders resolved
        if path != root and root not in path.parents:
            raise DatasetError(f"not below the indexed folder {root}", given)
        if any(part.startswith(".") for part in path.relative_to(root).parts):
            raise DatasetError("hidden: `cbir index` leaves hidden files and folders out", given)
        if path.is_dir() and path.is_symlink():
            raise DatasetError("a symbolic link to a folder: `cbir index` does not follow those", given)
        if path.is_dir() or (path != root and not os.path.lexists(path) and not path.suffix):
            folders[path] = None
            photos.update(dict.fromkeys(list_images(path) if path.is_dir() else []))
        elif path.suffix.lower() in IMAGE_SUFFIXES:
            photos[path] = None
        else:
            raise DatasetError(f"not an image file ({', '.join(sorted(IMAGE_SUFFIXES))})", given)
    return NamedPaths(sorted(photos), list(folders))


def scan_folder(root: Path, report: IndexReport) -> list[tuple[str, Path, os.stat_result]]:
    """Every image below `root` with its size and times: (id, path, stat). Only `stat` is read here:
    a file to embed is read (and hashed) once, by the encode stage. Files that cannot be stat'ed
    (a broken symbolic link, one gone since listing) go to `report.failed`."""
    from cbir.datasets import list_images

    return _stat_all(root, list_images(root), report)


def _stat_all(
    root: Path, paths: Sequence[Path], report: IndexReport
) -> list[tuple[str, Path, os.stat_result]]:
    """(id, path, stat) of `paths` below `root`; those that cannot be stat'ed go to `report.failed`."""
    found = []
    for path in paths:
        image_id = path.relative_to(root).as_posix()
        try:
            found.append((image_id, path, path.stat()))
        except OSError as e:
            link = "broken symbolic link" if path.is_symlink() else "cannot read"
            report.failed[image_id] = f"{link}: {e.strerror or e}"
    return found


def plan_update(
    found: Sequence[tuple[str, Path, os.stat_result]],
    old_entries: dict[str, dict[str, Any]],
    old_failed: dict[str, dict[str, Any]],
    redo: set[str],
    report: IndexReport,
) -> Plan:
    """What is on disk now against what the generation holds: unchanged files stay, new and changed ones
    (size or time) and those of damaged shards (`redo`) are to embed, gone ones are dropped. A changed
    file keeps its entry, served until its new content is embedded."""
    plan = Plan()
    kept: set[str] = set()
    for image_id, path, st in found:
        old = None if image_id in redo else old_entries.get(image_id) or old_failed.get(image_id)
        if old and old["size"] == st.st_size and old["mtime_ns"] == st.st_mtime_ns:
            kept.add(image_id)
            if image_id not in old_entries:
                report.failed[image_id] = old["reason"]
                continue
            report.unchanged += 1
            if "meta" not in old:
                plan.missing_meta[image_id] = path
            continue
        if old and image_id in old_entries:
            kept.add(image_id)
        plan.todo.append(Todo(image_id, path, st, old, image_id in redo))
    plan.drop_entries = set(old_entries) - kept
    plan.drop_failed = set(old_failed) - kept
    report.removed = sorted(plan.drop_entries - {t.image_id for t in plan.todo})
    return plan


def commit_plan(writer: ManifestWriter, gen: int, index_dir: Path, plan: Plan) -> None:
    """Publish what needs no embedding, in one transaction: removals, EXIF meta of unchanged photos
    (recorded once per file version, for filters), and checksums of shards written before the index
    kept them."""
    from cbir.filters import photo_metadata

    meta = {image_id: photo_metadata(path) for image_id, path in plan.missing_meta.items()}
    with writer.commit() as conn:
        delete(conn, gen, "entries", plan.drop_entries)
        delete(conn, gen, "failed", plan.drop_failed)
        set_meta(conn, gen, meta)
        drop_unused_shards(conn, gen)
    unsummed = [name for name, sha1 in writer.checksums(gen).items() if sha1 is None]
    with writer.commit() as conn:
        set_checksums(conn, gen, {name: file_hash(index_dir / SHARDS / name) for name in unsummed})


# Encode, write, commit --------------------------------------------------------------------------
def local_encode_chunks(
    model_dir: Path,
    root: Path,
    chunks: Sequence[Sequence[Path]],
    loaded: dict[Path, RetrievalModel] | None = None,
) -> Iterator[tuple[int, ImageEmbedding]]:
    """The encode stage in this process: (chunk number, the model's embedding of its images), in order.
    The model loads once, when the first chunk is wanted (and is left in `loaded`, by its folder)."""
    from cbir.datasets import Dataset
    from cbir.models import load_model

    model = None
    for number, chunk in enumerate(chunks):
        if model is None:
            model = load_model(model_dir)
            if loaded is not None:
                loaded[Path(model_dir)] = model
        yield number, model.embed(Dataset.from_paths(chunk, root))


def encode_and_commit(
    writer: ManifestWriter,
    gen: int,
    index_dir: Path,
    root: Path,
    model_dir: Path,
    todo: Sequence[Todo],
    report: IndexReport,
    progress: bool,
    chunk_size: int,
    on_chunk: Callable[[int, int], None] | None,
    encode: EncodeStage | None,
) -> None:
    """Embed the files to index chunk by chunk; each chunk's vectors become a shard, committed in one
    transaction as it arrives (in any order), so a killed run loses only chunks not yet committed."""
    from cbir.datasets import Dataset
    from cbir.progress import progress_bar

    if not todo:
        return
    chunks = [list(todo[start : start + chunk_size]) for start in range(0, len(todo), chunk_size)]
    done, left = 0, set(range(len(chunks)))
    with progress_bar("indexing images", len(todo), enabled=progress) as advance:
        for number, embedding in (encode or local_encode_chunks)(
            model_dir, root, [[t.path for t in chunk] for chunk in chunks]
        ):
            if number not in left:
                raise RuntimeError(f"the encode stage returned chunk {number} twice or out of range")
            left.remove(number)
            chunk = chunks[number]
            ids = Dataset.from_paths([t.path for t in chunk], root).image_ids
            result = record_chunk(chunk, ids, embedding, report)
            shard = write_shard(index_dir, result.vectors) if result.ok else None
            commit_chunk(writer, gen, result, shard)
            done += len(chunk)
            advance(len(chunk))
            if on_chunk is not None:
                on_chunk(done, len(todo))
    if left:  # what came is committed; a rerun embeds the rest
        raise RuntimeError(f"the encode stage ended without {len(left)} of {len(chunks)} chunks")


def record_chunk(
    chunk: Sequence[Todo], ids: Sequence[str], embedding: ImageEmbedding, report: IndexReport
) -> ChunkResult:
    """Sort one embedded chunk into files to write, failures and touched files (same content: they keep
    their vector), and count them in the report. `ids` are the embedding's names of the chunk's files."""
    ok, failed, touched = [], [], []
    for row, (t, key) in enumerate(zip(chunk, embedding.keys, strict=True)):
        reason = embedding.failed.get(ids[row])
        if reason is not None:
            failed.append({**t.entry(key), "reason": reason})
            report.failed[t.image_id] = reason
        elif t.old is not None and t.old["sha1"] == key and "shard" in t.old:  # touched, not changed
            now = {**t.old, "size": t.stat.st_size, "mtime_ns": t.stat.st_mtime_ns}
            touched.append(_with_meta(now, t.path))
            report.unchanged += 1
        else:
            (report.changed if t.old else report.repaired if t.repair else report.added).append(t.image_id)
            ok.append((row, t, key))
    vectors = np.asarray(embedding.vectors, dtype=np.float32)[[row for row, _, _ in ok]]
    return ChunkResult([(t, key) for _, t, key in ok], vectors, failed, touched)


def _write_npy_atomic(path: Path, array: np.ndarray) -> str:
    """Write a shard and return the SHA-1 of its bytes, for the manifest."""
    tmp = tmp_path(path)
    with tmp.open("wb") as f:
        np.save(f, np.ascontiguousarray(array, dtype=np.float32))
    digest = file_hash(tmp)
    os.replace(tmp, path)
    return digest


def write_shard(index_dir: Path, vectors: np.ndarray) -> ShardInfo:
    """A new shard file (float32; fp16 would cost recall, see BENCHMARKS.md), with its checksum."""
    name = f"{uuid.uuid4().hex}.npy"
    digest = _write_npy_atomic(index_dir / SHARDS / name, vectors)
    return ShardInfo(name, len(vectors), 0, -1, digest, stat_signature(index_dir / SHARDS / name))


def commit_chunk(writer: ManifestWriter, gen: int, result: ChunkResult, shard: ShardInfo | None) -> None:
    """One chunk's changes in one transaction: new entries in the new shard, failures, touched files.
    Only the chunk's rows are written, whatever the size of the collection."""
    written = [
        _with_meta({**t.entry(key), "shard": shard.name, "row": row}, t.path)
        for row, (t, key) in enumerate(result.ok)
    ]
    with writer.commit() as conn:
        if shard is not None:
            add_shard(conn, gen, shard)
            update_header(conn, gen, {"dim": int(result.vectors.shape[1])})
        put_entries(conn, gen, [*written, *result.touched])
        delete(conn, gen, "failed", [e["id"] for e in written])
        delete(conn, gen, "entries", [f["id"] for f in result.failed])
        put_failed(conn, gen, result.failed)
        drop_unused_shards(conn, gen)


def _with_meta(entry: dict[str, Any], path: Path) -> dict[str, Any]:
    """The entry with the photo's capture date and camera (for filters), read once per file version:
    entries of indexes written before they were recorded get them on the next run."""
    from cbir.filters import photo_metadata

    return entry if "meta" in entry else {**entry, "meta": photo_metadata(path)}


# Compact, ANN, sweep ----------------------------------------------------------------------------
def compaction_group(shards: Sequence[ShardInfo]) -> list[str]:
    """The shards to merge into one (none: leave them). A small index is kept as one shard holding
    exactly its entries. Above `COMPACT_ALL_ROWS`, shards are ranked by rows in use, and the first that
    holds fewer than `COMPACT_RATIO` times the rows of all smaller ones (or that is mostly unused rows)
    is merged with them: a new chunk never rewrites the big shards of a large index."""
    if not shards:
        return []
    if sum(s.live for s in shards) <= COMPACT_ALL_ROWS:
        whole = len(shards) == 1 and shards[0].live == shards[0].rows
        return [] if whole else [s.name for s in shards]
    ranked = sorted(shards, key=lambda s: (-s.live, s.seq))
    smaller = np.cumsum([s.live for s in ranked][::-1])[::-1]  # rows of each shard and all below it
    for i, s in enumerate(ranked):
        below = int(smaller[i]) - s.live
        if s.live < COMPACT_RATIO * below or 2 * s.live < s.rows:
            return [t.name for t in ranked[i:]]
    return []


def compact(writer: ManifestWriter, gen: int, index_dir: Path) -> None:
    """Merge the shards `compaction_group` names into one new shard; the old files are swept at the end
    of the run."""
    merge_shards(writer, gen, index_dir, compaction_group(writer.shards(gen)))


def merge_shards(writer: ManifestWriter, gen: int, index_dir: Path, group: Sequence[str]) -> None:
    """The live rows of these shards as one new shard (rows ordered by id), committed in one
    transaction; nothing when the group is empty."""
    if not group:
        return
    entries = sorted(entries_of(writer.conn, gen, group), key=lambda e: e["id"])
    checksums = writer.checksums(gen)
    vectors = _vectors_of(index_dir, entries, checksums, mmap=False)
    shard = write_shard(index_dir, vectors)
    with writer.commit() as conn:
        add_shard(conn, gen, shard)
        put_entries(conn, gen, [{**e, "shard": shard.name, "row": row} for row, e in enumerate(entries)])
        drop_unused_shards(conn, gen)


def _finish(writer: ManifestWriter, gen: int, index_dir: Path) -> None:
    """The approximate index of a large index, then the sweep of what the live generation no longer
    names."""
    current = refresh_ann(writer, gen, index_dir)  # may merge shards first
    live = set(writer.checksums(gen))
    if current is not None:
        live.add(current)
    model_dir = writer.generations()[0]["model_dir"]
    _remove_orphans(index_dir, live, model_dir)


def refresh_ann(writer: ManifestWriter, gen: int, index_dir: Path) -> str | None:
    """The generation's approximate index, named in the manifest: the one it has while that still fits
    (`ann.delta_fits`: readers search the rest exactly), else a new one over every shard; its file name
    (None: the collection is searched exactly). Decided from the shard counters: O(shards)."""
    shards = writer.shards(gen)
    kind = ann.kind_for(sum(s.live for s in shards))
    current = writer.ann(gen)
    if kind is not None and current is not None:
        fits = ann.delta_fits(current["shards"], {s.name: s.live for s in shards})
        if (
            fits
            and current["name"].endswith(ann.SUFFIXES[kind])
            and (index_dir / SHARDS / current["name"]).exists()
        ):
            return current["name"]
    if kind is not None:  # a new index: first drop the removed photos' rows, so that it holds none
        merge_shards(writer, gen, index_dir, [s.name for s in shards if s.live < s.rows])
        shards = writer.shards(gen)
    wanted = None if kind is None else write_ann(index_dir, shards, kind, writer.checksums(gen))
    if wanted != current:
        with writer.commit() as conn:
            set_ann(conn, gen, wanted)
    return None if wanted is None else wanted["name"]


def write_ann(
    index_dir: Path, shards: Sequence[ShardInfo], kind: str, checksums: dict[str, str | None]
) -> dict[str, Any]:
    """An approximate index of this kind over every row of these shards (a killed run's file of the
    same shards is reused), written aside and renamed into place; what the manifest records of it."""
    # Rows as the files hold them: a manifest upgraded from JSON counts a shard's rows up to its last
    # entry, fewer than the file has when the photos of its last rows were removed before.
    lengths = [len(np.load(index_dir / SHARDS / s.name, mmap_mode="r")) for s in shards]
    covers = [[s.name, n, s.live] for s, n in zip(shards, lengths, strict=True)]
    layout = hashlib.sha1(json.dumps([c[:2] for c in covers]).encode()).hexdigest()[:32]
    path = index_dir / SHARDS / f"{layout}{ann.SUFFIXES[kind]}"
    if not path.exists():
        loaded = [_load_shard(index_dir, s.name, checksums.get(s.name)) for s in shards]
        vectors = loaded[0] if len(loaded) == 1 else np.concatenate(loaded)
        tmp = tmp_path(path)
        ann.write(vectors, tmp, kind)
        os.replace(tmp, path)
    return {"name": path.name, "shards": covers}


def _remove_orphans(index_dir: Path, live: set[str], model_dir: str) -> None:
    """What the live generation no longer names: shards (replaced, compacted, or left by a killed run)
    and approximate indexes (`live`: the file names in `shards/` to keep), older model folders, an older
    layout's `ann.faiss`, and the temporaries of killed runs. Only names the index writes, under its
    lock."""
    shards = index_dir / SHARDS
    for f in [
        *shards.glob("*.npy"),
        *(f for suffix in ann.SUFFIXES.values() for f in shards.glob(f"*{suffix}")),
    ]:
        if f.name not in live:
            f.unlink(missing_ok=True)
    old_models = [d for d in index_dir.iterdir() if _is_model_dir(d.name) and d.name != model_dir]
    temporaries = [f for d in (index_dir, shards) for f in d.glob(f".*{TMP_SUFFIX}*") if _is_ours(f.name)]
    for f in [*temporaries, *old_models]:
        if f.is_dir():
            shutil.rmtree(f, ignore_errors=True)
        else:
            f.unlink(missing_ok=True)
    for legacy in ("ann.faiss", "ann.faiss.source"):
        (index_dir / legacy).unlink(missing_ok=True)
