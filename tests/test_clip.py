"""The CLIP backend (issue 15, item 4) on a tiny randomly initialised CLIP the test writes itself
(tools/tiny_clip.py): the zero-shot `clip` model trains, saves, loads and embeds; an index over real
photos searches with it; `contrastive` trains its heads on its embeddings; a missing, malformed or
changed checkpoint is one clear error naming the file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from tools.tiny_clip import IMAGE_SIDE, PROJECTION, write_tiny_clip
from typer.testing import CliRunner

from cbir.cli import app
from cbir.datasets import Dataset
from cbir.models import ModelError, create_model, load_model
from tests.conftest import KAGGLE_MINI

runner = CliRunner()
PHOTOS = sorted((KAGGLE_MINI / "images_train").glob("*.jpg"), key=lambda p: int(p.stem))[:8]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    return write_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


@pytest.fixture
def own_copy(tiny_clip, tmp_path) -> Path:
    """A copy of the checkpoint that a test may damage or move."""
    return Path(shutil.copytree(tiny_clip, tmp_path / "ckpt"))


def photos() -> Dataset:
    return Dataset.from_paths(PHOTOS)


def test_zero_shot_model_trains_saves_loads_embeds(tiny_clip, tmp_path):
    model = create_model("clip", checkpoint=str(tiny_clip)).fit()
    texts = ["a dog running on the beach", "two people on a bench", "a dog running on the beach"]
    t = model.embed_texts(texts)
    images = model.embed(photos())
    assert t.shape == (3, PROJECTION) and images.vectors.shape == (8, PROJECTION) and not images.failed
    np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(images.vectors, axis=1), 1, atol=1e-5)
    np.testing.assert_array_equal(t[0], t[2])
    assert not np.allclose(t[0], t[1])
    assert len({tuple(np.round(v, 4)) for v in images.vectors}) == 8  # eight photos, eight vectors

    saved = model.save(tmp_path / "m")
    config = json.loads((saved / "config.json").read_text())
    assert config["state"]["checkpoint"] == str(tiny_clip.resolve())
    assert len(config["state"]["checkpoint_sha1"]) == 40
    loaded = load_model(saved)
    np.testing.assert_allclose(loaded.embed_texts(texts), t, atol=1e-6)
    np.testing.assert_allclose(loaded.embed(photos()).vectors, images.vectors, atol=1e-6)


def test_the_checkpoint_mean_and_std_are_used(own_copy):
    """Pixels are normalised with the preprocessor config's mean and std (OpenAI's values when it has
    none), and features of other values are cached apart."""
    from cbir.encoders.clip import OPENAI_MEAN, OPENAI_STD, ClipCheckpoint

    first = create_model("clip", checkpoint=str(own_copy)).fit().embed(photos()).vectors
    spec_file = own_copy / "preprocessor_config.json"
    spec_file.write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.25] * 3, "size": 40}))
    changed = ClipCheckpoint.open(own_copy).preprocessing
    assert (changed.mean, changed.std, changed.size, changed.crop) == (
        (0.5,) * 3,
        (0.25,) * 3,
        40,
        IMAGE_SIDE,
    )
    second = create_model("clip", checkpoint=str(own_copy)).fit().embed(photos()).vectors
    assert second.shape == first.shape and not np.allclose(first, second, atol=1e-3)
    spec_file.unlink()
    default = ClipCheckpoint.open(own_copy).preprocessing
    assert (default.mean, default.std, default.crop) == (OPENAI_MEAN, OPENAI_STD, IMAGE_SIDE)


def test_index_and_search_real_photos(tiny_clip, tmp_path):
    """Through the CLI: train (no training), index eight photos, search by text and by photo. The
    weights are random, so only the mechanics are checked: a photo finds itself first."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in PHOTOS:
        shutil.copy(p, folder / p.name)
    model_dir, index_dir = tmp_path / "m", tmp_path / "ix"
    result = train_clip(tiny_clip, model_dir)
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["index", str(folder), "--out", str(index_dir), "-m", str(model_dir)])
    assert result.exit_code == 0 and "indexed 8 images" in result.output, result.output
    result = runner.invoke(
        app, ["search", "a dog on the beach", "--index", str(index_dir), "-k", "5", "--json"]
    )
    rows = json.loads(result.stdout)
    assert [r["rank"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["score"] for r in rows] == sorted((r["score"] for r in rows), reverse=True)
    query = folder / PHOTOS[3].name
    result = runner.invoke(
        app, ["search", "--image", str(query), "--index", str(index_dir), "-k", "3", "--json"]
    )
    top = json.loads(result.stdout)[0]
    assert Path(top["path"]).name == query.name and top["score"] == pytest.approx(1.0, abs=1e-4)


def test_contrastive_heads_on_clip_features(tiny_clip, flickr8k_slice_dir, tmp_path, monkeypatch):
    """`image_encoder=clip:PATH` (the issue's spelling of `image_features`; and `clip:PATH` among the
    text features): the heads train on the
    CLIP embeddings, recorded by absolute path, so the saved model loads from another directory and
    embeds identically; embedding photos runs no EfficientNet."""
    import cbir.encoders

    checkpoint = Path(shutil.copytree(tiny_clip, tmp_path / "ckpt"))
    monkeypatch.chdir(tmp_path)
    quick = {"ensemble": 1, "embed_dim": 8, "hidden": 16, "lsa_dim": 8, "batch_size": 16, "bank_size": 0}
    args = ["train", "-d", str(flickr8k_slice_dir), "--method", "contrastive", "-o", "m", "--epochs", "2"]
    args += ["-p", "image_encoder=clip:ckpt", "-p", "text_features=lsa+clip:ckpt"]
    args += [arg for k, v in quick.items() for arg in ("-p", f"{k}={v}")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    monkeypatch.chdir(flickr8k_slice_dir)
    model = load_model(tmp_path / "m")
    assert model.representation_ == f"clip:{checkpoint}" and model.text_.kinds == [
        "lsa",
        f"clip:{checkpoint}",
    ]
    assert model.arrays_["m0.image.mean"].shape == (PROJECTION,)  # the image head's input: CLIP embeddings
    assert model.arrays_["m0.text.mean"].shape == (8 + PROJECTION,)  # LSA, then CLIP's text embedding
    monkeypatch.setattr(cbir.encoders, "shared_image_encoder", lambda: pytest.fail("EfficientNet ran"))
    first = model.embed(photos()).vectors
    assert first.shape == (8, 8) and np.isfinite(first).all()
    np.testing.assert_allclose(load_model(tmp_path / "m").embed(photos()).vectors, first, atol=1e-6)
    texts = model.embed_texts(["a dog on the beach", "a man in red"])
    assert texts.shape == (2, 8) and not np.allclose(texts[0], texts[1])


def test_classical_method_on_clip_features(tiny_clip, flickr8k_slice_dir, tmp_path):
    """The classical methods take `clip:PATH` image features too, and keep them through save/load."""
    from cbir.datasets import load_dataset

    data = load_dataset(flickr8k_slice_dir)
    train, test = data.split("train"), data.split("test")
    model = create_model("ridge", image_features=f"clip:{tiny_clip}", alpha=1.0).fit(train)
    images = model.embed(test).vectors
    assert images.shape[0] == len(test) and np.isfinite(images).all()
    np.testing.assert_allclose(load_model(model.save(tmp_path / "m")).embed(test).vectors, images, atol=1e-5)


def test_both_spellings_of_the_image_features_are_an_error(tiny_clip):
    with pytest.raises(ModelError, match="image_features or its other spelling image_encoder"):
        create_model("ridge", image_features="auto", image_encoder=f"clip:{tiny_clip}")


def train_clip(checkpoint: Path, out: Path):
    return runner.invoke(
        app,
        [
            "train",
            "-d",
            str(KAGGLE_MINI),
            "--method",
            "clip",
            "-p",
            f"checkpoint={checkpoint}",
            "-o",
            str(out),
        ],
    )


def assert_clear_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "error:" in result.output
    flat = " ".join(result.output.split())  # rich wraps long lines
    for fragment in fragments:
        assert fragment in flat, flat


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    missing = tmp_path / "nowhere"
    assert_clear_error(train_clip(missing, tmp_path / "m"), str(missing), "not a directory")
    assert_clear_error(train_clip(tmp_path, tmp_path / "m"), str(tmp_path / "config.json"), "missing")


@pytest.mark.parametrize(
    "damage, fragments",
    [
        ("config", ("config.json:1: malformed JSON",)),
        ("not-clip", ("config.json: not a CLIP configuration", "'bert'")),
        ("no-weights", ("no weights (model.safetensors",)),
        ("truncated", ("model.safetensors: cannot load CLIP weights",)),
        ("no-tokenizer", ("no tokenizer",)),
        ("crop", ("preprocessor_config.json: crop_size 48", "32-pixel input")),
        ("open-clip", ("an open_clip checkpoint", "transformers format")),
    ],
)
def test_malformed_checkpoint_is_a_clear_error(own_copy, tmp_path, damage, fragments):
    weights = own_copy / "model.safetensors"
    if damage == "config":
        (own_copy / "config.json").write_text("{not json")
    elif damage == "not-clip":
        (own_copy / "config.json").write_text(json.dumps({"model_type": "bert"}))
    elif damage == "no-weights":
        weights.unlink()
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "crop":
        (own_copy / "preprocessor_config.json").write_text(json.dumps({"crop_size": 48}))
    elif damage == "no-tokenizer":
        (own_copy / "tokenizer.json").unlink()
    else:
        (own_copy / "config.json").unlink()
        (own_copy / "open_clip_config.json").write_text("{}")
    assert_clear_error(train_clip(own_copy, tmp_path / "m"), *fragments)


def test_moved_or_changed_checkpoint_is_a_clear_error(own_copy, tmp_path):
    assert train_clip(own_copy, tmp_path / "m").exit_code == 0
    config = json.loads((own_copy / "config.json").read_text())
    config["logit_scale_init_value"] = 3.0
    (own_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="CLIP checkpoint changed since this model was made"):
        load_model(tmp_path / "m")
    own_copy.rename(tmp_path / "moved")
    result = runner.invoke(app, ["evaluate", "-m", str(tmp_path / "m"), "-d", str(KAGGLE_MINI)])
    assert_clear_error(result, str(tmp_path / "m" / "config.json"), str(own_copy), "not a directory")
