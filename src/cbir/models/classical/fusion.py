"""`fusion`: a weighted sum of several models' scores, as the strongest cs5785 competitors ensembled.

The fused model stays one embedding space: member embeddings scaled by sqrt(weight) and put side by
side have as inner product the weighted sum of the members' scores, so indexes and search work as
for any model. Weights are chosen on a simplex grid by validation mR (by k-fold cross-validation
over training images when there is no validation split and every member is a config to train).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Self

import numpy as np

from cbir.datasets import Dataset
from cbir.metrics import retrieval_metrics
from cbir.models import RetrievalModel, create_model, load_model, method_class
from cbir.models.base import (
    SHARED_PARAMS,
    ModelError,
    Param,
    fold_of_images,
    grid_search,
    has_scored_val,
    require_training_pairs,
)


def simplex_grid(n: int, step: float) -> list[tuple[float, ...]]:
    """Every weight vector of n non-negative multiples of `step` summing to 1."""
    parts = round(1 / step)
    return [
        tuple(c / parts for c in combo)
        for combo in itertools.product(range(parts + 1), repeat=n)
        if sum(combo) == parts
    ]


def image_folds(data: Dataset, k: int, seed: int) -> list[tuple[Dataset, Dataset]]:
    """(train part, held-out part) for k seeded folds over the images."""
    fold_of = fold_of_images(len(data), k, seed)
    return [
        (data.subset(np.flatnonzero(fold_of != f)), data.subset(np.flatnonzero(fold_of == f)))
        for f in range(k)
    ]


class FusionModel(RetrievalModel):
    """Weighted score fusion of member models (model directories or {"method": ..., params} configs)."""

    method = "fusion"
    PARAMS = {
        "members": Param('two or more model directories or {"method": ...} configs', list),
        "weights": Param("fixed member weights; null: chosen on val from a grid", list, optional=True),
        "step": Param("spacing of the weight grid", float, 0, 0.5, open_low=True),
        "folds": Param("k of the k-fold weight choice used when there is no val split", int, 2),
        "seed": SHARED_PARAMS["seed"],
    }

    def __init__(
        self,
        members: Sequence[str | dict[str, Any]] = (),
        weights: Sequence[float] | None = None,
        step: float = 0.1,
        folds: int = 3,
        seed: int = 0,
    ):
        super().__init__(
            members=list(members) if isinstance(members, tuple) else members,  # validated as a list
            weights=list(weights) if isinstance(weights, tuple) else weights,
            step=step,
            folds=folds,
            seed=seed,
        )
        if len(self.params["members"]) < 2:
            raise ModelError(
                'fusion needs at least two members, e.g. -p members=\'[{"method": "cca"}, "runs/kr"]\''
            )
        for m in self.params["members"]:
            if not isinstance(m, str | dict) or (isinstance(m, dict) and "method" not in m):
                raise ModelError(
                    f"a fusion member is a model directory or a {{'method': ...}} config, not {m!r}"
                )
        if weights is not None and len(weights) != len(self.params["members"]):
            raise ModelError(f"{len(weights)} weights for {len(self.params['members'])} members")
        numbers = weights is not None and all(
            isinstance(w, int | float) and not isinstance(w, bool) and w >= 0 for w in weights
        )
        if weights is not None and not (numbers and sum(weights) > 0):
            raise ModelError(f"fusion: weights must be non-negative numbers, not all zero, not {weights!r}")

    def _new_member(self, spec: str | dict[str, Any], train: Dataset, val: Dataset | None) -> RetrievalModel:
        if isinstance(spec, str):
            if not Path(spec).is_dir():
                raise ModelError(f"fusion member {spec}: no such model directory")
            return load_model(spec)
        config = dict(spec)
        return create_model(config.pop("method"), **config).fit(train, val)

    def fit_image_views(self, train: Dataset, val: Dataset | None = None) -> list[tuple[Dataset, list[str]]]:
        """Each member's; saved members embed the held-out images (val, else the train folds), and
        without a scored val the fold refits embed train images as members otherwise embed val."""
        held = val if val is not None and has_scored_val(val) else train
        needs = []
        for spec in self.params["members"]:
            if isinstance(spec, str):
                needs += [(held, load_model(spec).image_views())] if Path(spec).is_dir() else []
            else:
                config = dict(spec)
                needs += create_model(config.pop("method"), **config).fit_image_views(train, held)
        return needs

    def fit(self, train: Dataset, val: Dataset | None = None) -> Self:
        require_training_pairs(self.method, train)
        specs = self.params["members"]
        self.members_ = [self._new_member(s, train, val) for s in specs]
        if self.params["weights"] is not None:
            weights, self.selection_ = np.asarray(self.params["weights"], dtype=np.float64), []
        else:
            weights = self._choose_weights(train, val)
        keep = np.flatnonzero(weights > 0)
        self.members_ = [self.members_[i] for i in keep]
        self.weights_ = (weights[keep] / weights[keep].sum()).tolist()
        return self

    def _held_out_scores(
        self, train: Dataset, val: Dataset | None
    ) -> list[tuple[list[np.ndarray], np.ndarray]]:
        """Per held-out part: each member's score matrix and the caption pairing."""
        if has_scored_val(val):
            return [
                (
                    [m.score(m.embed_texts(val.captions), m.embed_images(val)) for m in self.members_],
                    val.caption_image,
                )
            ]
        if any(isinstance(s, str) for s in self.params["members"]):
            raise ModelError(
                "without a validation split, fusion weights need members given as configs (or -p weights=...)"
            )
        # Fold refits keep the hyperparameters each member chose on all of train (no nested search).
        specs = [
            {**s, **getattr(m, "hyperparameters_", {})}
            for s, m in zip(self.params["members"], self.members_, strict=True)
        ]
        parts = []
        for fit_part, held in image_folds(train, self.params["folds"], self.params["seed"]):
            models = [self._new_member(s, fit_part, None) for s in specs]
            parts.append(
                (
                    [m.score(m.embed_texts(held.captions), m.embed_images(held)) for m in models],
                    held.caption_image,
                )
            )
        return parts

    def _choose_weights(self, train: Dataset, val: Dataset | None) -> np.ndarray:
        parts = self._held_out_scores(train, val)
        grid = simplex_grid(len(self.members_), self.params["step"])

        def held_out_mr(w: tuple[float, ...]) -> float:
            total = 0.0
            for scores, pairing in parts:
                fused = sum(wi * s for wi, s in zip(w, scores, strict=True) if wi > 0)
                total += retrieval_metrics(fused, pairing)["mR"]
            return total / len(parts)

        best, results = grid_search(grid, held_out_mr, "fusion: choosing weights")
        self.selection_ = [{"weights": list(w), "mR": r} for w, r in zip(grid, results, strict=True)]
        return np.asarray(best, dtype=np.float64)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        return np.hstack(
            [np.sqrt(w) * m.embed_texts(texts) for w, m in zip(self.weights_, self.members_, strict=True)]
        )

    def image_views(self) -> list[str]:
        return list(dict.fromkeys(view for m in self.members_ for view in m.image_views()))

    def embed_images(self, images: Dataset) -> np.ndarray:
        return np.hstack(
            [np.sqrt(w) * m.embed_images(images) for w, m in zip(self.weights_, self.members_, strict=True)]
        )

    def _arrays(self) -> dict[str, np.ndarray]:
        return {f"member{i}/{k}": v for i, m in enumerate(self.members_) for k, v in m._arrays().items()}

    def _state(self) -> dict[str, Any]:
        members = [{"method": m.method, "params": m.params, "state": m._state()} for m in self.members_]
        best = max((s["mR"] for s in self.selection_), default=None)
        return {"members": members, "weights": self.weights_, "validation_mR": best}

    def _restore(self, arrays: dict[str, np.ndarray], state: dict[str, Any]) -> None:
        self.members_ = []
        for i, config in enumerate(state["members"]):
            prefix = f"member{i}/"
            own = {k.removeprefix(prefix): v for k, v in arrays.items() if k.startswith(prefix)}
            self.members_.append(method_class(config["method"]).from_config(config, own))
        self.weights_ = state["weights"]
