"""The encode stage on Ray (cbir.distributed): a local 2-worker Ray (`cluster`, once per session), indexes a
small folder of real photos (and a corrupt file) exactly as the local path does, and survives a crashed
worker and a killed driver without losing anything."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cbir.distributed import KILL_ONCE_ENV, ray_encode_chunks
from cbir.index import SearchIndex, read_manifest, update_index
from tests.conftest import FLICKR8K

N_PHOTOS = 12
CHUNK = 3
QUERY = "a dog running on grass"


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """12 Flickr8k photos (every 40th of the folder) and one truncated JPEG."""
    folder = tmp_path_factory.mktemp("ray-photos")
    sources = sorted((FLICKR8K / "images").glob("*.jpg"))[: 40 * N_PHOTOS : 40]
    for source in sources:
        shutil.copy(source, folder / source.name)
    (folder / "corrupt.jpg").write_bytes(sources[0].read_bytes()[:2000])
    return folder


@pytest.fixture(scope="module")
def local_index(photos, tmp_path_factory) -> SearchIndex:
    return update_index(photos, tmp_path_factory.mktemp("local") / "ix", chunk_size=CHUNK, progress=False)[0]


def assert_same_index(got: SearchIndex, want: SearchIndex) -> None:
    """Same ids, content keys and failures, vectors within 1e-5, same search results."""
    assert got.ids == want.ids and len(got) == N_PHOTOS
    assert got.failed == want.failed and list(got.failed) == ["corrupt.jpg"]
    sha1 = {e["id"]: e["sha1"] for e in _entries(got)}
    assert sha1 == {e["id"]: e["sha1"] for e in _entries(want)}
    np.testing.assert_allclose(np.asarray(got.vectors), np.asarray(want.vectors), atol=1e-5)
    ranked = [r.id for r in got.search_text(QUERY, k=5)]
    assert ranked == [r.id for r in want.search_text(QUERY, k=5)]


def _entries(ix: SearchIndex) -> list[dict]:
    return read_manifest(ix.path)["entries"]


# Ray start-up and worker processes: a minute or more on a busy machine.
@pytest.mark.slow
def test_ray_index_equals_local_index(cluster, photos, local_index, tmp_path):
    arrived = []
    ix, report = update_index(
        photos,
        tmp_path / "ix",
        chunk_size=CHUNK,
        progress=False,
        encode=ray_encode_chunks(workers=2),
        on_chunk=lambda done, total: arrived.append((done, total)),
    )
    assert_same_index(ix, local_index)
    assert len(report.added) == N_PHOTOS and list(report.failed) == ["corrupt.jpg"]
    done = [d for d, _ in arrived]  # chunks (of 3, 3, 3, 3, 1 files) are committed as they come back
    assert len(arrived) == 5 and done == sorted(done) and arrived[-1] == (N_PHOTOS + 1, N_PHOTOS + 1)


@pytest.mark.slow
def test_a_crashed_worker_is_restarted_and_nothing_is_lost(cluster, photos, local_index, tmp_path):
    marker = tmp_path / "killed"
    crash_once = {"runtime_env": {"env_vars": {KILL_ONCE_ENV: str(marker)}}}
    ix, _ = update_index(
        photos,
        tmp_path / "ix",
        chunk_size=CHUNK,
        progress=False,
        encode=ray_encode_chunks(workers=1, actor_options=crash_once),
    )
    assert marker.exists()  # an actor did kill itself mid-run
    assert_same_index(ix, local_index)


DRIVER = """
import sys, time
from cbir.distributed import ray_encode_chunks
from cbir.index import update_index

def stop_after_first_chunk(done, total):
    print(done, flush=True)
    time.sleep(600)  # killed here, mid-run, with one chunk committed

update_index(sys.argv[1], sys.argv[2], chunk_size=int(sys.argv[4]), progress=False,
             encode=ray_encode_chunks(sys.argv[3], workers=1), on_chunk=stop_after_first_chunk)
"""


@pytest.mark.slow
def test_a_killed_driver_loses_nothing_and_a_cli_rerun_finishes(cluster, photos, local_index, tmp_path):
    out = tmp_path / "ix"
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER, str(photos), str(out), cluster, str(CHUNK)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        committed = int(driver.stdout.readline())  # files of the one chunk committed (3, or the last 1)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    manifest = read_manifest(out)
    assert len(manifest["entries"]) + len(manifest["failed"]) == committed
    kept = len(manifest["entries"])

    cbir = Path(sys.executable).with_name("cbir")
    rerun = subprocess.run(
        [str(cbir), "index", str(photos), "--out", str(out), "--ray", cluster, "--ray-workers", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert rerun.returncode == 0, rerun.stderr
    assert f"(added {N_PHOTOS - kept}, changed 0, removed 0, unchanged {kept};" in rerun.stdout
    assert_same_index(SearchIndex.open(out), local_index)


def test_without_ray_the_cli_says_how_to_install_it(photos, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from cbir.cli import app

    monkeypatch.setitem(sys.modules, "ray", None)  # as if the ray extra were not installed
    result = CliRunner().invoke(app, ["index", str(photos), "--out", str(tmp_path / "ix"), "--ray"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "pip install 'cbir[ray]'" in result.output
    assert not (tmp_path / "ix").exists()  # refused before anything was written


@pytest.mark.parametrize(
    ("argv", "spelled"),
    [
        (["index", "P", "--ray", "10.0.0.5:6379"], ["index", "P", "--ray-address", "10.0.0.5:6379"]),
        (["index", "P", "--ray=auto"], ["index", "P", "--ray-address", "auto"]),
        (["index", "--ray", "[2001:db8::5]:6379"], ["index", "--ray-address", "[2001:db8::5]:6379"]),
        (
            ["index", "P", "--ray", "ray://head:10001", "-o", "X"],
            ["index", "P", "--ray-address", "ray://head:10001", "-o", "X"],
        ),
        (["index", "--ray", "P", "-o", "X"], ["index", "--ray", "P", "-o", "X"]),  # a folder, not an address
        (["index", "P", "--ray"], ["index", "P", "--ray"]),
        (["train", "-d", "D", "--ray", "auto"], ["train", "-d", "D", "--ray-address", "auto"]),
    ],
)
def test_ray_takes_an_optional_address(argv, spelled):
    from cbir.cli import ray_address_spelling

    assert ray_address_spelling(argv) == spelled


def test_a_folder_named_like_an_address_stays_a_folder(tmp_path, monkeypatch):
    from cbir.cli import ray_address_spelling

    monkeypatch.chdir(tmp_path)
    (tmp_path / "photos:2024").mkdir()
    assert ray_address_spelling(["index", "--ray", "photos:2024", "-o", "X"]) == [
        "index",
        "--ray",
        "photos:2024",
        "-o",
        "X",
    ]
