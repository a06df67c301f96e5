"""Shard damage is seen (checksum per shard, verified on open), named, and repaired by a rerun."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

import cbir.index
from cbir.cli import app
from cbir.index import SHARDS, IndexFormatError, SearchIndex, file_hash, read_manifest, update_index
from tests.conftest import write_legacy_manifest

runner = CliRunner()


def only_shard(index_dir):
    (shard,) = {e["shard"] for e in read_manifest(index_dir)["entries"]}
    return index_dir / SHARDS / shard


def swap_rows(path, a: int, b: int) -> None:
    """Same size, same header, two rows exchanged: what a bad disk or a stray writer might leave."""
    arr = np.load(path)
    arr[[a, b]] = arr[[b, a]]
    with path.open("r+b") as f:
        np.save(f, arr)


def truncate(path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize(
    ("damage", "error"), [(swap_rows, r"damaged shard \(checksum mismatch\)"), (truncate, "damaged shard")]
)
def test_damaged_shard_is_named_then_rebuilt_by_a_rerun(folder, tmp_path, zero_shot_dir, damage, error):
    index_dir = tmp_path / "ix"
    ix, _ = update_index(folder, index_dir, zero_shot_dir, progress=False)
    before = np.array(ix.vectors)
    shard = only_shard(index_dir)
    damage(shard, *((0, 1) if damage is swap_rows else ()))
    with pytest.raises(IndexFormatError, match=rf"{shard}: {error}"):
        SearchIndex.open(index_dir)
    result = runner.invoke(app, ["search", "a dog", "--index", str(index_dir)])
    assert result.exit_code == 2 and str(shard) in result.output

    result = runner.invoke(app, ["index", str(folder), "--out", str(index_dir), "-m", str(zero_shot_dir)])
    assert result.exit_code == 0, result.output
    assert f"{shard}: " in result.output and "re-embedded 10 image(s)" in result.output
    assert "added 0" in result.output
    np.testing.assert_allclose(np.asarray(SearchIndex.open(index_dir).vectors), before, atol=1e-5)
    _, report = update_index(folder, index_dir, zero_shot_dir, progress=False)
    assert report.unchanged == 10 and not report.damaged and not report.repaired


def test_missing_shard_is_named_and_rebuilt(folder, tmp_path, zero_shot_dir):
    index_dir = tmp_path / "ix"
    update_index(folder, index_dir, zero_shot_dir, progress=False)
    shard = only_shard(index_dir)
    shard.unlink()
    with pytest.raises(IndexFormatError, match=rf"{shard}: shard missing"):
        SearchIndex.open(index_dir)
    ix, report = update_index(folder, index_dir, zero_shot_dir, progress=False)
    assert len(report.repaired) == 10 and list(report.damaged) == [shard.name] and len(ix) == 10


def test_index_written_before_checksums_gets_them(folder, tmp_path, zero_shot_dir):
    index_dir = tmp_path / "ix"
    update_index(folder, index_dir, zero_shot_dir, progress=False)
    write_legacy_manifest(index_dir, lambda manifest: manifest.pop("shards"))  # a JSON manifest of old
    assert len(SearchIndex.open(index_dir)) == 10  # still opens
    _, report = update_index(folder, index_dir, zero_shot_dir, progress=False)
    assert report.unchanged == 10
    shard = only_shard(index_dir)
    assert read_manifest(index_dir)["shards"] == {shard.name: file_hash(shard)}


def test_large_index_skips_verify_on_open_but_a_rerun_repairs(folder, tmp_path, zero_shot_dir, monkeypatch):
    index_dir = tmp_path / "ix"
    ix, _ = update_index(folder, index_dir, zero_shot_dir, progress=False)
    before = np.array(ix.vectors)
    swap_rows(only_shard(index_dir), 0, 1)
    monkeypatch.setattr(cbir.index, "VERIFY_ON_OPEN_MAX_BYTES", 0)
    assert len(SearchIndex.open(index_dir)) == 10  # not verified on open (too costly when large)
    ix, report = update_index(folder, index_dir, zero_shot_dir, progress=False)
    assert len(report.repaired) == 10
    np.testing.assert_allclose(np.asarray(ix.vectors), before, atol=1e-5)
