"""ONNX Runtime against torch on real photos and captions, the export cache, and overlapped decoding."""

import shutil
import warnings

import numpy as np
import pytest

from cbir.encoders import ImageEncoder
from cbir.encoders.image import preprocess
from cbir.encoders.runtime import exported, resolve_runtime, torch_exporter
from tests.conftest import FLICKR8K

pytest.importorskip("onnxruntime")
PHOTOS = sorted((FLICKR8K / "images").glob("*.jpg"))[:8]


def test_onnx_backbone_matches_torch_on_flickr8k_photos():
    pixels = np.stack([preprocess(p.read_bytes()) for p in PHOTOS])
    onnx_rows = ImageEncoder(runtime="onnx")._forward(pixels)
    torch_rows = ImageEncoder(runtime="torch")._forward(pixels)
    assert onnx_rows.shape == torch_rows.shape == (8, torch_rows.shape[1])
    assert np.abs(torch_rows).max() > 1  # real activations, not zeros
    assert np.abs(onnx_rows - torch_rows).max() <= 1e-4


def _tiny_exporter():
    import torch

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh())
    x = torch.randn(5, 4)
    return torch_exporter(module, [x], ["x"], {"x": {0: "n"}}), x.numpy(), module(x).detach().numpy()


def test_an_exported_file_that_does_not_load_is_exported_again(tmp_path):
    export, x, expected = _tiny_exporter()
    path = tmp_path / "onnx" / "tiny.onnx"
    first = exported(path, export)
    np.testing.assert_allclose(first.run(None, {"x": x})[0], expected, atol=1e-6)
    good = path.read_bytes()

    def never(_):
        raise AssertionError("a file that loads was exported again")

    exported(path, never)  # a good file is reused
    path.write_bytes(good[: len(good) // 2])  # cut short, as by a crash or a full disk
    with pytest.warns(UserWarning, match="cannot be loaded"):
        again = exported(path, export)
    np.testing.assert_allclose(again.run(None, {"x": x})[0], expected, atol=1e-6)
    assert path.read_bytes() == good
    assert [p.name for p in path.parent.iterdir()] == ["tiny.onnx"]  # no temporary left behind


def test_a_failed_export_leaves_no_file(tmp_path):
    def broken(path):
        path.write_bytes(b"half a model")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        exported(tmp_path / "m.onnx", broken)
    assert list(tmp_path.iterdir()) == []


def test_runtime_choice(monkeypatch):
    assert resolve_runtime("auto") == "onnx"  # installed, and faster (BENCHMARKS.md)
    with pytest.raises(ValueError, match="unknown runtime 'tpu'"):
        ImageEncoder(runtime="tpu")
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.warns(UserWarning, match="onnxruntime is not installed"):
        assert resolve_runtime("auto") == "torch"
    with pytest.raises(RuntimeError, match="onnxruntime is not installed"):
        resolve_runtime("onnx")


def test_overlapped_decoding_gives_the_sequential_result(tmp_path):
    shutil.copy(PHOTOS[0], tmp_path / "a.jpg")
    (tmp_path / "corrupt.jpg").write_bytes(PHOTOS[1].read_bytes()[:1500])
    paths = [*PHOTOS[:5], tmp_path / "corrupt.jpg", tmp_path / "gone.jpg", *PHOTOS[5:], tmp_path / "a.jpg"]
    views = ("center", "hflip")
    sequential = ImageEncoder(cache=False, decode_threads=0, batch_size=3).encode(paths, views, False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        overlapped = ImageEncoder(cache=False, decode_threads=3, batch_size=3).encode(paths, views, False)
    assert overlapped.keys == sequential.keys and sequential.keys[-1] == sequential.keys[0]
    assert overlapped.failed == sequential.failed and sorted(sequential.failed) == [5, 6]
    for view in views:
        np.testing.assert_array_equal(overlapped.views[view], sequential.views[view])
    assert np.abs(sequential.views["center"][:5]).sum(1).min() > 0
