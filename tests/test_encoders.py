"""Encoders on real images and captions: reference agreement, cache, views, broken files."""

import shutil
from collections import Counter

import numpy as np
import pytest

from cbir.encoders import ImageEncoder, TextEncoder, image_features
from cbir.encoders.cache import FeatureCache
from cbir.encoders.image import CACHE_LAYOUT, LOGITS_DIM, MODEL_ID, POOLED_DIM, STAGES_DIM, preprocess
from tests.conftest import KAGGLE_MINI


def test_text_encoder_matches_sentence_transformers(rsicd_slice):
    st = pytest.importorskip("sentence_transformers")
    from cbir.encoders.text import model_dir

    texts = rsicd_slice.captions[:20] + ["", "a black cat standing on a couch in a cluttered room"]
    ours = TextEncoder(cache=False).encode(texts, progress=False)
    ref = st.SentenceTransformer(str(model_dir()), device="cpu").encode(texts, normalize_embeddings=True)
    assert ours.shape == (22, 384)
    np.testing.assert_allclose(ours, ref, atol=1e-4)


@pytest.mark.parametrize("runtime", ["onnx", "torch"])
def test_bulk_text_encoding_matches_numpy(rsicd_slice, monkeypatch, runtime):
    """Bulk runs in ONNX Runtime (torch without it), in same-shape batches, with NumPy's outputs."""
    from cbir.encoders import text
    from cbir.encoders.text import MiniLM

    if runtime == "onnx":
        pytest.importorskip("onnxruntime")
    texts = rsicd_slice.captions[:30] + ["a dog", "a dog running on the beach with a red ball in its mouth"]
    one_by_one = np.concatenate([TextEncoder(cache=False).encode([t], progress=False) for t in texts])
    bulk_batches = []
    forward = getattr(MiniLM, f"forward_{runtime}")
    monkeypatch.setattr(MiniLM, f"forward_{runtime}", lambda m, ids, mask: bulk_batches.append(len(ids)) or
                        forward(m, ids, mask))  # fmt: skip
    monkeypatch.setattr(text, "BULK", 16)
    bulk = TextEncoder(cache=False, batch_size=8, runtime=runtime).encode(texts, progress=False)
    assert set(bulk_batches) == {text.BULK_ROWS}  # same-shape batches, the last of a length filled up
    per_length = Counter(len(ids) for ids in TextEncoder(cache=False).token_ids(list(dict.fromkeys(texts))))
    assert len(bulk_batches) == sum(-(-count // text.BULK_ROWS) for count in per_length.values())
    assert np.abs(bulk - one_by_one).max() <= 1e-4


def test_minilm_weights_are_mapped_not_copied(rsicd_slice):
    """The weights are read-only views of the mapped file, equal to what safetensors reads, and the
    transposed views give the embeddings of contiguous copies (a cold search no longer copies 91 MB)."""
    from safetensors.numpy import load_file

    from cbir.encoders.text import MiniLM, mapped_safetensors, model_dir

    file = model_dir() / "model.safetensors"
    mapped, read = mapped_safetensors(file), load_file(file)
    assert mapped.keys() == read.keys()
    for name, array in mapped.items():
        assert array.dtype == read[name].dtype and not array.flags.writeable and not array.flags.owndata
        np.testing.assert_array_equal(array, read[name])
    encoder = TextEncoder(cache=False)
    texts = rsicd_slice.captions[:10]
    views = np.concatenate([encoder.encode([t], progress=False) for t in texts])
    model = encoder._model
    assert isinstance(model, MiniLM)
    assert not model.w["encoder.layer.0.intermediate.dense.weight"].flags.c_contiguous  # a view
    model.w = {k: np.ascontiguousarray(v) for k, v in model.w.items()}
    copies = np.concatenate([encoder.encode([t], progress=False) for t in texts])
    np.testing.assert_allclose(views, copies, rtol=0, atol=1e-6)


def test_weights_in_a_type_the_mapped_reader_cannot_take_are_a_clear_error(tmp_path):
    from safetensors.numpy import save_file

    from cbir.encoders.text import mapped_safetensors

    file = tmp_path / "w.safetensors"
    save_file({"ok": np.zeros(3, np.float32), "bytes": np.zeros(3, np.uint8)}, str(file))
    with pytest.raises(ValueError, match=r"w\.safetensors: tensor bytes is U8"):
        mapped_safetensors(file)


def test_repeated_text_is_encoded_once_whatever_batch_it_lands_in():
    """Without the padding of a longer neighbour, a repeat in another batch would differ in the last
    bits, and a rerun from the cache (which keeps one row per text) would train on other numbers."""
    long = "a very long caption about many small white boats moored in rows along a busy harbour at dusk"
    texts = ["a dog", "a cat", "a dog", long]  # batches of 2: [a dog, a cat], [a dog, long]
    encoder = TextEncoder(cache=False, batch_size=2)
    rows = encoder.encode(texts, progress=False)
    np.testing.assert_array_equal(rows[0], rows[2])
    np.testing.assert_array_equal(rows[[0, 1, 3]], encoder.encode(["a dog", "a cat", long], progress=False))


@pytest.mark.parametrize("runtime", ["onnx", "torch"])
def test_cached_rows_do_not_depend_on_what_else_a_run_encoded(tmp_path, rsicd_slice, runtime):
    """A cache filled piecemeal by other runs holds, to the bit, the rows that one run into an empty
    cache computes (with rows padded to their batch's longest, 1 in 10 differed in the last bits, and a
    retrain from a warm cache trained on other numbers than one from an empty cache)."""
    if runtime == "onnx":
        pytest.importorskip("onnxruntime")
    texts = list(dict.fromkeys(rsicd_slice.captions))[:200]
    fresh = TextEncoder(cache_dir=tmp_path / "fresh", runtime=runtime).encode(texts, progress=False)
    other_runs = TextEncoder(cache_dir=tmp_path / "warm", runtime=runtime)
    other_runs.encode(
        texts[::3] + ["a dog", "a dog running on the beach with a red ball in its mouth"], progress=False
    )
    other_runs.encode(texts[50:150], progress=False)
    warm = TextEncoder(cache_dir=tmp_path / "warm", runtime=runtime).encode(texts, progress=False)
    np.testing.assert_array_equal(warm, fresh)


def test_text_encoder_cache_roundtrip(tmp_path, rsicd_slice):
    texts = rsicd_slice.captions[:100]
    enc = TextEncoder(cache_dir=tmp_path)
    first = enc.encode(texts, progress=False)
    again = TextEncoder(cache_dir=tmp_path)
    again._load = lambda: (_ for _ in ()).throw(AssertionError("cache miss: model was loaded"))
    np.testing.assert_array_equal(again.encode(texts, progress=False), first)


def test_image_encoder_features_cache_and_classes(tmp_path):
    paths = sorted((KAGGLE_MINI / "images_train").glob("*.jpg"), key=lambda p: int(p.stem))[:12]
    enc = ImageEncoder(cache_dir=tmp_path)
    feats = enc.encode(paths, progress=False)
    assert feats.pooled.shape == (12, POOLED_DIM) and feats.logits.shape == (12, LOGITS_DIM)
    assert feats.stages.shape == (12, STAGES_DIM) and np.isfinite(feats.stages).all()
    assert not feats.failed and np.isfinite(feats.pooled).all()
    # the 320 channels of the last stage (before the 1x1 head conv) differ from image to image
    assert feats.stages[:, -320:].std(0).mean() > 0.01
    # images_train/1.jpg is a man cross-country skiing: ImageNet class 795 is "ski"
    assert 795 in np.argsort(feats.logits[1])[-3:]
    again = ImageEncoder(cache_dir=tmp_path)
    again._network = lambda bulk=True: (_ for _ in ()).throw(AssertionError("cache miss: network was loaded"))
    cached = again.encode(paths, progress=False)
    np.testing.assert_array_equal(cached.pooled, feats.pooled)
    np.testing.assert_array_equal(cached.stages, feats.stages)
    on_disk = FeatureCache(f"{MODEL_ID}/{CACHE_LAYOUT}/center", tmp_path)  # what a new process reads
    assert len(on_disk) == 12


def test_a_few_photos_run_the_network_untraced_with_the_features_of_the_traced_one(tmp_path, monkeypatch):
    """Tracing costs seconds before the first photo: a handful of photos skip it (BENCHMARKS.md,
    start-up), and get the features bulk work caches, to float precision."""
    from cbir.encoders import image

    paths = sorted((KAGGLE_MINI / "images_train").glob("*.jpg"), key=lambda p: int(p.stem))[:2]
    asked = []
    real = image.load_network
    monkeypatch.setattr(
        image, "load_network", lambda traced=True, *rest: asked.append(traced) or real(traced, *rest)
    )
    few = ImageEncoder(cache=False, runtime="torch").encode(paths, progress=False)
    assert asked == [False]
    encoder = ImageEncoder(cache=False, runtime="torch")
    bulk = encoder._forward(np.stack([preprocess(p.read_bytes()) for p in paths]), bulk=True)
    assert asked == [False, True]
    np.testing.assert_allclose(few.rows, bulk, rtol=1e-4, atol=1e-4)
    encoder._forward(np.stack([preprocess(paths[0].read_bytes())]), bulk=False)
    assert asked == [False, True]  # the traced network, once there, serves small batches too


def test_views_are_deterministic_and_distinct():
    data = (KAGGLE_MINI / "images_train" / "0.jpg").read_bytes()
    center = preprocess(data)
    assert center.shape == (224, 224, 3)
    np.testing.assert_array_equal(preprocess(data, "hflip"), center[:, ::-1])
    assert not np.array_equal(preprocess(data, "crop-tl"), center)
    np.testing.assert_array_equal(preprocess(data, "crop-tl"), preprocess(data, "crop-tl"))
    with pytest.raises(ValueError, match="unknown view"):
        preprocess(data, "sideways")


def test_broken_images_are_reported_and_skipped(tmp_path):
    good = KAGGLE_MINI / "images_train" / "0.jpg"
    shutil.copy(good, tmp_path / "good.jpg")
    (tmp_path / "truncated.jpg").write_bytes(good.read_bytes()[:2000])
    (tmp_path / "garbage.png").write_bytes(b"this is not a png")
    paths = [
        tmp_path / "good.jpg",
        tmp_path / "truncated.jpg",
        tmp_path / "garbage.png",
        tmp_path / "gone.jpg",
    ]
    feats = ImageEncoder(cache_dir=tmp_path / "cache").encode(paths, progress=False)
    assert sorted(feats.failed) == [1, 2, 3]
    assert "not a readable image" in feats.failed[1] and feats.failed[3].startswith("cannot read")
    assert feats.keys[0] and feats.keys[1] and not feats.keys[3]  # content keys of what could be read
    assert feats.ok.tolist() == [True, False, False, False]
    assert np.abs(feats.pooled[0]).sum() > 0 and not feats.pooled[1:].any()


def test_image_features_prefers_precomputed_only_when_asked(kaggle_mini):
    with pytest.raises(ValueError, match="does not have"):
        image_features(kaggle_mini, "resnet2048")
    with pytest.raises(ValueError, match="unknown image representation"):
        image_features(kaggle_mini, "vgg")


def test_feature_kind_table_is_what_the_encoder_and_readers_use(kaggle_mini):
    from cbir.datasets.kaggle import FEATURE_FILES
    from cbir.feature_kinds import COMPUTED_DIM, COMPUTED_KINDS, FEATURE_KINDS, computed_columns

    # the computed kinds tile the encoder's row exactly, in table order
    assert [computed_columns(k).start for k in COMPUTED_KINDS] == [0, POOLED_DIM, POOLED_DIM + LOGITS_DIM]
    assert computed_columns(COMPUTED_KINDS[-1]).stop == COMPUTED_DIM == POOLED_DIM + LOGITS_DIM + STAGES_DIM
    assert set(FEATURE_FILES) | set(COMPUTED_KINDS) == set(FEATURE_KINDS)
    rows = image_features(kaggle_mini.subset([0, 1]), "+".join(COMPUTED_KINDS), progress=False)
    assert rows.shape == (2, COMPUTED_DIM)
    np.testing.assert_array_equal(
        image_features(kaggle_mini.subset([0, 1]), "effnet-logits", progress=False),
        rows[:, POOLED_DIM:-STAGES_DIM],
    )
