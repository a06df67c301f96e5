"""The fixed cost of `cbir index` before the first photo (issue 14), by phase, in fresh processes.

    PYTHONPATH=src python -m benchmarks.startup                       # this checkout
    PYTHONPATH=src python -m benchmarks.startup --src before=/tmp/main-src --src after=src
    PYTHONPATH=src python -m benchmarks.startup --model lite0=runs/a --model lite2=runs/b   # other models

Each case runs `cbir index` in a new process on one photo that no cache has seen (a copy of a
cs5785-mini photo with one pixel changed), so the time is start-up plus one photo:
  - `fresh`: a new index of a folder holding only that photo;
  - `update`: that photo added to an index of 8 photos (their features cached);
with the shipped default model and with `--model zero-shot` (or the `--model` directories given), and
zero-shot once more with an empty
feature cache (the very first index on a machine: the class vocabulary is embedded then). The child
times phases by wrapping functions (time excludes nested phases); "other" is the rest of the process
(interpreter start, argument parsing, scanning, writing the index). Wall and CPU seconds (CPU of every
thread) are both given: on a busy machine CPU time is the steadier figure. With several `--src`, the
code trees run one after the other in one run (each with its own empty feature cache).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PHOTOS = REPO.parent / "shared" / "datasets" / "cs5785-mini" / "images_train"
EXISTING = 8
PHASES = ("import cbir", "import torch", "class vocabulary", "model load", "network load", "first batch")

# Run in the child: wrap the functions each phase is made of, then run `cbir index` as the CLI does.
CHILD = r"""
import builtins, json, sys, time
clock = lambda: (time.perf_counter(), time.process_time())
start = clock()
totals, stack = {}, []

def enter(name):
    stack.append([name, clock(), (0.0, 0.0)])

def leave():
    name, (w0, c0), (nw, nc) = stack.pop()
    w, c = clock()
    spent = (w - w0, c - c0)
    t = totals.setdefault(name, [0.0, 0.0])
    t[0] += spent[0] - nw
    t[1] += spent[1] - nc
    if stack:  # the parent phase excludes this one
        stack[-1][2] = (stack[-1][2][0] + spent[0], stack[-1][2][1] + spent[1])

def timed(owner, attr, name):
    original = getattr(owner, attr)
    def wrapper(*args, **kwargs):
        enter(name)
        try:
            return original(*args, **kwargs)
        finally:
            leave()
    setattr(owner, attr, wrapper)

real_import = builtins.__import__
def import_hook(name, *args, **kwargs):
    if name.partition(".")[0] != "torch" or "torch" in sys.modules:
        return real_import(name, *args, **kwargs)
    enter("import torch")
    try:
        return real_import(name, *args, **kwargs)
    finally:
        leave()
builtins.__import__ = import_hook

enter("import cbir")
import cbir.cli, cbir.models, cbir.encoders.image as image, cbir.models.zeroshot as zeroshot
leave()
timed(cbir.models, "load_model", "model load")
timed(zeroshot.ZeroShotModel, "fit", "class vocabulary")
timed(image, "load_network", "network load")
timed(image.ImageEncoder, "_forward", "first batch")
sys.argv = ["cbir", *sys.argv[1:]]
try:
    cbir.cli.main()
except SystemExit as e:
    if e.code:
        raise
end = clock()
print(json.dumps({"phases": totals, "inside": [end[0] - start[0], end[1] - start[1]]}))
"""


def new_photo(source: Path, target: Path) -> None:
    """A photo no feature cache has seen: `source` with one pixel changed at random."""
    from PIL import Image

    im = Image.open(source).convert("RGB")
    im.putpixel((0, 0), tuple(uuid.uuid4().bytes[:3]))
    target.parent.mkdir(parents=True, exist_ok=True)
    im.save(target, quality=90)


def run_index(src: Path, folder: Path, out: Path, model: str, cache: Path) -> dict:
    """One `cbir index` in a new process: wall and CPU seconds in all, and per phase."""
    env = {
        **os.environ,
        "PYTHONPATH": str(src),
        "CBIR_CACHE_DIR": str(cache),
        "CBIR_NO_PROGRESS": "1",
        "CBIR_DATA_DIR": str(out.parent / "data"),
    }
    before = os.times()
    wall = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", CHILD, "index", str(folder), "--out", str(out), "--model", model],
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - wall
    after = os.times()
    if done.returncode:
        raise SystemExit(f"cbir index failed ({done.returncode}):\n{done.stderr}")
    child = json.loads(done.stdout.strip().splitlines()[-1])
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    phases = {name: child["phases"].get(name, [0.0, 0.0]) for name in PHASES}
    phases["other"] = [wall - sum(p[0] for p in phases.values()), cpu - sum(p[1] for p in phases.values())]
    return {"wall": wall, "cpu": cpu, "phases": phases}


def prepare(work: Path, src: Path, label: str, model: str, cache: Path) -> tuple[Path, Path]:
    """A folder of `EXISTING` photos and its index (not timed): what the `update` case adds to."""
    folder = work / f"library-{label}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for photo in sorted(PHOTOS.glob("*.jpg"))[:EXISTING]:
        shutil.copy(photo, folder / photo.name)
    out = work / f"library-{label}.cbir"
    shutil.rmtree(out, ignore_errors=True)
    run_index(src, folder, out, model, cache)
    return folder, out


def cases(work: Path, label: str, src: Path, cache: Path, models: list[tuple[str, str]]) -> list[dict]:
    """Every case once with one code tree; each indexes one photo no cache has seen. `models`: (name
    in the table, `--model` value)."""
    sample = sorted(PHOTOS.glob("*.jpg"))[EXISTING]
    rows = []

    def case(name: str, folder: Path, out: Path, model: str, cache: Path = cache) -> None:
        new_photo(sample, folder / f"new-{uuid.uuid4().hex[:8]}.jpg")
        rows.append({"code": label, "case": name, **run_index(src, folder, out, model, cache)})

    for name, model in models:
        folder, index = prepare(work / label, src, name, model, cache)
        case(f"{name}, 1 photo added to an index of {EXISTING}", folder, index, model)
        case(
            f"{name}, new index of 1 photo",
            work / label / f"lone-{name}",
            work / label / f"lone-{name}.cbir",
            model,
        )
    first = work / label / "first"
    empty = work / label / "empty"
    case(
        "zero-shot, new index of 1 photo, empty feature cache",
        first,
        first.with_suffix(".cbir"),
        "zero-shot",
        empty,
    )
    return rows


def table(rows: list[dict]) -> str:
    head = ["code", "case", "total", *PHASES, "other"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    for r in rows:
        cells = [f"{r['wall']:.1f} / **{r['cpu']:.1f}**"]
        cells += [f"{r['phases'][p][0]:.1f} / {r['phases'][p][1]:.1f}" for p in [*PHASES, "other"]]
        lines.append(f"| {r['code']} | {r['case']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--src", action="append", default=[], metavar="LABEL=SRC",
                        help="a code tree to time (its src/ folder); repeat to compare")  # fmt: skip
    parser.add_argument("--model", action="append", default=[], metavar="NAME=DIR",
                        help="a model directory to time instead of default and zero-shot")  # fmt: skip
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    trees = [s.partition("=")[::2] for s in args.src] or [("this checkout", str(REPO / "src"))]
    models = [(n, str(Path(d).resolve())) for n, _, d in (m.partition("=") for m in args.model)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="cbir-startup-") as tmp:
        work = Path(tmp)
        for label, src in trees:  # each tree has its own cache: neither warms the other's photos
            trials = models or [("default", "default"), ("zero-shot", "zero-shot")]
            rows += cases(work, label, Path(src).resolve(), work / label / "cache", trials)
            print(table(rows[-2 * len(trials) - 1 :]), file=sys.stderr, flush=True)
    print(f"seconds, wall / CPU (all threads); {time.strftime('%Y-%m-%d %H:%M')}")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
