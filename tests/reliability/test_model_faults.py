"""The model-directory fault matrix at the index: a damaged or inconsistent model is refused by
`cbir index` in one line naming the file (exit 2, no traceback), and the index it was meant to
replace keeps its model and answers searches as before."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from typer.testing import CliRunner

from cbir.cli import app
from cbir.index import SearchIndex, update_index
from cbir.models.base import CONFIG_FILE, FORMAT_VERSION, WEIGHTS_FILE
from tests.reliability.conftest import photos

runner = CliRunner()


def truncate(model_dir):
    weights = model_dir / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def shorten_largest_array(model_dir):
    arrays = load_file(str(model_dir / WEIGHTS_FILE))
    name = max(arrays, key=lambda k: arrays[k].size)
    save_file({**arrays, name: np.ascontiguousarray(arrays[name][:-1])}, str(model_dir / WEIGHTS_FILE))


def drop_largest_array(model_dir):
    arrays = load_file(str(model_dir / WEIGHTS_FILE))
    del arrays[max(arrays, key=lambda k: arrays[k].size)]
    save_file(arrays, str(model_dir / WEIGHTS_FILE))


def edit_config(change):
    def edit(model_dir):
        config = json.loads((model_dir / CONFIG_FILE).read_text())
        change(config)
        (model_dir / CONFIG_FILE).write_text(json.dumps(config))

    return edit


# fault -> (damage done to a copy of a good model directory, what the error names after the folder)
FAULTS = {
    "weights truncated": (truncate, f"/{WEIGHTS_FILE}"),
    "weights empty": (lambda d: (d / WEIGHTS_FILE).write_bytes(b""), f"/{WEIGHTS_FILE}"),
    "weights missing": (lambda d: (d / WEIGHTS_FILE).unlink(), f"/{WEIGHTS_FILE}"),
    "array of the wrong shape": (shorten_largest_array, f"/{WEIGHTS_FILE}"),
    "array missing": (drop_largest_array, f"/{WEIGHTS_FILE}"),
    "config missing": (lambda d: (d / CONFIG_FILE).unlink(), f": not a model directory (no {CONFIG_FILE})"),
    "config not JSON": (lambda d: (d / CONFIG_FILE).write_text('{"method": "zero-shot",'), f"/{CONFIG_FILE}"),
    "config of a newer format": (
        edit_config(lambda c: c.update(format_version=FORMAT_VERSION + 1)),
        f"/{CONFIG_FILE}",
    ),
    "unknown method": (edit_config(lambda c: c.update(method="nonesuch")), f"/{CONFIG_FILE}"),
    "params not an object": (edit_config(lambda c: c.update(params=[1, 2])), f"/{CONFIG_FILE}"),
    "unknown param": (edit_config(lambda c: c["params"].update(bogus=1)), f"/{CONFIG_FILE}"),
    "arrays list missing": (edit_config(lambda c: c.pop("arrays")), f"/{CONFIG_FILE}"),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory, zero_shot_dir):
    """A good index of ten real photos, built once; each case works on a copy."""
    base = tmp_path_factory.mktemp("model-faults")
    (base / "photos").mkdir()
    for p in photos(10):
        shutil.copy(p, base / "photos" / p.name)
    update_index(base / "photos", base / "ix", zero_shot_dir, progress=False)
    return base


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_damaged_model_is_refused_and_the_index_keeps_working(built, tmp_path, zero_shot_dir, fault):
    damage, named = FAULTS[fault]
    model = shutil.copytree(zero_shot_dir, tmp_path / "model")
    damage(model)
    index_dir = shutil.copytree(built / "ix", tmp_path / "ix")
    before = SearchIndex.open(index_dir).search_text("a dog", k=3)
    result = runner.invoke(app, ["index", str(built / "photos"), "--out", str(index_dir), "-m", str(model)])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert f"{model}{named}" in " ".join(result.output.split()), result.output
    after = SearchIndex.open(index_dir).search_text("a dog", k=3)
    assert [(r.id, round(r.score, 5)) for r in after] == [(r.id, round(r.score, 5)) for r in before]
