"""The encode stage of `cbir index` on a Ray cluster, with Ray Data; and the same stages filling the
feature cache before `cbir train --ray` fits (`fill_feature_cache`).

The chunks of files to index become a Ray dataset (one block per chunk) that flows through two stages:
  read + decode/resize, in Ray tasks: each file is read once; its content key is the SHA-1 of its bytes
    and each view the model needs is decoded from them (`read_and_prepare`, as on the local path);
  embed, `map_batches` on a pool of actors that each load the model once: pixels -> network features
    (the worker's feature cache serves rows it has) -> the model's vectors.
The driver streams the results back and yields each chunk as soon as all its rows are in (in any
order); `update_index` writes its shard and commits it, so a crash of the driver loses only the chunks
still in flight, and a crashed actor is restarted by Ray and its batch retried.

On a cluster every node needs cbir installed and the indexed folder at the same path (a shared
filesystem). The model travels with the job (its files are sent to each actor); only vectors, keys and
failure reasons come back, and only the driver writes the index.

Before training, the actors return the network's raw features instead (every computed kind of each view
the method will read, `RetrievalModel.fit_image_views`); the driver stores them in its own feature cache
as they arrive, so `fit` then finds every feature cached and runs as it does locally.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cbir.feature_kinds import DEFAULT_BACKBONE
from cbir.index import EncodeStage
from cbir.models.base import ImageEmbedding
from cbir.progress import progress_bar

if TYPE_CHECKING:
    from cbir.datasets import Dataset
    from cbir.encoders.cache import FeatureCache
    from cbir.encoders.image import ImageFeatures

INSTALL_HINT = "pip install 'cbir[ray]'"
DEFAULT_WORKERS = 2
# Fault injection for the recovery tests: a file path; the first actor call that finds no file there
# creates it and kills its own process, as an out-of-memory kill would.
KILL_ONCE_ENV = "CBIR_RAY_KILL_ONCE"
PIXELS = "pixels:"  # column prefix of one view's decoded pixels
FEATURES = "features:"  # column prefix of one view's network features (a feature-cache fill)
FILL_CHUNK = 64  # files per block of a feature-cache fill, at most
# CPUs a read + decode task asks for: decoding is lighter than inference, and a request unlike the actors'
# keeps Ray Data from fusing the stages (decoding then runs beside inference, not before it in the actor).
DECODE_CPUS = 0.5


class RayUnavailableError(RuntimeError):
    """Ray is not installed, or the cluster cannot be reached; the message says what to do."""


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401  (Ray Data ships in the `ray[data]` extra)
    except ImportError as e:
        raise RayUnavailableError(f"running on Ray needs Ray Data ({e}); install it: {INSTALL_HINT}") from e
    return ray


def ray_encode_chunks(
    address: str | None = None,
    *,
    workers: int = DEFAULT_WORKERS,
    actor_options: dict[str, Any] | None = None,
) -> EncodeStage:
    """An encode stage for `update_index(..., encode=...)` that runs on Ray.

    `address`: a running cluster (`ray start --head` prints it; `auto` finds a local one); None starts a
    private local Ray for this process (`workers` + 1 CPUs, no dashboard, bound to 127.0.0.1). A Ray
    this process is already connected to is used as it is. `workers`: actors holding the model, one CPU
    each. `actor_options`: further Ray options of the actors (`num_gpus`, `memory`, `runtime_env`...).
    """
    if workers < 1:
        raise ValueError(f"workers must be at least 1, not {workers}")
    _ray()  # a missing Ray is said now, before any work

    def encode(
        model_dir: Path, root: Path, chunks: Sequence[Sequence[Path]]
    ) -> Iterator[tuple[int, ImageEmbedding]]:
        if not any(chunks):
            return
        connect(address, workers)
        yield from _run(model_dir, root, chunks, workers, actor_options or {})

    return encode


def connect(address: str | None = None, workers: int = DEFAULT_WORKERS) -> None:
    """Join the Ray cluster at `address`, or start a local one for `workers` actors (and the decode
    tasks), unless this process is connected already. The local Ray stops when the process exits."""
    ray = _ray()
    if ray.is_initialized():
        return
    quiet = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.ERROR}
    try:
        if address is None:
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # a private Ray reports nowhere
            ray.init(num_cpus=workers + 1, _node_ip_address="127.0.0.1", **quiet)
        else:
            ray.init(address=address, **{k: v for k, v in quiet.items() if k != "include_dashboard"})
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        raise RayUnavailableError(f"cannot start or reach {where}: {e}") from e


@dataclass
class CacheFill:
    """What `fill_feature_cache` did, counted in (file, view) rows: computed on Ray, found in the cache
    already; and the files Ray could not decode (left to `fit`, which reports them)."""

    computed: int = 0
    cached: int = 0
    failed: int = 0


def fill_feature_cache(
    needs: Sequence[tuple[Dataset, Sequence[str]]],
    address: str | None = None,
    *,
    backbone: str = DEFAULT_BACKBONE,
    workers: int = DEFAULT_WORKERS,
    actor_options: dict[str, Any] | None = None,
    progress: bool = True,
) -> CacheFill:
    """Compute on Ray the network features that `needs` (images and their views: a model's
    `fit_image_views`) lack in this process's feature cache, and store them there, so that fitting
    afterwards computes none. `backbone`: the network the model reads (its `image_backbone`).
    `address`, `workers`, `actor_options`: as for `ray_encode_chunks`.
    `clip:PATH` views are left to `fit`, which computes them where it runs."""
    if workers < 1:
        raise ValueError(f"workers must be at least 1, not {workers}")
    _ray()  # a missing Ray is said now, before any work
    missing, fill = _missing_views(needs, backbone)
    by_views: dict[tuple[str, ...], list[Path]] = {}
    for path, views in missing.items():
        by_views.setdefault(views, []).append(path)
    if not by_views:
        return fill
    ray = _ray()
    connected = ray.is_initialized()
    connect(address, workers)
    try:
        for views, paths in by_views.items():
            computed, failed = _fill(paths, views, backbone, workers, actor_options or {}, progress)
            fill.computed += computed
            fill.failed += failed
    finally:
        if not connected:  # a private Ray stops, a cluster is left: fitting needs neither
            ray.shutdown()
    return fill


def _missing_views(
    needs: Sequence[tuple[Dataset, Sequence[str]]], backbone: str
) -> tuple[dict[Path, tuple[str, ...]], CacheFill]:
    """Per file, the EfficientNet views of `needs` that the feature cache lacks (one file of each
    content), and the count of rows it has. Files that cannot be read are left to `fit`."""
    from cbir.encoders import VIEWS
    from cbir.encoders.cache import file_hash

    wanted: dict[Path, dict[str, None]] = {}
    for images, views in needs:
        computed = dict.fromkeys(v for v in views if v in VIEWS)
        for path in images.images if computed else []:
            wanted.setdefault(Path(path), {}).update(computed)
    views_of: dict[str, dict[str, None]] = {}  # content key -> views
    path_of: dict[str, Path] = {}
    for path, views in wanted.items():
        try:
            key = file_hash(path)
        except OSError:
            continue
        path_of.setdefault(key, path)
        views_of.setdefault(key, {}).update(views)
    lacking: dict[Path, list[str]] = {}
    fill = CacheFill()
    for view in dict.fromkeys(v for views in views_of.values() for v in views):
        keys = [key for key, views in views_of.items() if view in views]
        known = _driver_cache(view, backbone).known(keys)
        fill.cached += len(known)
        for key in keys:
            if key not in known:
                lacking.setdefault(path_of[key], []).append(view)
    return {path: tuple(views) for path, views in lacking.items()}, fill


def _fill(
    paths: Sequence[Path],
    views: Sequence[str],
    backbone: str,
    workers: int,
    actor_options: dict[str, Any],
    progress: bool,
) -> tuple[int, int]:
    """One Ray run computing the `backbone` network's `views` of `paths`, each batch cached here as it
    arrives: (rows computed, files failed)."""
    size = max(1, min(FILL_CHUNK, -(-len(paths) // (2 * workers))))  # a few blocks per actor
    chunks = [paths[i : i + size] for i in range(0, len(paths), size)]
    encoded = _pipeline(chunks, views, backbone, _Encoder, {"backbone": backbone}, workers, actor_options)
    computed = failed = 0
    with progress_bar(f"image features on Ray ({', '.join(views)})", len(paths), progress) as advance:
        for batch in encoded.iter_batches(batch_size=None, batch_format="numpy"):
            ok = [i for i, error in enumerate(batch["error"]) if not error]
            for view in views:
                keys = [str(batch["key"][i]) for i in ok]
                computed += _store(_driver_cache(view, backbone), keys, batch[FEATURES + view][ok])
            failed += len(batch["error"]) - len(ok)
            advance(len(batch["error"]))
    return computed, failed


def _store(cache: FeatureCache, keys: Sequence[str], rows: np.ndarray) -> int:
    """Rows of one view into this process's feature cache, but those it has meanwhile (a local Ray's
    workers may share the cache); how many came back."""
    known = cache.known(keys)
    new = [i for i, key in enumerate(keys) if key not in known]
    cache.put_many([keys[i] for i in new], rows[new])
    return len(keys)


def _driver_cache(view: str, backbone: str) -> FeatureCache:
    """Where this process's `backbone` image encoder reads the features of `view`."""
    from cbir.encoders import shared_image_encoder
    from cbir.encoders.cache import FeatureCache

    encoder = shared_image_encoder(backbone)
    return FeatureCache.open(encoder.namespace(view), encoder.cache_dir)


def _run(
    model_dir: Path,
    root: Path,
    chunks: Sequence[Sequence[Path]],
    workers: int,
    actor_options: dict[str, Any],
) -> Iterator[tuple[int, ImageEmbedding]]:
    """The Ray Data pipeline over `chunks`, each chunk yielded once all its rows are back."""
    import ray

    from cbir.datasets import Dataset
    from cbir.models import load_model

    loaded = load_model(model_dir)
    views, backbone = loaded.image_views(), loaded.image_backbone()
    # The model's files by reference (nested in a list, so Ray does not inline them): the driver holds
    # them for the whole run, so an actor that Ray restarts after a crash finds them.
    model = {"model_files": [ray.put(_files_of(model_dir))], "root": str(root)}
    embedded = _pipeline(chunks, views, backbone, _Embedder, model, workers, actor_options)
    pending: dict[int, _Chunk] = {}
    for batch in embedded.iter_batches(batch_size=None, batch_format="numpy"):
        for i, number in enumerate(batch["chunk"].tolist()):
            chunk = pending.setdefault(number, _Chunk(len(chunks[number])))
            chunk.add(int(batch["row"][i]), str(batch["key"][i]), str(batch["error"][i]), batch["vector"][i])
            if chunk.complete:
                ids = Dataset.from_paths(chunks[number], root).image_ids
                yield number, pending.pop(number).embedding(ids)


def _pipeline(
    chunks: Sequence[Sequence[Path]],
    views: Sequence[str],
    backbone: str,
    stage: type,
    stage_kwargs: dict[str, Any],
    workers: int,
    actor_options: dict[str, Any],
):
    """The two stages over `chunks` (one block each; numbered, empty ones left out): read + decode
    `views` at the input size of `backbone` in Ray tasks, then `stage(**stage_kwargs)` actors, a pool
    of at most `workers`, one CPU each unless `actor_options` say otherwise. The Ray dataset of the
    actors' rows, to iterate."""
    import pyarrow as pa
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the driver shows its own progress
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    tables = [
        pa.table(
            {
                "chunk": pa.array([number] * len(chunk), pa.int64()),
                "row": pa.array(range(len(chunk)), pa.int64()),
                "path": pa.array([os.fsencode(p) for p in chunk], pa.binary()),  # any name, UTF-8 or not
            }
        )
        for number, chunk in enumerate(chunks)
        if chunk
    ]
    return (
        ray.data.from_arrow(tables)
        .map_batches(
            _decode,
            fn_kwargs={"views": views, "backbone": backbone},
            batch_size=None,
            batch_format="numpy",
            num_cpus=DECODE_CPUS,
        )
        .map_batches(
            stage,
            fn_constructor_kwargs=stage_kwargs,
            batch_size=None,
            batch_format="numpy",
            # A crashed actor is restarted by Ray Data and its batch retried; no more actors than blocks.
            compute=ray.data.ActorPoolStrategy(size=min(workers, len(tables))),
            **{"num_cpus": 1, **actor_options},
        )
    )


class _Chunk:
    """The rows of one chunk as they come back from the workers."""

    def __init__(self, size: int):
        self.size = size
        self.rows: dict[int, tuple[str, str, np.ndarray]] = {}

    def add(self, row: int, key: str, error: str, vector: np.ndarray) -> None:
        self.rows[row] = (key, error, vector)

    @property
    def complete(self) -> bool:
        return len(self.rows) == self.size

    def embedding(self, ids: Sequence[str]) -> ImageEmbedding:
        rows = [self.rows[i] for i in range(self.size)]
        failed = {ids[i]: error for i, (_, error, _) in enumerate(rows) if error}
        vectors = np.stack([vector for _, _, vector in rows]).astype(np.float32)
        return ImageEmbedding(vectors, [key for key, _, _ in rows], failed)


def _files_of(model_dir: Path) -> dict[str, bytes]:
    """The model folder's files, to send to each actor: workers need not see the index folder."""
    return {p.relative_to(model_dir).as_posix(): p.read_bytes() for p in model_dir.rglob("*") if p.is_file()}


def _decode(batch: dict[str, np.ndarray], views: Sequence[str], backbone: str) -> dict[str, np.ndarray]:
    """Read + decode/resize stage (a Ray task): each file read once, its key and every view's pixels
    at the input size of the model's `backbone`; a file that cannot be read or decoded gets its reason
    in `error` (and zero pixels)."""
    from functools import partial

    from cbir.encoders.image import preprocess, read_and_prepare
    from cbir.feature_kinds import BACKBONES

    n, size = len(batch["path"]), BACKBONES[backbone].input_size
    keys, errors = [""] * n, [""] * n
    pixels = {view: np.zeros((n, size, size, 3), dtype=np.uint8) for view in views}
    prepare = partial(preprocess, size=size)
    for i, raw in enumerate(batch["path"]):
        path = Path(os.fsdecode(bytes(raw)))
        keys[i], decoded, error = read_and_prepare(path, dict.fromkeys(views), prepare)
        errors[i] = error or ""
        for view, rows in decoded.items():
            pixels[view][i] = rows
    return {
        **{k: batch[k] for k in ("chunk", "row", "path")},
        "key": np.array(keys, dtype=object),
        "error": np.array(errors, dtype=object),
        **{PIXELS + view: rows for view, rows in pixels.items()},
    }


def _network_features(batch: dict[str, np.ndarray], backbone: str) -> ImageFeatures:
    """The `backbone` network's features of a decoded batch's files, each view (from this worker's
    feature cache where it has them); failed rows stay zero."""
    from cbir.encoders import shared_image_encoder

    _kill_once_if_asked()
    keys = [str(k) for k in batch["key"]]
    failed = {i: str(e) for i, e in enumerate(batch["error"]) if e}
    pixels = {name[len(PIXELS) :]: rows for name, rows in batch.items() if name.startswith(PIXELS)}
    return shared_image_encoder(backbone).encode_decoded(keys, pixels, failed)


class _Embedder:
    """Embed stage (a Ray actor): loads the model once, then turns decoded pixels into its vectors."""

    def __init__(self, model_files: list[Any], root: str):
        import ray

        from cbir.models import load_model

        folder = Path(tempfile.mkdtemp(prefix="cbir-model-"))
        try:
            for name, data in ray.get(model_files[0]).items():
                (folder / name).parent.mkdir(parents=True, exist_ok=True)
                (folder / name).write_bytes(data)
            self.model = load_model(folder)  # read whole into memory: the copy is not needed after
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        self.root = Path(root)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from cbir.datasets import Dataset
        from cbir.encoders import attach_features

        feats = _network_features(batch, self.model.image_backbone())
        data = Dataset.from_paths([Path(os.fsdecode(bytes(p))) for p in batch["path"]], self.root)
        embedding = self.model.embed_encoded(attach_features(data, feats))
        return {**{k: batch[k] for k in ("chunk", "row", "key", "error")}, "vector": embedding.vectors}


class _Encoder:
    """Encode stage of a feature-cache fill (a Ray actor): decoded pixels -> the network's features of
    each view, sent back to the driver to cache."""

    def __init__(self, backbone: str):
        self.backbone = backbone

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feats = _network_features(batch, self.backbone)
        rows = {FEATURES + view: rows for view, rows in feats.views.items()}
        return {**{k: batch[k] for k in ("chunk", "row", "key", "error")}, **rows}


def _kill_once_if_asked() -> None:
    marker = os.environ.get(KILL_ONCE_ENV)
    if not marker:
        return
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    os.kill(os.getpid(), signal.SIGKILL)
