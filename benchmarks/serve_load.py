"""Load test of `cbir serve`: concurrent clients against a real index, on loopback, for a bounded time.

    python benchmarks/serve_load.py [--index runs/rsicd-index] [--clients 50] [--seconds 30]

Builds the index when it is missing (every RSICD image, 10,921 aerial photos, zero-shot model; image
features come from the cache), starts `cbir serve` in a subprocess on 127.0.0.1 and a free port, then
runs the clients: each sends one request after another, cycling through a text search (an RSICD test
caption, each client its own), a search by an indexed image and a thumbnail. Prints throughput and
latency per kind of request and in all; exits 1 when any request failed.
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
        build_index(RSICD / "images", index_dir)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(index_dir: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
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
                return (await client.get("/api/health")).json()["images"]
            except httpx.TransportError:
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


async def load_test(index_dir: Path, clients: int, seconds: float, plans: list) -> dict:
    """One server, `clients` clients for `seconds`: the report rows."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = start_server(index_dir, port)
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
        server.wait(30)
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
    parser.add_argument("--index", type=Path, default=REPO / "runs" / "rsicd-index")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--json", type=Path, help="Also write the results here.")
    args = parser.parse_args()
    if not (1 <= args.clients <= MAX_CLIENTS and 0 < args.seconds <= MAX_SECONDS):
        parser.error(f"--clients must be 1..{MAX_CLIENTS} and --seconds 0..{MAX_SECONDS}")

    from cbir.datasets import load_dataset
    from cbir.index import SearchIndex

    build_if_missing(args.index)
    ids = SearchIndex.open(args.index).ids
    captions = sorted(set(load_dataset(RSICD).split("test").captions))
    plans = [request_plan(ids, captions, c) for c in range(args.clients)]
    print(f"{platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}", flush=True)
    result = await load_test(args.index, args.clients, args.seconds, plans)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 1 if result["rows"][-1]["errors"] else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
