"""`ridge`: the simplest complete method. Sentence embeddings (MiniLM) are mapped by ridge regression
onto standardised image features; queries and images meet by cosine in image-feature space."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Self

import numpy as np

from cbir.datasets import Dataset
from cbir.encoders import image_features, shared_text_encoder
from cbir.metrics import retrieval_metrics
from cbir.models.base import RetrievalModel


def resolve_image_representation(name: str, dataset: Dataset) -> str:
    """`auto` = the dataset's precomputed ResNet pool5 features when it has them, else EfficientNet."""
    if name != "auto":
        return name
    return "resnet2048" if "resnet2048" in dataset.features else "effnet-pool"


def unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def ridge_solve(x: np.ndarray, y: np.ndarray, alpha: float) -> np.ndarray:
    """W minimising |xW - y|^2 + alpha |W|^2 (x and y centred by the caller)."""
    gram = x.T @ x
    gram[np.diag_indices_from(gram)] += alpha
    return np.linalg.solve(gram, x.T @ y).astype(np.float32)


class RidgeModel(RetrievalModel):
    """Ridge regression from MiniLM sentence embeddings to standardised image features (cosine)."""

    method = "ridge"

    def __init__(
        self,
        image_features: str = "auto",
        alpha: float | None = None,
        alphas: Sequence[float] = (1.0, 10.0, 100.0, 1000.0),
    ):
        super().__init__(image_features=image_features, alpha=alpha, alphas=list(alphas))

    def fit(self, train: Dataset, val: Dataset | None = None) -> Self:
        self.representation_ = resolve_image_representation(self.params["image_features"], train)
        feats = image_features(train, self.representation_)
        self.image_mean_ = feats.mean(0)
        self.image_scale_ = feats.std(0) + 1e-6
        texts = shared_text_encoder().encode(train.captions)
        self.text_mean_ = texts.mean(0)
        x = texts - self.text_mean_
        y = ((feats - self.image_mean_) / self.image_scale_)[train.caption_image]
        alpha = self.params["alpha"]
        if alpha is None:
            alpha = self._choose_alpha(x, y, val) if val is not None and len(val.captions) else 10.0
        self.alpha_ = float(alpha)
        self.weights_ = ridge_solve(x, y, self.alpha_)
        return self

    def _choose_alpha(self, x: np.ndarray, y: np.ndarray, val: Dataset) -> float:
        """The alpha with the best validation mR."""
        val_images = self.embed_images(val)
        val_texts = shared_text_encoder().encode(val.captions) - self.text_mean_
        best, best_score = self.params["alphas"][0], -1.0
        for a in self.params["alphas"]:
            pred = unit_rows(val_texts @ ridge_solve(x, y, a))
            score = retrieval_metrics(pred @ val_images.T, val.caption_image)["mR"]
            if score > best_score:
                best, best_score = a, score
        return float(best)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        return unit_rows(
            (shared_text_encoder().encode(texts, progress=len(texts) > 256) - self.text_mean_) @ self.weights_
        )

    def embed_images(self, images: Dataset) -> np.ndarray:
        feats = image_features(images, self.representation_)
        return unit_rows((feats - self.image_mean_) / self.image_scale_)

    def _arrays(self) -> dict[str, np.ndarray]:
        return {
            "weights": self.weights_,
            "image_mean": self.image_mean_,
            "image_scale": self.image_scale_,
            "text_mean": self.text_mean_,
        }

    def _state(self) -> dict[str, Any]:
        return {"representation": self.representation_, "alpha": self.alpha_}

    def _restore(self, arrays: dict[str, np.ndarray], state: dict[str, Any]) -> None:
        self.weights_, self.image_mean_ = arrays["weights"], arrays["image_mean"]
        self.image_scale_, self.text_mean_ = arrays["image_scale"], arrays["text_mean"]
        self.representation_, self.alpha_ = state["representation"], state["alpha"]
