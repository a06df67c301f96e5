"""The one interface every retrieval method implements, and its on-disk form.

A model is fitted on a `Dataset`, then embeds queries (`embed_texts`) and images (`embed_images`)
into one space where a larger inner product means a better match. Saved, it is a directory:
`config.json` (method, plain-data parameters, small JSON state) + `weights.safetensors` (arrays).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Self, TypeVar

import numpy as np

from cbir.calibration import Calibration
from cbir.datasets import Dataset, DatasetError
from cbir.feature_kinds import BACKBONES, CLIP_KIND, DEFAULT_BACKBONE, FEATURE_KINDS
from cbir.progress import progress_bar

if TYPE_CHECKING:
    from cbir.encoders import EncodedImages

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.safetensors"
# Format 1 (no `format_version` key): config.json + weights. Format 2 adds `format_version` and an
# `arrays` manifest (name -> shape, dtype) that loading checks the weights file against. Format 3 adds
# an optional `calibration` (cbir.calibration: similarity -> P(match)); without one, scores stay raw.
FORMAT_VERSION = 3
T = TypeVar("T")


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero): inner products become cosines."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class ModelError(ValueError):
    """A model directory that cannot be used; the message says which file and why."""


def has_scored_val(val: Dataset | None) -> bool:
    """Whether `val` can score candidates (captions, each paired with an image); methods select on it
    when it can, and fall back to k-fold over the training images when it cannot."""
    return val is not None and len(val.captions) > 0 and bool((val.caption_image >= 0).all())


def grid_search(
    candidates: Sequence[T], score: Callable[[T], float], label: str, progress: bool = True
) -> tuple[T, list[float]]:
    """The candidate with the highest score (the first of equals) and every candidate's score: the
    one hyperparameter search of every method, scored on val or k-fold held-out parts."""
    if not candidates:
        raise ValueError(f"{label}: no candidates to choose from")
    scores: list[float] = []
    with progress_bar(label, len(candidates), enabled=progress and len(candidates) > 1) as advance:
        for candidate in candidates:
            scores.append(float(score(candidate)))
            advance(1, mR=scores[-1])
    return candidates[int(np.argmax(scores))], scores


def require_training_pairs(method: str, train: Dataset) -> None:
    """Refuse training data with no caption paired with an image: there is nothing to learn from.
    Every trained method's `fit` calls this, so the Python API refuses as the CLI does."""
    if not (train.caption_image >= 0).any():
        raise DatasetError(
            f"the train split has no captions paired with images ({len(train.images)} images, "
            f"{len(train.captions)} captions): nothing for {method} to train on",
            train.root,
        )


def centre_view_needs(
    representation: str, train: Dataset, val: Dataset | None
) -> list[tuple[Dataset, list[str]]]:
    """`fit_image_views` of a method that reads the centre view of its representation, of the train
    images and of a scored val split (selection, calibration)."""
    from cbir.encoders import computed_views

    views = computed_views(representation, ["center"])
    if not views:
        return []
    return [(train, views)] + ([(val, views)] if val is not None and has_scored_val(val) else [])


def fold_of_images(n_images: int, k: int, seed: int) -> np.ndarray:
    """The seeded fold (0..k-1) of each training image, for k-fold selection without a val split."""
    if n_images < 2 * k:
        raise ModelError(f"{n_images} training images are too few for {k}-fold cross-validation")
    return np.random.default_rng(seed).permutation(n_images) % k


@dataclass(frozen=True)
class Param:
    """What a method parameter means and which values it takes; checked when a model is built, so a
    bad value fails at once with the parameter named, not minutes into training."""

    meaning: str
    kind: type = object  # int, float (ints accepted), bool, str, list; object: checked by the method
    low: float | None = None
    high: float | None = None
    open_low: bool = False  # low itself is excluded
    open_high: bool = False
    choices: tuple[Any, ...] = ()
    optional: bool = False  # None is accepted (the method then chooses the value)

    def allowed(self) -> str:
        if self.choices:
            text = f"one of {', '.join(map(str, self.choices))}"
        else:
            text = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
                self.kind, "a list" if self.kind is list else "any value"
            )
            if self.low is not None or self.high is not None:
                left = "(" if self.open_low or self.low is None else "["
                right = ")" if self.open_high or self.high is None else "]"
                text += f" in {left}{_bound(self.low, '-inf')}, {_bound(self.high, 'inf')}{right}"
        return text + (" or null" if self.optional else "")

    def check(self, method: str, name: str, value: Any) -> None:
        if not self._accepts(value):
            raise ModelError(f"{method}: parameter {name} must be {self.allowed()}, not {value!r}")

    def _accepts(self, value: Any) -> bool:
        if value is None:
            return self.optional
        if self.choices:
            return value in self.choices
        kinds = (int, float) if self.kind is float else (self.kind,)
        if not isinstance(value, kinds) or (isinstance(value, bool) and self.kind is not bool):
            return False
        if self.low is not None and (value < self.low or (self.open_low and value == self.low)):
            return False
        return self.high is None or (value < self.high or (not self.open_high and value == self.high))


def _bound(value: float | None, infinite: str) -> str:
    return infinite if value is None else f"{value:g}"


# Parameters several methods take, declared once; a method's PARAMS picks them by name.
SHARED_PARAMS: dict[str, Param] = dict(
    image_features=Param(
        f"image features, '+'-joined ({', '.join(FEATURE_KINDS)}, auto, tags, {CLIP_KIND})", str
    ),
    text_features=Param(
        f"caption features, '+'-joined (minilm, tfidf, bow, lsa, word2vec, glove, {CLIP_KIND})", str
    ),
    image_backbone=Param("EfficientNet-Lite computing the effnet-* image features", choices=tuple(BACKBONES)),
    use_augmented=Param("also train on the dataset's augmented captions, when it has them", bool),
    batch_size=Param("training pairs per step", int, 2),
    lr=Param("Adam learning rate", float, 0, open_low=True),
    epochs=Param("most training epochs (early stopping on val may end sooner)", int, 1),
    patience=Param("epochs without a better val mR before training stops", int, 1),
    seed=Param("random seed (initialisation, shuffling, folds)", int),
)


@dataclass
class ImageEmbedding:
    """Image files embedded by a model: one vector each, and the files that could not be."""

    vectors: np.ndarray  # (n, d); the rows of failed images are zero
    keys: list[str]  # SHA-1 of each file's bytes (the feature cache key); "" where unreadable
    failed: dict[str, str]  # image id -> reason


class RetrievalModel:
    """Base class: subclasses set `method` and `PARAMS`, take plain-data keyword parameters, and
    implement `fit`, `embed_texts`, `embed_images`, `_arrays`/`_state` and `_restore`."""

    method: ClassVar[str] = ""
    PARAMS: ClassVar[dict[str, Param]] = {}
    calibration: Calibration | None = None  # set by `cbir.calibration.calibrate` after fitting

    def __init__(self, **params: Any):
        specs = self.param_specs()
        for name, value in params.items():
            if name in specs:
                specs[name].check(self.method, name, value)
        self.params = params

    @classmethod
    def param_specs(cls) -> dict[str, Param]:
        """The parameters this method takes (a subclass may narrow a shared table)."""
        return cls.PARAMS

    def get_params(self) -> dict[str, Any]:
        return dict(self.params)

    def fit(self, train: Dataset, val: Dataset | None = None) -> Self:
        raise NotImplementedError

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        raise NotImplementedError

    def embed_images(self, images: Dataset) -> np.ndarray:
        raise NotImplementedError

    def image_views(self) -> list[str]:
        """The views of an image `embed_images` reads (test-time augmentation may use several)."""
        return ["center"]

    def fit_image_views(self, train: Dataset, val: Dataset | None = None) -> list[tuple[Dataset, list[str]]]:
        """The images that `fit(train, val)` and calibration on `val` read computed features of, each
        with its views (as `image_views` names them), known before fitting so that they can be computed
        ahead (`cbir train --ray`). Empty when the method reads none or cannot tell: `fit` then computes
        what it reads, as always."""
        return []

    def image_backbone(self) -> str:
        """The EfficientNet-Lite that computes the features `embed_images` reads."""
        return DEFAULT_BACKBONE

    def embed(self, images: Dataset, progress: bool = False) -> ImageEmbedding:
        """The embedding contract for image files: vectors plus the failures (id -> reason), each
        file read and hashed once for all the views the model needs."""
        from cbir.encoders import encode_images

        return self.embed_encoded(encode_images(images, self.image_views(), progress, self.image_backbone()))

    def embed_encoded(self, encoded: EncodedImages) -> ImageEmbedding:
        """`embed` of image files already encoded (here, or by Ray workers: cbir.distributed)."""
        vectors = np.array(self.embed_images(encoded.dataset), dtype=np.float32)
        vectors[list(encoded.failed)] = 0.0
        ids = encoded.dataset.image_ids
        failed = {ids[row]: reason for row, reason in sorted(encoded.failed.items())}
        return ImageEmbedding(vectors, encoded.keys, failed)

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

    def _stored(self, provenance: dict[str, Any] | None = None) -> tuple[dict[str, np.ndarray], str]:
        """The arrays and the config.json text that `save` writes."""
        from cbir import __version__

        arrays = {k: np.ascontiguousarray(v) for k, v in self._arrays().items()}
        config = {
            "format_version": FORMAT_VERSION,
            "method": self.method,
            "params": self.params,
            "state": self._state(),
            "arrays": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in arrays.items()},
            "cbir_version": __version__,
            **({"calibration": self.calibration.to_json()} if self.calibration else {}),
            **({"provenance": provenance} if provenance else {}),
        }
        return arrays, json.dumps(config, indent=2, default=_jsonable) + "\n"

    def as_saved(self) -> Self:
        """This model as saving and loading it would give it back, made in memory. Weights stored as
        int8 or float16 score a little differently from the float32 ones just fitted, and what is
        chosen after fitting (the calibration, the recorded test metrics) must be the shipped model's."""
        from safetensors.numpy import load, save

        arrays, text = self._stored()
        return type(self).from_config(json.loads(text), load(save(arrays)))

    def save(self, path: Path | str, provenance: dict[str, Any] | None = None) -> Path:
        """Write the model directory atomically: a complete sibling directory is renamed into place,
        so a crash leaves the previous model (or none), never a half-written one. `provenance` (how
        the model was made: data, command, metrics) is stored as is in config.json."""
        from safetensors.numpy import save_file

        arrays, text = self._stored(provenance)  # fails before touching the disk
        diverged = sorted(k for k, a in arrays.items() if a.dtype.kind == "f" and not np.isfinite(a).all())
        if diverged:  # evaluation would score such a model as perfect (every score NaN)
            raise ModelError(
                f"training {self.method} diverged (NaN/inf in {', '.join(diverged[:3])}"
                f"{', …' if len(diverged) > 3 else ''}); nothing was saved to {path}"
            )
        out = Path(path)
        staging = out.parent / f".{out.name}.{uuid.uuid4().hex}.tmp"
        try:
            staging.mkdir(parents=True)
            save_file(arrays, str(staging / WEIGHTS_FILE))
            (staging / CONFIG_FILE).write_text(text)
            # safetensors writes 0600 whatever the umask: readable like config.json, for a server or
            # a colleague that loads the model as another user.
            shutil.copymode(staging / CONFIG_FILE, staging / WEIGHTS_FILE)
            for file in (WEIGHTS_FILE, CONFIG_FILE):
                _fsync(staging / file)
            _move_into_place(staging, out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return out

    @classmethod
    def from_config(cls, config: dict[str, Any], arrays: dict[str, np.ndarray]) -> Self:
        model = cls(**config.get("params", {}))
        model._restore(arrays, config.get("state", {}))
        if config.get("calibration") is not None:
            model.calibration = Calibration.from_json(config["calibration"])
        return model


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot store {type(value).__name__} in config.json")


def _fsync(file: Path) -> None:
    with open(file, "rb") as f:
        os.fsync(f.fileno())


def _move_into_place(staging: Path, out: Path) -> None:
    """Rename the finished `staging` directory to `out`, replacing a model directory already there."""
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / CONFIG_FILE).is_file())):
        raise ModelError(f"{out}: exists and is not a model directory; not overwriting it")
    old = out.parent / f".{out.name}.{uuid.uuid4().hex}.old"
    if out.exists():
        os.replace(out, old)
    try:
        os.replace(staging, out)
    except OSError:
        if old.exists():
            os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_calibration(path: Path | str, calibration: Calibration) -> Path:
    """Store `calibration` in an existing model directory: config.json alone is rewritten (atomically),
    the weights stay byte for byte as they are."""
    cfg_file = Path(path) / CONFIG_FILE
    config, _ = read_model_dir(path)  # a directory that does not load is refused, untouched
    config.update(format_version=FORMAT_VERSION, calibration=calibration.to_json())
    if "arrays" not in config:  # format 1: record the manifest the new version number promises
        from safetensors.numpy import load_file

        weights = load_file(str(Path(path) / WEIGHTS_FILE)) if (Path(path) / WEIGHTS_FILE).is_file() else {}
        config["arrays"] = {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in weights.items()}
        config.setdefault("params", {})
        config.setdefault("state", {})
    write_json_atomically(cfg_file, config)
    return Path(path)


def write_json_atomically(path: Path, data: Any) -> None:
    """`data` as JSON in `path`, written aside, synced and renamed: a reader sees the old file or the new."""
    staging = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        staging.write_text(json.dumps(data, indent=2, default=_jsonable) + "\n")
        _fsync(staging)
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


def read_model_dir(path: Path | str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The checked config and arrays of a model directory; any problem is a `ModelError` naming the file."""
    root = Path(path)
    cfg_file = root / CONFIG_FILE
    if not cfg_file.is_file():
        raise ModelError(f"{root}: not a model directory (no {CONFIG_FILE}); train one with `cbir train`")
    config = read_config(cfg_file)
    return config, read_weights(root / WEIGHTS_FILE, config.get("arrays"))


def read_config(cfg_file: Path) -> dict[str, Any]:
    """config.json parsed, its format version supported and its top-level keys of the right types."""
    try:
        config = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ModelError(f"{cfg_file}:{e.lineno}: malformed JSON: {e.msg}") from e
    except UnicodeDecodeError as e:
        raise ModelError(f"{cfg_file}: not a text file ({e.reason})") from e
    if not isinstance(config, dict):
        raise ModelError(f"{cfg_file}: expected a JSON object, found {type(config).__name__}")
    version = config.get("format_version", 1)
    if type(version) is not int or version < 1:
        raise ModelError(f"{cfg_file}: unknown model format_version {version!r}")
    if version > FORMAT_VERSION:
        raise ModelError(
            f"{cfg_file}: model format {version} (written by cbir {config.get('cbir_version', '?')}) is "
            f"newer than this cbir reads (up to {FORMAT_VERSION}); upgrade cbir to load it"
        )
    required = ("method", "params", "state", "arrays") if version >= 2 else ("method",)
    missing = [key for key in required if key not in config]
    if missing:
        raise ModelError(f"{cfg_file}: no {', '.join(repr(k) for k in missing)} key")
    objects = ("params", "state", "arrays")
    if not isinstance(config["method"], str) or not all(isinstance(config.get(k, {}), dict) for k in objects):
        raise ModelError(f"{cfg_file}: 'method' must be a string and {', '.join(objects)} JSON objects")
    return config


def read_weights(file: Path, manifest: dict[str, Any] | None) -> dict[str, np.ndarray]:
    """The arrays of weights.safetensors, checked against the config's manifest when it has one."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    if not file.is_file():
        if manifest:
            raise ModelError(f"{file}: missing (config.json lists {len(manifest)} arrays)")
        return {}
    try:
        arrays = load_file(str(file))
    except (SafetensorError, OSError) as e:
        raise ModelError(f"{file}: unreadable or truncated weights ({e})") from e
    if manifest is None:  # format 1 records no shapes
        return arrays
    if set(arrays) != set(manifest):
        missing, extra = sorted(set(manifest) - set(arrays)), sorted(set(arrays) - set(manifest))
        raise ModelError(f"{file}: arrays do not match config.json (missing {missing}, unexpected {extra})")
    for name, spec in manifest.items():
        found = {"shape": list(arrays[name].shape), "dtype": str(arrays[name].dtype)}
        if not isinstance(spec, dict) or found != {k: spec.get(k) for k in found}:
            raise ModelError(f"{file}: array '{name}' is {found}; config.json records {spec}")
    return arrays
