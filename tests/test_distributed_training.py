"""`cbir train --ray`: the photo features a method will read are computed on Ray (the session's local
2-worker `cluster`) into the driver's feature cache, equal to the local encoder's, so that fitting then
computes none; and which features each method reads is known before it fits (`fit_image_views`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from cbir import encoders
from cbir.datasets import load_dataset
from cbir.encoders import ImageEncoder, UnreadableImagesWarning, encode_images, image_features
from cbir.encoders.cache import FeatureCache, file_hash
from cbir.feature_kinds import ALL_COMPUTED
from cbir.models import create_model
from tests.conftest import write_karpathy_slice

# A contrastive model small enough to train in seconds; no zero-shot part (its class texts take minutes
# to embed with an empty cache).
TINY = {"ensemble": 1, "embed_dim": 8, "hidden": 16, "lsa_dim": 8, "batch_size": 16, "bank_size": 0}
TINY |= {"text_features": "lsa", "zero_shot_weight": 0.0}


@pytest.fixture(scope="module")
def slice_dir(flickr8k, tmp_path_factory) -> Path:
    """24 Flickr8k photos (8 per split), the first training photo truncated (a copy: not readable)."""
    folder = write_karpathy_slice(flickr8k, tmp_path_factory.mktemp("ray-train"), 8, "flickr8k_ray")
    manifest = folder / "dataset_flickr8k_ray.json"
    data = json.loads(manifest.read_text())
    first = next(e for e in data["images"] if e["split"] == "train")
    source = Path(first["filepath"]) / first["filename"]
    (folder / "broken").mkdir()
    (folder / "broken" / first["filename"]).write_bytes(source.read_bytes()[:2000])
    first["filepath"] = str(folder / "broken")
    manifest.write_text(json.dumps(data))
    return folder


@pytest.fixture
def empty_cache(tmp_path, monkeypatch) -> Path:
    """An empty feature cache for this process (the driver); the Ray workers keep theirs."""
    monkeypatch.setenv("CBIR_CACHE_DIR", str(tmp_path / "driver-cache"))
    return tmp_path / "driver-cache"


@pytest.fixture
def empty_image_cache(tmp_path, monkeypatch) -> None:
    """This process's image encoder on an empty cache (text features stay cached: MiniLM is slow)."""
    monkeypatch.setitem(encoders._shared, "image", ImageEncoder(cache_dir=tmp_path / "image-cache"))


def local_rows(images, views) -> dict[str, np.ndarray]:
    """Every computed kind of each view, from the local encoder with no cache."""
    feats = ImageEncoder(cache=False).encode(images, views, progress=False)
    return feats.views


def spy_network(monkeypatch) -> list[int]:
    """The batch sizes the EfficientNet runs on from now on."""
    calls: list[int] = []
    forward = ImageEncoder._forward

    def counted(self, pixels, bulk=True):
        calls.append(len(pixels))
        return forward(self, pixels, bulk)

    monkeypatch.setattr(ImageEncoder, "_forward", counted)
    return calls


# Ray worker processes load the network: a minute or more on a busy machine.
@pytest.mark.slow
def test_a_ray_fill_caches_what_the_local_encoder_computes(cluster, slice_dir, empty_cache, monkeypatch):
    from cbir.distributed import fill_feature_cache

    data = load_dataset(slice_dir)
    train, val = data.split("train"), data.split("val")
    needs = create_model("contrastive", views=["center", "hflip"], **TINY).fit_image_views(train, val)
    views = [(d.images, v) for d, v in needs]
    assert views == [(train.images, ["center", "hflip"]), (val.images, ["center"])]
    want = {"train": local_rows(train.images, ["center", "hflip"]), "val": local_rows(val.images, ["center"])}

    fill = fill_feature_cache(needs, workers=2, progress=False)
    assert (fill.computed, fill.cached, fill.failed) == (7 * 2 + 8, 0, 1)  # the truncated photo: none

    calls = spy_network(monkeypatch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = {
            "train": {v: image_features(train, ALL_COMPUTED, v, progress=False) for v in ("center", "hflip")},
            "val": {"center": image_features(val, ALL_COMPUTED, progress=False)},
        }
    assert calls == []  # every feature was cached: the network never ran here
    assert caught and {w.category for w in caught} == {UnreadableImagesWarning}  # the truncated photo
    for split, views in want.items():
        for view, rows in views.items():
            np.testing.assert_allclose(got[split][view], rows, atol=1e-5)
    assert not got["train"]["center"][0].any() and got["train"]["center"][1:].any(1).all()
    val_keys = [file_hash(p) for p in val.images]
    hflip = FeatureCache.open(ImageEncoder().namespace("hflip"))
    assert hflip.known(val_keys) == set()  # the method never reads val flipped: not computed

    again = fill_feature_cache(needs, workers=2, progress=False)
    assert (again.computed, again.cached) == (0, 7 * 2 + 8)


@pytest.mark.slow
def test_cbir_train_on_a_ray_cluster(cluster, slice_dir, tmp_path):
    cbir = Path(sys.executable).with_name("cbir")
    args = [str(cbir), "train", "-d", str(slice_dir), "--method", "contrastive", "-o", str(tmp_path / "m")]
    args += ["--ray", cluster, "--ray-workers", "1", "--epochs", "2"]
    args += [arg for k, v in TINY.items() for arg in ("-p", f"{k}={json.dumps(v)}")]
    env = {**os.environ, "CBIR_CACHE_DIR": str(tmp_path / "driver-cache")}
    run = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr
    assert "image features: 15 computed on Ray, 0 found cached" in run.stdout  # 7 + 8 centre views
    assert "trained contrastive" in run.stdout and (tmp_path / "m" / "config.json").is_file()


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("contrastive", {**TINY, "views": ["center", "rot90"], "embed_views": ["center", "vflip"]}),
        ("contrastive", {**TINY, "zero_shot_weight": 0.2, "image_features": "effnet-stages"}),
        ("autoencoder", {"epochs": 1, "code_size": 8, "image_hidden": 16, "text_hidden": 16}),
        ("ridge", {"image_features": "tags+effnet-logits", "text_features": "tfidf"}),
        ("zero-shot", {}),
        (
            "fusion",
            {
                "members": [
                    {"method": "ridge", "text_features": "tfidf"},
                    {"method": "contrastive", **TINY, "epochs": 2, "embed_views": ["hflip"]},
                ],
                "step": 0.5,
            },
        ),
    ],
)
def test_fitting_reads_only_the_views_it_announces(method, params, slice_dir, empty_image_cache, monkeypatch):
    """Computed locally ahead from `fit_image_views` (as Ray would), the features leave `fit` and the
    calibration after it nothing to compute."""
    from cbir.calibration import calibrate_if_possible

    data = load_dataset(slice_dir)
    train, val = data.split("train"), data.split("val")
    model = create_model(method, **params)
    needs = model.fit_image_views(train, val)
    assert needs and all(views for _, views in needs)
    for images, views in needs:
        encode_images(images, views, progress=False)
    calls = spy_network(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnreadableImagesWarning)
        model.fit(data.split("train"), data.split("val"))
        calibrate_if_possible(model, data.split("val"))
    assert calls == []


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("contrastive", {"image_features": "resnet2048", "views": ["center", "hflip"]}),
        ("ridge", {"image_features": "resnet2048+tags"}),
        ("clip", {"checkpoint": "no-such-checkpoint"}),
    ],
)
def test_precomputed_or_clip_features_need_nothing_ahead(method, params, slice_dir):
    data = load_dataset(slice_dir)
    assert create_model(method, **params).fit_image_views(data.split("train"), data.split("val")) == []


def test_without_ray_train_says_how_to_install_it(slice_dir, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from cbir.cli import app

    monkeypatch.setitem(sys.modules, "ray", None)  # as if the ray extra were not installed
    args = ["train", "-d", str(slice_dir), "--method", "contrastive", "-o", str(tmp_path / "m"), "--ray"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "pip install 'cbir[ray]'" in result.output
    assert not (tmp_path / "m").exists()
