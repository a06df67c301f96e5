"""The classical family (issue 3) on real slices: every mapping and representation, persistence,
hyperparameter selection, fusion, and the Kaggle submission writer."""

from __future__ import annotations

import csv
import dataclasses

import numpy as np
import pytest
from typer.testing import CliRunner

from cbir.cli import app
from cbir.datasets import DatasetError
from cbir.encoders import image_features
from cbir.evaluation import evaluate, score_split
from cbir.models import ModelError, create_model, load_model
from cbir.models.classical.text_features import Analyzer, TextFeaturizer, glove_vectors
from cbir.submission import read_submission, score_submission, write_submission
from tests.conftest import KAGGLE_MINI

runner = CliRunner()

# (method, params): together they cover every mapping, direction, metric and representation.
CONFIGS = [
    ("ridge", {}),
    ("ridge", {"text_features": "tfidf+word2vec", "ngrams": 2, "direction": "image-to-text"}),
    ("kernel-ridge", {"image_features": "effnet-pool+effnet-logits"}),
    ("kernel-ridge", {"kernel": "poly", "direction": "text-to-image"}),
    ("cca", {"text_features": "minilm+bow"}),
    ("pls", {"text_features": "glove", "metric": "euclidean"}),
]


@pytest.fixture(scope="module")
def fitted(rsicd_slice, tmp_path_factory):
    """Every config fitted once on the slice's train split (val picks hyperparameters), and saved."""
    root = tmp_path_factory.mktemp("classical")
    out = {}
    for i, (method, params) in enumerate(CONFIGS):
        model = create_model(method, **params).fit(rsicd_slice.split("train"), rsicd_slice.split("val"))
        out[i] = (model, model.save(root / f"{method}-{i}"))
    return out


@pytest.mark.parametrize("i", range(len(CONFIGS)), ids=[f"{m}-{i}" for i, (m, _) in enumerate(CONFIGS)])
def test_each_method_retrieves_and_round_trips(fitted, rsicd_slice, i):
    model, path = fitted[i]
    metrics = evaluate(model, rsicd_slice, "test")
    # chance over 40 test images: t2i R@10 = 25, mR about 12
    assert metrics["t2i_r10"] > 40 and metrics["mR"] > 20, metrics
    loaded = load_model(path)
    test = rsicd_slice.split("test")
    np.testing.assert_allclose(score_split(loaded, test), score_split(model, test), rtol=1e-5, atol=1e-5)
    assert loaded.hyperparameters_ == model.hyperparameters_


def test_hyperparameters_come_from_the_validation_grid(fitted):
    model, _ = fitted[4]  # cca
    grid = model.selection_
    assert (
        len(grid) == 12
        and max(grid, key=lambda c: c["mR"])["n_components"] == model.hyperparameters_["n_components"]
    )


def test_euclidean_metric_ranks_by_distance(fitted, rsicd_slice):
    model, _ = fitted[5]  # pls, euclidean; images are its source side, captions its target side
    test = rsicd_slice.split("test")
    query = model.map_.embed_target(model.text_.transform(test.captions[:12]))
    items = model.map_.embed_source(model.image_.transform(test))
    dist = ((query[:, None, :] - items[None, :, :]) ** 2).sum(-1)
    scores = score_split(model, test)[:12]
    np.testing.assert_array_equal(np.argsort(-scores, axis=1)[:, :5], np.argsort(dist, axis=1)[:, :5])


def test_text_representations(rsicd_slice):
    analyse = Analyzer(stem=True, stop_words=True, ngrams=2)
    assert analyse("The Buildings are near a green river") == [
        "build",
        "near",
        "green",
        "river",
        "build near",
        "near green",
        "green river",
    ]
    captions = rsicd_slice.split("train").captions
    a = TextFeaturizer("word2vec", seed=3).fit(captions)
    b = TextFeaturizer("word2vec", seed=3).fit(captions)
    np.testing.assert_array_equal(a.w2v_vectors, b.w2v_vectors)  # reproducible with a seed
    row_of, table = glove_vectors()
    glove = TextFeaturizer("glove").transform(["river bridge"])
    expected = (table[row_of["river"]] + table[row_of["bridge"]]) / 2
    np.testing.assert_allclose(glove[0], expected / np.linalg.norm(expected), rtol=1e-5)
    from sklearn.feature_extraction.text import TfidfVectorizer

    tfidf = TextFeaturizer("tfidf").fit(captions)
    ref = TfidfVectorizer(analyzer=tfidf.analyzer, max_features=4096, sublinear_tf=True).fit(captions)
    order = [ref.vocabulary_[t] for t in sorted(tfidf.vocabulary, key=tfidf.vocabulary.get)]
    np.testing.assert_allclose(
        tfidf.transform(captions[:20]), ref.transform(captions[:20]).toarray()[:, order], atol=1e-6
    )
    from sklearn.decomposition import TruncatedSVD

    lsa = TextFeaturizer("lsa", lsa_dim=16).fit(captions)  # same vectoriser, then a rank-16 SVD
    svd = TruncatedSVD(16, random_state=0).fit(ref.transform(captions))
    expected = svd.transform(ref.transform(captions[:20]))
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    assert lsa.transform(captions[:20]).shape == (20, 16)
    np.testing.assert_allclose(lsa.transform(captions[:20]), expected, atol=1e-5)


def test_parameters_are_checked():
    with pytest.raises(ModelError, match="no direction"):
        create_model("cca", direction="text-to-image")
    with pytest.raises(ModelError, match="not a parameter of ridge"):
        create_model("ridge", gamma=0.5)
    with pytest.raises(ValueError, match="unknown text representation"):
        create_model("ridge", text_features="minilm+elmo")


def test_kfold_selection_without_validation_is_seeded(kaggle_mini):
    train = kaggle_mini.split("train")
    a = create_model("ridge", text_features="minilm+tfidf", image_features="effnet-pool+tags").fit(train)
    b = create_model("ridge", text_features="minilm+tfidf", image_features="effnet-pool+tags").fit(train)
    assert len(a.selection_) == 4 and a.hyperparameters_ == b.hyperparameters_
    test = kaggle_mini.split("test")
    np.testing.assert_array_equal(score_split(a, test), score_split(b, test))


def test_fusion_is_the_weighted_sum_of_its_members(rsicd_slice, fitted, tmp_path):
    train, val, test = (rsicd_slice.split(s) for s in ("train", "val", "test"))
    members = [str(fitted[0][1]), {"method": "cca", "n_components": 64, "reg": 0.1, "power": 4}]
    fused = create_model("fusion", members=members, step=0.25).fit(train, val)
    # every weighting on the 0.25 grid was tried, the one-hot ones included; the best on val is kept
    by_weights = {tuple(s["weights"]): s["mR"] for s in fused.selection_}
    assert set(by_weights) == {(w, 1.0 - w) for w in (0.0, 0.25, 0.5, 0.75, 1.0)}
    assert min(by_weights.values()) < max(by_weights.values())
    assert by_weights[tuple(fused.weights_)] == max(by_weights.values())
    expected = sum(w * score_split(m, test) for w, m in zip(fused.weights_, fused.members_, strict=True))
    np.testing.assert_allclose(score_split(fused, test), expected, atol=1e-5)
    again = load_model(fused.save(tmp_path / "fusion"))
    np.testing.assert_allclose(score_split(again, test), score_split(fused, test), atol=1e-6)
    with pytest.raises(ModelError, match="at least two"):
        create_model("fusion", members=members[:1])


@pytest.fixture(scope="module")
def kaggle_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("kaggle") / "ridge"
    result = runner.invoke(app, ["train", "-d", str(KAGGLE_MINI), "--method", "ridge", "-o", str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_submission_format_and_score_match_evaluate(kaggle_model, kaggle_mini, tmp_path):
    out = tmp_path / "submission.csv"
    result = runner.invoke(app, ["submit", "-m", str(kaggle_model), "-d", str(KAGGLE_MINI), "-o", str(out)])
    assert result.exit_code == 0, result.output
    rows = list(csv.reader(out.open()))
    assert rows[0] == ["Descritpion_ID", "Top_20_Image_IDs"] and len(rows) == 80
    assert [r[0] for r in rows[1:]] == [f"{i}.txt" for i in range(79)]
    test_names = {p.name for p in kaggle_mini.split("test").images}
    for _, ranked in rows[1:]:
        names = ranked.split(" ")
        assert len(names) == 20 and len(set(names)) == 20 and set(names) <= test_names
    # scoring the written file the competition's way gives what `cbir evaluate` reports
    metrics = evaluate(load_model(kaggle_model), kaggle_mini, "test")
    assert score_submission(out, KAGGLE_MINI / "answers_test.csv") == pytest.approx(
        metrics["map20"], abs=1e-9
    )
    assert f"MAP@20 against {KAGGLE_MINI / 'answers_test.csv'}: {metrics['map20']:.4f}" in result.output


def test_submission_follows_descriptions_not_file_order(kaggle_model, kaggle_mini, tmp_path):
    """Test descriptions are shuffled against images: rows follow the description, whatever order
    the descriptions are read in."""
    model = load_model(kaggle_model)
    first = read_submission(write_submission(model, kaggle_mini, tmp_path / "a.csv"))
    order = np.random.default_rng(0).permutation(len(kaggle_mini.captions))
    shuffled = dataclasses.replace(
        kaggle_mini,
        captions=[kaggle_mini.captions[j] for j in order],
        caption_image=kaggle_mini.caption_image[order],
        caption_ids=[kaggle_mini.caption_ids[j] for j in order],
        caption_split=[kaggle_mini.caption_split[j] for j in order],
        augmented=None,
    )
    assert read_submission(write_submission(model, shuffled, tmp_path / "b.csv")) == first
    text = " ".join((KAGGLE_MINI / "descriptions_test" / "7.txt").read_text().split())
    test = kaggle_mini.split("test")
    best = np.argmax(model.score(model.embed_texts([text]), model.embed_images(test))[0])
    assert first["7.txt"][0] == test.images[best].name


def test_submission_errors_name_the_problem(kaggle_model, rsicd_slice_dir, tmp_path):
    r = runner.invoke(
        app, ["submit", "-m", str(kaggle_model), "-d", str(rsicd_slice_dir), "-o", str(tmp_path / "s.csv")]
    )
    assert r.exit_code == 2 and "no test descriptions" in r.output and "Traceback" not in r.output
    bad = tmp_path / "bad.csv"
    bad.write_text("Descritpion_ID,Top_20_Image_IDs\n0.txt,1.jpg 2.jpg 1.jpg\n")
    with pytest.raises(DatasetError, match=r"bad.csv:2: expected 20 distinct"):
        read_submission(bad)


def test_fusion_with_fixed_weights_adds_its_members_scores(rsicd_slice):
    """Weights given: no selection, weights normalised, a zero weight drops its member."""
    train, test = rsicd_slice.split("train"), rsicd_slice.split("test")
    members = [
        {"method": "ridge", "alpha": 10.0},
        {"method": "cca", "n_components": 16, "reg": 0.1, "power": 1.0},
    ]
    fused = create_model("fusion", members=members, weights=[3, 1]).fit(train)
    assert fused.weights_ == [0.75, 0.25] and fused.selection_ == []
    ridge, cca = fused.members_
    expected = 0.75 * score_split(ridge, test) + 0.25 * score_split(cca, test)
    np.testing.assert_allclose(score_split(fused, test), expected, atol=1e-5)
    only_ridge = create_model("fusion", members=members, weights=[1, 0]).fit(train)
    assert len(only_ridge.members_) == 1
    np.testing.assert_allclose(score_split(only_ridge, test), score_split(ridge, test), atol=1e-5)
    for bad in ([0, 0], [1, -1], [1, "a"]):
        with pytest.raises(ModelError, match="weights must be non-negative numbers, not all zero"):
            create_model("fusion", members=members, weights=bad)


def test_models_on_the_kaggle_resnet_csv_features(tmp_path, kaggle_mini, monkeypatch):
    """With the Kaggle layout's ResNet CSVs present, `auto` trains, evaluates and submits on them and
    reads no image file. The CSVs hold informative stand-ins (the photos' EfficientNet features)."""
    import json
    import shutil

    import cbir.encoders.image as image_module
    from cbir.datasets.kaggle import FEATURE_FILES

    root = shutil.copytree(KAGGLE_MINI, tmp_path / "kaggle")
    for split in ("train", "test"):
        part = kaggle_mini.split(split)
        effnet = np.asarray(image_features(part, "effnet-pool+effnet-logits", progress=False))
        (root / f"features_{split}").mkdir()
        for stem, width in FEATURE_FILES.values():
            rows = [
                f"images_{split}/{p.name}," + ",".join(f"{v:.5f}" for v in effnet[i, :width])
                for i, p in enumerate(part.images)
            ]
            (root / f"features_{split}" / f"{stem}_{split}.csv").write_text("\n".join(rows) + "\n")

    def no_image_reads(path):
        raise AssertionError(f"read {path}: the precomputed features should have been used")

    monkeypatch.setattr(image_module, "read_image_file", no_image_reads)
    out = tmp_path / "ridge"
    result = runner.invoke(app, ["train", "-d", str(root), "--method", "ridge", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["state"]["representation"] == "resnet2048"
    result = runner.invoke(app, ["evaluate", "-m", str(out), "-d", str(root), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["map20"] > 0.1  # chance is about 0.045
    result = runner.invoke(app, ["submit", "-m", str(out), "-d", str(root), "-o", str(tmp_path / "s.csv")])
    assert result.exit_code == 0 and "MAP@20" in result.output, result.output
    from cbir.datasets import load_dataset

    data = load_dataset(root)
    deep = create_model("contrastive", epochs=2, ensemble=1, hidden=64, embed_dim=64).fit(data.split("train"))
    assert deep.representation_ == "resnet2048"
    assert score_split(deep, data.split("test")).shape == (79, 79)
