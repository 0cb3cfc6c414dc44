"""The registry going away under a running mesh (file registry).

The sidecars are pointed at a symlink to the real registry directory (the shape of a
mounted volume's `..data` link), so an outage can be made deterministic: as root a
chmod would not stop reads, and a plain removed directory is recreated at once by the
sidecars' own heartbeats. Promised: callers keep serving on the last-known endpoints
while the registry is unreadable or gone, and pick up changes once it is back. The
Consul equivalent (the emulator's outage switch) is tests/integration/
test_discovery_consul_mesh.py::test_consul_down_calls_keep_flowing_on_last_known_endpoints.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import pytest

from tests.faults.settle import Baseline, assert_settles
from tests.integration.conftest import Mesh, Sidecar

pytestmark = pytest.mark.integration


def _linked_mesh(mesh: Mesh) -> tuple[Path, Path, Sidecar]:
    real = mesh.workdir / "registry-real"
    real.mkdir()
    link = mesh.workdir / "registry-link"
    link.symlink_to(real)
    extra = {"discovery": {"file": {"directory": str(link)}}}
    mesh.service("inventory", extra)
    _, payment = mesh.service("payment", extra)
    mesh.wait_endpoints(payment, "inventory", 1)
    return real, link, payment


def _calls_keep_succeeding(payment: Sidecar, seconds: float = 2.0) -> int:
    calls = 0
    deadline = time.monotonic() + seconds  # several TTLs and polls of the file registry
    with httpx.Client(timeout=5) as client:
        while time.monotonic() < deadline and calls < 300:
            resp = client.get(f"{payment.outbound}/v1/invoke/inventory/during/{calls}")
            assert resp.status_code == 200, (calls, resp.text)
            calls += 1
    return calls


def test_registry_unreadable_keeps_last_known_endpoints(mesh: Mesh) -> None:
    real, link, payment = _linked_mesh(mesh)
    base = Baseline.take(payment)
    blocker = mesh.workdir / "not-a-directory"
    blocker.write_text("")
    os.replace(mesh.workdir / "registry-link", mesh.workdir / "registry-link.away")
    (mesh.workdir / "registry-link").symlink_to(blocker)  # listing it: NotADirectoryError
    try:
        assert _calls_keep_succeeding(payment) >= 10
    finally:
        link.unlink()
        link.symlink_to(real)
    mesh.wait_endpoints(payment, "inventory", 1, timeout=10)
    assert_settles(base)


def test_registry_removed_keeps_last_known_endpoints(mesh: Mesh) -> None:
    real, _, payment = _linked_mesh(mesh)
    away = mesh.workdir / "registry-real.away"
    os.replace(real, away)  # the link now dangles: the registry is gone
    try:
        assert _calls_keep_succeeding(payment) >= 10
    finally:
        os.replace(away, real)
