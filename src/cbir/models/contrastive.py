"""`contrastive`: a dual encoder on frozen pretrained features, trained with symmetric InfoNCE.

Images enter as EfficientNet-Lite0 features (or the dataset's own precomputed features), captions as
MiniLM sentence embeddings; only the two projection heads and the temperature are learned. On a few
thousand images the frozen features carry the knowledge and the heads only align them, so what
matters is using every caption, cheap augmentation (cached rotated/flipped views of each training
image), early stopping on the validation split, and averaging several heads (an ensemble).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Self

import numpy as np

from cbir.datasets import Dataset
from cbir.encoders import VIEWS, image_features, shared_text_encoder
from cbir.metrics import retrieval_metrics
from cbir.models.base import ModelError, RetrievalModel
from cbir.models.heads import head_forward
from cbir.models.ridge import resolve_image_representation, unit_rows


def image_inputs(dataset: Dataset, representation: str, view: str = "center") -> np.ndarray:
    """Features of one or more representations joined by '+' (e.g. `effnet-pool+effnet-logits`)."""
    return np.concatenate([image_features(dataset, kind, view) for kind in representation.split("+")], 1)


class ContrastiveModel(RetrievalModel):
    """Dual encoder: MLP heads over frozen image features and MiniLM embeddings, symmetric InfoNCE."""

    method = "contrastive"

    def __init__(
        self,
        image_features: str = "auto",
        views: Sequence[str] = ("center",),
        use_augmented: bool = True,
        embed_dim: int = 512,
        hidden: int = 1024,
        dropout: float = 0.2,
        input_dropout: float = 0.1,
        temperature: float = 0.05,
        batch_size: int = 256,
        lr: float = 1e-3,
        weight_decay: float = 1e-2,
        epochs: int = 40,
        patience: int = 6,
        ensemble: int = 1,
        seed: int = 0,
    ):
        unknown = sorted(set(views) - set(VIEWS))
        if unknown:
            raise ModelError(f"unknown view(s) {', '.join(unknown)} (known: {', '.join(VIEWS)})")
        super().__init__(
            image_features=image_features,
            views=list(views),
            use_augmented=use_augmented,
            embed_dim=embed_dim,
            hidden=hidden,
            dropout=dropout,
            input_dropout=input_dropout,
            temperature=temperature,
            batch_size=batch_size,
            lr=lr,
            weight_decay=weight_decay,
            epochs=epochs,
            patience=patience,
            ensemble=ensemble,
            seed=seed,
        )

    def fit(self, train: Dataset, val: Dataset | None = None) -> Self:
        import torch

        from cbir.models.torch_training import (
            CaptionSampler,
            MLPHead,
            arrays_of,
            seed_everything,
            standardiser,
            train_epochs,
        )

        p = self.params
        self.representation_ = resolve_image_representation(p["image_features"], train)
        views = p["views"] if not self.representation_.startswith("resnet") else ["center"]
        keep = np.flatnonzero(train.caption_image >= 0)
        if not p["use_augmented"] and train.augmented is not None:
            keep = keep[~train.augmented[keep]]
        if len(keep) == 0:
            raise ModelError("the train split has no captions paired with images")
        caption_image = train.caption_image[keep]
        texts = torch.from_numpy(shared_text_encoder().encode([train.captions[j] for j in keep]))
        images = torch.from_numpy(np.stack([image_inputs(train, self.representation_, v) for v in views]))
        center = images[0].numpy()
        has_val = val is not None and len(val.captions) > 0 and bool((val.caption_image >= 0).all())
        if has_val:
            val_images = torch.from_numpy(image_inputs(val, self.representation_))
            val_texts = torch.from_numpy(shared_text_encoder().encode(val.captions))

        self.arrays_: dict[str, np.ndarray] = {}
        self.history_: list[dict[str, float]] = []
        for member in range(p["ensemble"]):
            rng = seed_everything(p["seed"] + member)
            image_head = MLPHead(
                images.shape[2], p["embed_dim"], p["hidden"], p["dropout"], p["input_dropout"],
                **standardiser(center),
            )  # fmt: skip
            text_head = MLPHead(
                texts.shape[1], p["embed_dim"], p["hidden"], p["dropout"], p["input_dropout"],
                **standardiser(texts.numpy()),
            )  # fmt: skip
            log_scale = torch.nn.Parameter(torch.tensor(float(np.log(1.0 / p["temperature"]))))
            module = torch.nn.ModuleDict({"image": image_head, "text": text_head})
            module.register_parameter("log_scale", log_scale)
            sampler = CaptionSampler(caption_image, len(views), p["batch_size"], rng)

            def batches(sampler=sampler):
                for img, cap, view in sampler():
                    yield images[view, img], texts[cap]

            def loss_fn(x_img, x_txt, image_head=image_head, text_head=text_head, log_scale=log_scale):
                a = torch.nn.functional.normalize(image_head(x_img), dim=1)
                b = torch.nn.functional.normalize(text_head(x_txt), dim=1)
                logits = a @ b.T * log_scale.clamp(max=np.log(100.0)).exp()
                target = torch.arange(len(a))
                ce = torch.nn.functional.cross_entropy
                return (ce(logits, target) + ce(logits.T, target)) / 2

            validate = None
            if has_val:

                def validate(image_head=image_head, text_head=text_head):
                    a = torch.nn.functional.normalize(image_head(val_images), dim=1)
                    b = torch.nn.functional.normalize(text_head(val_texts), dim=1)
                    return retrieval_metrics((b @ a.T).numpy(), val.caption_image)["mR"]

            result = train_epochs(
                module,
                batches,
                loss_fn,
                epochs=p["epochs"],
                validate=validate,
                patience=p["patience"],
                lr=p["lr"],
                weight_decay=p["weight_decay"],
                description=f"contrastive {member + 1}/{p['ensemble']}",
            )
            self.history_.append(
                {
                    "epochs_run": result.epochs_run,
                    "best_epoch": result.best_epoch,
                    "val_mR": result.best_score,
                    "loss": result.final_loss,
                    "temperature": float(torch.exp(-log_scale.detach())),
                }
            )
            self.arrays_.update(arrays_of(image_head, f"m{member}.image"))
            self.arrays_.update(arrays_of(text_head, f"m{member}.text"))
        return self

    def _embed(self, x: np.ndarray, side: str) -> np.ndarray:
        """Ensemble members' unit embeddings side by side, scaled so the inner product is their mean."""
        k = self.params["ensemble"]
        parts = [unit_rows(head_forward(self.arrays_, f"m{m}.{side}", x)) for m in range(k)]
        return np.concatenate(parts, 1) / np.sqrt(k)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        return self._embed(shared_text_encoder().encode(texts, progress=len(texts) > 256), "text")

    def embed_images(self, images: Dataset) -> np.ndarray:
        return self._embed(image_inputs(images, self.representation_), "image")

    def _arrays(self) -> dict[str, np.ndarray]:
        return self.arrays_

    def _state(self) -> dict[str, Any]:
        return {"representation": self.representation_, "history": self.history_}

    def _restore(self, arrays: dict[str, np.ndarray], state: dict[str, Any]) -> None:
        self.arrays_ = arrays
        self.representation_, self.history_ = state["representation"], state["history"]
