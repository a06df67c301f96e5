"""The deep methods (issue 4) on a real RSICD slice: one epoch beats chance, save -> load ranks the
same, loading for search does not import torch, and the training pieces behave."""

import json
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from cbir.cli import app
from cbir.evaluation import score_split
from cbir.models import ModelError, create_model, load_model

runner = CliRunner()

# chance mR over the 40 test images of the slice: t2i R@1/5/10 = 2.5/12.5/25, i2t about the same
CHANCE_MR = 15.0
# Heads over frozen features learn from the 40 training images of the slice; the autoencoder's text
# side learns its word embeddings from scratch, which one epoch over 200 captions cannot do, so it
# trains on 300 real training images (still seconds).
CASES = {
    "autoencoder-mse": ("autoencoder", {"loss": "mse", "batch_size": 16, "lr": 0.003}),
    "autoencoder-triplet": (
        "autoencoder",
        {"loss": "triplet", "negatives": "hard", "batch_size": 16, "lr": 0.003},
    ),
    "contrastive": (
        "contrastive",
        {
            "image_features": "effnet-pool+effnet-stages",
            "text_features": "minilm+lsa",
            "lsa_dim": 32,
            "views": ["center", "rot90"],
            "embed_views": ["center", "hflip"],
            "ensemble": 2,
            "batch_size": 16,
        },
    ),
}
AUTOENCODER_TRAIN_IMAGES = 300


def training_data(method, rsicd, rsicd_slice):
    if method == "autoencoder":
        return rsicd.split("train").sample(AUTOENCODER_TRAIN_IMAGES), rsicd_slice.split("val")
    return rsicd_slice.split("train"), rsicd_slice.split("val")


@pytest.fixture(scope="module", params=sorted(CASES))
def trained(request, rsicd, rsicd_slice, rsicd_slice_dir, tmp_path_factory):
    """One epoch of each method; contrastive through `cbir train`, the others through the library."""
    method, params = CASES[request.param]
    out = tmp_path_factory.mktemp("deep") / request.param
    if method == "autoencoder":
        create_model(method, epochs=1, seed=3, **params).fit(*training_data(method, rsicd, rsicd_slice)).save(
            out
        )
        return method, params, out
    args = ["train", "-d", str(rsicd_slice_dir), "--method", method, "-o", str(out), "--epochs", "1"]
    args += ["--seed", "3"]
    for key, value in params.items():
        args += ["-p", f"{key}={json.dumps(value)}"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "trained contrastive" in result.output
    return method, params, out


def test_one_epoch_beats_chance(trained, rsicd_slice_dir):
    _, _, out = trained
    result = runner.invoke(app, ["evaluate", "-m", str(out), "-d", str(rsicd_slice_dir), "--json"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output)
    assert metrics["n_images"] == 40
    assert metrics["mR"] > 2 * CHANCE_MR, metrics


def test_saved_model_ranks_identically(trained, rsicd_slice):
    method, _, out = trained
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == method and (out / "weights.safetensors").is_file()
    test = rsicd_slice.split("test")
    loaded = load_model(out)
    again = load_model(out)
    scores = score_split(loaded, test)
    np.testing.assert_array_equal(scores, score_split(again, test))
    np.testing.assert_array_equal(np.argsort(-scores, 1), np.argsort(-score_split(again, test), 1))


def test_same_seed_same_model(trained, rsicd, rsicd_slice):
    method, params, out = trained
    model = create_model(method, epochs=1, seed=3, **params)
    model.fit(*training_data(method, rsicd, rsicd_slice))
    test = rsicd_slice.split("test")
    np.testing.assert_allclose(
        score_split(model, test), score_split(load_model(out), test), rtol=1e-5, atol=1e-5
    )


def test_loading_for_search_needs_no_torch_or_sklearn(trained):
    """A one-query `cbir search` must not pay for importing torch or scikit-learn (~1 s each)."""
    _, _, out = trained
    code = (
        "import sys; from cbir.models import load_model; "
        f"m = load_model({str(out)!r}); m.embed_texts(['a river']); "
        "print(sorted(k for k in ('torch', 'sklearn') if k in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"


def test_autoencoder_is_nearest_neighbours_in_code_space(rsicd_slice):
    """The inner product of the saved embeddings is minus half the squared Euclidean distance."""
    from cbir.models.autoencoder import euclidean_as_inner_product

    rng = np.random.default_rng(0)
    t, i = rng.normal(size=(5, 7)).astype(np.float32), rng.normal(size=(9, 7)).astype(np.float32)
    te, ie = euclidean_as_inner_product(t, i)
    expected = -((t[:, None, :] - i[None, :, :]) ** 2).sum(-1) / 2
    np.testing.assert_allclose(te @ ie.T, expected, rtol=1e-5, atol=1e-5)


def test_triplet_negatives():
    import torch

    from cbir.models.autoencoder import triplet_loss

    # text 0: positive at 1.0, negatives at 0.5 (harder) and 1.2 (semi-hard: farther, within margin)
    dist = torch.tensor([[1.0, 0.5, 1.2], [3.0, 1.0, 3.0], [3.0, 3.0, 1.0]])
    hard = triplet_loss(dist, 0.5, "hard")
    semi = triplet_loss(dist, 0.5, "semi-hard")
    assert hard.item() == pytest.approx((0.5 + 1.0 - 0.5) / 3)
    assert semi.item() == pytest.approx((0.5 + 1.0 - 1.2) / 3)


def test_bad_parameters_are_clear():
    with pytest.raises(ModelError, match="parameter loss must be one of mse, triplet, not .cosine."):
        create_model("autoencoder", loss="cosine")
    with pytest.raises(ModelError, match="unknown view"):
        create_model("contrastive", views=["sideways"])
    with pytest.raises(ModelError, match="unknown view"):
        create_model("contrastive", embed_views=["sideways"])
    with pytest.raises(ModelError, match="unknown text representation 'minilm\\+words'"):
        create_model("contrastive", text_features="minilm+words")


def test_embed_views_average_makes_mirror_images_alike(rsicd_slice, tmp_path):
    """With `embed_views` center + hflip an image and its mirror image average the same two views, so
    they embed identically; with the center view alone they do not."""
    from PIL import Image, ImageOps

    from cbir.datasets import Dataset

    original = rsicd_slice.split("test").images[0]
    mirror = tmp_path / "mirror.png"  # lossless: the mirror's pixels are exactly the flipped original's
    ImageOps.mirror(Image.open(original).convert("RGB")).save(mirror)
    pair = Dataset.from_paths([original, mirror], tmp_path)
    train, val = rsicd_slice.split("train"), rsicd_slice.split("val")
    quick = {"ensemble": 1, "epochs": 1, "batch_size": 16}
    averaged = create_model("contrastive", embed_views=["center", "hflip"], **quick).fit(train, val)
    emb = averaged.embed_images(pair)
    np.testing.assert_allclose(emb[0], emb[1], atol=1e-5)
    emb = create_model("contrastive", **quick).fit(train, val).embed_images(pair)
    assert np.abs(emb[0] - emb[1]).max() > 1e-3


def test_contrastive_saved_before_caption_features_still_loads(rsicd_slice, tmp_path):
    """A model directory from before `text_features` existed (MiniLM only, no text state or arrays)
    loads and ranks as it did."""
    quick = {"ensemble": 1, "epochs": 1, "batch_size": 16, "text_features": "minilm"}
    create_model("contrastive", **quick).fit(rsicd_slice.split("train")).save(tmp_path)
    test = rsicd_slice.split("test")
    expected = score_split(load_model(tmp_path), test)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["params"]["text_features"], config["params"]["embed_views"], config["state"]["text"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    np.testing.assert_array_equal(score_split(load_model(tmp_path), test), expected)


@pytest.mark.parametrize(("dtype", "size_ratio"), [("float16", 0.55), ("int8", 0.3)])
def test_contrastive_stored_smaller_ranks_alike(rsicd_slice, tmp_path, dtype, size_ratio):
    """The shipped default's size saver: float16 or row-quantised int8 weights shrink the file and
    rank as the float32 model does."""
    from safetensors.numpy import load_file

    train, val, test = (rsicd_slice.split(s) for s in ("train", "val", "test"))
    quick = {"embed_dim": 32, "hidden": 32, "lsa_dim": 16, "epochs": 2, "batch_size": 16}
    model = create_model("contrastive", **quick).fit(train, val)
    small = create_model("contrastive", weights_dtype=dtype, **quick).fit(train, val)
    model.save(tmp_path / "float32")
    small.save(tmp_path / dtype)
    arrays = load_file(str(tmp_path / dtype / "weights.safetensors"))
    assert arrays["m0.image.linear.weight"].dtype == np.dtype(dtype)
    sizes = [(tmp_path / d / "weights.safetensors").stat().st_size for d in ("float32", dtype)]
    assert sizes[1] < size_ratio * sizes[0]
    scores = score_split(small, test)
    np.testing.assert_allclose(scores, score_split(model, test), atol=1e-6)  # the same training
    stored = score_split(load_model(tmp_path / dtype), test)
    np.testing.assert_allclose(stored, scores, atol=2e-2)
    assert np.mean(stored.argmax(1) == scores.argmax(1)) >= 0.9


def test_contrastive_zero_shot_fusion(flickr8k_slice_dir, tmp_path):
    """The zero-shot (ConSE) score mixed in: its weight chosen on val (the largest within one standard
    error of the best val mR), a fixed weight mixes the two models' scores exactly, and the fused
    model saves and loads as it ranks."""
    from cbir.datasets import load_dataset
    from cbir.metrics import retrieval_metrics
    from cbir.models.contrastive import ZERO_SHOT_WEIGHTS
    from cbir.models.zeroshot import ZeroShotModel

    data = load_dataset(flickr8k_slice_dir)
    train, val, test = (data.split(s) for s in ("train", "val", "test"))
    quick = {"ensemble": 1, "epochs": 2, "batch_size": 16, "embed_dim": 32, "hidden": 32, "lsa_dim": 16}
    own = create_model("contrastive", **quick).fit(train, val)
    chosen = create_model("contrastive", zero_shot_weight=None, **quick).fit(train, val)
    sweep = dict(chosen.zero_shot_sweep_)
    standard_error = sweep.pop("standard_error")
    assert [float(w) for w in sweep] == list(ZERO_SHOT_WEIGHTS) and 0 < standard_error < 10
    assert sweep["0.0"] == pytest.approx(retrieval_metrics(score_split(own, val), val.caption_image)["mR"])
    within = [float(w) for w, mr in sweep.items() if mr >= max(sweep.values()) - standard_error]
    assert chosen.zero_shot_weight_ == max(within)

    mixed = create_model("contrastive", zero_shot_weight=0.3, **quick).fit(train, val)
    zero_shot = score_split(ZeroShotModel(visual_weight=0.0).fit(), test)
    expected = 0.7 * score_split(own, test) + 0.3 * zero_shot
    np.testing.assert_allclose(score_split(mixed, test), expected, atol=1e-5)
    np.testing.assert_allclose(score_split(load_model(mixed.save(tmp_path / "m")), test), expected, atol=1e-5)


def test_zero_shot_fusion_needs_photos(kaggle_mini, tmp_path):
    """Precomputed ResNet features have no ImageNet logits: a fixed weight is refused, null means none."""
    from cbir.datasets import load_dataset
    from tests.test_datasets import copy_kaggle, write_feature_csvs

    root = copy_kaggle(tmp_path)
    write_feature_csvs(root, kaggle_mini, np.random.default_rng(0))
    train = load_dataset(root).split("train")  # also the val split here: the competition has none
    quick = {"ensemble": 1, "epochs": 1, "batch_size": 16, "lsa_dim": 16, "image_features": "resnet2048"}
    with pytest.raises(ModelError, match="zero_shot_weight"):
        create_model("contrastive", zero_shot_weight=0.3, **quick).fit(train, train)
    fused = create_model("contrastive", zero_shot_weight=None, **quick).fit(train, train)
    assert fused.zero_shot_weight_ == 0 and "zero_shot.class_embeddings" not in fused.arrays_
