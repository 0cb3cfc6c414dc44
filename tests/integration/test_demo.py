"""`opus-sidecar demo --once`: the whole demo mesh, as a user runs it.

Real processes throughout: two demo apps and two sidecars on 127.0.0.1, calls
crossing both sidecars over HTTP/2. The demo falls back to free ports when the
seed's 8080/15006/9090 are taken, so this test does not need them free.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration

CALLS = 3


def test_demo_once_makes_every_call_through_the_mesh() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sidecar", "demo", "--once", "--calls", str(CALLS)],
        capture_output=True,
        text=True,
        timeout=45,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output

    rows = re.findall(
        r"^(\d+)/3\s+payment\.create -> inventory\.reserve\s+.*\s(\d{3})\s+[\d.]+ ms$",
        result.stdout,
        flags=re.MULTILINE,
    )
    assert [index for index, _ in rows] == ["1", "2", "3"], output
    assert all(status == "200" for _, status in rows), output
    # Both apps answered: payment's reply carries inventory's, fetched through the mesh.
    assert '"status": "created"' in result.stdout
    assert '"status": "reserved"' in result.stdout
    assert "curl -s -X POST http://127.0.0.1:" in result.stdout
    assert "/v1/invoke/payment/create" in result.stdout
