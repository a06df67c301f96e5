"""A library that keeps itself indexed (issue 14): default index location, --update, serve --watch."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from cbir.cli import app
from cbir.index import MANIFEST, SearchIndex
from cbir.library import FOLDER_INDEX, data_dir, default_index_dir, find_index
from cbir.server import create_app
from tests.test_search import photos, zero_shot_dir  # noqa: F401 (a fixture)

runner = CliRunner()


@pytest.fixture
def library(tmp_path, monkeypatch) -> Path:
    """Six real photos in a folder, and a data folder of this test's own."""
    monkeypatch.setenv("CBIR_DATA_DIR", str(tmp_path / "data"))
    root = tmp_path / "Pictures"
    (root / "2024").mkdir(parents=True)
    for i, p in enumerate(photos(6)):
        shutil.copy(p, (root / "2024" if i % 2 else root) / p.name)
    return root


def test_index_then_search_without_out_or_index(library, zero_shot_dir, monkeypatch, tmp_path):  # noqa: F811
    indexed = runner.invoke(app, ["index", str(library), "--model", str(zero_shot_dir)])
    assert indexed.exit_code == 0, indexed.output
    assert (library / FOLDER_INDEX / MANIFEST).is_file()
    assert default_index_dir(library) == library / FOLDER_INDEX
    # From inside the folder (or below it), the folder's own index is found.
    monkeypatch.chdir(library / "2024")
    assert find_index() == library / FOLDER_INDEX
    found = runner.invoke(app, ["search", "a dog", "-k", "3", "--paths"])
    assert found.exit_code == 0, found.output
    expected = SearchIndex.open(library / FOLDER_INDEX).search_text("a dog", k=3)
    assert found.stdout.splitlines() == [str(r.path) for r in expected]
    # Elsewhere, the index built last.
    monkeypatch.chdir(tmp_path)
    assert find_index() == (library / FOLDER_INDEX).resolve()
    assert (data_dir() / "last-index").is_file()


def test_no_index_anywhere_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("CBIR_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["search", "a dog"])
    assert (
        result.exit_code == 2 and "no index found" in result.output and "cbir index FOLDER" in result.output
    )


def test_a_read_only_folder_is_indexed_into_the_data_folder(library, monkeypatch):
    monkeypatch.setattr("os.access", lambda path, mode: False)
    target = default_index_dir(library)
    assert target.parent == data_dir() / "indexes" and target.name.startswith("Pictures-")


def test_an_empty_folder_says_it_found_nothing(tmp_path, monkeypatch, zero_shot_dir):  # noqa: F811
    monkeypatch.setenv("CBIR_DATA_DIR", str(tmp_path / "data"))
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["index", str(tmp_path / "empty"), "--model", str(zero_shot_dir)])
    assert result.exit_code == 0 and "found no photos below" in result.output


def test_search_update_indexes_new_photos_first(library, zero_shot_dir):  # noqa: F811
    ix_dir = library / FOLDER_INDEX
    runner.invoke(app, ["index", str(library), "--model", str(zero_shot_dir)])
    new = photos(1, start=40)[0]
    shutil.copy(new, library / "new.jpg")
    stale = runner.invoke(app, ["search", "--image", str(new), "--index", str(ix_dir), "-k", "1", "--paths"])
    assert stale.stdout.strip() != str(library / "new.jpg")
    fresh = runner.invoke(
        app, ["search", "--image", str(new), "--index", str(ix_dir), "-k", "1", "--paths", "--update"]
    )
    assert fresh.exit_code == 0, fresh.output
    assert fresh.stdout.strip() == str(library / "new.jpg")
    assert "updated: 1 change(s)" in fresh.output


def test_serve_watch_adds_a_new_photo_within_seconds(library, zero_shot_dir):  # noqa: F811
    runner.invoke(app, ["index", str(library), "--model", str(zero_shot_dir)])
    web = create_app(library / FOLDER_INDEX, watch=0.2)
    try:
        client = TestClient(web)
        assert client.get("/api/health").json()["images"] == 6
        shutil.copy(photos(1, start=40)[0], library / "2024" / "arrived.jpg")
        deadline = time.monotonic() + 120  # generous for a loaded machine; normally about a second
        while client.get("/api/health").json()["images"] != 7 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert client.get("/api/health").json()["images"] == 7
        page = client.get("/api/similar/2024/arrived.jpg", params={"k": 1}).json()
        assert page["results"][0]["id"] == "2024/arrived.jpg"
        (library / "2024" / "arrived.jpg").unlink()  # the watcher updates the photos that changed only
        while client.get("/api/health").json()["images"] != 6 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert client.get("/api/health").json()["images"] == 6
    finally:
        web.state.watcher.stop()


def test_the_watcher_rebuilds_when_the_model_was_retrained_in_place(library, zero_shot_dir, tmp_path):  # noqa: F811
    """`add_paths` refuses to add to an index whose model has changed since; the watcher then rebuilds
    the index with the model as it is now, instead of failing every round."""
    from cbir.calibration import Calibration
    from cbir.library import Watcher
    from cbir.models import load_model
    from cbir.models.base import write_calibration

    model = Path(shutil.copytree(zero_shot_dir, tmp_path / "model"))
    runner.invoke(app, ["index", str(library), "--model", str(model)])
    index = SearchIndex.open(library / FOLDER_INDEX)
    assert load_model(index.model_dir).calibration is None
    retrained = Calibration(slope=3.0, intercept=0.5, dataset="here", split="val")
    write_calibration(model, retrained)  # the model directory changes in place
    shutil.copy(photos(1, start=40)[0], library / "2024" / "arrived.jpg")
    published: list[SearchIndex] = []
    watcher = Watcher(index, published.append, interval=0.1)
    watcher.start()
    try:
        deadline = time.monotonic() + 120
        while not published and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        watcher.stop()
    assert published, "the watcher never published an update"
    assert "2024/arrived.jpg" in published[-1] and len(published[-1]) == 7
    assert load_model(published[-1].model_dir).calibration == retrained
