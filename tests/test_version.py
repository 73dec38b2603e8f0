"""One version string: pyproject.toml takes it from modan_ext/_version.py, and the installed
metadata says what `modan_ext.__version__` says."""
from __future__ import annotations

import importlib.metadata
import json
import os
from urllib.parse import unquote, urlparse

import pytest

import modan_ext

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_pyproject_reads_the_version_from_the_package():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from 3.11")
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        config = tomllib.load(f)
    assert "version" not in config["project"], "a second version string in pyproject.toml"
    assert "version" in config["project"]["dynamic"]
    assert config["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "modan_ext._version.__version__"}


def installed_distribution() -> importlib.metadata.Distribution:
    """The installed modan_ext's metadata, when it describes the package imported here."""
    try:
        dist = importlib.metadata.distribution("modan_ext")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("modan_ext is not installed (no metadata): install it, e.g. bash .ci/setup")
    package = os.path.dirname(os.path.realpath(modan_ext.__file__))
    direct_url = json.loads(dist.read_text("direct_url.json") or "{}")
    if direct_url.get("dir_info", {}).get("editable"):
        source = unquote(urlparse(direct_url["url"]).path)
        installed_from = os.path.join(os.path.realpath(source), "modan_ext")
    else:
        installed_from = os.path.realpath(dist.locate_file("modan_ext"))
    if installed_from != package:
        pytest.skip(f"the installed modan_ext metadata belongs to {installed_from}, not to the "
                    f"package imported here ({package})")
    return dist


def test_installed_metadata_version_is_the_package_version():
    assert installed_distribution().version == modan_ext.__version__
