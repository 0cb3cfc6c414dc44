"""Two real sidecars in strict mTLS with `tls.source: vault`, their leaves issued by the
Vault PKI emulator (tests/emulators/vault_emulator.py: Vault's documented
`POST /v1/<mount>/issue/<role>`, real certificates from a CA made here; the real Vault
cannot run in this environment): calls served, renewal under a load loop with no failed
call and new handshakes seeing the new certificate, Vault down and back."""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from cryptography import x509

from tests import tlscerts
from tests.emulators.vault_emulator import VaultEmulator
from tests.integration.conftest import REPO, Mesh, Sidecar
from tests.integration.mtls_helpers import TD, spiffe_id

pytestmark = pytest.mark.integration


@pytest.fixture
def vault() -> Iterator[VaultEmulator]:
    emulator = VaultEmulator(tlscerts.ca(TD)).start()
    yield emulator
    emulator.stop()


def _tls(vault: VaultEmulator, ttl: float = 3600, **extra: Any) -> dict[str, Any]:
    return {
        "tls": {
            "mode": "strict",
            "trust_domain": TD,
            "source": "vault",
            "vault": {
                "address": vault.address,
                "role": "mesh",
                "token": "root",
                "ttl": ttl,
                "timeout": 1.0,
                "retry_max": 0.5,
                **extra,
            },
        }
    }


def _call(caller: Sidecar, client: httpx.Client) -> httpx.Response:
    return client.get(f"{caller.outbound}/v1/invoke/inventory/echo", timeout=10)


def _certs(sidecar: Sidecar) -> dict[str, Any]:
    reply: dict[str, Any] = httpx.get(f"{sidecar.admin}/certs", timeout=5).json()
    return reply


def _wait(what: str, done: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def _handshake_serial(port: int, vault: VaultEmulator, workdir: Path) -> str:
    """A fresh mTLS handshake to `port` as payment; the serial of the certificate met."""
    issued = vault.issue(
        {"common_name": "payment", "uri_sans": spiffe_id("payment"), "ttl": "600s"},
        vault.roles["mesh"],
    )
    client = tlscerts.Leaf(issued["certificate"].encode(), issued["private_key"].encode())
    cert, key = client.write(workdir / "client", "payment")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata=vault.ca.cert_pem.decode())
    ctx.load_cert_chain(cert, key)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return format(x509.load_der_x509_certificate(der).serial_number, "x")


class Load:
    """Calls payment -> inventory in a loop on a thread; every status kept."""

    def __init__(self, payment: Sidecar) -> None:
        self.payment = payment
        self.statuses: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        with httpx.Client() as client:
            while not self._stop.is_set() and len(self.statuses) < 20000:
                try:
                    self.statuses.append(_call(self.payment, client).status_code)
                except httpx.HTTPError:
                    self.statuses.append(0)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def failed(self) -> dict[int, int]:
        return {s: self.statuses.count(s) for s in set(self.statuses) if s != 200}


def test_vault_strict_mesh(mesh: Mesh, vault: VaultEmulator) -> None:
    _, inventory = mesh.service("inventory", _tls(vault))
    _, payment = mesh.service("payment", _tls(vault))
    mesh.wait_endpoints(payment, "inventory", 1)
    with httpx.Client() as client:
        reply = _call(payment, client)
        assert reply.status_code == 200, reply.text
        xfcc = reply.json()["headers"]["x-forwarded-client-cert"]
        assert xfcc == f"By={spiffe_id('inventory')};URI={spiffe_id('payment')}"
    certs = _certs(inventory)
    assert certs["source"] == "vault" and certs["identity"] == spiffe_id("inventory")
    assert certs["certificate"]["issuer"] == vault.ca.cert.subject.rfc4514_string()
    asked = {r["uri_sans"]: r for r in vault.requests}
    assert asked[spiffe_id("inventory")]["common_name"] == "inventory"
    assert asked[spiffe_id("payment")]["ttl"] == "3600s"
    serial = _handshake_serial(inventory.ports["inbound"], vault, mesh.workdir)
    assert serial == certs["certificate"]["serial"]


def test_vault_renewal_under_load_fails_no_call(mesh: Mesh, vault: VaultEmulator) -> None:
    # ttl 3 s: each sidecar asks Vault for a new leaf every 2 s.
    _, inventory = mesh.service("inventory", _tls(vault, ttl=3))
    _, payment = mesh.service("payment", _tls(vault, ttl=3))
    mesh.wait_endpoints(payment, "inventory", 1)
    with Load(payment) as load:
        seen = set()
        for generation in (2, 3, 4):

            def renewed(g: int = generation) -> bool:
                return int(_certs(inventory)["generation"]) >= g

            _wait("inventory never renewed", renewed)
            current = _certs(inventory)["certificate"]["serial"]
            served = _handshake_serial(inventory.ports["inbound"], vault, mesh.workdir)
            # A new handshake meets the current leaf (or the next, if one just arrived).
            assert served == current or _certs(inventory)["certificate"]["serial"] == served
            seen.add(served)
    assert len(seen) >= 2
    assert _certs(payment)["generation"] >= 3
    assert len(load.statuses) > 20 and not load.failed(), load.failed()


def test_vault_down_and_back(mesh: Mesh, vault: VaultEmulator) -> None:
    _, inventory = mesh.service("inventory", _tls(vault, ttl=4))
    _, payment = mesh.service("payment", _tls(vault, ttl=4))
    mesh.wait_endpoints(payment, "inventory", 1)
    with Load(payment) as load:
        vault.stop()  # the port closed: connection refused
        first = _certs(inventory)
        # Renewal fails and is retried; the current leaf stays in use until it expires.
        _wait("the failure was never logged", lambda: "cannot renew" in inventory.output())
        assert _certs(inventory)["certificate"]["serial"] == first["certificate"]["serial"]
        _wait(
            "the expiry was never counted",
            lambda: inventory.metric("opus_tls_certificate_expired_total") >= 1,
        )
        assert _certs(inventory)["expired"] is True
        assert inventory.proc.poll() is None  # still running
        vault.start()  # back on the same port
        _wait(
            "inventory never renewed after Vault came back",
            lambda: not _certs(inventory)["expired"],
        )
        _wait("payment never renewed", lambda: not _certs(payment)["expired"])
        ok_from = len(load.statuses)
        _wait("no call after", lambda: len(load.statuses) > ok_from + 20)
    assert "expired at" in inventory.output()
    # Calls on the pooled connection carried on through the outage; new handshakes after
    # Vault's return use the new leaves.
    served = _handshake_serial(inventory.ports["inbound"], vault, mesh.workdir)
    assert served == _certs(inventory)["certificate"]["serial"]
    assert not load.failed(), load.failed()


def test_vault_unreachable_at_start_stops_it_with_the_error(
    tmp_path: Path, vault: VaultEmulator
) -> None:
    vault.stop()
    config = tmp_path / "sidecar.yaml"
    listeners = {
        name: {"host": "127.0.0.1", "port": 0} for name in ("outbound", "inbound", "admin")
    }
    config.write_text(
        yaml.safe_dump({"service": {"name": "inventory"}, "listeners": listeners, **_tls(vault)})
    )
    done = subprocess.run(
        [sys.executable, "-m", "sidecar", "run", "--config", str(config)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 1
    assert "cannot start: tls.source vault: vault http://127.0.0.1:" in done.stderr
    assert "Traceback" not in done.stderr
