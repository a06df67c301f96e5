"""Calibrated scores (issue 14): a Platt map fitted on val, stored with the model, applied by every
search, so `--min-score 0.5` means even odds on any model; uncalibrated models keep the similarity."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from cbir.calibration import Calibration, Embedded, Pairs, fit_platt, photo_pairs, reliability, scored_pairs
from cbir.cli import app
from cbir.datasets import load_dataset
from cbir.models import ModelError, load_model
from cbir.models.base import CONFIG_FILE, FORMAT_VERSION, WEIGHTS_FILE

runner = CliRunner()


def test_platt_recovers_a_known_logistic_map_and_its_ece_is_small():
    rng = np.random.default_rng(0)
    similarities = rng.uniform(-0.2, 0.8, 20_000)
    labels = (rng.random(len(similarities)) < 1 / (1 + np.exp(-(12 * similarities - 3)))).astype(float)
    pairs = Pairs(similarities, labels, np.ones(len(similarities)))
    slope, intercept = fit_platt(pairs)
    assert slope == pytest.approx(12, rel=0.1) and intercept == pytest.approx(-3, rel=0.1)
    ece, rows = reliability(Calibration(slope, intercept).probability(similarities), pairs)
    assert ece < 0.02
    assert sum(r["share"] for r in rows) == pytest.approx(1)
    constant, _ = reliability(np.full(len(similarities), 0.9), pairs)
    assert constant > 0.3  # a score that ignores the similarity is far from calibrated


@pytest.fixture(scope="module")
def trained(rsicd_slice_dir, tmp_path_factory):
    """A ridge model trained by `cbir train` on a slice with a val split, and one saved without."""
    root = tmp_path_factory.mktemp("calibration")
    result = runner.invoke(
        app, ["train", "-d", str(rsicd_slice_dir), "--method", "ridge", "--out", str(root / "ridge")]
    )
    assert result.exit_code == 0, result.output
    assert f"calibrated scores on {rsicd_slice_dir.name} val (" in result.output
    return root / "ridge", result.output


def test_train_with_a_val_split_stores_a_calibration_that_separates_matches(trained, rsicd_slice):
    model_dir, _ = trained
    config = json.loads((model_dir / CONFIG_FILE).read_text())
    assert config["format_version"] == FORMAT_VERSION == 3
    stored = config["calibration"]
    val = rsicd_slice.split("val")
    assert stored["split"] == "val" and stored["positives"] == len(val.captions)
    assert stored["negatives"] == 10 * len(val.captions) and stored["prior"] == 0.5
    model = load_model(model_dir)
    assert model.calibration == Calibration.from_json(stored)
    pairs = scored_pairs(model, val)
    probabilities = model.calibration.probability(pairs.similarities)
    matches, others = probabilities[pairs.labels == 1], probabilities[pairs.labels == 0]
    assert matches.mean() > 0.5 > others.mean()
    assert model.calibration.slope > 0  # a higher similarity is a likelier match


def test_photo_queries_have_their_own_curve_on_the_scale_of_sentences(trained, rsicd_slice):
    model = load_model(trained[0])
    c = model.calibration
    val = rsicd_slice.split("val")
    assert c.photo_slope > 0 and c.photo_pairs == 11 * len(val.images)  # itself and 10 others per photo
    assert "photo queries (" in trained[1]
    pairs = photo_pairs(Embedded.of(model, val), c)
    # The target of a pair: the text curve's mean P(match) of the query photo's captions with the other
    # photo. The photo curve meets it on average, and closer than the sentence curve does.
    photo = c.probability(pairs.similarities, photo_share=1.0)
    assert photo.mean() == pytest.approx(pairs.labels.mean(), abs=0.01)
    assert reliability(photo, pairs)[0] < reliability(c.probability(pairs.similarities), pairs)[0]
    own, others = photo[::11], np.delete(photo, np.s_[::11])
    assert own.mean() > 0.5 > others.mean()  # a photo matches a description of itself
    # Mixed queries blend the curves' log-odds by the photos' share of the query.
    x = np.array([0.1, 0.5])
    logit = lambda p: np.log(p / (1 - p))  # noqa: E731
    half = logit(c.probability(x, photo_share=0.5))
    assert half == pytest.approx((logit(c.probability(x)) + logit(c.probability(x, 1.0))) / 2, abs=1e-4)


def test_a_calibration_stored_before_photo_curves_scores_photo_queries_on_the_text_curve():
    old = Calibration.from_json({"method": "platt", "slope": 10.0, "intercept": -2.0})
    x = np.array([0.1, 0.3, 0.9])
    assert old.photo_slope is None
    np.testing.assert_array_equal(old.probability(x, photo_share=1.0), old.probability(x))
    with pytest.raises(ValueError, match="photo_slope"):
        Calibration.from_json({"method": "platt", "slope": 1, "intercept": 0, "photo_slope": "x"})


def strip_calibration(model_dir) -> None:
    """The model as cbir wrote it before calibration existed (format 2, no `calibration`)."""
    config = json.loads((model_dir / CONFIG_FILE).read_text())
    config.pop("calibration")
    config["format_version"] = 2
    (model_dir / CONFIG_FILE).write_text(json.dumps(config))


def test_uncalibrated_model_scores_by_cosine_with_a_note_then_cbir_calibrate_adds_it(
    trained, rsicd_slice_dir, tmp_path
):
    from cbir.index import build_index

    model_dir = shutil.copytree(trained[0], tmp_path / "model")
    strip_calibration(model_dir)
    weights = (model_dir / WEIGHTS_FILE).read_bytes()
    assert load_model(model_dir).calibration is None
    images = sorted(load_dataset(rsicd_slice_dir).split("test").images)[:12]
    photos = tmp_path / "photos"
    photos.mkdir()
    for path in images:
        shutil.copy(path, photos)
    ix = build_index(photos, tmp_path / "ix", model_dir, progress=False)
    query = "many planes are parked at the airport"
    raw = ix.search_text(query, k=5)
    assert not ix.calibrated and all(r.score == pytest.approx(r.similarity) for r in raw)
    result = runner.invoke(app, ["search", query, "--index", str(ix.path), "-k", "3"])
    assert result.exit_code == 0 and "no score calibration" in result.output, result.output

    result = runner.invoke(app, ["calibrate", "-m", str(model_dir), "-d", str(rsicd_slice_dir)])
    assert result.exit_code == 0, result.output
    assert (model_dir / WEIGHTS_FILE).read_bytes() == weights  # only config.json changed
    calibration = load_model(model_dir).calibration
    assert calibration is not None

    ix = build_index(photos, tmp_path / "ix", model_dir, progress=False)  # the model changed: re-embedded
    found = ix.search_text(query, k=12)
    assert ix.calibrated and [r.id for r in found] == [r.id for r in ix.search_text(query, k=12)]
    for r in found:
        assert 0 < r.score < 1 and r.score == pytest.approx(
            float(calibration.probability(r.similarity)), abs=1e-6
        )
    kept = runner.invoke(app, ["search", query, "--index", str(ix.path), "--min-score", "0.5", "--json"])
    assert kept.exit_code == 0, kept.output
    rows = json.loads(kept.stdout)
    assert [r["id"] for r in rows] == [r.id for r in found if r.score >= 0.5]
    assert "no score calibration" not in kept.output
    # A search by photo is scored by the photo curve, in Python and in the CLI alike.
    similar = ix.search_similar(found[0].id, k=12)
    assert similar[0].id == found[0].id
    for r in similar:
        assert r.score == pytest.approx(
            float(calibration.probability(r.similarity, photo_share=1.0)), abs=1e-6
        )
    by_photo = runner.invoke(app, ["search", "--image", str(photos / found[0].id), "--index", str(ix.path),
                                   "-k", "12", "--json"])  # fmt: skip
    assert [r["score"] for r in json.loads(by_photo.stdout)] == pytest.approx(
        [r.score for r in similar], abs=1e-5
    )
    # Feedback alone is photos only; a sentence plus a photo at weight 1 is half and half.
    for found_by, share in ((ix.find(None, more_like=[found[0].id], k=3), 1.0),
                            (ix.find(f"{query} + id:{found[1].id}", k=3), 0.5)):  # fmt: skip
        expected = calibration.probability([r.similarity for r in found_by], share)
        assert [r.score for r in found_by] == pytest.approx(list(expected), abs=1e-6)


def test_calibrate_errors_are_one_line(trained, tmp_path):
    result = runner.invoke(app, ["calibrate", "-m", str(trained[0]), "-d", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    bad = shutil.copytree(trained[0], tmp_path / "bad")
    config = json.loads((bad / CONFIG_FILE).read_text())
    config["calibration"] = {"method": "platt", "slope": "steep", "intercept": 0}
    (bad / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(ModelError, match="calibration"):
        load_model(bad)
    result = runner.invoke(app, ["calibrate", "-m", str(bad), "-d", str(tmp_path)])
    assert result.exit_code == 2 and "calibration" in result.output and "Traceback" not in result.output


def test_the_zero_shot_model_is_calibrated_by_the_file_the_package_keeps(
    flickr8k_slice_dir, tmp_path, monkeypatch
):
    """The zero-shot model has no directory: `cbir calibrate --model zero-shot` writes the package's
    calibration file, and every load of the model by name scores through it; a damaged file is an error
    that names it and the command that rebuilds it."""
    import cbir.models

    target = tmp_path / "zero_shot_calibration.json"
    monkeypatch.setattr(cbir.models, "ZERO_SHOT_CALIBRATION", target)
    assert load_model("zero-shot").calibration is None  # no file: raw similarities, as before
    result = runner.invoke(app, ["calibrate", "-m", "zero-shot", "-d", str(flickr8k_slice_dir)])
    assert result.exit_code == 0, result.output
    assert str(target) in "".join(result.output.split())
    calibration = load_model("zero-shot").calibration
    assert calibration is not None and calibration.dataset == flickr8k_slice_dir.name
    assert calibration == Calibration.from_json(json.loads(target.read_text()))
    assert calibration.photo_slope is not None  # photo queries get their own curve too
    target.write_text('{"method": "platt", "slope": "steep"}')
    with pytest.raises(ModelError, match="zero_shot_calibration.json.*make default-model"):
        load_model("zero-shot")


def test_the_shipped_zero_shot_model_scores_as_p_match():
    calibration = load_model("zero-shot").calibration
    assert calibration is not None and calibration.dataset == "flickr8k" and calibration.split == "val"
    scores = calibration.probability(np.array([-1.0, 0.0, 1.0]))
    assert 0 <= scores[0] < scores[1] < scores[2] <= 1


def test_a_zero_shot_index_scores_through_the_packaged_calibration_and_follows_it(
    flickr8k_slice_dir, tmp_path, monkeypatch
):
    """Indexes keep a copy of their model: the zero-shot copy carries the package's calibration, and a
    new calibration (`cbir calibrate --model zero-shot`) reaches the index on its next update."""
    import cbir.models
    from cbir.index import update_index

    shipped = json.loads(cbir.models.ZERO_SHOT_CALIBRATION.read_text())
    target = tmp_path / "zero_shot_calibration.json"
    target.write_text(json.dumps(shipped))
    monkeypatch.setattr(cbir.models, "ZERO_SHOT_CALIBRATION", target)
    photos = tmp_path / "photos"
    photos.mkdir()
    for path in load_dataset(flickr8k_slice_dir).split("test").images[:12]:
        shutil.copy(path, photos)
    ix, _ = update_index(photos, tmp_path / "ix", "zero-shot", progress=False)
    first = ix.search_text("a dog runs on the grass", k=3)
    calibration = Calibration.from_json(shipped)
    assert ix.calibrated and all(
        r.score == pytest.approx(float(calibration.probability(r.similarity)), abs=1e-6) for r in first
    )
    target.write_text(json.dumps({**shipped, "intercept": shipped["intercept"] + 2.0}))
    ix, _ = update_index(photos, tmp_path / "ix", "zero-shot", progress=False)
    again = ix.search_text("a dog runs on the grass", k=3)
    assert [r.id for r in again] == [r.id for r in first]
    assert all(b.score > a.score for a, b in zip(first, again, strict=True))  # the new curve is in use


def test_training_calibrates_the_model_as_it_is_saved(flickr8k_slice_dir, tmp_path):
    """int8 weights score a little differently from the float32 ones just fitted: the stored curve
    must be the one `cbir calibrate` fits on the saved model, not one of a model nobody loads."""
    from cbir.calibration import calibrate, calibrate_if_possible
    from cbir.models import create_model

    data = load_dataset(flickr8k_slice_dir)
    quick = {"ensemble": 1, "epochs": 2, "batch_size": 64, "bank_size": 0, "zero_shot_weight": 0.0}
    model = create_model("contrastive", **quick, weights_dtype="int8")
    model.fit(data.split("train"), data.split("val"))
    calibrate_if_possible(model, data.split("val"))
    saved = load_model(model.save(tmp_path / "model"))
    refitted = calibrate(saved, data.split("val"), "val")
    assert (saved.calibration.slope, saved.calibration.intercept) == (refitted.slope, refitted.intercept)
    assert calibrate(model, data.split("val"), "val").slope != refitted.slope  # the float32 model differs
