"""Retrieval methods behind one interface (`RetrievalModel`), found by name for `cbir train --method`.

Methods are registered as import paths so that listing them imports nothing heavy. A model is named by
a directory from `cbir train`, or by one of two names: `default`, the model shipped inside the package
(trained on Flickr8k everyday photos), and `zero-shot` (ConSE over ImageNet classes, no training).
"""

from __future__ import annotations

import importlib
import inspect
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cbir.models.base import (
    CONFIG_FILE,
    ModelError,
    Param,
    RetrievalModel,
    read_model_dir,
    write_json_atomically,
)

if TYPE_CHECKING:
    from cbir.calibration import Calibration

METHODS: dict[str, str] = {
    # classical family (issue 3)
    "ridge": "cbir.models.classical.model:RidgeModel",
    "kernel-ridge": "cbir.models.classical.model:KernelRidgeModel",
    "cca": "cbir.models.classical.model:CCAModel",
    "pls": "cbir.models.classical.model:PLSModel",
    "fusion": "cbir.models.classical.fusion:FusionModel",
    # deep methods (issue 4)
    "autoencoder": "cbir.models.autoencoder:AutoencoderModel",
    "contrastive": "cbir.models.contrastive:ContrastiveModel",
    # no training: ConSE over ImageNet classes (issue 5)
    "zero-shot": "cbir.models.zeroshot:ZeroShotModel",
    # a CLIP checkpoint the user has, searched zero-shot (issue 15)
    "clip": "cbir.models.clip:ClipModel",
}


def method_class(name: str) -> type[RetrievalModel]:
    if name not in METHODS:
        raise ModelError(f"unknown method '{name}' (known: {', '.join(sorted(METHODS))})")
    module, _, attr = METHODS[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def method_params(name: str) -> list[tuple[str, Any, Param]]:
    """(parameter, default, spec) of a method, in signature order: what `cbir methods` prints."""
    cls = method_class(name)
    specs = cls.param_specs()
    signature = inspect.signature(cls.__init__).parameters
    return [(n, p.default, specs[n]) for n, p in signature.items() if n in specs]


# Other spellings of a parameter, as issues and users write them (`-p image_encoder=clip:DIR`).
PARAM_ALIASES = {"image_encoder": "image_features", "text_encoder": "text_features"}


def _resolve_aliases(params: dict[str, Any]) -> dict[str, Any]:
    resolved = dict(params)
    for alias, name in PARAM_ALIASES.items():
        if alias in resolved:
            if name in resolved:
                raise ModelError(f"give {name} or its other spelling {alias}, not both")
            resolved[name] = resolved.pop(alias)
    return resolved


def create_model(method: str, **params: Any) -> RetrievalModel:
    """A new, unfitted model; unknown parameters are an error that lists the accepted ones."""
    cls = method_class(method)
    params = _resolve_aliases(params)
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


DEFAULT_MODEL = "default"
ZERO_SHOT_MODEL = "zero-shot"
SHIPPED_MODEL_DIR = Path(__file__).resolve().parent / "default"
REBUILD_SHIPPED = "rebuild it with `make default-model` (from a source checkout) or reinstall cbir"
# The zero-shot model has no files, yet its scores are P(match) like any model's: its calibration is
# fitted on Flickr8k val (`cbir calibrate --model zero-shot`, which `make default-model` runs) and kept here.
ZERO_SHOT_CALIBRATION = Path(__file__).resolve().parent / "zero_shot_calibration.json"


def _zero_shot() -> RetrievalModel:
    """The zero-shot model, calibrated when the package holds its calibration (else raw similarities)."""
    model = create_model(ZERO_SHOT_MODEL).fit()
    model.calibration = zero_shot_calibration()
    return model


def zero_shot_calibration() -> Calibration | None:
    """The zero-shot model's calibration as the package keeps it; None when it has none."""
    from cbir.calibration import Calibration

    if not ZERO_SHOT_CALIBRATION.is_file():
        return None
    try:
        return Calibration.from_json(json.loads(ZERO_SHOT_CALIBRATION.read_text()))
    except (OSError, ValueError) as e:
        problem = f"{ZERO_SHOT_CALIBRATION}: not a usable calibration ({e})"
        raise ModelError(f"{problem}; {REBUILD_SHIPPED}") from e


def write_zero_shot_calibration(calibration: Calibration) -> Path:
    """Store the zero-shot model's calibration (atomically: a reader sees the old file or the new)."""
    write_json_atomically(ZERO_SHOT_CALIBRATION, calibration.to_json())
    return ZERO_SHOT_CALIBRATION


def _load_dir(path: Path | str) -> RetrievalModel:
    """A saved model directory (config.json + weights.safetensors); one that does not make a usable
    model is a `ModelError` naming its config file, not a traceback later."""
    config, arrays = read_model_dir(path)
    cfg_file = Path(path) / CONFIG_FILE
    try:
        return method_class(config["method"]).from_config(config, arrays)
    except ModelError as e:
        raise ModelError(f"{cfg_file}: {e}") from e
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
        problem = f"missing {e}" if isinstance(e, KeyError) else str(e)
        raise ModelError(f"{cfg_file}: not a usable {config['method']} model ({problem})") from e


def model_source(spec: Path | str | None) -> str:
    """What `spec` names, as recorded in an index: 'default', 'zero-shot', or a resolved directory."""
    if spec is None or str(spec) in (DEFAULT_MODEL, ZERO_SHOT_MODEL):
        return str(spec or DEFAULT_MODEL)
    return str(Path(spec).expanduser().resolve())


def model_dir(spec: Path | str | None) -> Path | None:
    """The directory holding the model `spec` names; None for the zero-shot model, which has no files."""
    source = model_source(spec)
    if source == ZERO_SHOT_MODEL:
        return None
    return SHIPPED_MODEL_DIR if source == DEFAULT_MODEL else Path(source)


def load_model(spec: Path | str | None = DEFAULT_MODEL) -> RetrievalModel:
    """A saved model by directory (config.json + weights.safetensors), or by name: 'default' (None)
    or 'zero-shot'."""
    path = model_dir(spec)
    if path is None:
        return _zero_shot()
    if path != SHIPPED_MODEL_DIR:
        return _load_dir(path)
    try:
        return _load_dir(path)
    except ModelError as e:  # damage to the packaged files: say which and how to repair
        raise ModelError(
            f"the shipped default model in {path} cannot be loaded ({e}); {REBUILD_SHIPPED}"
        ) from e


__all__ = [
    "DEFAULT_MODEL",
    "METHODS",
    "ZERO_SHOT_MODEL",
    "ModelError",
    "Param",
    "RetrievalModel",
    "create_model",
    "load_model",
    "method_class",
    "method_params",
    "model_dir",
    "model_source",
]
