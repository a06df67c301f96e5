"""Tuning MiniLM's last layers together with the contrastive heads (partial fine-tuning, issue 15).

The heads first converge on frozen caption features; then the last `layers` MiniLM layers train with
them for a few epochs at a small learning rate. The token states entering those layers are computed
once per fit (the frozen layers below never run again), so an epoch costs one or two layers' forward
and backward pass over the captions. Torch only: imported inside `fit`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from cbir.encoders.text import TextEncoder, padded, padded_batches
from cbir.progress import progress_bar

CHUNK = 256  # captions per pass when states or features are computed without gradients


class CaptionStates:
    """Token states entering the tuned layers, one padded float16 row per caption (float16 halves the
    memory: 28k Flickr8k captions take ~0.9 GB)."""

    def __init__(self, encoder: TextEncoder, texts: Sequence[str], below: int):
        ids = encoder.token_ids(texts)
        self.lengths = np.array([len(t) for t in ids])
        self.states = torch.zeros((len(ids), int(self.lengths.max()), encoder.dim), dtype=torch.float16)
        chunks = [chunk for chunk, _ in padded_batches(self.lengths, CHUNK)]  # similar lengths pad little
        batches = (padded([ids[r] for r in rows]) for rows in chunks)
        with progress_bar("caption token states", len(ids), enabled=len(ids) > CHUNK) as advance:
            for rows, states in zip(chunks, encoder.network().token_states(batches, below), strict=True):
                self.states[rows, : states.shape[1]] = torch.from_numpy(states).half()
                advance(len(rows))

    def __len__(self) -> int:
        return len(self.lengths)

    def batch(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows' states (float32, padded to the longest of them) and their token mask."""
        n = int(self.lengths[rows].max())
        keep = torch.arange(n)[None] < torch.from_numpy(self.lengths[rows])[:, None]
        return self.states[rows, :n].float(), keep


class CaptionTuner:
    """Caption features whose MiniLM block (`columns`) comes from trainable top layers."""

    def __init__(self, encoder: TextEncoder, layers: int, columns: slice):
        network = encoder.network()
        self.encoder, self.below, self.columns = encoder, network.layers - layers, columns
        self.top = network.tunable_top(layers)

    def states(self, texts: Sequence[str]) -> CaptionStates:
        return CaptionStates(self.encoder, texts, self.below)

    def features(self, frozen: torch.Tensor, states: CaptionStates, rows: np.ndarray) -> torch.Tensor:
        """`frozen[rows]` with the MiniLM block replaced by the top layers' unit-length output."""
        minilm = torch.nn.functional.normalize(self.top(*states.batch(rows)), dim=1)
        c = self.columns
        return torch.cat([frozen[rows, : c.start], minilm, frozen[rows, c.stop :]], 1)

    def all_features(self, frozen: torch.Tensor, states: CaptionStates) -> torch.Tensor:
        with torch.no_grad():
            chunks = [np.arange(s, min(s + CHUNK, len(states))) for s in range(0, len(states), CHUNK)]
            return torch.cat([self.features(frozen, states, rows) for rows in chunks])

    def weights(self) -> dict[str, np.ndarray]:
        return self.top.weights()
