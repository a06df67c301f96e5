"""Scores that mean something: the similarity of a query and a photo turned into the odds of a match.

A search's raw score, the similarity, is the inner product of the query's vector scaled to unit
length with the photo's vector as the model embeds it (what `SearchIndex` stores). Every model has
its own scale (0.2-0.6 for zero-shot text, -0.3-0.1 for the shipped default, whose image vectors
are not unit length), so no `--min-score` means the same on two models. Calibration fits, on a
held-out captioned split, a logistic map (Platt scaling) from similarity to P(match):

- positives: every caption with its own photo;
- negatives: `NEGATIVES_PER_CAPTION` photos drawn at random (seeded) among the others, per caption;
- prior: matches and non-matches weigh the same in the fit (`PRIOR` = 0.5), so a score of 0.5 says the
  similarity is as typical of a match as of a non-match. The true base rate of a collection (1 photo in N
  matches a caption) would put every score near 0; the even prior answers the question a person asks
  of one result ("is this one of the photos I meant?").

Negatives are sampled, not checked: a random Flickr8k photo can match another photo's caption ("a dog
runs"), which pulls the top of the scale down a little; that is the cost of needing no labels beyond
the captions. The map is monotone, so rankings never change; it is stored with the model (config.json,
`calibration`) and applied to every search in the CLI, the API and the page.

Photo queries (`--image`, "more like this", `img:`/`id:` terms, feedback) compare two photos, whose
similarities run on another scale (higher than any caption's), so they get a second curve, fitted
on the same split to keep the meaning of the first: each photo with captions queries itself and
`NEGATIVES_PER_CAPTION` random other photos, and the target of a pair is the mean P(match), by the
text curve, of the query photo's own captions with the other photo. A photo result's score is thus
the chance that it matches a description of the query photo; 0.5 is even odds, as for a sentence.
A query mixing sentences and photos blends the two curves' log-odds by the photo terms' share of the
query's weight (`photo_share`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from cbir.datasets import Dataset
    from cbir.models.base import RetrievalModel

NEGATIVES_PER_CAPTION = 10
PRIOR = 0.5
SEED = 0
ECE_BINS = 15
NEWTON_STEPS = 50


@dataclass(frozen=True)
class Calibration:
    """P(match) = 1 / (1 + exp(-(slope * similarity + intercept))), fitted on `split` of `dataset`."""

    slope: float
    intercept: float
    method: str = "platt"
    prior: float = PRIOR
    dataset: str = ""
    split: str = "val"
    positives: int = 0
    negatives: int = 0
    # The curve of photo queries (None: calibrated before photo queries were; they use the text curve).
    photo_slope: float | None = None
    photo_intercept: float | None = None
    photo_pairs: int = 0

    def probability(self, similarities: np.ndarray, photo_share: float = 0.0) -> np.ndarray:
        """P(match) of each similarity, for a query whose weight is `photo_share` photos (0: words)."""
        x = np.asarray(similarities, dtype=np.float64)
        z = self.slope * x + self.intercept
        if photo_share and self.photo_slope is not None:
            z = (1 - photo_share) * z + photo_share * (self.photo_slope * x + self.photo_intercept)
        return (1.0 / (1.0 + np.exp(-np.clip(z, -60, 60)))).astype(np.float32)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> Calibration:
        """The stored form back; anything else is a ValueError the model loader names the file for."""
        if not isinstance(data, dict) or data.get("method") != "platt":
            raise ValueError(f"calibration must be a Platt scaling object, not {data!r}")
        for prefix, optional in (("", False), ("photo_", True)):
            slope, intercept = data.get(f"{prefix}slope"), data.get(f"{prefix}intercept")
            if optional and slope is None and intercept is None:
                continue
            numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (slope, intercept))
            if not numbers or not np.isfinite([slope, intercept]).all():
                raise ValueError(
                    f"calibration {prefix}slope and {prefix}intercept must be finite numbers, "
                    f"not {slope!r}, {intercept!r}"
                )
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


@dataclass(frozen=True)
class Pairs:
    """Caption-photo pairs of a split: their similarities, whether each is a match, and its weight in the
    fit (negatives weighted so that both classes weigh as `PRIOR` says)."""

    similarities: np.ndarray
    labels: np.ndarray
    weights: np.ndarray


@dataclass(frozen=True)
class Embedded:
    """A captioned split as a search sees it: unit caption vectors, image vectors as embedded, and the
    photo of each caption."""

    texts: np.ndarray
    images: np.ndarray
    own: np.ndarray

    @classmethod
    def of(cls, model: RetrievalModel, data: Dataset) -> Embedded:
        from cbir.models.base import unit_rows

        paired = np.flatnonzero(data.caption_image >= 0)
        if not len(paired) or len(data.images) < 2:
            raise ValueError(f"{data.name}: calibration needs captions paired with at least two photos")
        texts = unit_rows(model.embed_texts([data.captions[i] for i in paired]))
        images = np.asarray(model.embed_images(data), dtype=np.float32)
        return cls(texts, images, data.caption_image[paired])


def _others(rng: np.random.Generator, n_images: int, own: np.ndarray, negatives: int) -> np.ndarray:
    """`negatives` photos per row drawn uniformly among the photos other than the row's `own`."""
    others = rng.integers(0, n_images - 1, size=(len(own), negatives))
    return others + (others >= own[:, None])  # shift draws at or past the own photo by one


def scored_pairs(model: RetrievalModel, data: Dataset, negatives: int = NEGATIVES_PER_CAPTION) -> Pairs:
    """Similarities of every caption with its photo and with `negatives` other photos of `data`, as a
    search computes them: unit query vectors, image vectors as embedded."""
    return text_pairs(Embedded.of(model, data), negatives)


def text_pairs(split: Embedded, negatives: int = NEGATIVES_PER_CAPTION) -> Pairs:
    texts, images, own = split.texts, split.images, split.own
    others = _others(np.random.default_rng(SEED), len(images), own, negatives)
    pos = np.einsum("ij,ij->i", texts, images[own])
    neg = np.einsum("ij,ikj->ik", texts, images[others]).ravel()
    neg_weight = len(pos) / len(neg) * (1 - PRIOR) / PRIOR
    return Pairs(
        similarities=np.concatenate([pos, neg]).astype(np.float64),
        labels=np.concatenate([np.ones(len(pos)), np.zeros(len(neg))]),
        weights=np.concatenate([np.ones(len(pos)), np.full(len(neg), neg_weight)]),
    )


def photo_pair_rows(split: Embedded, negatives: int = NEGATIVES_PER_CAPTION) -> np.ndarray:
    """The photos of the photo-query pairs, one row per photo with captions: itself, then `negatives`
    random others (seeded)."""
    queries = np.unique(split.own)
    others = _others(np.random.default_rng(SEED + 1), len(split.images), queries, negatives)
    return np.concatenate([queries[:, None], others], 1)


def photo_pairs(split: Embedded, text: Calibration, negatives: int = NEGATIVES_PER_CAPTION) -> Pairs:
    """Photo-query pairs: every photo with captions against itself and `negatives` random others, as
    a search by that photo scores them (unit query vector); the target of a pair is the text curve's
    mean P(match) of the query photo's captions with the other photo (every pair weighs the same)."""
    from cbir.models.base import unit_rows

    photos = photo_pair_rows(split, negatives)
    queries = photos[:, 0]
    similarities = np.einsum("ij,ikj->ik", unit_rows(split.images[queries]), split.images[photos])
    targets = np.zeros(photos.shape)
    for row, query in enumerate(queries):
        captions = split.texts[split.own == query]
        targets[row] = text.probability(captions @ split.images[photos[row]].T).mean(0)
    return Pairs(similarities.ravel().astype(np.float64), targets.ravel(), np.ones(targets.size))


def fit_platt(pairs: Pairs) -> tuple[float, float]:
    """Weighted logistic regression of label on similarity (Newton's method, two parameters)."""
    x, y, w = pairs.similarities, pairs.labels, pairs.weights
    design = np.stack([x, np.ones_like(x)], 1)
    theta = np.zeros(2)
    for _ in range(NEWTON_STEPS):
        p = 1.0 / (1.0 + np.exp(-np.clip(design @ theta, -60, 60)))
        gradient = design.T @ (w * (p - y))
        hessian = (design * (w * p * (1 - p))[:, None]).T @ design + 1e-9 * np.eye(2)
        step = np.linalg.solve(hessian, gradient)
        theta -= step
        if np.abs(step).max() < 1e-10:
            break
    return float(theta[0]), float(theta[1])


def calibrate(model: RetrievalModel, data: Dataset, split: str = "val") -> Calibration:
    """Fit the similarity -> P(match) maps of `model` (sentence queries, then photo queries) on `data`
    (one split of a captioned dataset)."""
    embedded = Embedded.of(model, data)
    pairs = text_pairs(embedded)
    slope, intercept = fit_platt(pairs)
    n_pos = int(pairs.labels.sum())
    text = Calibration(slope, intercept, dataset=data.name, split=split, positives=n_pos,
                       negatives=len(pairs.labels) - n_pos)  # fmt: skip
    photos = photo_pairs(embedded, text)
    photo_slope, photo_intercept = fit_platt(photos)
    return replace(text, photo_slope=photo_slope, photo_intercept=photo_intercept,
                   photo_pairs=len(photos.labels))  # fmt: skip


def reliability(
    probabilities: np.ndarray, pairs: Pairs, bins: int = ECE_BINS
) -> tuple[float, list[dict[str, float]]]:
    """Expected calibration error (weighted, equal-width bins) and the per-bin rows of a reliability
    diagram: mean predicted probability, observed fraction of matches, share of the weight."""
    p, y, w = np.asarray(probabilities, np.float64), pairs.labels, pairs.weights
    which = np.minimum((p * bins).astype(int), bins - 1)
    total, ece, rows = w.sum(), 0.0, []
    for b in range(bins):
        mask = which == b
        if not mask.any():
            continue
        weight = w[mask].sum()
        predicted = float((w[mask] * p[mask]).sum() / weight)
        observed = float((w[mask] * y[mask]).sum() / weight)
        ece += weight / total * abs(predicted - observed)
        rows.append({"predicted": predicted, "observed": observed, "share": float(weight / total)})
    return float(ece), rows


def match_scores(model: RetrievalModel, similarities: np.ndarray, photo_share: float = 0.0) -> np.ndarray:
    """The scores a search shows: P(match) for a calibrated model, the raw similarity for an older one;
    `photo_share`: how much of the query is photos (cbir.steer.photo_share)."""
    calibration = getattr(model, "calibration", None)
    if calibration is None:
        return np.asarray(similarities, dtype=np.float32)
    return calibration.probability(similarities, photo_share)


def calibrate_if_possible(model: RetrievalModel, val: Dataset | None) -> None:
    """After fitting: calibrate on the val split when it has captions paired with photos (what
    `cbir train` and `make default-model` do); a model without one keeps raw similarity scores.
    The curve is fitted on the model as saved and loaded (`as_saved`), so `cbir calibrate` on the
    saved model gives the same curve."""
    from cbir.models.base import has_scored_val

    if val is not None and has_scored_val(val) and len(val.images) >= 2:
        model.calibration = calibrate(model.as_saved(), val, "val")
