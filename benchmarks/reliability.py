"""Counts of the reliability audit (issue 12): runs `tests/reliability` and tallies the cases tried
and passed by group (one group a test file), for BENCHMARKS.md.

    PYTHONPATH=src python -m benchmarks.reliability
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SUITE = "tests/reliability"


def run_suite(junit: Path) -> int:
    """pytest on the suite, in a private temporary folder (shared ones are pruned by other runs)."""
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", SUITE, f"--junitxml={junit}"]
    return subprocess.run([*args, f"--basetemp={junit.parent / 'tmp'}"], cwd=REPO).returncode


def tally(junit: Path) -> tuple[Counter[str], Counter[str], Counter[str]]:
    """(tried, passed, seconds) by test file."""
    tried: Counter[str] = Counter()
    passed: Counter[str] = Counter()
    seconds: Counter[str] = Counter()
    for case in ET.parse(junit).iter("testcase"):
        group = case.get("classname", "").rsplit(".", 1)[-1]
        tried[group] += 1
        passed[group] += not any(c.tag in ("failure", "error", "skipped") for c in case)
        seconds[group] += float(case.get("time", 0))
    return tried, passed, seconds


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        code = run_suite(junit)
        tried, passed, seconds = tally(junit)
    print(f"\n{'group':28} {'tried':>6} {'passed':>7} {'seconds':>8}")
    for group in sorted(tried):
        print(f"{group:28} {tried[group]:>6} {passed[group]:>7} {seconds[group]:>8.1f}")
    total = sum(seconds.values())
    print(f"{'all':28} {sum(tried.values()):>6} {sum(passed.values()):>7} {total:>8.1f}")
    return code


if __name__ == "__main__":
    sys.exit(main())
