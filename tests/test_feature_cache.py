"""The feature cache is bounded (least recently used shards go first), keeps no query uploads, and
a lookup reads only the rows it asks for."""

from __future__ import annotations

import numpy as np
import pytest

from cbir.encoders import cache as cache_module
from cbir.encoders.cache import FeatureCache, transient

ROW_BYTES = 128 + 8 * 4  # a .npy shard of one 8-float row: header + data


def shard_of(cache: FeatureCache, key: str) -> str:
    return cache._connection().execute("SELECT shard FROM rows WHERE key = ?", (key,)).fetchone()[0]


def test_least_recently_used_shards_are_evicted_first(tmp_path):
    cache = FeatureCache("ns", tmp_path, max_bytes=2 * ROW_BYTES)
    for key in ("a", "b"):
        cache.put_many([key], np.full((1, 8), ord(key), np.float32))
    assert cache.nbytes() == 2 * ROW_BYTES
    b_file = cache.dir / shard_of(cache, "b")
    assert cache.get("a") is not None  # a is now used more recently than b
    cache.put_many(["c"], np.zeros((1, 8), np.float32))  # over the cap: b goes
    assert cache.get("b") is None and not b_file.exists()
    np.testing.assert_array_equal(cache.get("a"), np.full(8, ord("a")))
    assert cache.get("c") is not None and len(cache) == 2 and cache.nbytes() <= cache.max_bytes
    assert sorted(p.name for p in cache.dir.iterdir()) == sorted(shard_of(cache, k) for k in "ac")


def test_the_cap_holds_over_many_writes_across_namespaces(tmp_path):
    images = FeatureCache("images", tmp_path, max_bytes=5 * ROW_BYTES)
    texts = FeatureCache("texts", tmp_path, max_bytes=5 * ROW_BYTES)
    for i in range(12):
        (images if i % 2 else texts).put_many([str(i)], np.full((1, 8), i, np.float32))
        assert images.nbytes() <= 5 * ROW_BYTES
    files = [*images.dir.glob("*.npy"), *texts.dir.glob("*.npy")]
    assert sum(p.stat().st_size for p in files) == images.nbytes() == 5 * ROW_BYTES
    assert {k for k in map(str, range(12)) if (images if int(k) % 2 else texts).get(k) is not None} == {
        "7",
        "8",
        "9",
        "10",
        "11",
    }


def test_the_cap_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(cache_module.MAX_BYTES_ENV, raising=False)
    assert FeatureCache("ns", tmp_path).max_bytes == 2 << 30  # the default: 2 GiB
    monkeypatch.setenv(cache_module.MAX_BYTES_ENV, "512M")
    assert FeatureCache("ns", tmp_path).max_bytes == 512 << 20
    assert FeatureCache("ns", tmp_path, max_bytes=100).max_bytes == 100  # the option wins
    monkeypatch.setenv(cache_module.MAX_BYTES_ENV, "1K")
    cache = FeatureCache("ns", tmp_path)
    for key in "abcdefgh":
        cache.put_many([key], np.ones((1, 8), np.float32))
    assert cache.nbytes() <= 1024 and len(cache) == 1024 // ROW_BYTES
    monkeypatch.setenv(cache_module.MAX_BYTES_ENV, "lots")
    with pytest.raises(ValueError, match="CBIR_CACHE_MAX_BYTES: 'lots' is not a size in bytes"):
        FeatureCache("ns", tmp_path)


def test_a_lookup_maps_only_the_shard_it_needs_and_copies_one_row(tmp_path, monkeypatch):
    writer = FeatureCache("ns", tmp_path)
    for i in range(5):
        writer.put_many([f"k{i}", f"j{i}"], np.arange(16, dtype=np.float32).reshape(2, 8) + 100 * i)
    opened = []
    real_load = np.load

    def recording_load(path, *args, **kwargs):
        opened.append((path.name, kwargs.get("mmap_mode")))
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(np, "load", recording_load)
    reader = FeatureCache("ns", tmp_path)  # a new process's view: nothing read yet
    row = reader.get("j3")
    np.testing.assert_array_equal(row, np.arange(8, 16) + 300)
    assert opened == [(shard_of(reader, "j3"), "r")]  # one shard, memory-mapped
    assert row.base is None or not isinstance(row.base, np.memmap)  # a copy: the map may be dropped
    assert set(reader.get_many(["k0", "k3", "gone"])) == {"k0", "k3"}
    assert len(opened) == 2  # k3's shard was already mapped


def test_writes_from_another_process_are_seen_at_once(tmp_path):
    cache = FeatureCache.open("ns", tmp_path)
    FeatureCache("ns", tmp_path).put_many(["b"], np.zeros((1, 3)))  # as another process would
    assert cache.get("b") is not None


def test_nothing_is_written_inside_transient(tmp_path):
    cache = FeatureCache("ns", tmp_path)
    cache.put_many(["kept"], np.ones((1, 4)))
    with transient():
        cache.put_many(["query"], np.ones((1, 4)))
        assert cache.get("kept") is not None  # reads still hit
    assert cache.get("query") is None and len(cache) == 1
    assert len(list(cache.dir.glob("*.npy"))) == 1


def test_shards_of_the_older_layout_are_adopted(tmp_path):
    (tmp_path / "ns").mkdir()
    np.savez(tmp_path / "ns" / "old.npz", keys=np.array(["x", "y"]), rows=np.eye(2, dtype=np.float32))
    cache = FeatureCache("ns", tmp_path)
    np.testing.assert_array_equal(cache.get("y"), [0, 1])
    assert len(cache) == 2 and not (tmp_path / "ns" / "old.npz").exists()


def test_an_uploaded_query_photo_is_not_cached(tmp_path, monkeypatch):
    """`SearchIndex.embed_image` of uploaded bytes (the server's photo queries) leaves the cache as
    it was; the same photo indexed from a folder is cached."""
    import shutil

    from cbir.encoders.image import CACHE_LAYOUT, MODEL_ID
    from cbir.index import build_index
    from tests.conftest import KAGGLE_MINI

    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(KAGGLE_MINI / "images_train" / "0.jpg", photos / "0.jpg")
    monkeypatch.setenv("CBIR_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(FeatureCache, "_open", {})
    index = build_index(photos, tmp_path / "ix", progress=False)
    center = FeatureCache(f"{MODEL_ID}/{CACHE_LAYOUT}/center", tmp_path / "cache")
    assert len(center) == 1
    upload = (KAGGLE_MINI / "images_train" / "1.jpg").read_bytes()
    vector = index.embed_image(upload)
    assert vector.any() and len(center) == 1
    assert sorted(p.name for p in center.dir.iterdir()) == [shard_of(center, center_key(photos / "0.jpg"))]


def center_key(path) -> str:
    from cbir.encoders.cache import content_key

    return content_key(path.read_bytes())
