"""The small trainable heads of the deep methods, run in NumPy from saved arrays.

Training uses PyTorch (`cbir.models.torch_training`), but a fitted head is a couple of matrix
products: running it in NumPy means loading a model for search never imports torch (~1.5 s).
Array names follow the torch module's `state_dict` so the two forwards read the same weights.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

WORD = re.compile(r"[a-z0-9]+")


def words(text: str) -> list[str]:
    """Lower-case word tokens, the unit of the learned word embeddings."""
    return WORD.findall(text.lower())


def head_forward(arrays: dict[str, np.ndarray], prefix: str, x: np.ndarray) -> np.ndarray:
    """`MLPHead.forward` in NumPy: a linear path plus, when the head has one, a ReLU hidden layer."""
    x = np.asarray(x, dtype=np.float32)
    if f"{prefix}.mean" in arrays:
        x = (x - arrays[f"{prefix}.mean"]) / arrays[f"{prefix}.scale"]
    y = x @ arrays[f"{prefix}.linear.weight"].T + arrays[f"{prefix}.linear.bias"]
    if f"{prefix}.hidden.weight" in arrays:
        h = np.maximum(x @ arrays[f"{prefix}.hidden.weight"].T + arrays[f"{prefix}.hidden.bias"], 0.0)
        y = y + h @ arrays[f"{prefix}.out.weight"].T + arrays[f"{prefix}.out.bias"]
    return y.astype(np.float32)


def bag_of_words(texts: Sequence[str], vocabulary: dict[str, int], embeddings: np.ndarray) -> np.ndarray:
    """Mean of the learned embeddings of each text's known words (zeros when it has none)."""
    out = np.zeros((len(texts), embeddings.shape[1]), dtype=np.float32)
    for row, text in enumerate(texts):
        ids = [vocabulary[w] for w in words(text) if w in vocabulary]
        if ids:
            out[row] = embeddings[ids].mean(0)
    return out
