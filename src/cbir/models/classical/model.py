"""One classical retrieval model, parameterised by (text features, image features, mapping, direction,
metric); each mapping is a registered method (`ridge`, `kernel-ridge`, `cca`, `pls`).

Hyperparameters left unset are chosen by mR on the validation split, or by k-fold cross-validation
over the training images when there is none; the fold split and word2vec are seeded.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any, ClassVar, Self

import numpy as np

from cbir.datasets import Dataset
from cbir.metrics import retrieval_metrics
from cbir.models.base import (
    SHARED_PARAMS,
    ModelError,
    Param,
    RetrievalModel,
    centre_view_needs,
    fold_of_images,
    grid_search,
    has_scored_val,
    require_training_pairs,
    unit_rows,
)
from cbir.models.classical.image_representation import IMAGE_KINDS, ImageFeaturizer
from cbir.models.classical.mappings import (
    KernelRidgeMap,
    Mapping,
    RidgeMap,
    SharedSpaceMap,
    median_sq_distance,
)
from cbir.models.classical.text_features import TEXT_KINDS, TextFeaturizer, parse_kinds

DIRECTIONS = ("text-to-image", "image-to-text")
METRICS = ("cosine", "euclidean")
# The hyperparameters each mapping searches when they are not given, and their default grids.
GRIDS: dict[str, dict[str, list[float]]] = {
    "ridge": {"alpha": [1.0, 10.0, 100.0, 1000.0]},
    "kernel-ridge": {"alpha": [0.01, 0.1, 1.0], "gamma": [0.5, 1.0, 2.0]},  # gamma: x 1/median |a-b|^2
    "cca": {"n_components": [64, 128, 256], "reg": [0.01, 0.1], "power": [1.0, 4.0]},
    "pls": {"n_components": [32, 64, 128, 256], "power": [0.0, 1.0]},
}


HeldOut = tuple[np.ndarray, np.ndarray, np.ndarray]  # text features, image features, caption_image

SEARCHED = "; null: chosen on val (or k-fold) from its grid"
CLASSICAL_PARAMS: dict[str, Param] = {
    "text_features": SHARED_PARAMS["text_features"],
    "image_features": SHARED_PARAMS["image_features"],
    "direction": Param("which side is mapped onto the other", choices=DIRECTIONS, optional=True),
    "metric": Param("how mapped vectors are compared", choices=METRICS),
    "alpha": Param("ridge regularisation" + SEARCHED, float, 0, open_low=True, optional=True),
    "alphas": Param("the alpha grid searched when alpha is null", list, optional=True),
    "kernel": Param("kernel of kernel ridge", choices=("rbf", "poly")),
    "gamma": Param(
        "kernel scale, x 1/median squared distance" + SEARCHED, float, 0, open_low=True, optional=True
    ),
    "degree": Param("degree of the polynomial kernel", int, 1),
    "n_components": Param("shared-space dimensions" + SEARCHED, int, 1, optional=True),
    "reg": Param("CCA covariance regularisation" + SEARCHED, float, 0, optional=True),
    "power": Param("each direction scaled by its strength^power" + SEARCHED, float, optional=True),
    "ngrams": Param("longest word n-gram of tfidf/bow features", int, 1),
    "stem": Param("stem caption words", bool),
    "stop_words": Param("drop English stop words", bool),
    "max_features": Param("vocabulary size of tfidf/bow features", int, 1),
    "word2vec_dim": Param("dimensions of the word2vec features", int, 1),
    "folds": Param("k of the k-fold selection used when there is no val split", int, 2),
    "seed": SHARED_PARAMS["seed"],
}


class ClassicalModel(RetrievalModel):
    """Text and image features related by a fitted mapping, ranked by cosine or Euclidean distance."""

    mapping: ClassVar[str] = ""
    default_direction: ClassVar[str] = "image-to-text"
    PARAMS = CLASSICAL_PARAMS

    @classmethod
    def param_specs(cls) -> dict[str, Param]:
        """The parameters this mapping uses (`_check` refuses the others by name)."""
        grid = GRIDS[cls.mapping]
        unused = {name for other in GRIDS.values() for name in other} - set(grid)
        if "alpha" not in grid:
            unused.add("alphas")
        if cls.mapping != "kernel-ridge":
            unused |= {"kernel", "degree"}
        if cls.mapping in ("cca", "pls"):
            unused.add("direction")
        return {k: v for k, v in cls.PARAMS.items() if k not in unused}

    def __init__(
        self,
        text_features: str = "minilm",
        image_features: str = "auto",
        direction: str | None = None,
        metric: str = "cosine",
        alpha: float | None = None,
        alphas: Sequence[float] | None = None,
        kernel: str = "rbf",
        gamma: float | None = None,
        degree: int = 2,
        n_components: int | None = None,
        reg: float | None = None,
        power: float | None = None,
        ngrams: int = 1,
        stem: bool = True,
        stop_words: bool = True,
        max_features: int = 4096,
        word2vec_dim: int = 100,
        folds: int = 3,
        seed: int = 0,
    ):
        params = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        params["alphas"] = list(alphas) if isinstance(alphas, tuple) else alphas  # validated as a list
        super().__init__(**params)
        self._check()

    def _check(self) -> None:
        p, grid = self.params, GRIDS[self.mapping]
        parse_kinds(p["text_features"], TEXT_KINDS, "text representation")
        parse_kinds(p["image_features"], IMAGE_KINDS, "image representation")
        searched = [*GRIDS["ridge"], *GRIDS["kernel-ridge"], *GRIDS["cca"], *GRIDS["pls"]]
        for name in dict.fromkeys(searched):
            if p[name] is not None and name not in grid:
                raise ModelError(
                    f"'{name}' is not a parameter of {self.method} (it searches {', '.join(grid)})"
                )
        if p["alphas"] is not None and "alpha" not in grid:
            raise ModelError(f"'alphas' is not a parameter of {self.method}")
        if p["direction"] is not None and self.mapping in ("cca", "pls"):
            raise ModelError(f"{self.method} projects both sides into one space; it takes no direction")
        if self.mapping != "kernel-ridge" and (p["kernel"] != "rbf" or p["degree"] != 2):
            raise ModelError("'kernel' and 'degree' are parameters of kernel-ridge only")

    @property
    def direction(self) -> str:
        return self.params["direction"] or self.default_direction

    # ---- fitting -------------------------------------------------------------------------------
    def _text_featurizer(self) -> TextFeaturizer:
        p = self.params
        return TextFeaturizer(
            p["text_features"],
            p["ngrams"],
            p["stem"],
            p["stop_words"],
            p["max_features"],
            p["word2vec_dim"],
            p["seed"],
        )

    def fit_image_views(self, train: Dataset, val: Dataset | None = None) -> list[tuple[Dataset, list[str]]]:
        kinds = ImageFeaturizer(self.params["image_features"]).kinds_of(train)
        return centre_view_needs("+".join(kinds), train, val)

    def fit(self, train: Dataset, val: Dataset | None = None) -> Self:
        require_training_pairs(self.method, train)
        self.text_ = self._text_featurizer().fit(train.captions)
        self.image_ = ImageFeaturizer(self.params["image_features"]).fit(train)
        texts, images = self.text_.transform(train.captions), self.image_.transform(train)
        if has_scored_val(val):
            held_out = [(self.text_.transform(val.captions), self.image_.transform(val), val.caption_image)]
            splits = [(texts, images, train.caption_image, held_out[0])]
        else:
            splits = self._folds(texts, images, train.caption_image)
        self.hyperparameters_ = self._select(splits, texts, images, train.caption_image)
        self.map_ = self._fit_map(*self._pairs(texts, images, train.caption_image), self.hyperparameters_)
        return self

    def _folds(
        self, texts, images, caption_image
    ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, HeldOut]]:
        """k folds over the training images (seeded), each (train texts, images, pairing, held-out)."""
        k = self.params["folds"]
        fold_of = fold_of_images(len(images), k, self.params["seed"])
        out = []
        for f in range(k):
            parts = []
            for keep in (fold_of != f, fold_of == f):
                remap = np.cumsum(keep) - 1
                rows = keep[caption_image]
                parts.append((texts[rows], images[keep], remap[caption_image[rows]]))
            out.append((*parts[0], parts[1]))
        return out

    def _pairs(self, texts, images, caption_image) -> tuple[np.ndarray, np.ndarray]:
        """(source, target) training rows: one per caption, or for kernel ridge one per image with
        the mean of its captions' features (keeps the kernel matrix at n_images squared)."""
        if self.mapping == "kernel-ridge":
            sums = np.zeros((len(images), texts.shape[1]), dtype=np.float64)
            np.add.at(sums, caption_image, texts)
            counts = np.bincount(caption_image, minlength=len(images))
            has = counts > 0
            text_rows, image_rows = (sums[has] / counts[has, None]).astype(np.float32), images[has]
        else:
            text_rows, image_rows = texts, images[caption_image]
        return (text_rows, image_rows) if self.direction == "text-to-image" else (image_rows, text_rows)

    def _candidates(self, source: np.ndarray) -> list[dict[str, Any]]:
        p, grid = self.params, dict(GRIDS[self.mapping])
        if p["alphas"] is not None:
            grid["alpha"] = list(p["alphas"])
        values = {name: [p[name]] if p[name] is not None else options for name, options in grid.items()}
        if self.mapping == "kernel-ridge" and p["gamma"] is None:
            if p["kernel"] == "rbf":
                width = median_sq_distance(source, p["seed"])
                values["gamma"] = [g / width for g in values["gamma"]]
            else:
                values["gamma"] = [1.0]
        names = list(values)
        return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*values.values())]

    def _fit_map(
        self, source: np.ndarray, target: np.ndarray, hp: dict[str, Any], memo: dict | None = None
    ) -> Mapping:
        """The mapping for one candidate; `memo` reuses a CCA/PLS decomposition across candidates."""
        if self.mapping == "ridge":
            return RidgeMap.fit(source, target, hp["alpha"])
        if self.mapping == "kernel-ridge":
            return KernelRidgeMap.fit(
                source, target, hp["alpha"], self.params["kernel"], hp["gamma"], self.params["degree"]
            )
        memo = {} if memo is None else memo
        reg = hp.get("reg", 0.0)
        if reg not in memo:
            memo[reg] = SharedSpaceMap.decompose(source, target, self.mapping == "cca", reg)
        return SharedSpaceMap.from_decomposition(memo[reg], int(hp["n_components"]), hp["power"])

    def _select(self, splits, texts, images, caption_image) -> dict[str, Any]:
        """The candidate with the best mean held-out mR (the only one when everything is given)."""
        candidates = self._candidates(self._pairs(texts, images, caption_image)[0])
        if len(candidates) == 1:
            return candidates[0]
        # per split: its training pairs and a memo of CCA/PLS decompositions shared by the candidates
        parts = [(self._pairs(*split[:3]), {}, split[3]) for split in splits]

        def held_out_mr(hp: dict[str, Any]) -> float:
            total = 0.0
            for pairs, memo, (ho_texts, ho_images, ho_pairing) in parts:
                text_emb, image_emb = self._embed(self._fit_map(*pairs, hp, memo), ho_texts, ho_images)
                total += retrieval_metrics(text_emb @ image_emb.T, ho_pairing)["mR"]
            return total / len(parts)

        best, scores = grid_search(candidates, held_out_mr, f"{self.method}: choosing hyperparameters")
        self.selection_ = [{**hp, "mR": s} for hp, s in zip(candidates, scores, strict=True)]
        return best

    # ---- embedding -----------------------------------------------------------------------------
    def _embed(
        self, mapping: Mapping, texts: np.ndarray, images: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        if self.direction == "text-to-image":
            text_side, image_side = mapping.embed_source(texts), mapping.embed_target(images)
        else:
            text_side, image_side = mapping.embed_target(texts), mapping.embed_source(images)
        return self._finish(text_side, query=True), self._finish(image_side, query=False)

    def _finish(self, v: np.ndarray, query: bool) -> np.ndarray:
        """Cosine: unit rows. Euclidean as an inner product: query [q, 1] . item [x, -|x|^2/2]."""
        v = np.asarray(v, dtype=np.float32)
        if self.params["metric"] == "cosine":
            return unit_rows(v)
        extra = np.ones(len(v)) if query else -0.5 * (v**2).sum(1)
        return np.hstack([v, extra[:, None].astype(np.float32)])

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        feats = self.text_.transform(texts)
        side = (
            self.map_.embed_source(feats)
            if self.direction == "text-to-image"
            else self.map_.embed_target(feats)
        )
        return self._finish(side, query=True)

    def embed_images(self, images: Dataset) -> np.ndarray:
        feats = self.image_.transform(images)
        side = (
            self.map_.embed_target(feats)
            if self.direction == "text-to-image"
            else self.map_.embed_source(feats)
        )
        return self._finish(side, query=False)

    # ---- persistence ---------------------------------------------------------------------------
    def _arrays(self) -> dict[str, np.ndarray]:
        mapped = {f"map.{k}": v for k, v in self.map_.arrays().items()}
        return {**self.text_.arrays(), **self.image_.arrays(), **mapped}

    def _state(self) -> dict[str, Any]:
        return {
            **self.image_.state(),
            "text": self.text_.state(),
            "map": self.map_.state(),
            "hyperparameters": self.hyperparameters_,
            "selection": getattr(self, "selection_", []),
        }

    def _restore(self, arrays: dict[str, np.ndarray], state: dict[str, Any]) -> None:
        self.text_ = self._text_featurizer()
        self.text_.restore(arrays, state["text"])
        self.image_ = ImageFeaturizer(self.params["image_features"])
        self.image_.restore(arrays, state)
        mapped = {k.removeprefix("map."): v for k, v in arrays.items() if k.startswith("map.")}
        cls = {"ridge": RidgeMap, "kernel-ridge": KernelRidgeMap}.get(self.mapping, SharedSpaceMap)
        self.map_ = cls.restore(mapped, state["map"])
        self.hyperparameters_ = state["hyperparameters"]
        self.selection_ = state.get("selection", [])


class RidgeModel(ClassicalModel):
    """Ridge regression between caption and image features (default: MiniLM -> image space, cosine)."""

    method, mapping, default_direction = "ridge", "ridge", "text-to-image"


class KernelRidgeModel(ClassicalModel):
    """Kernel ridge (RBF/polynomial) between caption and image features (default: image -> MiniLM)."""

    method, mapping = "kernel-ridge", "kernel-ridge"


class CCAModel(ClassicalModel):
    """Regularised CCA: captions and images projected onto their most correlated directions."""

    method, mapping = "cca", "cca"


class PLSModel(ClassicalModel):
    """PLS-SVD: captions and images projected onto their directions of greatest covariance."""

    method, mapping = "pls", "pls"
