"""`opus-sidecar demo --once`: the whole demo mesh, as a user runs it.

Real processes throughout: two demo apps and two sidecars on 127.0.0.1, calls
crossing both sidecars over HTTP/2. The demo falls back to free ports when the
seed's 8080/15006/9090 are taken, so this test does not need them free.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys

import pytest

from sidecar.demo.mesh import SEED_PORTS

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


def test_a_busy_outbound_port_is_a_warning_naming_the_base_url() -> None:
    """When the outbound port asked for is someone else's, the seed's snippet (which
    calls localhost:8080) would reach them: the demo says so in a box, on stderr at
    start-up and again in the summary, with the base_url that reaches the mesh. The test
    holds a port of its own and asks the demo for it, as 8080 is shared on this machine."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        held = holder.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "sidecar", "demo", "--once", "--calls", "1",
             "--outbound-port", str(held)],
            capture_output=True, text=True, timeout=45,
        )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    used = re.search(r"^  payment .* sidecar outbound :(\d+) ", result.stdout, re.MULTILINE)
    assert used is not None, output
    port = int(used.group(1))
    assert port != held
    snippet = f'OpusClient("http://127.0.0.1:{port}")'
    for stream in (result.stderr, result.stdout):
        assert "WARNING" in stream, output
        assert f"port {held} was busy" in stream, output
        assert f"localhost:{SEED_PORTS['outbound']}" in stream, output
        assert snippet in stream, output
