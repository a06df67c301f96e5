"""Adding named photos to an index (`cbir.indexing.add_paths`, `cbir index --add`): the same index as a
full run, at the cost of the photos named: no full read of the manifest, no re-embedding of unchanged
photos, only shards whose file changed checked again."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import cbir.indexing as ing
import cbir.manifest
from cbir.cli import app
from cbir.datasets import DatasetError
from cbir.index import SHARDS, IndexFormatError, SearchIndex, read_manifest, update_index
from cbir.manifest import MANIFEST, ManifestWriter
from cbir.models import create_model
from tests.conftest import FLICKR8K
from tests.test_index_stages import backwards_encode, expected_vectors, make_folder

runner = CliRunner()


@pytest.fixture
def flickr_folder(tmp_path) -> Path:
    """20 real Flickr8k photos, 8 of them in a subfolder."""
    root = tmp_path / "photos"
    (root / "later").mkdir(parents=True)
    for i, path in enumerate(sorted((FLICKR8K / "images").glob("*.jpg"))[:20]):
        shutil.copy(path, root / ("later" if i % 5 in (1, 3) else "") / path.name)
    return root


def test_adding_photos_in_batches_gives_the_index_of_a_full_run(flickr_folder, tmp_path):
    full, _ = update_index(flickr_folder, tmp_path / "full", "default", progress=False)
    later = sorted((flickr_folder / "later").iterdir())
    first = [p for p in sorted(flickr_folder.glob("*.jpg"))]
    report = ing.add_paths(flickr_folder, tmp_path / "added", first, "default", progress=False)
    assert sorted(report.added) == [p.name for p in first] and report.size == 12
    report = ing.add_paths(
        flickr_folder, tmp_path / "added", [later[0], flickr_folder / "later"], progress=False
    )
    assert len(report.added) == 8 and report.size == 20 and report.unchanged == 0
    added = SearchIndex.open(tmp_path / "added")
    assert added.ids == full.ids and len(added) == 20
    np.testing.assert_allclose(np.asarray(added.vectors), np.asarray(full.vectors), atol=1e-6)
    for query in ("a dog running on grass", "children playing"):
        assert [r.id for r in added.search_text(query, k=5)] == [r.id for r in full.search_text(query, k=5)]


def counting(calls: list[Path]):
    """`backwards_encode` that records each path it embeds."""

    def encode(model_dir, root, chunks):
        calls.extend(p for chunk in chunks for p in chunk)
        yield from backwards_encode(model_dir, root, chunks)

    return encode


def test_unchanged_photos_are_skipped_and_changed_ones_embedded_again(tmp_path):
    root = make_folder(tmp_path, 6)
    index_dir = tmp_path / "ix"
    calls: list[Path] = []
    options = {"progress": False, "encode": counting(calls)}
    ing.add_paths(root, index_dir, [root], "default", **options)
    assert len(calls) == 6
    calls.clear()
    report = ing.add_paths(root, index_dir, [root / "p001.jpg", root / "sub"], "default", **options)
    assert calls == [] and report.unchanged == 3 and report.added == report.changed == []
    (root / "p001.jpg").write_bytes(b"new content")
    (root / "sub" / "p000.jpg").unlink()
    report = ing.add_paths(root, index_dir, [root / "p001.jpg", root / "sub/p000.jpg"], "default", **options)
    assert (
        calls == [root / "p001.jpg"] and report.changed == ["p001.jpg"] and report.removed == ["sub/p000.jpg"]
    )
    ix = SearchIndex.open(index_dir)
    assert len(ix) == 5 and report.size == 5
    np.testing.assert_array_equal(ix.vectors, expected_vectors(ix))


def count_entry_reads(monkeypatch) -> list[int]:
    """How many entries were read from manifests, whatever the query (every read builds them here)."""
    reads = [0]
    real = cbir.manifest._entry

    def entry(*row, **options):
        reads[0] += 1
        return real(*row, **options)

    monkeypatch.setattr(cbir.manifest, "_entry", entry)
    return reads


def test_adding_reads_only_the_entries_of_the_photos_named(tmp_path, monkeypatch):
    monkeypatch.setattr(ing, "COMPACT_ALL_ROWS", 8)  # a "large" index at 40 photos: no merge of all
    root = make_folder(tmp_path, 40)
    index_dir = tmp_path / "ix"
    update_index(root, index_dir, "default", progress=False, chunk_size=16, encode=backwards_encode)
    reads = count_entry_reads(monkeypatch)
    make_folder(tmp_path, 2, start=40)
    (root / "p005.jpg").write_bytes(b"changed")
    named = [root / "p040.jpg", root / "p041.jpg", root / "p005.jpg", root / "p007.jpg"]
    report = ing.add_paths(root, index_dir, named, "default", progress=False, encode=backwards_encode)
    assert (
        report.added == ["p040.jpg", "p041.jpg"] and report.changed == ["p005.jpg"] and report.unchanged == 1
    )
    assert reads[0] <= 2  # the two named photos indexed before: not the 40 entries
    assert report.size == 42 and len(SearchIndex.open(index_dir)) == 42


def test_a_damaged_shard_is_found_and_rebuilt_by_an_add(tmp_path):
    root = make_folder(tmp_path, 5)
    index_dir = tmp_path / "ix"
    ix, _ = update_index(root, index_dir, "default", progress=False, encode=backwards_encode)
    (shard,) = read_manifest(index_dir)["shards"]
    data = (index_dir / SHARDS / shard).read_bytes()
    (index_dir / SHARDS / shard).write_bytes(data[: len(data) // 2])
    make_folder(tmp_path, 1, start=5)
    report = ing.add_paths(
        root, index_dir, [root / "p005.jpg"], "default", progress=False, encode=backwards_encode
    )
    assert list(report.damaged) == [shard] and len(report.repaired) == 5 and report.added == ["p005.jpg"]
    ix = SearchIndex.open(index_dir)
    np.testing.assert_array_equal(ix.vectors, expected_vectors(ix))


def test_paths_an_add_cannot_take_are_clear_errors(tmp_path):
    root = make_folder(tmp_path, 3)
    index_dir = tmp_path / "ix"
    (root / ".hidden").mkdir()
    (root / "notes.txt").write_text("not a photo")
    (tmp_path / "elsewhere.jpg").write_bytes(b"photo")
    (root / "linked").symlink_to(tmp_path, target_is_directory=True)

    def add(path):
        ing.add_paths(root, index_dir, [path], "default", progress=False, encode=backwards_encode)

    for path, error in [
        (tmp_path / "elsewhere.jpg", "not below the indexed folder"),
        (root / "../elsewhere.jpg", "not below the indexed folder"),
        (root / ".hidden", "hidden"),
        (root / "notes.txt", "not an image file"),
        (root / "linked", "a symbolic link to a folder"),
        (root / "linked" / "elsewhere.jpg", "not below the indexed folder"),
        (root / "p009.jpg", "no such photo"),
    ]:
        with pytest.raises(DatasetError, match=error):
            add(path)
    add(root / "p001.jpg")
    with pytest.raises(IndexFormatError, match="with the model default; photos are added"):
        ing.add_paths(root, index_dir, [root / "p002.jpg"], "zero-shot", progress=False)


def test_a_manifest_written_before_the_shard_counters_gets_them(tmp_path):
    root = make_folder(tmp_path, 4)
    index_dir = tmp_path / "ix"
    update_index(root, index_dir, "default", progress=False, encode=backwards_encode)
    with sqlite3.connect(index_dir / MANIFEST) as conn:  # what the manifest was before them
        for trigger in ("entry_added", "entry_removed", "entry_moved"):
            conn.execute(f"DROP TRIGGER {trigger}")
        conn.execute("ALTER TABLE shards DROP COLUMN live")
        conn.execute("ALTER TABLE shards DROP COLUMN verified")
    make_folder(tmp_path, 1, start=4)
    report = ing.add_paths(
        root, index_dir, [root / "p004.jpg"], "default", progress=False, encode=backwards_encode
    )
    assert report.size == 5 and len(SearchIndex.open(index_dir)) == 5
    writer = ManifestWriter(index_dir)
    try:
        (gen,) = writer.conn.execute("SELECT gen FROM pointers WHERE name = 'live'").fetchone()
        counted = dict(writer.conn.execute("SELECT shard, COUNT(*) FROM entries GROUP BY shard"))
        assert {s.name: s.live for s in writer.shards(gen)} == counted and writer.count(gen) == 5
    finally:
        writer.close()


def test_cli_add_takes_paths_as_options_and_from_standard_input(tmp_path, monkeypatch):
    monkeypatch.setattr(
        ing,
        "local_encode_chunks",
        lambda model_dir, root, chunks, loaded=None: backwards_encode(model_dir, root, chunks),
    )
    root = make_folder(tmp_path, 3)
    index_dir = tmp_path / "ix"
    result = runner.invoke(
        app, ["index", str(root), "--out", str(index_dir), "--add", str(root / "p001.jpg")]
    )
    assert result.exit_code == 0, result.output
    assert (
        "indexed 1 images" in result.output and "(added 1, changed 0, removed 0, unchanged 0" in result.output
    )
    named = f"{root / 'p001.jpg'}\n{root / 'p002.jpg'}\n"
    result = runner.invoke(app, ["index", str(root), "--out", str(index_dir), "--add", "-"], input=named)
    assert result.exit_code == 0, result.output
    assert (
        "indexed 2 images" in result.output and "(added 1, changed 0, removed 0, unchanged 1" in result.output
    )
    result = runner.invoke(app, ["index", str(root), "--out", str(index_dir), "--add", str(tmp_path)])
    assert result.exit_code == 2 and "not below the indexed folder" in result.output


def test_a_folder_named_drops_the_photos_gone_from_it_and_a_folder_gone_drops_all(tmp_path, monkeypatch):
    """`--add FOLDER`: the photos indexed below it that are gone are dropped (looked up by a range of
    ids, not by reading the index), as are all of a folder that is gone; an unknown folder is an error."""
    monkeypatch.setattr(ing, "COMPACT_ALL_ROWS", 8)
    root = make_folder(tmp_path, 12)  # p000-p011, some of them in sub/
    index_dir = tmp_path / "ix"
    update_index(root, index_dir, "default", progress=False, encode=backwards_encode)
    in_sub = sorted(p.relative_to(root).as_posix() for p in (root / "sub").glob("*.jpg"))
    assert len(in_sub) >= 2
    (root / in_sub[0]).unlink()
    reads = count_entry_reads(monkeypatch)
    report = ing.add_paths(
        root, index_dir, [root / "sub"], "default", progress=False, encode=backwards_encode
    )
    assert report.removed == [in_sub[0]] and report.unchanged == len(in_sub) - 1
    assert reads[0] <= len(in_sub)  # the folder's entries, not the index's 12
    shutil.rmtree(root / "sub")
    report = ing.add_paths(
        root, index_dir, [root / "sub"], "default", progress=False, encode=backwards_encode
    )
    assert report.removed == in_sub[1:] and report.size == 12 - len(in_sub)
    assert not any(i.startswith("sub/") for i in SearchIndex.open(index_dir).ids)
    with pytest.raises(DatasetError, match="no such folder"):
        ing.add_paths(root, index_dir, [root / "sub"], "default", progress=False, encode=backwards_encode)


def test_a_refused_add_leaves_an_interrupted_rebuild_for_its_full_run(tmp_path):
    """An add with another model than the index's is refused before it writes anything: a rebuild with
    a third model that a full run left aside (interrupted) is still there for that run to carry on."""

    class Interrupted(Exception):
        pass

    def stop(done: int, total: int) -> None:
        raise Interrupted

    root = make_folder(tmp_path, 6)
    index_dir = tmp_path / "ix"
    update_index(root, index_dir, "default", progress=False, encode=backwards_encode)
    with pytest.raises(Interrupted):
        update_index(root, index_dir, "zero-shot", progress=False, chunk_size=2, on_chunk=stop)
    writer = ManifestWriter(index_dir)
    try:
        aside = writer.generations()[1]
        assert aside is not None and aside["model_source"] == "zero-shot"
        kept = writer.count(aside["gen"])
    finally:
        writer.close()
    other = create_model("zero-shot").fit().save(tmp_path / "other-model")
    with pytest.raises(IndexFormatError, match="photos are added to an index of the same folder"):
        ing.add_paths(root, index_dir, [root / "p001.jpg"], other, progress=False)
    writer = ManifestWriter(index_dir)
    try:
        assert writer.generations()[1] == aside and writer.count(aside["gen"]) == kept
    finally:
        writer.close()
