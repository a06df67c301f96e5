"""Tuning MiniLM's last layers with the contrastive heads (issue 15, partial fine-tuning): the tunable
layers start as the packaged ones, tuning on a Flickr8k slice improves val mR over the frozen heads
(seeded), and a tuned model saves, loads and embeds captions identically on every path."""

import numpy as np
import pytest
import torch

from cbir.datasets import load_dataset
from cbir.encoders import text
from cbir.encoders.text import MiniLM, TextEncoder, padded, torch_encoder_layer, torch_mean_pool
from cbir.models import ModelError, create_model, load_model

CAPTIONS = [
    "A black dog runs along the beach .",
    "Two children are playing in the snow",
    "a man in a red jacket climbs a rock wall while another man watches from below",
]
QUICK = {"ensemble": 1, "epochs": 10, "batch_size": 64, "bank_size": 0, "zero_shot_weight": 0.0}


def test_tunable_top_layers_start_as_the_packaged_network():
    encoder = TextEncoder(cache=False)
    network = encoder.network()
    ids, mask = padded(encoder.token_ids(CAPTIONS))
    for top in (1, 2):
        (states,) = network.token_states([(ids, mask)], network.layers - top)
        with torch.no_grad():
            pooled = network.tunable_top(top)(torch.from_numpy(states), torch.from_numpy(mask)).numpy()
        np.testing.assert_allclose(pooled, network(ids, mask), atol=1e-5)


def test_packed_top_layers_train_as_the_padded_ones():
    """Packed tokens (padding skipped outside attention) give the padded layers' outputs and gradients."""
    encoder = TextEncoder(cache=False)
    network = encoder.network()
    ids, mask = padded(encoder.token_ids(CAPTIONS))  # three lengths: padding in two rows
    (states,) = network.token_states([(ids, mask)], network.layers - 2)
    x, keep = torch.from_numpy(states), torch.from_numpy(mask)
    top = network.tunable_top(2)
    w = {name.replace("/", "."): v for name, v in top.params.items()}

    def padded_top():
        h, d = x, x.shape[-1]
        for i in range(network.layers - 2, network.layers):
            h = torch_encoder_layer(h, keep, w, f"encoder.layer.{i}.", network.heads, network.eps, d)
        return torch_mean_pool(h, keep)

    packed, reference = top(x, keep), padded_top()
    torch.testing.assert_close(packed, reference, rtol=0, atol=1e-5)
    weights = list(top.params.values())
    for got, want in zip(torch.autograd.grad(packed.square().sum(), weights),
                         torch.autograd.grad(reference.square().sum(), weights), strict=True):  # fmt: skip
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_tuned_layers_replace_the_packaged_ones_on_both_paths(monkeypatch):
    network = TextEncoder(cache=False).network()
    top = network.tunable_top(1)
    weights = {name: w + 0.01 for name, w in top.weights().items()}
    tuned = TextEncoder(layers=weights, cache=False)
    plain = TextEncoder(cache=False).encode(CAPTIONS, progress=False)
    one = tuned.encode(CAPTIONS, progress=False)  # NumPy, the query path
    monkeypatch.setattr(text, "BULK", len(CAPTIONS))
    bulk_calls = []
    forward = MiniLM.forward_torch
    monkeypatch.setattr(MiniLM, "forward_torch", lambda m, *a: bulk_calls.append(m.tuned) or forward(m, *a))
    bulk = tuned.encode(CAPTIONS, progress=False)  # torch, not ONNX
    assert bulk_calls and all(bulk_calls)
    assert np.abs(one - plain).max() > 1e-2
    np.testing.assert_allclose(bulk, one, atol=1e-5)
    assert not network.tuned and tuned.network().tuned  # the shared network keeps its weights
    with pytest.raises(RuntimeError, match="packaged weights"):
        tuned.network().forward_onnx(*padded(tuned.token_ids(CAPTIONS)))


def test_tuned_embeddings_are_cached_apart_from_the_packaged_ones(tmp_path, monkeypatch):
    """A tuned network's embeddings are cached (a model's evaluation reruns would otherwise re-encode
    every caption), under a namespace of their own: never read back as the packaged network's, or as
    another tuning's."""
    texts = [f"{caption} number {i}" for i, caption in enumerate(CAPTIONS * 40)]
    weights = {
        name: w + 0.01 for name, w in TextEncoder(cache=False).network().tunable_top(1).weights().items()
    }
    tuned = TextEncoder(layers=weights, cache_dir=tmp_path)
    first = tuned.encode(texts, progress=False)
    other = {name: w - 0.01 for name, w in weights.items()}
    assert TextEncoder(layers=other, cache_dir=tmp_path).cache_namespace != tuned.cache_namespace
    packaged = TextEncoder(cache_dir=tmp_path).encode(texts, progress=False)
    assert np.abs(first - packaged).max() > 1e-2  # not read from the tuned namespace
    again = TextEncoder(layers={name: w.copy() for name, w in weights.items()}, cache_dir=tmp_path)
    assert again.cache_namespace == tuned.cache_namespace  # from the values, not the objects
    monkeypatch.setattr(again, "_embed", lambda *a: pytest.fail("a cached embedding was recomputed"))
    np.testing.assert_array_equal(again.encode(texts, progress=False), first)


@pytest.fixture(scope="module")
def tuned(flickr8k_slice_dir):
    data = load_dataset(flickr8k_slice_dir)
    model = create_model("contrastive", **QUICK, text_tune_layers=1, text_tune_lr=1e-4)
    return data, model.fit(data.split("train"), data.split("val"))


def test_tuning_improves_val_over_the_frozen_heads_on_a_slice(tuned):
    _, model = tuned
    record = model.history_[0]
    assert record["text_tuning"]["kept"]
    assert record["text_tuning"]["val_mR"] > record["val_mR"]
    assert model.text_.minilm_layers


def test_tuned_model_saves_loads_and_embeds_identically(tuned, tmp_path):
    data, model = tuned
    loaded = load_model(model.save(tmp_path / "tuned"))
    assert sorted(loaded.text_.minilm_layers) == sorted(model.text_.minilm_layers)
    np.testing.assert_allclose(loaded.embed_texts(CAPTIONS), model.embed_texts(CAPTIONS), atol=1e-5)
    packaged = TextEncoder(cache=False).encode(CAPTIONS, progress=False)
    assert np.abs(loaded.text_.block("minilm", CAPTIONS) - packaged).max() > 1e-4  # the tuned layer runs


def test_text_tuning_needs_minilm():
    with pytest.raises(ModelError, match="text_tune_layers"):
        create_model("contrastive", text_tune_layers=1, ensemble=1, text_features="lsa")


def test_later_ensemble_members_train_on_the_tuned_captions(flickr8k_slice_dir, tmp_path):
    """The first member tunes MiniLM; the second member's heads are fitted to the tuned caption
    features (its input standardisation is their mean), not to the packaged network's."""
    data = load_dataset(flickr8k_slice_dir)
    params = {**QUICK, "ensemble": 2}
    model = create_model("contrastive", **params, text_tune_layers=1, text_tune_lr=1e-4)
    model.fit(data.split("train"), data.split("val"))
    first, second = model.history_
    assert first["text_tuning"]["kept"] and "text_tuning" not in second
    train = data.split("train")
    tuned = model.text_.transform(train.captions).mean(0)
    np.testing.assert_allclose(model.arrays_["m1.text.mean"], tuned, atol=1e-5)
    assert np.abs(model.arrays_["m0.text.mean"] - tuned).max() > 1e-3  # member 0 began on frozen ones
    loaded = load_model(model.save(tmp_path / "tuned-pair"))
    np.testing.assert_allclose(loaded.embed_texts(CAPTIONS), model.embed_texts(CAPTIONS), atol=1e-5)


class Stop(Exception):
    pass


def test_tuning_takes_torch_thread_count_and_the_environment_overrides_it(monkeypatch):
    """Tuning runs on torch's own thread count (the cores this process may use, OMP_NUM_THREADS), not
    every core of the host; CBIR_TORCH_THREADS overrides any count a caller asks for."""
    from cbir.models import torch_training
    from cbir.models.contrastive import TextStage

    asked = {}

    def spy(*args, **kwargs):
        asked.update(kwargs)
        raise Stop

    model = create_model("contrastive", ensemble=1, text_tune_layers=1, text_features="minilm")
    model.text_ = model._text_featurizer().fit(CAPTIONS)
    texts = torch.from_numpy(model.text_.transform(CAPTIONS))
    stage = TextStage(torch.nn.ModuleDict(), None, None, None, None, 0.0)
    before = torch.get_num_threads()
    monkeypatch.setattr(torch_training, "train_epochs", spy)
    try:
        torch.set_num_threads(1)
        with pytest.raises(Stop):
            model._tune_text(stage, CAPTIONS, texts, None, None)
    finally:
        torch.set_num_threads(before)
    assert asked["threads"] == 1

    seen = []
    monkeypatch.undo()
    monkeypatch.setenv("CBIR_TORCH_THREADS", "1")
    layer = torch.nn.Linear(2, 1)

    def loss(x):
        seen.append(torch.get_num_threads())
        return layer(x).sum()

    torch_training.train_epochs(layer, lambda: [(torch.ones(1, 2),)], loss, epochs=1, threads=2)
    assert seen == [1] and torch.get_num_threads() == before
