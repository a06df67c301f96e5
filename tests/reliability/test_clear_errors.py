"""Bad input ends in one clear line that names the file (exit 2), or in a report entry, never in a
traceback or silence."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from PIL import Image
from typer.testing import CliRunner

from cbir.cli import app
from cbir.datasets import DatasetError, load_dataset
from cbir.index import update_index
from tests.conftest import KAGGLE_MINI, write_karpathy_slice

runner = CliRunner()


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("filename", 17, "'filename' must be a string, not int"),
        ("sentences", "a plane on the runway", "'sentences' must be a list, not str"),
        ("sentences", ["a plane on the runway"], r"sentences\[0\]: expected an object with a string 'raw'"),
        ("split", ["train"], "'split' must be a string, not list"),
        ("tags", "airport", "'tags' must be a list, not str"),
    ],
)
def test_karpathy_entry_of_the_wrong_type_is_named(tmp_path, rsicd, key, value, message):
    data_dir = write_karpathy_slice(rsicd, tmp_path / "typed", 2)
    doc_path = next(data_dir.glob("dataset_*.json"))
    doc = json.loads(doc_path.read_text())
    doc["images"][3][key] = value
    doc_path.write_text(json.dumps(doc))
    with pytest.raises(DatasetError, match=rf"{doc_path}: {doc_path.name} images\[3\].*{message}"):
        load_dataset(data_dir)
    result = runner.invoke(
        app, ["train", "-d", str(data_dir), "--method", "ridge", "-o", str(tmp_path / "m")]
    )
    assert result.exit_code == 2 and "images[3]" in result.output and "Traceback" not in result.output


def test_broken_symlinks_are_reported_and_the_summary_counts_only_indexed(folder, tmp_path, zero_shot_dir):
    (folder / "dangling.jpg").symlink_to(folder / "gone.jpg")
    (folder / "loop.jpg").symlink_to(folder / "loop.jpg")
    (folder / "broken.jpg").write_bytes(b"not a jpeg at all")
    ix, report = update_index(folder, tmp_path / "ix", zero_shot_dir, progress=False)
    assert sorted(report.failed) == ["broken.jpg", "dangling.jpg", "loop.jpg"]
    assert report.failed["dangling.jpg"] == "broken symbolic link: No such file or directory"
    assert report.failed["loop.jpg"].startswith("broken symbolic link: Too many levels")
    assert len(ix) == 10 and len(report.added) == 10
    result = runner.invoke(
        app, ["index", str(folder), "--out", str(tmp_path / "ix2"), "-m", str(zero_shot_dir)]
    )
    assert result.exit_code == 0 and "indexed 10 images" in result.output and "added 10," in result.output
    assert "3 file(s) skipped" in result.output


def test_images_above_the_pixel_limit_are_skipped_by_name(folder, tmp_path, zero_shot_dir, monkeypatch):
    with Image.open(KAGGLE_MINI / "images_train" / "30.jpg") as im:
        rgb = im.convert("RGB")  # 224 x 224
    rgb.resize((448, 448)).save(folder / "flat.png")  # PNG: no reduced decoding, so the limit applies
    rgb.resize((2240, 2240)).save(folder / "huge.jpg", quality=80)  # decoded at 1/8: 280 x 280
    monkeypatch.setenv("CBIR_MAX_PIXELS", str(100_000))
    ix, report = update_index(folder, tmp_path / "ix", zero_shot_dir, progress=False)
    assert list(report.failed) == ["flat.png"]
    assert "pixels is above the limit of 100,000 (set CBIR_MAX_PIXELS" in report.failed["flat.png"]
    assert "huge.jpg" in ix  # a JPEG decodes at 1/8 scale: under the limit


def test_file_name_that_is_not_utf8_survives_cli_search(folder, tmp_path, zero_shot_dir):
    name = os.fsdecode(b"caf\xe9-\xff.jpg")  # Latin-1 bytes: not valid UTF-8
    shutil.copy(KAGGLE_MINI / "images_train" / "3.jpg", folder / name)
    runner.invoke(app, ["index", str(folder), "--out", str(tmp_path / "ix"), "-m", str(zero_shot_dir)])
    query = ["search", "--image", str(folder / name), "--index", str(tmp_path / "ix"), "-k", "1"]
    result = runner.invoke(app, query)
    assert result.exit_code == 0, result.output
    assert result.stdout.split()[-1] == str(folder) + "/caf\\xe9-\\xff.jpg"
    result = runner.invoke(app, [*query, "--json"])
    assert result.exit_code == 0 and os.fsencode(json.loads(result.stdout)[0]["path"]).endswith(
        b"\xe9-\xff.jpg"
    )
