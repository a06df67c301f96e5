"""The encode stage of `cbir index` on a Ray cluster, with Ray Data.

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
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cbir.index import EncodeStage
from cbir.models.base import ImageEmbedding

INSTALL_HINT = "pip install 'cbir[ray]'"
DEFAULT_WORKERS = 2
# Fault injection for the recovery tests: a file path; the first actor call that finds no file there
# creates it and kills its own process, as an out-of-memory kill would.
KILL_ONCE_ENV = "CBIR_RAY_KILL_ONCE"
PIXELS = "pixels:"  # column prefix of one view's decoded pixels
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
        raise RayUnavailableError(f"indexing on Ray needs Ray Data ({e}); install it: {INSTALL_HINT}") from e
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


def _run(
    model_dir: Path,
    root: Path,
    chunks: Sequence[Sequence[Path]],
    workers: int,
    actor_options: dict[str, Any],
) -> Iterator[tuple[int, ImageEmbedding]]:
    """The Ray Data pipeline over `chunks`, each chunk yielded once all its rows are back."""
    import pyarrow as pa
    import ray.data

    from cbir.datasets import Dataset
    from cbir.models import load_model

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # `update_index` has its own, counting committed chunks
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    model = load_model(model_dir)
    views, backbone = model.image_views(), model.image_backbone()
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
    embedded = (
        ray.data.from_arrow(tables)
        .map_batches(
            _decode,
            fn_kwargs={"views": views, "backbone": backbone},
            batch_size=None,
            batch_format="numpy",
            num_cpus=DECODE_CPUS,
        )
        .map_batches(
            _Embedder,
            # The model's files by reference (nested in a list, so Ray does not inline them): the driver
            # holds them for the whole run, so an actor that Ray restarts after a crash finds them.
            fn_constructor_kwargs={"model_files": [ray.put(_files_of(model_dir))], "root": str(root)},
            batch_size=None,
            batch_format="numpy",
            # A crashed actor is restarted by Ray Data and its batch retried; no more actors than chunks.
            compute=ray.data.ActorPoolStrategy(size=min(workers, len(tables))),
            **{"num_cpus": 1, **actor_options},
        )
    )
    pending: dict[int, _Chunk] = {}
    for batch in embedded.iter_batches(batch_size=None, batch_format="numpy"):
        for i, number in enumerate(batch["chunk"].tolist()):
            chunk = pending.setdefault(number, _Chunk(len(chunks[number])))
            chunk.add(int(batch["row"][i]), str(batch["key"][i]), str(batch["error"][i]), batch["vector"][i])
            if chunk.complete:
                ids = Dataset.from_paths(chunks[number], root).image_ids
                yield number, pending.pop(number).embedding(ids)


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
        from cbir.encoders import attach_features, shared_image_encoder

        _kill_once_if_asked()
        keys = [str(k) for k in batch["key"]]
        failed = {i: str(e) for i, e in enumerate(batch["error"]) if e}
        pixels = {name[len(PIXELS) :]: rows for name, rows in batch.items() if name.startswith(PIXELS)}
        feats = shared_image_encoder(self.model.image_backbone()).encode_decoded(keys, pixels, failed)
        data = Dataset.from_paths([Path(os.fsdecode(bytes(p))) for p in batch["path"]], self.root)
        embedding = self.model.embed_encoded(attach_features(data, feats))
        return {**{k: batch[k] for k in ("chunk", "row", "key", "error")}, "vector": embedding.vectors}


def _kill_once_if_asked() -> None:
    marker = os.environ.get(KILL_ONCE_ENV)
    if not marker:
        return
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    os.kill(os.getpid(), signal.SIGKILL)
