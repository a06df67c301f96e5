"""What the configuration benchmarks share: the command line (`--dataset`, `--only`, `--out`), picking
configurations by name prefix, and printing the Markdown table plus a JSON copy of the results."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def config_args(doc: str, dataset: Path, out: Path) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--dataset", type=Path, default=dataset)
    parser.add_argument("--only", action="append", default=[], help="configuration name prefix")
    parser.add_argument("--out", type=Path, default=out)
    return parser.parse_args()


def chosen(configs: dict[str, Any], only: list[str]) -> dict[str, Any]:
    return {k: v for k, v in configs.items() if not only or any(k.startswith(o) for o in only)}


def print_table(results: list[dict], row: Callable[[dict], str], header: str, out: Path) -> None:
    print("\n" + header)
    for r in results:
        print(row(r))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
