"""A killed or damaged feature-cache write costs recomputation, never a broken cache."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from cbir.cli import app
from cbir.encoders import FeatureCache
from cbir.encoders.image import ImageEncoder
from cbir.index import SearchIndex, update_index
from tests.conftest import REPO

runner = CliRunner()

# Encodes the photos given on the command line, but dies by SIGKILL halfway through writing the shard.
KILLED_WRITER = """
import os, signal, sys
from pathlib import Path
import numpy as np
from cbir.encoders.image import ImageEncoder

def half_then_kill(file, array, **options):
    f = open(file, "wb") if isinstance(file, (str, os.PathLike)) else file
    f.write(b"\\x93NUMPY" + bytes(1000))
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)

np.save = half_then_kill
ImageEncoder(cache_dir=sys.argv[1]).encode([Path(p) for p in sys.argv[2:]], progress=False)
"""


def fresh_cache_state() -> None:
    """What a new process sees: no FeatureCache instance already holding rows."""
    FeatureCache._open.clear()


@pytest.fixture
def use_empty_cache(tmp_path, monkeypatch):
    """Call to switch this process to an empty feature cache (after computing any reference)."""

    def switch():
        monkeypatch.setenv("CBIR_CACHE_DIR", str(tmp_path / "cache"))
        fresh_cache_state()
        return tmp_path / "cache"

    yield switch
    fresh_cache_state()


def test_kill_during_cache_write_then_index_works(folder, tmp_path, zero_shot_dir, use_empty_cache):
    reference = update_index(folder, tmp_path / "reference", zero_shot_dir, progress=False)[0]
    cache_dir = use_empty_cache()
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    args = [sys.executable, "-c", KILLED_WRITER, str(cache_dir), *map(str, sorted(folder.rglob("*.jpg")))]
    assert subprocess.run(args, env=env).returncode == -signal.SIGKILL
    (temp,) = [p for p in cache_dir.rglob(".*") if p.is_file()]  # the half-written shard
    fresh_cache_state()
    result = runner.invoke(
        app, ["index", str(folder), "--out", str(tmp_path / "ix"), "-m", str(zero_shot_dir)]
    )
    assert result.exit_code == 0, result.output
    ix = SearchIndex.open(tmp_path / "ix")
    np.testing.assert_allclose(np.asarray(ix.vectors), np.asarray(reference.vectors), atol=1e-5)
    assert temp.exists()  # never read, and left alone (it may be another process's write in progress)


def test_damaged_shard_is_set_aside_with_a_warning_and_recomputed(folder, use_empty_cache):
    cache_dir = use_empty_cache()
    paths = sorted(folder.rglob("*.jpg"))
    encoder = ImageEncoder()
    first = encoder.encode(paths[:6], progress=False).pooled
    encoder.encode(paths[6:], progress=False)
    shards = sorted(cache_dir.rglob("*.npy"), key=lambda p: p.stat().st_mtime_ns)
    assert len(shards) == 2
    damaged = shards[0]
    damaged.write_bytes(damaged.read_bytes()[:200])  # truncated: its rows cannot be mapped
    (damaged.parent / ".legacy.tmp.npz").write_bytes(b"PK")  # an older layout's temporary name
    fresh_cache_state()
    with pytest.warns(UserWarning, match=rf"{damaged}: damaged feature-cache shard .* set aside"):
        again = ImageEncoder().encode(paths, progress=False)
    assert not damaged.exists() and damaged.with_name(damaged.name + ".damaged").exists()
    np.testing.assert_allclose(again.pooled[:6], first, atol=1e-5)
    fresh_cache_state()
    assert len(FeatureCache.open(damaged.parent.relative_to(cache_dir).as_posix())) == len(paths)
