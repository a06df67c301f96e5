"""The first method end to end through the CLI on real slices: train, save, load, evaluate."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from cbir.cli import app
from cbir.evaluation import evaluate
from cbir.models import ModelError, create_model, load_model
from tests.conftest import EVALUATE_JSON_KEYS, KAGGLE_MINI

runner = CliRunner()


@pytest.fixture(scope="module")
def ridge_dir(rsicd_slice_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("models") / "ridge"
    result = runner.invoke(
        app, ["train", "--dataset", str(rsicd_slice_dir), "--method", "ridge", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    return out


def test_train_writes_a_model_directory(ridge_dir):
    config = json.loads((ridge_dir / "config.json").read_text())
    assert config["method"] == "ridge" and config["state"]["representation"] == "effnet-pool"
    assert (ridge_dir / "weights.safetensors").is_file()


def test_evaluate_json_beats_chance(ridge_dir, rsicd_slice_dir):
    result = runner.invoke(
        app,
        [
            "evaluate",
            "--model",
            str(ridge_dir),
            "--dataset",
            str(rsicd_slice_dir),
            "--split",
            "test",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    m = json.loads(result.output)
    assert set(EVALUATE_JSON_KEYS) <= set(m)
    assert m["n_images"] == 40
    # chance R@10 over 40 images is 25%; the slice model must be clearly better
    assert m["t2i_r10"] > 40


def test_evaluate_table(ridge_dir, rsicd_slice_dir):
    result = runner.invoke(app, ["evaluate", "-m", str(ridge_dir), "-d", str(rsicd_slice_dir)])
    assert result.exit_code == 0 and "text → image" in result.output and "mR" in result.output


def test_saved_model_ranks_identically(ridge_dir, rsicd_slice):
    model = load_model(ridge_dir)
    again = load_model(ridge_dir)
    test = rsicd_slice.split("test")
    np.testing.assert_array_equal(
        model.embed_texts(test.captions[:10]), again.embed_texts(test.captions[:10])
    )
    assert evaluate(model, rsicd_slice)["mR"] == evaluate(again, rsicd_slice)["mR"]


def test_kaggle_layout_train_and_evaluate(tmp_path):
    out = tmp_path / "m"
    assert (
        runner.invoke(app, ["train", "-d", str(KAGGLE_MINI), "--method", "ridge", "-o", str(out)]).exit_code
        == 0
    )
    result = runner.invoke(app, ["evaluate", "-m", str(out), "-d", str(KAGGLE_MINI), "--json"])
    m = json.loads(result.output)
    assert m["n_images"] == 79 and m["n_queries"] == 79
    assert m["map20"] > 0.1  # chance MAP@20 over 79 images is about 0.045


def test_bad_inputs_are_one_line_errors(tmp_path, ridge_dir):
    r = runner.invoke(
        app, ["train", "-d", str(tmp_path / "nope"), "--method", "ridge", "-o", str(tmp_path / "m")]
    )
    assert r.exit_code == 2 and "no such folder" in r.output and "Traceback" not in r.output
    r = runner.invoke(
        app, ["train", "-d", str(KAGGLE_MINI), "--method", "nonesuch", "-o", str(tmp_path / "m")]
    )
    assert r.exit_code == 2 and "unknown method" in r.output
    r = runner.invoke(app, ["evaluate", "-m", str(tmp_path), "-d", str(KAGGLE_MINI)])
    assert r.exit_code == 2 and "not a model directory" in r.output
    r = runner.invoke(app, ["evaluate", "-m", str(ridge_dir), "-d", str(KAGGLE_MINI), "--split", "val"])
    assert r.exit_code == 2 and "no 'val' split" in r.output
    with pytest.raises(ModelError, match="no parameter"):
        create_model("ridge", bogus=1)


def test_cli_help_lists_commands_without_loading_torch():
    """`--help` stays fast because the CLI imports no heavy library until a command runs."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "cbir.cli", "--help"], capture_output=True, text=True, check=True
    )
    for command in ("train", "evaluate", "demo"):
        assert command in proc.stdout
    imported = subprocess.run(
        [sys.executable, "-c", "import cbir.cli, sys; print('torch' in sys.modules)"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert imported.stdout.strip() == "False"


def test_evaluate_split_all_scores_every_image(ridge_dir, rsicd_slice_dir, rsicd_slice):
    result = runner.invoke(
        app, ["evaluate", "-m", str(ridge_dir), "-d", str(rsicd_slice_dir), "--split", "all", "--json"]
    )
    assert result.exit_code == 0, result.output
    m = json.loads(result.output)
    assert (m["n_images"], m["n_queries"]) == (120, len(rsicd_slice.captions))
    assert m == evaluate(load_model(ridge_dir), rsicd_slice, "all")


def test_progress_bars_go_to_stderr_so_json_output_parses(monkeypatch, capfd):
    from cbir.progress import progress_bar

    monkeypatch.delenv("CBIR_NO_PROGRESS", raising=False)
    with progress_bar("image features", 3) as advance:
        advance(3)
    out, err = capfd.readouterr()
    assert out == "" and "image features" in err
