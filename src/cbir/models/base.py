"""The one interface every retrieval method implements, and its on-disk form.

A model is fitted on a `Dataset`, then embeds queries (`embed_texts`) and images (`embed_images`)
into one space where a larger inner product means a better match. Saved, it is a directory:
`config.json` (method, plain-data parameters, small JSON state) + `weights.safetensors` (arrays).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Self

import numpy as np

from cbir.datasets import Dataset

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.safetensors"


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero): inner products become cosines."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class ModelError(ValueError):
    """A model directory that cannot be used; the message says which file and why."""


class RetrievalModel:
    """Base class: subclasses set `method`, take plain-data keyword parameters, and implement
    `fit`, `embed_texts`, `embed_images`, `_arrays`/`_state` and `_restore`."""

    method: ClassVar[str] = ""

    def __init__(self, **params: Any):
        self.params = params

    def get_params(self) -> dict[str, Any]:
        return dict(self.params)

    def fit(self, train: Dataset, val: Dataset | None = None) -> Self:
        raise NotImplementedError

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        raise NotImplementedError

    def embed_images(self, images: Dataset) -> np.ndarray:
        raise NotImplementedError

    def score(self, text_embeddings: np.ndarray, image_embeddings: np.ndarray) -> np.ndarray:
        """(n_texts, n_images) scores, higher is better."""
        return (
            np.asarray(text_embeddings, dtype=np.float32) @ np.asarray(image_embeddings, dtype=np.float32).T
        )

    # Persistence: arrays go to safetensors, everything else (JSON-able) to config.json.
    def _arrays(self) -> dict[str, np.ndarray]:
        return {}

    def _state(self) -> dict[str, Any]:
        return {}

    def _restore(self, arrays: dict[str, np.ndarray], state: dict[str, Any]) -> None:
        pass

    def save(self, path: Path | str) -> Path:
        from safetensors.numpy import save_file

        from cbir import __version__

        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        arrays = {k: np.ascontiguousarray(v) for k, v in self._arrays().items()}
        config = {
            "method": self.method,
            "params": self.params,
            "state": self._state(),
            "cbir_version": __version__,
        }
        tmp_w, tmp_c = out / f".{WEIGHTS_FILE}.tmp", out / f".{CONFIG_FILE}.tmp"
        save_file(arrays, str(tmp_w))
        tmp_c.write_text(json.dumps(config, indent=2, default=_jsonable) + "\n")
        os.replace(tmp_w, out / WEIGHTS_FILE)
        os.replace(tmp_c, out / CONFIG_FILE)
        return out

    @classmethod
    def from_config(cls, config: dict[str, Any], arrays: dict[str, np.ndarray]) -> Self:
        model = cls(**config.get("params", {}))
        model._restore(arrays, config.get("state", {}))
        return model


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot store {type(value).__name__} in config.json")


def read_model_dir(path: Path | str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    from safetensors.numpy import load_file

    root = Path(path)
    cfg_file = root / CONFIG_FILE
    if not cfg_file.is_file():
        raise ModelError(f"{root}: not a model directory (no {CONFIG_FILE}); train one with `cbir train`")
    try:
        config = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ModelError(f"{cfg_file}:{e.lineno}: malformed JSON: {e.msg}") from e
    if "method" not in config:
        raise ModelError(f"{cfg_file}: no 'method' key")
    weights = root / WEIGHTS_FILE
    arrays = load_file(str(weights)) if weights.is_file() else {}
    return config, arrays
