"""The integration tier's fixtures (real processes on 127.0.0.1), shared with this folder,
and `target`: one app behind its own sidecar for a whole test module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.conftest import Mesh, Proc, Sidecar, mesh

__all__ = ["mesh", "target"]


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Proc, Sidecar]]:
    """An inventory app behind its sidecar, shared by the module's tests."""
    started = Mesh(tmp_path_factory.mktemp("h2"))
    try:
        yield started.service("inventory")
    finally:
        started.stop()
