"""`autoencoder`: the original deep approach, rebuilt faithfully.

1. An autoencoder compresses image features (ResNet pool5 when the dataset ships them, else
   EfficientNet-Lite0) to a small code (default 100-d), trained on reconstruction RMSE.
2. A text encoder with its own word embeddings (vocabulary from the train captions; mean of the
   words' vectors -> hidden layer -> code) learns to land on the image codes, by MSE to the code
   of its image or by a triplet loss with hard or semi-hard negatives.
3. Retrieval is nearest neighbours (Euclidean) in that shared code space.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any, Self

import numpy as np

from cbir.datasets import Dataset
from cbir.encoders import image_features, resolve_image_representation
from cbir.metrics import retrieval_metrics
from cbir.models.base import (
    SHARED_PARAMS,
    ModelError,
    Param,
    RetrievalModel,
    centre_view_needs,
    has_scored_val,
    require_training_pairs,
    unit_rows,
)
from cbir.models.heads import bag_of_words, head_forward, words

LOSSES = ("mse", "triplet")
NEGATIVES = ("hard", "semi-hard")


def euclidean_as_inner_product(texts: np.ndarray, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Augmented vectors whose inner product is -|t - i|^2 / 2, so nearest neighbours by Euclidean
    distance are the largest scores, both ways, in any inner-product index."""
    t_sq = (texts**2).sum(1, keepdims=True) / 2
    i_sq = (images**2).sum(1, keepdims=True) / 2
    ones_t, ones_i = np.ones_like(t_sq), np.ones_like(i_sq)
    return (
        np.concatenate([texts, -ones_t, -t_sq], 1).astype(np.float32),
        np.concatenate([images, i_sq, ones_i], 1).astype(np.float32),
    )


class AutoencoderModel(RetrievalModel):
    """Image autoencoder code space + word-embedding text encoder (MSE or triplet), Euclidean k-NN."""

    method = "autoencoder"
    PARAMS = {
        "image_features": SHARED_PARAMS["image_features"],
        "code_size": Param("dimensions of the shared code space", int, 1),
        "image_hidden": Param("hidden units of the image autoencoder", int, 1),
        "word_dim": Param("dimensions of the word embeddings the text encoder learns", int, 1),
        "text_hidden": Param("hidden units of the text encoder", int, 1),
        "min_count": Param("fewest occurrences in the training captions for a word to be kept", int, 1),
        "loss": Param("text-to-code loss", choices=LOSSES),
        "margin": Param("triplet margin on the unit sphere", float, 0, open_low=True),
        "negatives": Param("triplet negatives: the hardest in the batch or the semi-hard", choices=NEGATIVES),
        "use_augmented": SHARED_PARAMS["use_augmented"],
        "dropout": Param("dropout in the encoders", float, 0, 1, open_high=True),
        **{k: SHARED_PARAMS[k] for k in ("batch_size", "lr", "epochs", "patience", "seed")},
    }

    def __init__(
        self,
        image_features: str = "auto",
        code_size: int = 100,
        image_hidden: int = 512,
        word_dim: int = 300,
        text_hidden: int = 512,
        min_count: int = 2,
        loss: str = "mse",
        margin: float = 0.2,
        negatives: str = "semi-hard",
        use_augmented: bool = True,
        dropout: float = 0.2,
        batch_size: int = 256,
        lr: float = 1e-3,
        epochs: int = 25,
        patience: int = 4,
        seed: int = 0,
    ):
        super().__init__(
            image_features=image_features,
            code_size=code_size,
            image_hidden=image_hidden,
            word_dim=word_dim,
            text_hidden=text_hidden,
            min_count=min_count,
            loss=loss,
            margin=margin,
            negatives=negatives,
            use_augmented=use_augmented,
            dropout=dropout,
            batch_size=batch_size,
            lr=lr,
            epochs=epochs,
            patience=patience,
            seed=seed,
        )

    def fit_image_views(self, train: Dataset, val: Dataset | None = None) -> list[tuple[Dataset, list[str]]]:
        representation = resolve_image_representation(self.params["image_features"], train)
        return centre_view_needs(representation, train, val)

    def fit(self, train: Dataset, val: Dataset | None = None) -> Self:
        import torch

        from cbir.models.torch_training import CaptionSampler, arrays_of, seed_everything

        require_training_pairs(self.method, train)
        p = self.params
        rng = seed_everything(p["seed"])
        self.representation_ = resolve_image_representation(p["image_features"], train)
        feats = image_features(train, self.representation_)
        keep = np.flatnonzero(train.caption_image >= 0)
        if not p["use_augmented"] and train.augmented is not None:
            keep = keep[~train.augmented[keep]]
        if len(keep) == 0:
            raise ModelError("the train split has no captions paired with images")
        counts = Counter(w for j in keep for w in words(train.captions[j]))
        self.vocabulary_ = sorted(w for w, c in counts.items() if c >= p["min_count"])
        has_val = has_scored_val(val)
        val_feats = image_features(val, self.representation_) if has_val else None

        self.history_: dict[str, dict[str, float]] = {}
        encoder, ae_result = self._fit_autoencoder(feats, val_feats, rng)
        self.arrays_ = arrays_of(encoder, "encoder")
        with torch.no_grad():
            codes = encoder(torch.from_numpy(feats))
            val_codes = encoder(torch.from_numpy(val_feats)).numpy() if has_val else None

        text_encoder = self._fit_text_encoder(
            [train.captions[j] for j in keep],
            train.caption_image[keep],
            codes,
            (val.captions, val.caption_image, val_codes) if has_val else None,
            CaptionSampler(train.caption_image[keep], 1, p["batch_size"], rng),
        )
        self.arrays_["word_embeddings"] = text_encoder.embeddings.weight.detach().numpy().copy()
        self.arrays_.update(arrays_of(text_encoder.head, "text"))
        self.history_["autoencoder"] = ae_result
        return self

    def _fit_autoencoder(self, feats: np.ndarray, val_feats: np.ndarray | None, rng: np.random.Generator):
        """Encoder and decoder trained on RMSE of standardised features; returns the encoder."""
        import torch

        from cbir.models.torch_training import MLPHead, standardiser, train_epochs

        p = self.params
        norm = standardiser(feats)
        encoder = MLPHead(feats.shape[1], p["code_size"], p["image_hidden"], p["dropout"], **norm)
        decoder = MLPHead(p["code_size"], feats.shape[1], p["image_hidden"], p["dropout"])
        module = torch.nn.ModuleDict({"encoder": encoder, "decoder": decoder})
        x = torch.from_numpy(feats)
        mean, scale = torch.from_numpy(norm["mean"]), torch.from_numpy(norm["scale"])

        def rmse(batch: torch.Tensor) -> torch.Tensor:
            return ((decoder(encoder(batch)) - (batch - mean) / scale) ** 2).mean().sqrt()

        def batches():
            perm = torch.from_numpy(rng.permutation(len(x)))
            for lo in range(0, len(x), p["batch_size"]):
                yield (x[perm[lo : lo + p["batch_size"]]],)

        validate = None
        if val_feats is not None:
            val_x = torch.from_numpy(val_feats)

            def validate() -> float:
                return -float(rmse(val_x))

        result = train_epochs(
            module, batches, rmse, p["epochs"], validate, p["patience"], p["lr"], description="autoencoder"
        )
        return encoder, {"epochs_run": result.epochs_run, "val_rmse": -result.best_score}

    def _fit_text_encoder(self, captions, caption_image, codes, val, sampler):
        """Word embeddings -> mean -> MLP -> code, pulled onto the (fixed) image codes."""
        import torch

        from cbir.models.torch_training import MLPHead, train_epochs

        p = self.params
        vocab = {w: i + 1 for i, w in enumerate(self.vocabulary_)}  # 0 pads
        tokens = torch.from_numpy(token_ids(captions, vocab))

        class TextEncoder(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.embeddings = torch.nn.Embedding(len(vocab) + 1, p["word_dim"], padding_idx=0)
                torch.nn.init.normal_(self.embeddings.weight, std=0.1)
                with torch.no_grad():
                    self.embeddings.weight[0].zero_()
                self.head = MLPHead(p["word_dim"], p["code_size"], p["text_hidden"], p["dropout"])

            def forward(self, tok: torch.Tensor) -> torch.Tensor:
                mask = (tok > 0).float().unsqueeze(-1)
                bag = (self.embeddings(tok) * mask).sum(1) / mask.sum(1).clamp(min=1.0)
                return self.head(bag)

        model = TextEncoder()

        def batches():
            for img, cap, _ in sampler():
                yield tokens[cap], codes[img]

        def loss_fn(tok: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            out = model(tok)
            if p["loss"] == "mse":
                return ((out - target) ** 2).sum(1).mean()
            unit = torch.nn.functional.normalize
            return triplet_loss(torch.cdist(unit(out), unit(target)), p["margin"], p["negatives"])

        validate = None
        if val is not None:
            val_captions, val_caption_image, val_codes = val
            val_tokens = torch.from_numpy(token_ids(val_captions, vocab))

            def validate() -> float:
                t, i = euclidean_as_inner_product(
                    self._space(model(val_tokens).numpy()), self._space(val_codes)
                )
                return retrieval_metrics(t @ i.T, val_caption_image)["mR"]

        result = train_epochs(
            model, batches, loss_fn, p["epochs"], validate, p["patience"], p["lr"], description="text encoder"
        )
        self.history_["text_encoder"] = {"epochs_run": result.epochs_run, "val_mR": result.best_score}
        return model

    def _text_codes(self, texts: Sequence[str]) -> np.ndarray:
        vocab = {w: i + 1 for i, w in enumerate(self.vocabulary_)}
        return head_forward(self.arrays_, "text", bag_of_words(texts, vocab, self.arrays_["word_embeddings"]))

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        codes = self._text_codes(texts)
        return euclidean_as_inner_product(self._space(codes), np.zeros((0, codes.shape[1]), np.float32))[0]

    def embed_images(self, images: Dataset) -> np.ndarray:
        codes = head_forward(self.arrays_, "encoder", image_features(images, self.representation_))
        return euclidean_as_inner_product(np.zeros((0, codes.shape[1]), np.float32), self._space(codes))[1]

    def _space(self, codes: np.ndarray) -> np.ndarray:
        """The triplet loss works on the unit sphere (its margin needs a fixed scale); MSE on raw codes."""
        return unit_rows(codes) if self.params["loss"] == "triplet" else codes

    def _arrays(self) -> dict[str, np.ndarray]:
        return self.arrays_

    def _state(self) -> dict[str, Any]:
        return {
            "representation": self.representation_,
            "vocabulary": self.vocabulary_,
            "history": self.history_,
        }

    def _restore(self, arrays: dict[str, np.ndarray], state: dict[str, Any]) -> None:
        self.arrays_ = arrays
        self.representation_, self.vocabulary_ = state["representation"], state["vocabulary"]
        self.history_ = state["history"]


def token_ids(texts: Sequence[str], vocab: dict[str, int]) -> np.ndarray:
    """(n_texts, longest) known-word ids, 0-padded, for the torch text encoder."""
    ids = [[vocab[w] for w in words(t) if w in vocab] for t in texts]
    out = np.zeros((len(ids), max(1, max(map(len, ids), default=1))), dtype=np.int64)
    for row, seq in enumerate(ids):
        out[row, : len(seq)] = seq
    return out


def triplet_loss(dist, margin: float, negatives: str):
    """Hinge on d(text, own image) - d(text, negative image) + margin over a batch's distance matrix
    (texts x images, own image on the diagonal); negatives: the hardest, or the semi-hard ones (the
    closest that are still farther than the positive, falling back to the hardest)."""
    import torch

    pos = dist.diagonal()
    neg = dist.masked_fill(torch.eye(len(dist), dtype=torch.bool), float("inf"))
    hardest = neg.min(1).values
    if negatives == "semi-hard":
        semi = neg.masked_fill(neg <= pos[:, None], float("inf")).min(1).values
        hardest = torch.where(torch.isfinite(semi), semi, hardest)
    return torch.relu(margin + pos - hardest).mean()
