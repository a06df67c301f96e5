"""Indexing a folder and searching it (issue 5), on real photos of cs5785-mini (COCO)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cbir.cli import app
from cbir.index import MANIFEST, IndexFormatError, SearchIndex, build_index, read_manifest, update_index
from tests.conftest import KAGGLE_MINI, REPO

runner = CliRunner()
TRAIN_IMAGES = KAGGLE_MINI / "images_train"


def photos(n: int, start: int = 0) -> list[Path]:
    return sorted(TRAIN_IMAGES.glob("*.jpg"), key=lambda p: int(p.stem))[start : start + n]


@pytest.fixture(scope="session")
def zero_shot_dir(tmp_path_factory) -> Path:
    """The zero-shot model saved once per session (its class texts are cached for later runs)."""
    from cbir.models import create_model

    return create_model("zero-shot").fit().save(tmp_path_factory.mktemp("zero-shot") / "model")


@pytest.fixture
def folder(tmp_path) -> Path:
    """Ten real photos in a folder with a subfolder, as a user's collection would be."""
    root = tmp_path / "photos"
    (root / "trip").mkdir(parents=True)
    for i, p in enumerate(photos(10)):
        shutil.copy(p, (root / "trip" if i % 3 == 0 else root) / p.name)
    return root


def manifest_ids(index_dir: Path) -> list[str]:
    return [e["id"] for e in read_manifest(index_dir)["entries"]]


def test_incremental_add_change_delete(folder, tmp_path, zero_shot_dir):
    ix, report = update_index(folder, tmp_path / "ix", zero_shot_dir, progress=False)
    assert len(ix) == 10 and len(report.added) == 10
    assert "trip/0.jpg" in ix and ix.image_path("trip/0.jpg") == folder / "trip" / "0.jpg"
    before = {i: ix.vector(i) for i in ix.ids}

    new, changed, deleted = photos(3, start=20)
    shutil.copy(new, folder / "new.jpg")
    shutil.copy(changed, folder / "1.jpg")  # same name, other photo
    (folder / "2.jpg").unlink()
    ix, report = update_index(folder, tmp_path / "ix", zero_shot_dir, progress=False)
    assert report.added == ["new.jpg"] and report.changed == ["1.jpg"] and report.removed == ["2.jpg"]
    assert report.unchanged == 8 and len(ix) == 10 and "2.jpg" not in ix
    assert not np.allclose(ix.vector("1.jpg"), before["1.jpg"])
    for i in set(before) - {"1.jpg", "2.jpg"}:
        np.testing.assert_array_equal(ix.vector(i), before[i])
    # the changed file now finds itself; a rerun with nothing new embeds nothing
    assert ix.search_image(folder / "1.jpg", k=1)[0].id == "1.jpg"
    os.utime(folder / "new.jpg")  # touched, same content
    _, report = update_index(folder, tmp_path / "ix", zero_shot_dir, progress=False)
    assert report.added == report.changed == report.removed == [] and report.unchanged == 10
    assert len(list((tmp_path / "ix" / "shards").iterdir())) == 1  # compacted, no orphans


def test_corrupt_images_are_listed_and_skipped(folder, tmp_path, zero_shot_dir):
    (folder / "broken.jpg").write_bytes(b"not a jpeg at all")
    (folder / "truncated.png").write_bytes((TRAIN_IMAGES / "5.jpg").read_bytes()[:300])
    ix, report = update_index(folder, tmp_path / "ix", zero_shot_dir, progress=False)
    assert sorted(report.failed) == ["broken.jpg", "truncated.png"]
    assert "not a readable image" in report.failed["broken.jpg"]
    assert len(ix) == 10 and "broken.jpg" not in ix and set(ix.failed) == {"broken.jpg", "truncated.png"}
    _, report = update_index(folder, tmp_path / "ix", zero_shot_dir, progress=False)
    assert sorted(report.failed) == ["broken.jpg", "truncated.png"] and report.unchanged == 10
    with pytest.raises(ValueError, match="not a readable image"):
        ix.search_image(folder / "broken.jpg")


def test_image_search_finds_the_query_image_first(folder, tmp_path, zero_shot_dir):
    ix = build_index(folder, tmp_path / "ix", zero_shot_dir, progress=False)
    for image_id in ("trip/0.jpg", "4.jpg", "8.jpg"):
        assert ix.search_image(ix.image_path(image_id), k=3)[0].id == image_id
        assert ix.search_similar(image_id, k=3)[0].id == image_id
        upload = ix.search_image(ix.image_path(image_id).read_bytes(), k=3)
        assert upload[0].id == image_id and upload[0].rank == 1
        assert upload[0].score > upload[1].score
    combined = ix.search(text="a photo", image=ix.image_path("4.jpg"), k=10)
    assert combined[0].id == "4.jpg" and len(combined) == 10
    ranked = ix.search_text("people", k=10)
    floor = ranked[4].score  # keeps the first five of the ten, drops the rest
    assert ranked[5].score < floor
    kept = ix.search_text("people", k=10, min_score=floor)
    assert [r.id for r in kept] == [r.id for r in ranked[:5]]
    with pytest.raises(KeyError):
        ix.image_path("nope.jpg")


def test_kill_during_indexing_then_rerun_loses_nothing(folder, tmp_path, zero_shot_dir):
    """SIGKILL once the first chunk is committed, with an empty feature cache so the run is slow
    enough to be caught midway; the rerun completes with each image exactly once."""
    for p in photos(30, start=10):
        shutil.copy(p, folder / p.name)
    n = len(list(folder.rglob("*.jpg")))
    index_dir = tmp_path / "ix"
    env = {**os.environ, "CBIR_CACHE_DIR": str(tmp_path / "fresh-cache"), "PYTHONPATH": str(REPO / "src")}
    script = (
        "from cbir.index import build_index; import sys; "
        "build_index(sys.argv[1], sys.argv[2], sys.argv[3], progress=False, chunk_size=4)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(folder), str(index_dir), str(zero_shot_dir)], env=env
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if (index_dir / MANIFEST).exists() and len(manifest_ids(index_dir)) >= 4:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    assert proc.wait(30) == -signal.SIGKILL, "the indexer finished before it could be killed"
    done = manifest_ids(index_dir)
    assert 4 <= len(done) < n
    SearchIndex.open(index_dir)  # the interrupted index is consistent and usable
    ix, report = update_index(folder, index_dir, zero_shot_dir, progress=False)
    assert sorted(ix.ids) == ix.ids and len(set(ix.ids)) == len(ix.ids) == n
    assert report.unchanged == len(done) and len(report.added) == n - len(done)
    reference = build_index(folder, tmp_path / "clean", zero_shot_dir, progress=False)
    np.testing.assert_allclose(np.asarray(ix.vectors), np.asarray(reference.vectors), atol=1e-5)


def test_cli_index_search_show(tmp_path, zero_shot_dir):
    index_dir = tmp_path / "ix"
    result = runner.invoke(
        app, ["index", str(TRAIN_IMAGES), "--out", str(index_dir), "-m", str(zero_shot_dir)]
    )
    assert result.exit_code == 0, result.output
    assert "indexed 80 images" in result.output
    caption = (KAGGLE_MINI / "descriptions_train" / "3.txt").read_text().splitlines()[0]
    result = runner.invoke(app, ["search", caption, "--index", str(index_dir), "-k", "5", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["rank"] for r in rows] == [1, 2, 3, 4, 5] and rows[0]["score"] >= rows[-1]["score"]
    assert Path(rows[0]["path"]).is_file()
    floor = (rows[2]["score"] + rows[3]["score"]) / 2  # keeps three of the five
    result = runner.invoke(
        app, ["search", caption, "--index", str(index_dir), "-k", "5", "--min-score", str(floor), "--json"]
    )
    assert rows[2]["score"] > rows[3]["score"] and json.loads(result.stdout) == rows[:3]
    result = runner.invoke(app, ["search", caption, "--index", str(index_dir), "--min-score", "10"])
    assert result.exit_code == 0 and result.stdout == "" and "no results" in result.output
    result = runner.invoke(app, ["search", "--image", str(TRAIN_IMAGES / "7.jpg"), "--index", str(index_dir)])
    top = result.stdout.splitlines()[0].split()[-1]
    assert result.exit_code == 0 and top == str((TRAIN_IMAGES / "7.jpg").resolve())  # ../shared may be a link
    grid, emap = tmp_path / "grid.png", tmp_path / "map.png"
    result = runner.invoke(
        app, ["show", caption, "--index", str(index_dir), "--out", str(grid), "--map", str(emap)]
    )
    assert result.exit_code == 0, result.output
    assert "ground truth: 3.jpg" in result.stdout
    from PIL import Image

    for png in (grid, emap):
        with Image.open(png) as im:
            assert im.format == "PNG" and im.width > 400 and im.height > 300


def test_a_cold_text_search_imports_only_the_search_path(folder, tmp_path, zero_shot_dir):
    """`cbir search TEXT --index IX` in a new process prints its results without importing the write
    path (cbir.indexing), FAISS (exact search below the ANN threshold is NumPy), the image encoder (PIL),
    the bulk text runtimes (onnxruntime, torch), SciPy or rich's tables: each
    would add to the second that a cold search may take (BENCHMARKS.md, issue 16)."""
    build_index(folder, tmp_path / "ix", zero_shot_dir, progress=False)
    heavy = ["cbir.indexing", "faiss", "PIL", "onnxruntime", "torch", "scipy", "sklearn", "rich.table"]
    code = (
        "import sys; from cbir.cli import main\n"
        "try:\n    main()\n"
        f"finally:\n    print([m for m in {heavy!r} if m in sys.modules], file=sys.stderr)"
    )
    args = ["a dog on the grass", "--index", str(tmp_path / "ix"), "-k", "3"]
    proc = subprocess.run([sys.executable, "-c", code, "search", *args], capture_output=True, text=True)
    assert proc.returncode == 0 and len(proc.stdout.splitlines()) == 3, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "[]"


def test_bad_index_paths_are_one_line_errors(tmp_path):
    with pytest.raises(IndexFormatError, match="not an index directory"):
        SearchIndex.open(tmp_path)
    result = runner.invoke(app, ["search", "dog", "--index", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "no such index directory" in result.output
    result = runner.invoke(app, ["index", str(tmp_path / "nofolder"), "--out", str(tmp_path / "ix")])
    assert result.exit_code == 2 and "no such folder" in result.output


def test_retraining_the_model_in_place_reembeds_every_photo(folder, tmp_path, zero_shot_dir):
    """The index notices that the model directory it was built with has new contents."""
    from cbir.models import create_model

    model = shutil.copytree(zero_shot_dir, tmp_path / "model")
    ix, _ = update_index(folder, tmp_path / "ix", model, progress=False)
    before = {i: ix.vector(i) for i in ix.ids}
    ix, report = update_index(folder, tmp_path / "ix", model, progress=False)
    assert report.unchanged == 10
    create_model("zero-shot", visual_weight=0.5).fit().save(model)  # retrained, same path
    ix, report = update_index(folder, tmp_path / "ix", model, progress=False)
    assert report.unchanged == 0 and len(report.added) + len(report.changed) == 10 and len(ix) == 10
    assert all(not np.allclose(ix.vector(i), before[i]) for i in ix.ids)
    assert ix.model.params["visual_weight"] == 0.5


def test_indexing_reads_and_hashes_each_file_once(folder, tmp_path, zero_shot_dir, monkeypatch):
    """The embedding contract: one call returns vectors and failures, each file read and hashed once
    (not hashed by the scan, then read by the encoder, then again by the model)."""
    import cbir.encoders.image as image_module
    import cbir.index as index_module

    (folder / "broken.jpg").write_bytes(b"not a jpeg at all")
    reads: list[str] = []
    hashes: list[str] = []
    read_image_file, content_key, file_hash = (
        image_module.read_image_file,
        image_module.content_key,
        index_module.file_hash,
    )

    def counted_read(path):
        reads.append(Path(path).name)
        return read_image_file(path)

    def counted_key(data):
        hashes.append(data[:16])
        return content_key(data)

    def counted_file_hash(path):
        if Path(path).resolve().is_relative_to(folder.resolve()):
            reads.append(Path(path).name)
        return file_hash(path)

    monkeypatch.setattr(image_module, "read_image_file", counted_read)
    monkeypatch.setattr(image_module, "content_key", counted_key)
    monkeypatch.setattr(index_module, "file_hash", counted_file_hash)
    ix, report = update_index(folder, tmp_path / "ix", zero_shot_dir, progress=False)
    assert len(ix) == 10 and list(report.failed) == ["broken.jpg"]
    assert sorted(reads) == sorted(p.name for p in folder.rglob("*.jpg")) and len(hashes) == 11
    entries = read_manifest(tmp_path / "ix")["entries"]
    assert {e["sha1"] for e in entries} == {file_hash(folder / e["id"]) for e in entries}
    # a touched file is read once to learn it did not change, and keeps its vector
    reads.clear()
    os.utime(folder / "4.jpg")
    _, report = update_index(folder, tmp_path / "ix", zero_shot_dir, progress=False)
    assert reads == ["4.jpg"] and report.unchanged == 10 and not report.changed


def test_model_embed_returns_vectors_and_failures(folder, zero_shot_dir):
    from cbir.datasets import Dataset
    from cbir.models import load_model

    (folder / "broken.jpg").write_bytes(b"not a jpeg at all")
    data = Dataset.from_paths([folder / "4.jpg", folder / "broken.jpg"], folder)
    embedding = load_model(zero_shot_dir).embed(data)
    assert (
        list(embedding.failed) == ["broken.jpg"] and "not a readable image" in embedding.failed["broken.jpg"]
    )
    assert embedding.vectors[0].any() and not embedding.vectors[1].any()
    assert len(data.report) == 0  # failures are returned, not written into the dataset


def test_approximate_search_above_the_threshold_matches_exact(folder, tmp_path, zero_shot_dir, monkeypatch):
    """Above ANN_THRESHOLD images the index writes and searches an HNSW graph (forced here with a
    threshold of 5); on a small collection its top results are the exact ones."""
    import faiss

    import cbir.index as index_module
    from cbir import ann

    monkeypatch.setattr(ann, "ANN_THRESHOLD", 5)
    ix = build_index(folder, tmp_path / "ix", zero_shot_dir, progress=False)
    shards = tmp_path / "ix" / index_module.SHARDS
    (shard,) = index_module.read_manifest(tmp_path / "ix")["shards"]  # compacted: one shard
    graphs = [p.name for p in shards.glob("*.hnsw")]
    assert graphs == [ix._ann.name] and ix.approximate
    assert isinstance(ix._index().searcher, faiss.IndexHNSWFlat)
    vectors = np.asarray(ix.vectors, dtype=np.float32)
    for query in (ix.embed_text("people outdoors"), ix.vector("4.jpg")):
        unit = query / np.linalg.norm(query)
        exact = [ix.ids[i] for i in np.argsort(-(vectors @ unit), kind="stable")[:5]]
        found = ix.search_vector(query, k=5)
        assert [r.id for r in found] == exact
        np.testing.assert_allclose([r.score for r in found], np.sort(vectors @ unit)[::-1][:5], rtol=1e-4)
    for photo in sorted(folder.glob("*.jpg"))[:6]:  # below the threshold again: exact search, no graph
        photo.unlink()
    ix = build_index(folder, tmp_path / "ix", zero_shot_dir, progress=False)
    assert not ix.approximate and not list(shards.glob("*.hnsw"))
    assert isinstance(ix._index(), ann.Exact)


def test_vector_search_hnsw_finds_the_exact_neighbours_of_a_small_set():
    from cbir.index import vector_search

    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(300, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = vectors[:10] + 0.05 * rng.normal(size=(10, 32)).astype(np.float32)
    _, exact = vector_search(vectors, exact=True).search(queries, 5)
    approximate = vector_search(vectors, exact=False)
    assert approximate.hnsw.efConstruction > 0  # an HNSW graph, not a flat index
    _, found = approximate.search(queries, 5)
    np.testing.assert_array_equal(found, exact)
