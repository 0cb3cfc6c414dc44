"""One version: `sidecar.__version__` is the source; the package metadata and the image tags
in the Kubernetes manifests follow it."""

from __future__ import annotations

import re
import tomllib
from importlib.metadata import version
from pathlib import Path

import sidecar

REPO = Path(__file__).resolve().parents[2]


def test_pyproject_reads_the_version_from_the_package() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "version" not in project["project"]
    assert "version" in project["project"]["dynamic"]
    dynamic = project["tool"]["setuptools"]["dynamic"]
    assert dynamic["version"] == {"attr": "sidecar.__version__"}


def test_installed_metadata_agrees_with_the_package() -> None:
    # An install made before __version__ changed keeps the old metadata: reinstall
    # (`pip install -e '.[test]'`) and this passes again.
    assert version("opus-mesh") == sidecar.__version__


def test_manifests_pin_the_image_of_this_version() -> None:
    tags = {
        (path.name, tag)
        for path in (REPO / "deploy" / "k8s").rglob("*.yaml")
        for tag in re.findall(r"opus-mesh/opus-sidecar:([\w.-]+)", path.read_text())
    }
    assert tags  # the pattern still finds the images
    assert {tag for _, tag in tags} == {sidecar.__version__}, sorted(tags)
