"""The saved-model format: versioned, written atomically, and checked in full when loaded."""

import json
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from typer.testing import CliRunner

from cbir.cli import app
from cbir.models import ModelError, create_model, load_model
from cbir.models.base import CONFIG_FILE, FORMAT_VERSION, WEIGHTS_FILE

runner = CliRunner()


@pytest.fixture(scope="module")
def two_ridges(rsicd_slice, tmp_path_factory):
    """Two real ridge models that differ only in alpha, saved once; tests work on copies."""
    root = tmp_path_factory.mktemp("format")
    train = rsicd_slice.split("train")
    return [create_model("ridge", alpha=a).fit(train).save(root / f"alpha{a:g}") for a in (1.0, 1000.0)]


@pytest.fixture
def model_dir(two_ridges, tmp_path):
    return shutil.copytree(two_ridges[0], tmp_path / "model")


def edit_config(model_dir, change) -> None:
    config = json.loads((model_dir / CONFIG_FILE).read_text())
    change(config)
    (model_dir / CONFIG_FILE).write_text(json.dumps(config))


def snapshot(model_dir) -> tuple[bytes, bytes]:
    return (model_dir / CONFIG_FILE).read_bytes(), (model_dir / WEIGHTS_FILE).read_bytes()


def assert_cli_refuses(model_dir, rsicd_slice_dir, *fragments: str) -> None:
    r = runner.invoke(app, ["evaluate", "-m", str(model_dir), "-d", str(rsicd_slice_dir)])
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    flat = " ".join(r.output.split())
    for fragment in fragments:
        assert fragment in flat, r.output


def test_config_records_the_format_and_every_array(model_dir):
    config = json.loads((model_dir / CONFIG_FILE).read_text())
    assert config["format_version"] == FORMAT_VERSION
    arrays = load_file(str(model_dir / WEIGHTS_FILE))
    assert arrays and config["arrays"] == {
        k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in arrays.items()
    }


def test_newer_format_is_refused_naming_the_file(model_dir, rsicd_slice_dir):
    edit_config(model_dir, lambda c: c.update(format_version=FORMAT_VERSION + 1))
    with pytest.raises(ModelError, match=f"{CONFIG_FILE}: model format {FORMAT_VERSION + 1} .* newer"):
        load_model(model_dir)
    assert_cli_refuses(model_dir, rsicd_slice_dir, str(model_dir / CONFIG_FILE), "upgrade cbir")
    edit_config(model_dir, lambda c: c.update(format_version="2"))
    with pytest.raises(ModelError, match="unknown model format_version '2'"):
        load_model(model_dir)


def test_format_1_models_still_load_and_rank_the_same(model_dir, rsicd_slice):
    """Models saved before the format had a version (no `format_version`, no `arrays`) are read."""
    texts = rsicd_slice.split("test").captions[:8]
    expected = load_model(model_dir).embed_texts(texts)
    edit_config(model_dir, lambda c: [c.pop("format_version"), c.pop("arrays")])
    np.testing.assert_array_equal(load_model(model_dir).embed_texts(texts), expected)


def test_truncated_weights_are_an_error_naming_the_file(model_dir, rsicd_slice_dir):
    weights = model_dir / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelError, match=f"{WEIGHTS_FILE}: unreadable or truncated"):
        load_model(model_dir)
    assert_cli_refuses(model_dir, rsicd_slice_dir, str(weights))
    weights.unlink()
    with pytest.raises(ModelError, match=f"{WEIGHTS_FILE}: missing"):
        load_model(model_dir)


def test_weights_of_the_wrong_shape_are_refused(model_dir, rsicd_slice_dir):
    weights = model_dir / WEIGHTS_FILE
    arrays = load_file(str(weights))
    name = max(arrays, key=lambda k: arrays[k].size)
    save_file({**arrays, name: np.ascontiguousarray(arrays[name][:-1])}, str(weights))
    with pytest.raises(ModelError, match=f"{WEIGHTS_FILE}: array '{name}' is"):
        load_model(model_dir)
    assert_cli_refuses(model_dir, rsicd_slice_dir, str(weights), name)
    del arrays[name]
    save_file(arrays, str(weights))
    with pytest.raises(ModelError, match=f"missing \\['{name}'\\]"):
        load_model(model_dir)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c["params"].update(text_features="minilm+elmo"), "unknown text representation"),
        (lambda c: c["params"].update(bogus=1), "bogus"),
        (lambda c: c.update(method="nonesuch"), "unknown method 'nonesuch'"),
        (lambda c: c["state"].pop("hyperparameters"), "missing 'hyperparameters'"),
        (lambda c: c.update(params=[1, 2]), "JSON objects"),
        (lambda c: c.pop("arrays"), "no 'arrays' key"),
    ],
)
def test_bad_config_values_are_an_error_naming_the_file(model_dir, rsicd_slice_dir, change, message):
    edit_config(model_dir, change)
    with pytest.raises(ModelError, match=message) as caught:
        load_model(model_dir)
    assert str(model_dir / CONFIG_FILE) in str(caught.value)
    assert_cli_refuses(model_dir, rsicd_slice_dir, str(model_dir / CONFIG_FILE))


def test_saving_over_a_model_replaces_it_whole(two_ridges, tmp_path):
    out = shutil.copytree(two_ridges[0], tmp_path / "model")
    load_model(two_ridges[1]).save(out)
    assert snapshot(out) == snapshot(two_ridges[1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no staging or old copies left


@pytest.mark.parametrize("failing_call", [0, 1])
def test_a_save_that_fails_midway_leaves_the_old_model(two_ridges, tmp_path, monkeypatch, failing_call):
    """Each rename of a save fails in turn: the directory then holds the old model exactly,
    never the new weights beside the old config; no temporary files are left behind."""
    out = shutil.copytree(two_ridges[0], tmp_path / "model")
    new = load_model(two_ridges[1])
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == failing_call + 1:
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="disk full"):
        new.save(out)
    monkeypatch.undo()
    assert snapshot(out) == snapshot(two_ridges[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    load_model(out)


def test_save_will_not_overwrite_a_folder_that_is_not_a_model(two_ridges, tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "holiday.jpg").write_bytes(b"not yours to delete")
    with pytest.raises(ModelError, match="not a model directory; not overwriting"):
        load_model(two_ridges[0]).save(tmp_path / "photos")
    assert (tmp_path / "photos" / "holiday.jpg").read_bytes() == b"not yours to delete"


def test_saved_weights_are_as_readable_as_the_config(two_ridges, tmp_path):
    """safetensors creates its file 0600; a model is saved for others to load too (a server running as
    another user), so the weights take the mode every new file gets here, as config.json does."""
    model = load_model(two_ridges[0])
    before = os.umask(0o022)
    try:
        saved = model.save(tmp_path / "shared")
    finally:
        os.umask(before)
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        assert (saved / name).stat().st_mode & 0o777 == 0o644, name
