"""Score a model on one split of a dataset: every caption queries every image of the split."""

from __future__ import annotations

import numpy as np

from cbir.datasets import Dataset, DatasetError
from cbir.metrics import retrieval_metrics
from cbir.models import RetrievalModel


def score_split(model: RetrievalModel, data: Dataset) -> np.ndarray:
    """(n_captions, n_images) model scores for one split's captions against its images."""
    return model.score(model.embed_texts(data.captions), model.embed_images(data))


def evaluate(model: RetrievalModel, dataset: Dataset, split: str = "test") -> dict[str, float]:
    data = dataset.split(split)
    if not data.captions:
        raise DatasetError(f"the '{split}' split has no captions to query with", dataset.root)
    if (data.caption_image < 0).any():
        raise DatasetError(
            f"the '{split}' captions are not paired with images (Kaggle test without answers_test.csv); "
            "write a submission with `cbir submit` instead",
            dataset.root,
        )
    return retrieval_metrics(score_split(model, data), data.caption_image)
