"""No confident wrong answers: degenerate training is refused, NaN never scores well, and readers
report what they could not understand instead of guessing."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cbir.cli import app
from cbir.datasets import DatasetError, load_dataset
from cbir.encoders.image import preprocess
from cbir.metrics import image_to_text_ranks, retrieval_metrics, text_to_image_ranks
from tests.conftest import KAGGLE_MINI, write_karpathy_slice

runner = CliRunner()
IMAGES = KAGGLE_MINI / "images_train"


def real_captions(n_images: int) -> list[tuple[str, str]]:
    """(image file name, caption) pairs of cs5785-mini, five captions an image."""
    pairs = []
    for i in range(n_images):
        lines = (KAGGLE_MINI / "descriptions_train" / f"{i}.txt").read_text().splitlines()
        pairs += [(f"{i}.jpg", line.strip()) for line in lines if line.strip()]
    return pairs


def test_nan_scores_rank_last_not_first():
    nan = np.full((30, 30), np.nan)  # a diverged model: every score NaN
    assert (text_to_image_ranks(nan, np.arange(30)) == 29).all()
    assert (image_to_text_ranks(nan, np.arange(30)) == 29).all()
    metrics = retrieval_metrics(nan, np.arange(30))
    assert metrics["mR"] == 0.0 and metrics["map20"] == 0.0 and metrics["medr"] == 30.0
    scores = np.array([[np.nan, 0.1, 0.2], [0.3, 0.9, np.nan]])
    # caption 0's truth is NaN: last; caption 1's truth beats the NaN and the 0.3
    assert text_to_image_ranks(scores, np.array([0, 1])).tolist() == [2, 0]


def test_training_on_no_captions_is_refused_by_name(tmp_path, rsicd):
    data_dir = write_karpathy_slice(rsicd, tmp_path / "nocaps", 4)
    doc_path = next(data_dir.glob("dataset_*.json"))
    doc = json.loads(doc_path.read_text())
    for entry in doc["images"]:
        entry["sentences"] = []
    doc_path.write_text(json.dumps(doc))
    result = runner.invoke(
        app, ["train", "-d", str(data_dir), "--method", "ridge", "-o", str(tmp_path / "m")]
    )
    assert result.exit_code == 2
    assert f"{data_dir}: the train split has no captions paired with images" in result.output
    assert not (tmp_path / "m").exists()


def test_training_that_diverges_saves_nothing(tmp_path):
    out = tmp_path / "m"
    args = ["train", "-d", str(KAGGLE_MINI), "--method", "autoencoder", "-o", str(out), "-p", "lr=1e12"]
    result = runner.invoke(app, [*args, "--epochs", "1"])
    assert result.exit_code == 2 and "diverged (NaN/inf in" in result.output
    assert not out.exists()


def test_captions_csv_unclosed_quote_names_the_line(tmp_path):
    pairs = real_captions(8)
    lines = ["image,caption", *(f"{name},{text}" for name, text in pairs)]
    name, text = pairs[4]
    lines[5] = f'{name},"{text}'  # line 6: the quote is never closed
    (tmp_path / "captions.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "images").mkdir()
    for i in range(8):
        (tmp_path / "images" / f"{i}.jpg").symlink_to(IMAGES / f"{i}.jpg")
    with pytest.raises(DatasetError, match=rf"{tmp_path / 'captions.txt'}:6: unclosed quote"):
        load_dataset(tmp_path)
    result = runner.invoke(app, ["evaluate", "-m", str(tmp_path), "-d", str(tmp_path)])
    assert result.exit_code == 2


def test_unknown_karpathy_split_is_reported_with_the_known_ones(tmp_path, rsicd):
    data_dir = write_karpathy_slice(rsicd, tmp_path / "typo", 3)
    doc_path = next(data_dir.glob("dataset_*.json"))
    doc = json.loads(doc_path.read_text())
    for entry in doc["images"][:2]:
        entry["split"] = "tset"
    doc_path.write_text(json.dumps(doc))
    data = load_dataset(data_dir)
    assert data.splits.count("tset") == 2
    (note,) = [s for s in data.report.skipped if "tset" in s]
    assert note.startswith(f"{doc_path}: split 'tset' (2 image(s)) is none of train, val, test, restval")


def test_16_bit_greyscale_png_keeps_its_tones():
    with Image.open(IMAGES / "3.jpg") as im:
        grey8 = np.asarray(im.convert("L"))
    files = {}
    for name, array in (("8-bit", grey8), ("16-bit", grey8.astype(np.uint16) * 257)):
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, "PNG")
        files[name] = buf.getvalue()
    with Image.open(io.BytesIO(files["16-bit"])) as im:
        assert im.mode.startswith("I")  # really a deep greyscale file
    deep, shallow = preprocess(files["16-bit"]), preprocess(files["8-bit"])
    assert abs(float(deep.mean()) - float(shallow.mean())) < 1.0
    assert float(deep.mean()) < 200  # not the near-white of clipping
