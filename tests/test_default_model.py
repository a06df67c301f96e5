"""The shipped default model (issue 11): it loads, it is what `cbir index` uses, it finds everyday
photos on real Flickr8k test data, its damage is a clear error, and `make default-model` rebuilds it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cbir.cli import app
from cbir.evaluation import evaluate
from cbir.models import SHIPPED_MODEL_DIR, ModelError, load_model

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def test_shipped_model_loads_small_and_records_how_it_was_made():
    model = load_model("default")
    assert model.method == "contrastive"
    assert 0 < model.zero_shot_weight_ <= 0.5  # the zero-shot part, at the weight chosen on val, loads
    assert len(model.text_.minilm_layers) > 0  # MiniLM's tuned top layers ship with it
    # 10 MB was the aim; the tuned layers take it to 12 MB for +1.15 val mR (BENCHMARKS.md, "Tuning
    # MiniLM's last layers"), within the 25 MB allowed where quality needs it.
    size = sum(f.stat().st_size for f in SHIPPED_MODEL_DIR.iterdir())
    assert size <= 25 * 2**20, f"shipped model is {size / 2**20:.1f} MB"
    provenance = json.loads((SHIPPED_MODEL_DIR / "config.json").read_text())["provenance"]
    assert provenance["command"] == "make default-model"
    assert provenance["data"]["name"] == "flickr8k"
    assert provenance["data"]["splits"] == {"train": 5591, "val": 500, "test": 1000}
    assert provenance["test_metrics"]["t2i_r10"] > 70


def test_shipped_int8_weights_load_in_one_pass_bit_for_bit():
    """Each int8 weight times its row scale, straight to float32 (no float32 copy of the int8 first),
    equals the two-step dequantisation bit for bit; float32 arrays are kept as read, not copied."""
    from safetensors.numpy import load_file

    from cbir.models.contrastive import QUANT_SCALE, loaded_arrays

    stored = load_file(str(SHIPPED_MODEL_DIR / "weights.safetensors"))
    loaded = loaded_arrays(stored)
    quantised = [name for name in loaded if name + QUANT_SCALE in stored]
    assert "text.lsa" in quantised and not any(name.endswith(QUANT_SCALE) for name in loaded)
    for name in quantised:
        two_steps = stored[name].astype(np.float32) * stored[name + QUANT_SCALE]
        assert loaded[name].dtype == np.float32
        np.testing.assert_array_equal(loaded[name], two_steps)
    float32 = np.ones((3, 4), dtype=np.float32)  # as a model saved with weights_dtype float32 holds
    assert loaded_arrays({"w": float32})["w"] is float32


def test_quality_floor_on_a_flickr8k_test_slice(flickr8k):
    """100 unseen test photos, 500 captions: the stored model, as loaded, must rank most of them well.
    Zero-shot gets about a third of this; a broken load (wrong weights, lost bank) falls well below."""
    test = flickr8k.split("test").sample(100)
    metrics = evaluate(load_model("default"), test, "test")
    zero_shot = evaluate(load_model("zero-shot"), test, "test")
    assert metrics["t2i_r10"] >= 80, metrics
    assert metrics["mR"] >= zero_shot["mR"] + 20, (metrics["mR"], zero_shot["mR"])


def test_index_without_model_uses_the_default_and_zero_shot_by_name(flickr8k, tmp_path):
    from cbir.demo import photo_folder
    from cbir.index import SearchIndex

    folder = photo_folder(flickr8k.split("test").sample(40), tmp_path / "photos")
    result = runner.invoke(app, ["index", str(folder), "--out", str(tmp_path / "ix")])
    assert result.exit_code == 0, result.output
    assert "model: default" in result.output
    ix = SearchIndex.open(tmp_path / "ix")
    assert ix.model_source == "default"
    assert json.loads((ix.model_dir / "config.json").read_text())["method"] == "contrastive"
    default_vectors = np.asarray(ix.vectors)

    result = runner.invoke(app, ["index", str(folder), "--out", str(tmp_path / "ix"), "--model", "zero-shot"])
    assert result.exit_code == 0, result.output
    ix = SearchIndex.open(tmp_path / "ix")
    assert ix.model_source == "zero-shot"
    assert np.asarray(ix.vectors).shape != default_vectors.shape  # re-embedded by the other model


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_damaged_shipped_model_is_a_clear_error(tmp_path, monkeypatch, damage):
    import cbir.models

    copy = tmp_path / "default"
    shutil.copytree(SHIPPED_MODEL_DIR, copy)
    weights = copy / "weights.safetensors"
    if damage == "missing":
        shutil.rmtree(copy)
    else:
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    monkeypatch.setattr(cbir.models, "SHIPPED_MODEL_DIR", copy)
    with pytest.raises(ModelError, match="make default-model") as e:
        load_model("default")
    assert str(copy) in str(e.value)
    result = runner.invoke(app, ["index", str(tmp_path), "--out", str(tmp_path / "ix")])
    assert result.exit_code == 2
    assert "make default-model" in result.output and "Traceback" not in result.output


def test_retrain_command_on_a_tiny_slice_is_deterministic(flickr8k_slice_dir, tmp_path):
    from safetensors.numpy import load_file

    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        done = subprocess.run(
            [sys.executable, str(REPO / "tools" / "default_model.py"), "--dataset", str(flickr8k_slice_dir),
             "--out", str(out), "--epochs", "2"],
            capture_output=True, text=True, cwd=REPO,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert "default model →" in done.stdout
    provenance = json.loads((outs[0] / "config.json").read_text())["provenance"]
    assert provenance["data"]["splits"] == {"train": 30, "val": 30, "test": 30}
    assert "cbir train --dataset" in provenance["equivalent"]
    assert set(provenance["test_metrics"]) >= {"t2i_r1", "mR", "map20", "medr"}
    a, b = (load_file(str(o / "weights.safetensors")) for o in outs)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert load_model(outs[0]).embed_texts(["a dog"]).shape[0] == 1


@pytest.mark.slow
def test_demo_end_to_end(flickr8k_slice_dir, tmp_path):
    """`make demo`'s steps (index the test photos, three searches with captions, a grid, the metrics) on
    a small slice."""
    result = runner.invoke(app, ["demo", "--dataset", str(flickr8k_slice_dir), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "indexed 30 photos" in result.output
    assert result.output.count("  1  ") >= 3  # a top result under each of the three queries
    assert (tmp_path / "grid.png").stat().st_size > 10_000
    assert "mR" in result.output and "MAP@20" in result.output


def test_models_by_name_in_evaluate_and_submit(tmp_path):
    """`--model default` and `--model zero-shot` work wherever a model directory does, and the shipped
    model ranks COCO photos it was never trained on (cs5785-mini) far above chance (MAP@20 about 0.06;
    measured 0.57, zero-shot 0.66: BENCHMARKS.md)."""
    mini = str(REPO.parent / "shared" / "datasets" / "cs5785-mini")
    scores = {}
    for name in ("default", "zero-shot"):
        result = runner.invoke(app, ["evaluate", "--model", name, "--dataset", mini, "--json"])
        assert result.exit_code == 0, result.output
        scores[name] = json.loads(result.output)["map20"]
    assert min(scores.values()) > 0.45, scores
    result = runner.invoke(
        app, ["submit", "--model", "default", "--dataset", mini, "--out", str(tmp_path / "s.csv")]
    )
    assert result.exit_code == 0, result.output
    assert len((tmp_path / "s.csv").read_text().splitlines()) == 80  # header + 79 descriptions
