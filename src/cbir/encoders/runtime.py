"""Networks run through ONNX Runtime, exported once from their torch definition.

ONNX Runtime runs the same graphs faster than torch on a small CPU (benchmarks/encoding_speed.py,
benchmarks/text_encoding.py) and imports in a fraction of torch's time. An exported file lives in the
feature cache's `onnx/` folder (`$CBIR_ONNX_DIR` when set), named by the hash of the weights it was
made from, so it is exported once per weights version whatever feature cache a run uses; it is
written beside its final name and renamed into place, and a file that does not load (corrupt, cut
short) is exported again. Without onnxruntime installed the encoders fall back to torch.
"""

from __future__ import annotations

import importlib.util
import os
import uuid
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cbir.encoders.cache import default_cache_dir, file_hash

OPSET = 17
RUNTIMES = ("auto", "onnx", "torch")
MISSING = "onnxruntime is not installed (pip install onnxruntime==1.32.0 onnx==1.23.2)"


def check_runtime(runtime: str) -> str:
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime '{runtime}' (known: {', '.join(RUNTIMES)})")
    return runtime


def resolve_runtime(runtime: str) -> str:
    """'onnx' or 'torch': `auto` is ONNX Runtime where it is installed (faster, measured), else torch
    with a warning saying so."""
    check_runtime(runtime)
    installed = importlib.util.find_spec("onnxruntime") is not None
    if runtime == "onnx" and not installed:
        raise RuntimeError(MISSING)
    if runtime == "auto":
        if installed:
            return "onnx"
        warnings.warn(f"{MISSING}: running in torch, slower", stacklevel=3)
        return "torch"
    return runtime


def onnx_path(name: str, weights: Path) -> Path:
    """Where the network `name` exported from `weights` is kept."""
    folder = Path(os.environ.get("CBIR_ONNX_DIR", default_cache_dir() / "onnx"))
    return folder / f"{name}-{file_hash(weights)[:16]}-opset{OPSET}.onnx"


def session(path: Path, threads: int = 0) -> Any:
    """An ONNX Runtime session on the CPU; `threads` 0 lets it use every core."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def exported(path: Path, export: Callable[[Path], None], threads: int = 0) -> Any:
    """A session over the ONNX file at `path`, exported first where it is missing or does not load."""
    if path.exists():
        try:
            return session(path, threads)
        except Exception as e:  # onnxruntime raises its own types for a bad file (InvalidProtobuf, Fail...)
            warnings.warn(f"{path}: cannot be loaded ({e}); exporting it again", stacklevel=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        export(tmp)
        loaded = session(tmp, threads)  # only a file that loads takes the final name
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return loaded


def torch_exporter(
    module: Any, example: Sequence[Any], inputs: Sequence[str], dynamic: dict[str, dict[int, str]]
) -> Callable[[Path], None]:
    """Exports `module` as traced on `example` inputs, its outputs (however many) in order; the
    `dynamic` axes of each named input may change size from call to call."""

    def export(path: Path) -> None:
        import torch

        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and folding notes
            torch.onnx.export(
                module,
                tuple(example),
                str(path),
                dynamo=False,
                input_names=list(inputs),
                dynamic_axes=dynamic,
                opset_version=OPSET,
            )

    return export
