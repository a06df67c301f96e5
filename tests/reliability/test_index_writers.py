"""One writer at a time, readers never broken by a writer, and an --out that is not ours is refused."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import cbir.index
from cbir.cli import app
from cbir.index import LOCK_FILE, IndexFormatError, SearchIndex, update_index
from cbir.lockfile import LockBusyError, exclusive_lock
from tests.reliability.conftest import photos

runner = CliRunner()
TRIALS = 20


def test_second_writer_stops_naming_the_holder(folder, tmp_path, zero_shot_dir):
    index_dir = tmp_path / "ix"
    update_index(folder, index_dir, zero_shot_dir, progress=False)
    with exclusive_lock(index_dir / LOCK_FILE):
        with pytest.raises(LockBusyError, match=rf"{LOCK_FILE}: process {os.getpid()} is already updating"):
            update_index(folder, index_dir, zero_shot_dir, progress=False)
        result = runner.invoke(app, ["index", str(folder), "--out", str(index_dir), "-m", str(zero_shot_dir)])
        assert result.exit_code == 2 and f"process {os.getpid()}" in result.output
    assert len(SearchIndex.open(index_dir)) == 10


def test_stale_lock_of_a_dead_process_is_taken_over(folder, tmp_path, zero_shot_dir):
    index_dir = tmp_path / "ix"
    index_dir.mkdir()
    (index_dir / LOCK_FILE).write_text("999999999\n")  # a run killed before it wrote anything else
    ix, report = update_index(folder, index_dir, zero_shot_dir, progress=False)
    assert len(ix) == 10 and len(report.added) == 10
    assert (index_dir / LOCK_FILE).read_text() == ""  # released


def race_two_writers(folder: Path, index_dir: Path, model: Path) -> list[BaseException]:
    """Two `update_index` calls released together on one --out; what either raised."""
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def write() -> None:
        start.wait()
        try:
            update_index(folder, index_dir, model, progress=False, chunk_size=3, wait=120)
        except BaseException as e:  # noqa: BLE001 - any failure of either writer fails the test
            errors.append(e)

    threads = [threading.Thread(target=write) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_concurrent_writers_never_corrupt_the_index(folder, tmp_path, zero_shot_dir):
    """Two writers start together on one --out, TRIALS times: the second waits for the first, and
    the index always holds each image once with the vectors of an uninterrupted build."""
    reference = update_index(folder, tmp_path / "reference", zero_shot_dir, progress=False)[0]
    expected = {i: reference.vector(i) for i in reference.ids}
    for trial in range(TRIALS):
        index_dir = tmp_path / f"ix{trial}"
        errors = race_two_writers(folder, index_dir, zero_shot_dir)
        assert not errors, f"trial {trial}: {errors}"
        ix = SearchIndex.open(index_dir)
        assert sorted(ix.ids) == sorted(expected), f"trial {trial}"
        for i in ix.ids:
            np.testing.assert_allclose(ix.vector(i), expected[i], atol=1e-5)


def test_reader_whose_shards_were_swept_rereads_the_manifest(folder, tmp_path, zero_shot_dir, monkeypatch):
    """A reader that listed shards just before a writer replaced them opens the new index."""
    index_dir = tmp_path / "ix"
    update_index(folder, index_dir, zero_shot_dir, progress=False)
    stale = cbir.index.read_manifest(index_dir)
    for p in photos(3, start=40):
        shutil.copy(p, folder / p.name)
    update_index(folder, index_dir, zero_shot_dir, progress=False)  # compacts: the old shard is gone
    assert not (index_dir / "shards" / stale["entries"][0]["shard"]).exists()
    reads = iter([stale])
    real = cbir.index.read_manifest
    monkeypatch.setattr(cbir.index, "read_manifest", lambda path, **kw: next(reads, None) or real(path, **kw))
    assert len(SearchIndex.open(index_dir)) == 13


def test_readers_keep_working_during_an_update(folder, tmp_path, zero_shot_dir):
    index_dir = tmp_path / "ix"
    update_index(folder, index_dir, zero_shot_dir, progress=False)
    for p in photos(12, start=40):
        shutil.copy(p, folder / p.name)
    done = threading.Event()
    errors: list[BaseException] = []

    def read() -> None:
        while not done.is_set():
            try:
                assert SearchIndex.open(index_dir).search_text("a dog", k=3)
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        update_index(folder, index_dir, zero_shot_dir, progress=False, chunk_size=2)
    finally:
        done.set()
        reader.join()
    assert not errors, errors[:3]


@pytest.mark.parametrize("hidden", [".notes.tmp.txt", ".drafts.tmp/draft.txt", "notes.txt"])
def test_out_folder_with_someone_elses_files_is_refused(folder, tmp_path, zero_shot_dir, hidden):
    out = tmp_path / "mine"
    (out / hidden).parent.mkdir(parents=True, exist_ok=True)
    (out / hidden).write_text("precious")
    with pytest.raises(IndexFormatError, match=r"exists and is not an index \(it holds"):
        update_index(folder, out, zero_shot_dir, progress=False)
    result = runner.invoke(app, ["index", str(folder), "--out", str(out), "-m", str(zero_shot_dir)])
    assert result.exit_code == 2 and "not an index" in result.output
    assert (out / hidden).read_text() == "precious"
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == sorted(
        {hidden, *[p.as_posix() for p in Path(hidden).parents if p != Path(".")]}
    )


def test_index_sweeps_only_what_it_wrote(folder, tmp_path, zero_shot_dir):
    index_dir = tmp_path / "ix"
    update_index(folder, index_dir, zero_shot_dir, progress=False)
    (index_dir / ".notes.tmp.txt").write_text("mine")
    (index_dir / ".drafts.tmp").mkdir()
    (index_dir / ".drafts.tmp" / "a.txt").write_text("mine")
    (index_dir / ".index.json.0123.cbir-tmp").write_text("{")  # left by a killed run
    shutil.copy(photos(1, start=40)[0], folder / "new.jpg")
    update_index(folder, index_dir, zero_shot_dir, progress=False)
    assert (index_dir / ".notes.tmp.txt").read_text() == "mine"
    assert (index_dir / ".drafts.tmp" / "a.txt").read_text() == "mine"
    assert not (index_dir / ".index.json.0123.cbir-tmp").exists()


QUERY = "a dog running on the grass"


@pytest.fixture
def two_models(folder, tmp_path, zero_shot_dir):
    """Reference query embedding and vectors of the folder's photos under two real models."""
    expected = {}
    for name, model in (("zero-shot", zero_shot_dir), ("default", None)):
        ix, _ = update_index(folder, tmp_path / f"reference-{name}", model, progress=False)
        expected[name] = (ix.embed_text(QUERY), {i: ix.vector(i) for i in ix.ids})
    return expected


def same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.allclose(a, b, atol=1e-5)


def snapshot_model(ix: SearchIndex, expected) -> str:
    """The model a reader's index belongs to; its query model and its vectors must be the same one,
    and it must hold every photo (a whole index, never one half rebuilt)."""
    query = ix.embed_text(QUERY)
    by_query = [m for m, (text, _) in expected.items() if same(query, text)]
    by_vectors = [
        m
        for m, (_, vectors) in expected.items()
        if sorted(ix.ids) == sorted(vectors) and all(same(ix.vector(i), vectors[i]) for i in ix.ids)
    ]
    assert len(by_query) == 1 and by_query == by_vectors, f"query model {by_query}, vectors {by_vectors}"
    assert len(ix.search_text(QUERY, k=3)) == 3
    return by_query[0]


def test_readers_see_one_whole_index_during_a_model_switch(folder, tmp_path, zero_shot_dir, two_models):
    """Reindexing with another model builds the new index aside: a search after every committed chunk
    finds all photos under the old model, then all under the new one; never a mix, never a failure."""
    index_dir = tmp_path / "ix"
    update_index(folder, index_dir, zero_shot_dir, progress=False)
    chunk_committed, read_after_it = threading.Event(), threading.Event()
    done = threading.Event()
    seen: list[tuple[bool, str]] = []  # (read after a chunk was committed, model seen)
    errors: list[BaseException] = []

    def read() -> None:
        while not done.is_set():
            after_chunk = chunk_committed.is_set()
            chunk_committed.clear()
            try:
                seen.append((after_chunk, snapshot_model(SearchIndex.open(index_dir), two_models)))
            except BaseException as e:  # noqa: BLE001 - any failure of a reader fails the test
                errors.append(e)
            if after_chunk:
                read_after_it.set()

    def wait_for_a_read(done_count: int, total: int) -> None:
        read_after_it.clear()
        chunk_committed.set()
        assert read_after_it.wait(120)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        update_index(folder, index_dir, None, progress=False, chunk_size=3, on_chunk=wait_for_a_read)
    finally:
        done.set()
        reader.join()
    assert not errors, errors[:3]
    assert [m for after_chunk, m in seen if after_chunk] == ["zero-shot"] * 4  # 10 photos, chunks of 3
    assert snapshot_model(SearchIndex.open(index_dir), two_models) == "default"
    assert sorted(p.name for p in index_dir.iterdir() if p.name.startswith("model")) == [
        SearchIndex.open(index_dir).model_dir.name
    ]  # the old model folder is gone once no manifest names it


def test_interrupted_model_switch_keeps_the_old_index_and_resumes(
    folder, tmp_path, zero_shot_dir, two_models
):
    index_dir = tmp_path / "ix"
    update_index(folder, index_dir, zero_shot_dir, progress=False)

    def killed(done_count: int, total: int) -> None:
        raise KeyboardInterrupt  # what a kill leaves: the chunks committed so far

    with pytest.raises(KeyboardInterrupt):
        update_index(folder, index_dir, None, progress=False, chunk_size=3, on_chunk=killed)
    assert snapshot_model(SearchIndex.open(index_dir), two_models) == "zero-shot"
    ix, report = update_index(folder, index_dir, None, progress=False, chunk_size=3)
    assert report.unchanged == 3 and len(report.added) == 7  # the committed chunk is not embedded again
    assert snapshot_model(ix, two_models) == "default"
