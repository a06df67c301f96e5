"""Shared fixtures: real slices of ../shared/datasets, written as small dataset folders."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# CBIR_TEST_DATA points elsewhere, e.g. when mutmut runs the tests from a copy in mutants/.
SHARED = Path(os.environ.get("CBIR_TEST_DATA", REPO.parent / "shared" / "datasets"))
RSICD = SHARED / "rsicd"
KAGGLE_MINI = SHARED / "cs5785-mini"
FLICKR8K = SHARED / "flickr8k"
# What `cbir evaluate --json` promises other tools (the public interface).
EVALUATE_JSON_KEYS = (
    *("t2i_r1", "t2i_r5", "t2i_r10", "i2t_r1", "i2t_r5", "i2t_r10"),
    *("mR", "map20", "r20", "medr", "n_images", "n_queries"),
)

# Features computed by tests are cached inside the repo (ignored by git): reruns are fast.
os.environ.setdefault("CBIR_CACHE_DIR", str(REPO / ".cache" / "test-features"))
# Networks exported for ONNX Runtime, kept there even by tests that switch to an empty feature cache.
os.environ.setdefault("CBIR_ONNX_DIR", str(REPO / ".cache" / "test-onnx"))
os.environ["CBIR_NO_PROGRESS"] = "1"
# `cbir index` remembers the last index in a data folder: a throwaway one, never the user's.
os.environ.setdefault("CBIR_DATA_DIR", tempfile.mkdtemp(prefix="cbir-test-data-"))


def pytest_collection_modifyitems(config, items):
    if not all(d.is_dir() for d in (RSICD, KAGGLE_MINI, FLICKR8K)):
        raise pytest.UsageError(f"the tests read real data from {SHARED}; it is missing")


@pytest.fixture(scope="session")
def cluster(tmp_path_factory) -> str:
    """One local 2-worker Ray for the session (its address, for drivers in other processes). Its workers
    get an empty feature cache, so they compute every feature themselves, and this checkout's cbir."""
    ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'cbir[ray]')")
    from cbir.distributed import connect

    worker_env = {
        "CBIR_CACHE_DIR": str(tmp_path_factory.mktemp("ray-worker-cache")),
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    with pytest.MonkeyPatch.context() as env:  # the local Ray's processes inherit the environment
        for name, value in worker_env.items():
            env.setenv(name, value)
        connect(workers=2)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="session")
def rsicd():
    from cbir.datasets import load_dataset

    return load_dataset(RSICD)


def write_karpathy_slice(dataset, out: Path, per_split: int, name: str = "rsicd_slice") -> Path:
    """A Karpathy JSON over a real, evenly spread slice of a dataset, pointing at the shared images."""
    part = dataset.sample(per_split)
    out.mkdir(parents=True, exist_ok=True)
    images = []
    for i, path in enumerate(part.images):
        images.append(
            {
                "filename": path.name,
                "filepath": str(path.parent),
                "split": part.splits[i],
                "imgid": i,
                "sentences": [{"raw": c} for c in part.captions_of(i)],
                "tags": part.tags[i] if part.tags else [],
            }
        )
    (out / f"dataset_{name}.json").write_text(
        json.dumps({"dataset": name.replace("_", "-"), "images": images})
    )
    return out


@pytest.fixture(scope="session")
def rsicd_slice_dir(rsicd, tmp_path_factory) -> Path:
    """120 RSICD images (40 per split) with their captions."""
    return write_karpathy_slice(rsicd, tmp_path_factory.mktemp("rsicd-slice"), 40)


@pytest.fixture(scope="session")
def rsicd_slice(rsicd_slice_dir):
    from cbir.datasets import load_dataset

    return load_dataset(rsicd_slice_dir)


@pytest.fixture(scope="session")
def flickr8k():
    from cbir.datasets import load_dataset

    return load_dataset(FLICKR8K)


@pytest.fixture(scope="session")
def flickr8k_slice_dir(flickr8k, tmp_path_factory) -> Path:
    """90 Flickr8k everyday photos (30 per split) with their captions."""
    return write_karpathy_slice(flickr8k, tmp_path_factory.mktemp("flickr8k-slice"), 30, "flickr8k_slice")


@pytest.fixture(scope="session")
def kaggle_mini():
    from cbir.datasets import load_dataset

    return load_dataset(KAGGLE_MINI)


def write_legacy_manifest(index_dir: Path, edit=None) -> dict:
    """Rewrite an index's manifest as the JSON file that cbir wrote before its SQLite manifest (format
    1: `index.json`, the live generation with its entries sorted by id), optionally edited first."""
    import json

    from cbir.manifest import LEGACY_MANIFEST, MANIFEST, read_manifest

    manifest = read_manifest(index_dir)
    manifest.pop("gen", None)
    manifest.update(version=1, entries=sorted(manifest["entries"], key=lambda e: e["id"]))
    if edit is not None:
        edit(manifest)
    for path in index_dir.glob(f"{MANIFEST}*"):
        path.unlink()
    (index_dir / LEGACY_MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest
