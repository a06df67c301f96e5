"""The larger packaged EfficientNet-Lite2 (issue 15): a model trained on it embeds new photos with it
after loading by path; features of different backbones never share a cache namespace or mix; bad names
fail at once with the allowed values."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from cbir.datasets import Dataset, load_dataset
from cbir.encoders import attach_features, computed_features_key
from cbir.encoders.cache import FeatureCache
from cbir.encoders.image import CACHE_LAYOUT, ImageEncoder
from cbir.feature_kinds import BACKBONES, computed_dim
from cbir.models import ModelError, create_model, load_model
from tests.conftest import FLICKR8K

QUICK = {"ensemble": 1, "epochs": 2, "batch_size": 16, "embed_dim": 32, "hidden": 32, "lsa_dim": 16}


def new_photos(slice_dir: Path, n: int = 2) -> list[Path]:
    """Flickr8k photos that the slice does not hold."""
    seen = {Path(p).name for p in load_dataset(slice_dir).images}
    return [p for p in sorted((FLICKR8K / "images").glob("*.jpg")) if p.name not in seen][:n]


def test_model_on_another_backbone_embeds_new_photos_with_it_after_loading(flickr8k_slice_dir, tmp_path):
    data = load_dataset(flickr8k_slice_dir)
    train, val = data.split("train"), data.split("val")
    model = create_model("contrastive", image_backbone="lite2", **QUICK).fit(train, val)
    assert computed_features_key("center", "lite2") in train.features
    assert computed_features_key("center", "lite0") not in train.features

    path = model.save(tmp_path / "lite2")
    assert json.loads((path / "config.json").read_text())["params"]["image_backbone"] == "lite2"
    loaded = load_model(path)
    photos = Dataset.from_paths(new_photos(flickr8k_slice_dir))
    vectors = loaded.embed(photos).vectors
    np.testing.assert_allclose(vectors, model.embed(photos).vectors, atol=1e-6)

    # The vectors are the heads over Lite2's features of the photos, and Lite0's never stand in for them.
    lite2 = ImageEncoder(backbone="lite2", cache=False).encode(photos.images, progress=False)
    lite0 = ImageEncoder(cache=False).encode(photos.images, progress=False)
    for feats in (lite2, lite0):
        embedded = loaded.embed_encoded(attach_features(photos, feats))
        np.testing.assert_allclose(embedded.vectors, vectors, atol=1e-6)
    assert lite0.rows.shape[1] != lite2.rows.shape[1]


def test_each_backbone_has_its_own_input_size_width_and_cache(tmp_path):
    photos = sorted((FLICKR8K / "images").glob("*.jpg"))[:2]
    lite2 = ImageEncoder(backbone="lite2", cache_dir=tmp_path)
    assert lite2.prepare(photos[0].read_bytes(), "center").shape == (260, 260, 3)
    feats = lite2.encode(photos, progress=False)
    assert feats.rows.shape == (2, computed_dim("lite2")) == (2, 1280 + 1000 + BACKBONES["lite2"].stages_dim)
    assert feats.stages.shape == (2, 856) and feats.logits.shape == (2, 1000)
    assert len(FeatureCache(f"efficientnet-lite2/{CACHE_LAYOUT}/center", tmp_path)) == 2
    assert len(FeatureCache(f"efficientnet-lite0/{CACHE_LAYOUT}/center", tmp_path)) == 0
    exported = {p.name.split("-pool")[0] for p in Path(os.environ["CBIR_ONNX_DIR"]).glob("*.onnx")}
    assert "efficientnet-lite2" in exported

    lite0 = ImageEncoder(cache_dir=tmp_path).encode(photos, progress=False)
    assert lite0.rows.shape == (2, computed_dim("lite0"))
    # Both read the photos as the same ImageNet classes at least somewhat alike, yet differ.
    assert np.corrcoef(lite0.logits[0], feats.logits[0])[0, 1] > 0.5
    assert not np.allclose(lite0.pooled, feats.pooled, atol=1e-2)


def test_bad_backbone_is_clear(kaggle_mini, tmp_path):
    with pytest.raises(ModelError, match="image_backbone must be one of lite0, lite2, not 'lite3'"):
        create_model("contrastive", image_backbone="lite3")
    with pytest.raises(ValueError, match=r"unknown image backbone 'lite1' \(known: lite0, lite2\)"):
        ImageEncoder(backbone="lite1")  # measured and dropped

    from tests.test_datasets import copy_kaggle, write_feature_csvs

    root = copy_kaggle(tmp_path)
    write_feature_csvs(root, kaggle_mini, np.random.default_rng(0))
    train = load_dataset(root).split("train")
    with pytest.raises(ModelError, match="image_backbone=lite2 computes effnet-\\* features"):
        create_model("contrastive", image_backbone="lite2", image_features="resnet2048", **QUICK).fit(train)
