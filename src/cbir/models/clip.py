"""`clip`: zero-shot search with a CLIP checkpoint the user has, nothing trained.

Captions go through the checkpoint's text tower, photos through its image tower (cbir.encoders.clip),
both L2-normalised, so the inner product is CLIP's own cosine similarity. The model directory does not
copy the weights (hundreds of MB): config.json records the checkpoint's absolute path and content
hash, and loading refuses a checkpoint that is gone or has changed (the index's vectors would no
longer match new queries).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Self

import numpy as np

from cbir.datasets import Dataset
from cbir.encoders import image_features, shared_clip_encoder
from cbir.feature_kinds import CLIP_PREFIX
from cbir.models.base import ModelError, Param, RetrievalModel, unit_rows


class ClipModel(RetrievalModel):
    """A CLIP checkpoint's two towers as a retrieval model: texts and images in CLIP's shared space."""

    method = "clip"
    PARAMS = {
        "checkpoint": Param(
            "a transformers CLIPModel directory (config.json, weights, tokenizer files)", str
        ),
    }

    def __init__(self, checkpoint: str = ""):
        super().__init__(checkpoint=checkpoint)

    def fit(self, train: Dataset | None = None, val: Dataset | None = None) -> Self:
        """No training: the checkpoint is checked, loaded once, and its path and hash recorded."""
        if not self.params["checkpoint"]:
            raise ModelError("clip: give the checkpoint directory, e.g. -p checkpoint=/path/to/clip")
        encoder = shared_clip_encoder(self.params["checkpoint"])
        encoder.load()
        self.checkpoint_, self.sha1_ = str(encoder.checkpoint.path), encoder.checkpoint.digest
        return self

    @property
    def kind(self) -> str:
        """The image feature kind of this checkpoint (cbir.feature_kinds)."""
        return f"{CLIP_PREFIX}{self.checkpoint_}"

    def image_views(self) -> list[str]:
        return [self.kind]

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        return unit_rows(shared_clip_encoder(self.checkpoint_).encode_texts(texts, progress=len(texts) > 256))

    def embed_images(self, images: Dataset) -> np.ndarray:
        return unit_rows(image_features(images, self.kind, progress=len(images) > 32))

    def _state(self) -> dict[str, Any]:
        return {"checkpoint": self.checkpoint_, "checkpoint_sha1": self.sha1_}

    def _restore(self, arrays: dict[str, np.ndarray], state: dict[str, Any]) -> None:
        """The recorded checkpoint, checked: still there, still whole, and the same bytes."""
        from cbir.encoders.clip import ClipCheckpointError

        self.checkpoint_, self.sha1_ = state["checkpoint"], state["checkpoint_sha1"]
        try:
            found = shared_clip_encoder(self.checkpoint_).checkpoint.digest
        except ClipCheckpointError as e:
            raise ModelError(f"the CLIP checkpoint this model uses is not usable: {e}") from e
        if found != self.sha1_:
            raise ModelError(
                f"{self.checkpoint_}: the CLIP checkpoint changed since this model was made (SHA-1 {found}, "
                f"recorded {self.sha1_}); rebuild the model with `cbir train --method clip`"
            )
