"""The build files name only things that exist."""

import re
import tomllib

from tests.conftest import REPO


def test_package_data_globs_each_match_files():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    for package, globs in config["tool"]["setuptools"]["package-data"].items():
        for pattern in globs:
            assert list((REPO / "src" / package).glob(pattern)), f"package-data {package}/{pattern}"


def test_makefile_names_only_existing_tests():
    named = re.findall(r"tests/[\w/]+\.py", (REPO / "Makefile").read_text())
    assert named and all((REPO / path).is_file() for path in named), named
