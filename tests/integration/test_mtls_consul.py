"""Two real sidecars in strict mTLS with `tls.source: consul`, their certificates from
Consul service mesh's CA through the agent API.

Consul itself cannot run here: the agent is the Consul emulator
(tests/emulators/consul_emulator.py with tests/emulators/consul_connect.py, which follow
Consul's documented agent/connect endpoints), issuing real certificates from a CA made
in the test. Covered: calls served with the Consul SPIFFE IDs on both sides; a leaf
rotation and a roots rotation under a load loop with zero failed calls, new handshakes
meeting the new certificate; the agent going away (killed) and coming back, calls
flowing on the material in hand meanwhile."""

from __future__ import annotations

import functools
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509

from sidecar.tls import devca
from tests import tlscerts
from tests.integration.conftest import Mesh, Proc, Sidecar

pytestmark = pytest.mark.integration

TD = "11111111-2222-3333-4444-555555555555.consul"


def _uri(service: str) -> str:
    return f"spiffe://{TD}/ns/default/dc/dc1/svc/{service}"


def _agent(mesh: Mesh, ca_dir: Path, port: int = 0, name: str = "consul") -> Proc:
    argv = [sys.executable, "-m", "tests.emulators.consul_emulator", "--port", str(port)]
    argv += ["--connect-ca", str(ca_dir), "--trust-domain", TD]
    proc = Proc(name, argv, mesh.workdir, None)
    mesh.procs.append(proc)
    return proc


def _tls(agent_port: int) -> dict[str, Any]:
    return {
        "tls": {
            "mode": "strict",
            "trust_domain": TD,
            "source": "consul",
            "consul": {"address": f"127.0.0.1:{agent_port}", "wait": 10, "retry_max": 0.5},
        }
    }


def _ca(mesh: Mesh, name: str) -> tuple[Path, devca.DevCa]:
    directory = mesh.workdir / name
    ca = tlscerts.ca(TD)
    tlscerts.write_ca(ca, directory)
    return directory, ca


def _certs(sidecar: Sidecar) -> dict[str, Any]:
    certs: dict[str, Any] = httpx.get(f"{sidecar.admin}/certs", timeout=5).json()
    return certs


def _serial(sidecar: Sidecar) -> str:
    return str(_certs(sidecar)["certificate"]["serial"])


def _serial_changed(sidecar: Sidecar, old: str) -> Callable[[], bool]:
    return lambda: _serial(sidecar) != old


def _roots(sidecar: Sidecar, count: int) -> bool:
    return len(_certs(sidecar)["roots"]) == count


def _wait(what: str, check: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def _call(caller: Sidecar, client: httpx.Client) -> httpx.Response:
    return client.get(f"{caller.outbound}/v1/invoke/inventory/echo", timeout=10)


@contextmanager
def _load(caller: Sidecar) -> Iterator[list[int]]:
    """Calls in a loop (bounded) while the block runs; their statuses (0: failed)."""
    results: list[int] = []
    stop = threading.Event()

    def run() -> None:
        with httpx.Client() as client:
            while not stop.is_set() and len(results) < 5000:
                try:
                    results.append(_call(caller, client).status_code)
                except httpx.HTTPError:
                    results.append(0)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        yield results
    finally:
        stop.set()
        thread.join(30)


def _handshake(sidecar: Sidecar, trust: devca.DevCa, workdir: Path) -> str:
    """A new mTLS handshake with `sidecar`'s inbound port, trusting only `trust`, with a
    client certificate `trust` issued: the serial of the certificate the sidecar shows."""
    chain, key = devca.issue(trust, _uri("payment"), 600)
    cert_file, key_file = workdir / "client.crt", workdir / "client.key"
    cert_file.write_bytes(chain)
    key_file.write_bytes(key)
    ctx = ssl.create_default_context(cadata=trust.cert_pem.decode())
    ctx.check_hostname = False
    ctx.load_cert_chain(str(cert_file), str(key_file))
    with (
        socket.create_connection(("127.0.0.1", sidecar.ports["inbound"]), timeout=10) as raw,
        ctx.wrap_socket(raw) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return format(x509.load_der_x509_certificate(der).serial_number, "x")


def _mesh(mesh: Mesh, agent: Proc) -> tuple[Sidecar, Sidecar]:
    extra = _tls(int(agent.ports["port"]))
    _, inventory = mesh.service("inventory", extra)
    _, payment = mesh.service("payment", extra)
    mesh.wait_endpoints(payment, "inventory", 1)
    return inventory, payment


def _admin(agent: Proc, path: str, body: dict[str, Any]) -> Any:
    return httpx.put(f"http://127.0.0.1:{agent.ports['port']}{path}", json=body, timeout=10).json()


def test_strict_mesh_with_consul_certificates(mesh: Mesh) -> None:
    agent = _agent(mesh, _ca(mesh, "ca1")[0])
    inventory, payment = _mesh(mesh, agent)
    with httpx.Client() as client:
        reply = _call(payment, client)
    assert reply.status_code == 200, reply.text
    xfcc = reply.json()["headers"]["x-forwarded-client-cert"]
    assert xfcc == f"By={_uri('inventory')};URI={_uri('payment')}"
    certs = _certs(inventory)
    assert certs["source"] == "consul" and certs["identity"] == _uri("inventory")


def test_leaf_rotation_under_load_fails_no_call(mesh: Mesh) -> None:
    ca_dir, ca = _ca(mesh, "ca1")
    agent = _agent(mesh, ca_dir)
    inventory, payment = _mesh(mesh, agent)
    with _load(payment) as results:
        for _ in range(3):
            before = {s.name: _certs(s)["certificate"]["serial"] for s in (inventory, payment)}
            _admin(agent, "/_emulator/connect/rotate-leaf", {})
            for sidecar in (inventory, payment):
                _wait(
                    f"{sidecar.name} never took the new leaf",
                    _serial_changed(sidecar, before[sidecar.name]),
                )
            # A new handshake meets the new certificate.
            now = _certs(inventory)["certificate"]["serial"]
            assert _handshake(inventory, ca, mesh.workdir) == now
    assert len(results) > 20
    assert results.count(200) == len(results), {s: results.count(s) for s in set(results)}
    assert payment.metric("opus_tls_source_errors_total", source="consul") == 0


def test_roots_rotation_under_load_fails_no_call(mesh: Mesh) -> None:
    agent = _agent(mesh, _ca(mesh, "ca1")[0])
    inventory, payment = _mesh(mesh, agent)
    new_dir, new_ca = _ca(mesh, "ca2")
    before = {s.name: _certs(s)["certificate"]["serial"] for s in (inventory, payment)}
    with _load(payment) as results:
        _admin(agent, "/_emulator/connect/rotate-roots", {"ca_dir": str(new_dir), "grace": 1.0})
        for sidecar in (inventory, payment):
            _wait(
                f"{sidecar.name} never trusted the new root",
                functools.partial(_roots, sidecar, 2),
            )
            _wait(
                f"{sidecar.name} never took a leaf from the new root",
                _serial_changed(sidecar, before[sidecar.name]),
            )
        # The two roots share a name: a handshake trusting only the new one tells them apart.
        assert (
            _handshake(inventory, new_ca, mesh.workdir)
            == _certs(inventory)["certificate"]["serial"]
        )
        with httpx.Client() as client:
            assert _call(payment, client).status_code == 200
    assert len(results) > 20
    assert results.count(200) == len(results), {s: results.count(s) for s in set(results)}


def test_agent_going_away_and_coming_back(mesh: Mesh) -> None:
    ca_dir, _ = _ca(mesh, "ca1")
    agent = _agent(mesh, ca_dir)
    port = int(agent.ports["port"])
    inventory, payment = _mesh(mesh, agent)
    serial = _certs(inventory)["certificate"]["serial"]
    with _load(payment) as results:
        agent.stop()
        _wait(
            "the agent's loss was never counted",
            lambda: inventory.metric("opus_tls_source_errors_total", source="consul") >= 1,
        )
        gone = len(results)
        _wait("calls stopped while the agent was away", lambda: len(results) > gone + 20)
        # Back on the same port, with the same CA but no memory: new leaves, new indexes.
        _agent(mesh, ca_dir, port, name="consul-again")
        _wait(
            "the new agent's leaf never arrived",
            lambda: _certs(inventory)["certificate"]["serial"] != serial,
        )
        with httpx.Client() as client:
            assert _call(payment, client).status_code == 200
    assert results.count(200) == len(results), {s: results.count(s) for s in set(results)}


def test_consul_intentions_decide_inbound_calls_live(mesh: Mesh) -> None:
    """With authorization.intentions.source consul, the callee's sidecar asks the agent
    (PUT /v1/agent/connect/authorize) whether the caller's SPIFFE ID may call: an
    intention's change shows within its cache_ttl, no restart."""
    agent = _agent(mesh, _ca(mesh, "ca1")[0])
    _admin(agent, "/_emulator/connect/intentions", {"default": "deny", "rules": []})
    extra = _tls(int(agent.ports["port"]))
    extra["authorization"] = {"intentions": {"source": "consul", "cache_ttl": 0.3}}
    _, inventory = mesh.service("inventory", extra)
    _, payment = mesh.service("payment", _tls(int(agent.ports["port"])))
    mesh.wait_endpoints(payment, "inventory", 1)
    with httpx.Client() as client:
        denied = _call(payment, client)
        assert denied.status_code == 403, denied.text
        assert "Consul intentions" in denied.json()["error"] and _uri("payment") in denied.text
        rule = {"source": "payment", "destination": "inventory", "action": "allow"}
        _admin(agent, "/_emulator/connect/intentions", {"default": "deny", "rules": [rule]})
        _wait("the allow intention in force", lambda: _call(payment, client).status_code == 200)
        statuses = [_call(payment, client).status_code for _ in range(50)]
    assert statuses == [200] * 50
    assert inventory.metric("opus_authz_denied_total", rule="consul-intentions") >= 1
