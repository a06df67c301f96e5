"""CLIP weights a user has, as an image and a text encoder: a transformers `CLIPModel` directory
(`config.json`, `model.safetensors` or `pytorch_model.bin`, tokenizer files, optionally
`preprocessor_config.json`), loaded strictly offline.

Images are prepared without torchvision, as CLIP's own processor does: the shorter side resized
(bicubic) to the checkpoint's `size`, a centre crop of `crop_size`, then the checkpoint's mean and
standard deviation (OpenAI's values when it has no preprocessor config). Features are cached by file
content (or caption text) under the checkpoint's content hash, so other weights never read them.
open_clip directories are not supported: `open_clip_torch` needs torchvision, which cbir does not
install; convert such weights to the transformers format first.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cbir.encoders.cache import FeatureCache, text_key
from cbir.encoders.image import ImageEncoder
from cbir.imaging import to_rgb
from cbir.progress import progress_bar

# The values OpenAI's CLIP was trained with; a checkpoint's preprocessor_config.json overrides them.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
CONFIG_FILE = "config.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
SAFETENSORS_INDEX = "model.safetensors.index.json"
WEIGHT_FILES = ("model.safetensors", SAFETENSORS_INDEX, "pytorch_model.bin")  # the order transformers reads
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
OPEN_CLIP_FILES = ("open_clip_config.json", "open_clip_pytorch_model.bin", "open_clip_model.safetensors")
LAYOUT = "a transformers CLIPModel directory (config.json, model.safetensors, tokenizer files)"


class ClipCheckpointError(ValueError):
    """A CLIP checkpoint directory that cannot be used; the message names the file and why."""


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes CLIP's input: shorter side to `size`, centre crop, then (x - mean) / std."""

    size: int
    crop: int
    mean: tuple[float, ...] = OPENAI_MEAN
    std: tuple[float, ...] = OPENAI_STD


def _read_json(file: Path) -> dict[str, Any]:
    try:
        value = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ClipCheckpointError(f"{file}:{e.lineno}: malformed JSON: {e.msg}") from e
    except (OSError, UnicodeDecodeError) as e:
        raise ClipCheckpointError(f"{file}: unreadable ({e})") from e
    if not isinstance(value, dict):
        raise ClipCheckpointError(f"{file}: expected a JSON object, found {type(value).__name__}")
    return value


def _edge(value: Any, file: Path, key: str) -> int:
    """A size in a preprocessor config: an int, or {"shortest_edge": n} / {"height": n, "width": n}."""
    if isinstance(value, dict):
        value = value.get("shortest_edge", value.get("height"))
    if type(value) is not int or value < 1:
        raise ClipCheckpointError(f"{file}: '{key}' must be a positive size, not {value!r}")
    return value


def _preprocessing(root: Path, config: dict[str, Any]) -> Preprocessing:
    vision = config.get("vision_config") or {}
    side = vision.get("image_size", 224)
    file = root / PREPROCESSOR_FILE
    if not file.is_file():
        return Preprocessing(side, side)
    spec = _read_json(file)
    mean, std = spec.get("image_mean", OPENAI_MEAN), spec.get("image_std", OPENAI_STD)
    for key, value in (("image_mean", mean), ("image_std", std)):
        numbers = isinstance(value, list | tuple) and all(isinstance(v, int | float) for v in value)
        if not (numbers and len(value) == 3 and (key == "image_mean" or min(value) > 0)):
            raise ClipCheckpointError(f"{file}: '{key}' must be three numbers (std above 0), not {value!r}")
    size = _edge(spec.get("size", side), file, "size")
    crop = _edge(spec.get("crop_size", side), file, "crop_size")
    if crop != side or size < crop:
        raise ClipCheckpointError(
            f"{file}: crop_size {crop} (from size {size}) does not fit the model's {side}-pixel input"
        )
    return Preprocessing(size, crop, tuple(map(float, mean)), tuple(map(float, std)))


def _weight_files(root: Path) -> list[Path]:
    """The weight files transformers will read (a sharded safetensors index and its shards)."""
    for name in WEIGHT_FILES:
        file = root / name
        if not file.is_file():
            continue
        if name != SAFETENSORS_INDEX:
            return [file]
        shards = sorted(set((_read_json(file).get("weight_map") or {}).values()))
        missing = [s for s in shards if not (root / s).is_file()]
        if not shards or missing:
            raise ClipCheckpointError(f"{file}: shard {missing[0] if missing else '(none listed)'} missing")
        return [file, *(root / s for s in shards)]
    raise ClipCheckpointError(f"{root}: no weights ({', '.join(WEIGHT_FILES)}); expected {LAYOUT}")


@dataclass(frozen=True)
class ClipCheckpoint:
    """A checked CLIP checkpoint directory: every file it needs is there and its configs parse."""

    path: Path
    config: dict[str, Any]
    preprocessing: Preprocessing
    weights: tuple[Path, ...]
    other_files: tuple[Path, ...]  # configs and tokenizer files

    @property
    def files(self) -> tuple[Path, ...]:
        """Every file the features depend on."""
        return self.other_files + self.weights

    @classmethod
    def open(cls, path: Path | str) -> ClipCheckpoint:
        root = Path(path).expanduser().resolve()
        if not root.is_dir():
            raise ClipCheckpointError(
                f"{root}: no CLIP checkpoint there (not a directory); expected {LAYOUT}"
            )
        cfg_file = root / CONFIG_FILE
        if not cfg_file.is_file():
            if any((root / name).is_file() for name in OPEN_CLIP_FILES):
                raise ClipCheckpointError(
                    f"{root}: an open_clip checkpoint; only the transformers format is supported "
                    "(open_clip_torch needs torchvision): convert it to a CLIPModel directory first"
                )
            raise ClipCheckpointError(f"{cfg_file}: missing; expected {LAYOUT}")
        config = _read_json(cfg_file)
        if config.get("model_type") != "clip":
            raise ClipCheckpointError(
                f"{cfg_file}: not a CLIP configuration "
                f"(model_type {config.get('model_type')!r}, expected 'clip')"
            )
        present = [root / name for name in TOKENIZER_FILES if (root / name).is_file()]
        names = {p.name for p in present}
        if "tokenizer.json" not in names and not {"vocab.json", "merges.txt"} <= names:
            raise ClipCheckpointError(f"{root}: no tokenizer (tokenizer.json, or vocab.json and merges.txt)")
        preprocessing = _preprocessing(root, config)
        extra = [root / PREPROCESSOR_FILE] if (root / PREPROCESSOR_FILE).is_file() else []
        return cls(root, config, preprocessing, tuple(_weight_files(root)), (cfg_file, *extra, *present))

    @cached_property
    def stamps(self) -> tuple[tuple[str, int, int], ...]:
        """(file, size, mtime) of every file the features depend on: what changes when they do."""
        return tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in self.files)

    @property
    def digest(self) -> str:
        """SHA-1 over the names and bytes of the files the features depend on."""
        return _digest(self.stamps)

    @property
    def max_tokens(self) -> int:
        return int((self.config.get("text_config") or {}).get("max_position_embeddings", 77))


@lru_cache(maxsize=16)
def _digest(stamps: tuple[tuple[str, int, int], ...]) -> str:
    """Keyed by (file, size, mtime): a process hashes an unchanged checkpoint once."""
    h = hashlib.sha1()
    for name, _, _ in stamps:
        h.update(Path(name).name.encode() + b"\0")
        with open(name, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def load_clip(checkpoint: ClipCheckpoint):
    """(CLIPModel in eval mode, tokenizer), offline; weights that do not fit the config name the file."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        from transformers import AutoTokenizer, CLIPModel
        from transformers.utils import logging as hf_logging
    except ImportError as e:
        raise ClipCheckpointError(f"CLIP weights need transformers: pip install 'cbir[clip]' ({e})") from e

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    root, weights = checkpoint.path, checkpoint.weights[0]
    try:
        model, info = CLIPModel.from_pretrained(root, local_files_only=True, output_loading_info=True)
    except Exception as e:  # transformers raises OSError, ValueError, RuntimeError, SafetensorError…
        raise ClipCheckpointError(f"{weights}: cannot load CLIP weights ({type(e).__name__}: {e})") from e
    missing = sorted(info.get("missing_keys") or []) + sorted(info.get("mismatched_keys") or [])
    if missing:
        raise ClipCheckpointError(
            f"{weights}: does not hold the weights {root / CONFIG_FILE} describes "
            f"({len(missing)} missing or mismatched, e.g. {missing[0]})"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(root, local_files_only=True)
    except Exception as e:
        raise ClipCheckpointError(f"{root}: cannot load the tokenizer ({type(e).__name__}: {e})") from e
    return model.eval(), tokenizer


class ClipEncoder(ImageEncoder):
    """A CLIP checkpoint's two towers: image embeddings through the cached image pipeline, caption
    embeddings cached per text. Rows are CLIP's projected embeddings (not normalised)."""

    views = ("center",)

    def __init__(self, checkpoint: ClipCheckpoint, batch_size: int = 16, cache: bool = True):
        super().__init__(batch_size=batch_size, cache=cache)
        self.checkpoint = checkpoint
        self.dim = int(checkpoint.config.get("projection_dim", 512))
        self._tokenizer = None

    def namespace(self, view: str) -> str:
        return f"clip/{self.checkpoint.digest}/{view}"

    def prepare(self, data: bytes, view: str) -> np.ndarray:
        """Shorter side to `size` (bicubic), centre crop: (crop, crop, 3) uint8."""
        p = self.checkpoint.preprocessing
        im = to_rgb(Image.open(io.BytesIO(data)), p.size)
        scale = p.size / min(im.size)
        w, h = max(p.crop, round(im.width * scale)), max(p.crop, round(im.height * scale))
        if (w, h) != im.size:
            im = im.resize((w, h), Image.Resampling.BICUBIC)
        left, top = (w - p.crop) // 2, (h - p.crop) // 2
        return np.asarray(im.crop((left, top, left + p.crop, top + p.crop)), dtype=np.uint8)

    def _network(self, bulk: bool = True):
        """CLIP's towers (no tracing step to skip for small jobs: `bulk` is the image encoder's)."""
        if not self._nets:
            self._nets[True], self._tokenizer = load_clip(self.checkpoint)
        return self._nets[True]

    def _forward(self, pixels: np.ndarray, bulk: bool = True) -> np.ndarray:
        import torch

        p = self.checkpoint.preprocessing
        x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0
        x = (x - torch.tensor(p.mean).view(1, 3, 1, 1)) / torch.tensor(p.std).view(1, 3, 1, 1)
        with torch.inference_mode():
            return self._network().get_image_features(pixel_values=x).pooler_output.numpy()

    def encode_texts(self, texts: Sequence[str], progress: bool = True) -> np.ndarray:
        """(n, dim) caption embeddings; each text is embedded once per checkpoint (cached by content)."""
        texts = list(texts)
        cache = FeatureCache.open(self.namespace("text")) if self.use_cache else None
        keys = [text_key(t) for t in texts]
        hits = cache.get_many(keys) if cache is not None else {}
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        todo = [i for i, k in enumerate(keys) if k not in hits]
        for i, k in enumerate(keys):
            if k in hits:
                out[i] = hits[k]
        with progress_bar("CLIP text embeddings", len(todo), enabled=progress and len(todo) > 256) as advance:
            for start in range(0, len(todo), 64):
                rows = todo[start : start + 64]
                out[rows] = self._embed_texts([texts[i] for i in rows])
                advance(len(rows))
        if cache is not None and todo:
            cache.put_many([keys[i] for i in todo], out[todo])
        return out

    def _embed_texts(self, texts: list[str]) -> np.ndarray:
        import torch

        model = self._network()
        batch = self._tokenizer(
            texts, padding=True, truncation=True, max_length=self.checkpoint.max_tokens, return_tensors="pt"
        )
        with torch.inference_mode():
            return model.get_text_features(**batch).pooler_output.numpy()

    def load(self) -> None:
        """Load the weights now, so a checkpoint whose weights do not load fails at once."""
        self._network()
