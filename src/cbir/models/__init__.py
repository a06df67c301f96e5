"""Retrieval methods behind one interface (`RetrievalModel`), found by name for `cbir train --method`.

Methods are registered as import paths so that listing them imports nothing heavy.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any

from cbir.models.base import ModelError, RetrievalModel, read_model_dir

METHODS: dict[str, str] = {
    # classical family (issue 3)
    "ridge": "cbir.models.classical:RidgeModel",
    "kernel-ridge": "cbir.models.classical:KernelRidgeModel",
    "cca": "cbir.models.classical:CCAModel",
    "pls": "cbir.models.classical:PLSModel",
    "fusion": "cbir.models.classical.fusion:FusionModel",
    # deep methods (issue 4)
    "autoencoder": "cbir.models.autoencoder:AutoencoderModel",
    "contrastive": "cbir.models.contrastive:ContrastiveModel",
    # no training: ConSE over ImageNet classes (issue 5)
    "zero-shot": "cbir.models.zeroshot:ZeroShotModel",
}


def method_class(name: str) -> type[RetrievalModel]:
    if name not in METHODS:
        raise ModelError(f"unknown method '{name}' (known: {', '.join(sorted(METHODS))})")
    module, _, attr = METHODS[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def create_model(method: str, **params: Any) -> RetrievalModel:
    """A new, unfitted model; unknown parameters are an error that lists the accepted ones."""
    cls = method_class(method)
    accepted = [
        n
        for n, p in inspect.signature(cls.__init__).parameters.items()
        if n != "self" and p.kind is not p.VAR_KEYWORD
    ]
    takes_any = any(p.kind is p.VAR_KEYWORD for p in inspect.signature(cls.__init__).parameters.values())
    unknown = sorted(set(params) - set(accepted))
    if unknown and not takes_any:
        raise ModelError(
            f"method '{method}' has no parameter {', '.join(unknown)} (it takes: {', '.join(accepted)})"
        )
    return cls(**params)


def load_model(path: Path | str) -> RetrievalModel:
    """Load a saved model directory (config.json + weights.safetensors) by path."""
    config, arrays = read_model_dir(path)
    return method_class(config["method"]).from_config(config, arrays)


__all__ = ["METHODS", "ModelError", "RetrievalModel", "create_model", "load_model", "method_class"]
