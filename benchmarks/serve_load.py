"""Load test of `cbir serve`: concurrent clients against an index, on loopback, for a bounded time.

    python -m benchmarks.serve_load [--index runs/rsicd-index | --synthetic 10000] [--clients 50]
                                    [--seconds 30] [--baseline REV]

The index is a real one (`--index`; built when missing from every RSICD image, 10,921 aerial photos,
image features from the cache), or `--synthetic N`: N small generated JPEGs with random unit vectors
of the shipped default model's dimension, written straight into an index (no network pass; the
search work per query is the same as for real vectors). Starts `cbir serve` in a subprocess on
127.0.0.1 and a free port, then runs the clients: each sends one request after another, cycling
through a text search (an RSICD test caption, each client its own), a search by an indexed image and
a thumbnail. With `--baseline REV` the same load runs first against the server of git revision REV
(its `src/`, extracted to a temporary folder), then against this checkout's, and the ratio of their
request rates is printed. Prints throughput and latency per kind of request and in all; exits 1 when
any request failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RSICD = REPO.parent / "shared" / "datasets" / "rsicd"
MAX_CLIENTS = 200
MAX_SECONDS = 120
REQUEST_TIMEOUT = 30.0


def build_if_missing(index_dir: Path) -> None:
    from cbir.index import build_index

    if not index_dir.exists():
        print(f"building {index_dir} over {RSICD / 'images'} (zero-shot model)", flush=True)
        build_index(RSICD / "images", index_dir, "zero-shot")


def synthetic_index(index_dir: Path, n: int, model: Path, seed: int = 0) -> None:
    """An index of `n` generated photos (64x64 JPEGs of random colours) and random unit vectors, in the
    index format of `cbir.index` (written with its own helpers), embedded by no model: built in
    seconds. `model` is copied in as the index's model (the one that embeds text queries)."""
    from PIL import Image

    from benchmarks.index_growth import write_manifest
    from cbir import indexing
    from cbir.filters import photo_metadata
    from cbir.models import load_model

    if indexing.is_index(index_dir):
        return
    print(f"writing a synthetic index of {n} photos to {index_dir}", flush=True)
    rng = np.random.default_rng(seed)
    photos = index_dir.parent / f"{index_dir.name}-photos"
    photos.mkdir(parents=True, exist_ok=True)
    (index_dir / indexing.SHARDS).mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(n):
        path = photos / f"{i // 1000:02d}" / f"photo{i:05d}.jpg"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((64, 64)).save(path)
        todo = indexing.Todo(path.relative_to(photos).as_posix(), path, path.stat(), None, False)
        entries.append({**todo.entry(indexing.file_hash(path)), "meta": photo_metadata(path)})
    dim = int(load_model(model).embed_texts(["a photo"]).shape[1])
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    shard = indexing.write_shard(index_dir, vectors)
    write_manifest(index_dir, photos.resolve(), entries, (shard, dim), model)


def baseline_source(rev: str, into: Path) -> Path:
    """The `src/` folder of git revision `rev`, extracted under `into`: today's server to compare with."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "src"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into / "src"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(index_dir: Path, port: int, src: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(src)}
    command = ["serve", "--index", str(index_dir), "--port", str(port)]
    return subprocess.Popen([sys.executable, "-m", "cbir.cli", *command], env=env)


async def wait_until_up(base: str, server: subprocess.Popen, timeout: float = 300) -> int:
    import httpx

    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=base) as client:
        while time.monotonic() < deadline:
            if server.poll() is not None:
                raise SystemExit(f"the server exited with status {server.returncode}")
            try:
                health = (await client.get("/api/health")).json()
                if health["status"] == "ok":  # a server that loads in the background says "loading"
                    return health["images"]
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.5)
    raise SystemExit(f"the server did not answer within {timeout:.0f}s")


def request_plan(ids: list[str], captions: list[str], client: int) -> list[tuple[str, str]]:
    """(kind, url) cycle for one client: different captions and images per client."""
    rng = np.random.default_rng(client)
    plan = []
    for caption in rng.choice(captions, size=20, replace=False):
        plan.append(("text search", f"/api/search?q={quote(caption)}&k=20"))
        plan.append(("similar search", f"/api/similar/{quote(ids[rng.integers(len(ids))])}?k=20"))
        plan.append(("thumbnail", f"/thumbs/{quote(ids[rng.integers(len(ids))])}"))
    return plan


async def run_client(base: str, plan: list[tuple[str, str]], stop_at: float, log: list) -> None:
    import httpx

    async with httpx.AsyncClient(base_url=base, timeout=REQUEST_TIMEOUT) as client:
        i = 0
        while time.monotonic() < stop_at:
            kind, url = plan[i % len(plan)]
            i += 1
            start = time.perf_counter()
            try:
                ok = (await client.get(url)).status_code == 200
            except httpx.HTTPError:
                ok = False
            log.append((kind, time.perf_counter() - start, ok))


def report(log: list, seconds: float) -> list[dict]:
    rows = []
    for kind in ("text search", "similar search", "thumbnail", "all"):
        part = [(t, ok) for k, t, ok in log if kind in ("all", k)]
        if not part:  # a run too short for every kind of request to finish once
            continue
        ms = np.array([t for t, _ in part]) * 1000
        rows.append(
            {
                "requests": kind,
                "count": len(part),
                "req/s": len(part) / seconds,
                "p50 ms": float(np.percentile(ms, 50)),
                "p99 ms": float(np.percentile(ms, 99)),
                "errors": sum(not ok for _, ok in part),
            }
        )
    return rows


async def load_test(index_dir: Path, clients: int, seconds: float, plans: list, src: Path) -> dict:
    """One server (the code of `src`), `clients` clients for `seconds`: the report rows."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = start_server(index_dir, port, src)
    try:
        n_images = await wait_until_up(base, server)
        print(
            f"{n_images} images; {clients} clients for {seconds:g}s on {base}",
            flush=True,
        )
        log: list = []
        start = time.monotonic()
        stop_at = start + seconds
        await asyncio.gather(*(run_client(base, plans[c], stop_at, log) for c in range(clients)))
        elapsed = time.monotonic() - start  # includes the requests in flight at the deadline
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:  # still draining its queue of abandoned requests
            server.kill()
            server.wait()
    rows = report(log, elapsed)
    print(f"\n{'requests':15} {'count':>7} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}")
    for r in rows:
        print(
            f"{r['requests']:15} {r['count']:7d} {r['req/s']:8.1f} {r['p50 ms']:8.1f} "
            f"{r['p99 ms']:8.1f} {r['errors']:7d}"
        )
    print(f"{elapsed:.1f}s; load average after: {os.getloadavg()[0]:.1f}\n", flush=True)
    return {"images": n_images, "clients": clients, "seconds": elapsed, "rows": rows}


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--index", type=Path, help="A real index (default: RSICD, built when missing).")
    parser.add_argument("--synthetic", type=int, help="Use a synthetic index of this many photos instead.")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--baseline", help="Also load the server of this git revision first, and compare.")
    parser.add_argument("--json", type=Path, help="Also write the results here.")
    args = parser.parse_args()
    if not (1 <= args.clients <= MAX_CLIENTS and 0 < args.seconds <= MAX_SECONDS):
        parser.error(f"--clients must be 1..{MAX_CLIENTS} and --seconds 0..{MAX_SECONDS}")

    from cbir.datasets import load_dataset
    from cbir.index import SearchIndex

    with tempfile.TemporaryDirectory() as tmp:
        sources = {"this checkout": REPO / "src"}
        if args.baseline:
            sources = {f"baseline {args.baseline}": baseline_source(args.baseline, Path(tmp)), **sources}
        if args.synthetic:
            index_dir = args.index or REPO / "runs" / f"serve-synthetic-{args.synthetic}"
            # the first server's shipped model: one that every compared revision can read
            synthetic_index(index_dir, args.synthetic, next(iter(sources.values())) / "cbir/models/default")
        else:
            index_dir = args.index or REPO / "runs" / "rsicd-index"
            build_if_missing(index_dir)
        ids = SearchIndex.open(index_dir).ids
        captions = sorted(set(load_dataset(RSICD).split("test").captions))
        plans = [request_plan(ids, captions, c) for c in range(args.clients)]
        print(
            f"{platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}", flush=True
        )
        results = {}
        for name, src in sources.items():
            print(f"== {name} ({src})", flush=True)
            results[name] = await load_test(index_dir, args.clients, args.seconds, plans, src)
    rates = [r["rows"][-1]["req/s"] for r in results.values()]
    if len(rates) == 2:
        print(f"request rate, this checkout / baseline: {rates[1] / rates[0]:.2f}x", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 1 if any(r["rows"][-1]["errors"] for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
