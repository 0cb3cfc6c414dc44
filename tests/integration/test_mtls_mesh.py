"""Two real sidecars on 127.0.0.1 speaking mTLS to each other: with the dev CA and with
file certificates, over the h2 pool and the HTTP/1.1 one; secure naming (a valid
certificate for another service is refused with a 503 naming why); handshakes amortized
by the pool; /certs; and a file-source rotation under a load loop with no failed call."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from sidecar.tls import devca
from tests import tlscerts
from tests.integration.conftest import Mesh, Sidecar
from tests.integration.mtls_helpers import TD, file_tls, spiffe_id, tls_call

pytestmark = pytest.mark.integration


def _dev_tls(mesh: Mesh, **extra: Any) -> dict[str, Any]:
    ca_dir = mesh.workdir / "devca"
    if not (ca_dir / devca.CA_CERT).exists():
        devca.init_ca(ca_dir, TD)
    return {
        "mode": "strict",
        "trust_domain": TD,
        "source": "dev",
        "dev": {"ca_dir": str(ca_dir)},
        **extra,
    }


def _call(
    caller: Sidecar, service: str = "inventory", client: httpx.Client | None = None
) -> httpx.Response:
    get = client.get if client is not None else httpx.get
    return get(f"{caller.outbound}/v1/invoke/{service}/echo", timeout=10)


def _opened(sidecar: Sidecar, service: str) -> float:
    return sidecar.metric("opus_upstream_connections_opened_total", service=service)


@pytest.mark.parametrize("protocol", ["h2c", "http1"])
def test_dev_ca_strict_mesh(mesh: Mesh, protocol: str) -> None:
    extra = {"tls": _dev_tls(mesh), "upstream": {"protocol": protocol}}
    _, inventory = mesh.service("inventory", extra)
    _, payment = mesh.service("payment", extra)
    mesh.wait_endpoints(payment, "inventory", 1)
    with httpx.Client() as client:
        first = _call(payment, client=client)
        assert first.status_code == 200, first.text
        xfcc = first.json()["headers"]["x-forwarded-client-cert"]
        assert xfcc == f"By={spiffe_id('inventory')};URI={spiffe_id('payment')}"
        opened = _opened(payment, "inventory")
        for _ in range(50):
            assert _call(payment, client=client).status_code == 200
    # Zero handshakes per call in steady state: the pool's connections carried them all.
    assert _opened(payment, "inventory") == opened >= 1
    certs = httpx.get(f"{inventory.admin}/certs", timeout=5).json()
    assert certs["identity"] == spiffe_id("inventory") and certs["source"] == "dev"
    assert certs["certificate"]["sans"] == [f"URI:{spiffe_id('inventory')}"]
    assert certs["roots"][0]["sans"] == [f"URI:spiffe://{TD}"]
    assert inventory.access_log(1)[-1]["peer_identity"] == spiffe_id("payment")


def test_file_certs_strict_mesh(mesh: Mesh) -> None:
    ca = tlscerts.ca(TD)
    _, _inventory = mesh.service(
        "inventory", {"tls": file_tls(mesh.workdir / "inv", ca, "inventory")}
    )
    _, payment = mesh.service("payment", {"tls": file_tls(mesh.workdir / "pay", ca, "payment")})
    mesh.wait_endpoints(payment, "inventory", 1)
    reply = _call(payment)
    assert reply.status_code == 200
    assert reply.json()["headers"]["x-forwarded-client-cert"].endswith(
        f"URI={spiffe_id('payment')}"
    )


def test_secure_naming_refuses_a_valid_certificate_for_another_service(mesh: Mesh) -> None:
    ca = tlscerts.ca(TD)
    # "inventory"'s sidecar holds a certificate from the right CA, but for billing.
    impostor = file_tls(mesh.workdir / "imp", ca, "billing")
    _, _inventory = mesh.service("inventory", {"tls": impostor})
    _, _catalog = mesh.service("catalog", {"tls": file_tls(mesh.workdir / "cat", ca, "catalog")})
    _, payment = mesh.service("payment", {"tls": file_tls(mesh.workdir / "pay", ca, "payment")})
    reply = _call(payment)
    assert reply.status_code == 503
    reason = reply.json()["error"]
    assert f"presented {spiffe_id('billing')}, not {spiffe_id('inventory')}" in reason, reason
    assert "secure naming" in payment.output()
    assert (
        payment.metric("opus_tls_refused_connections_total", listener="upstream", reason="identity")
        >= 1
    )
    # A bystander service is served by the same sidecar meanwhile.
    assert _call(payment, "catalog").status_code == 200


def test_expected_identity_from_config_or_registry(mesh: Mesh) -> None:
    ca = tlscerts.ca(TD)
    k8s_id = f"spiffe://{TD}/ns/shop/sa/inventory"
    inv = file_tls(mesh.workdir / "inv", ca, "inventory")
    leaf = tlscerts.leaf(ca, (k8s_id,))
    inv["file"]["cert"], inv["file"]["key"] = leaf.write(mesh.workdir / "inv", "k8s")
    _, _inventory = mesh.service("inventory", {"tls": inv})
    pay = file_tls(mesh.workdir / "pay", ca, "payment")
    _, plain_payment = mesh.service("payment", {"tls": pay})
    assert _call(plain_payment).status_code == 503  # expects spiffe://mesh.test/svc/inventory
    _, told = mesh.service("payment", {"tls": pay, "services": {"inventory": {"identity": k8s_id}}})
    assert _call(told).status_code == 200
    # Or the registry entry says it (the callee's service.meta.spiffe_id).
    _, _catalog = mesh.service(
        "catalog", {"tls": {**inv}, "service": {"meta": {"spiffe_id": k8s_id}}}
    )
    mesh.wait_endpoints(plain_payment, "catalog", 1)
    reply = _call(plain_payment, "catalog")
    assert reply.status_code == 200, reply.text


def test_chain_to_another_ca_upstream(mesh: Mesh) -> None:
    _, _inventory = mesh.service(
        "inventory", {"tls": file_tls(mesh.workdir / "inv", tlscerts.ca(TD), "inventory")}
    )
    _, payment = mesh.service(
        "payment", {"tls": file_tls(mesh.workdir / "pay", tlscerts.ca(TD), "payment")}
    )
    reply = _call(payment)
    assert reply.status_code == 503 and "CERTIFICATE_VERIFY_FAILED" in reply.json()["error"]
    assert "handshake with inventory" in payment.output()


def _rotate(directory: Path, ca: devca.DevCa, service: str) -> str:
    """New files for `service`, each renamed over the old one (cert-manager's way)."""
    leaf = tlscerts.leaf(ca, (spiffe_id(service),), dns=("localhost",))
    staged = directory / "staged"
    cert, key = leaf.write(staged, service)
    os.replace(key, directory / f"{service}.key")
    os.replace(cert, directory / f"{service}.crt")
    from cryptography import x509

    return format(x509.load_pem_x509_certificate(leaf.cert_pem).serial_number, "x")


def _wait_serial(sidecar: Sidecar, serial: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while httpx.get(f"{sidecar.admin}/certs", timeout=5).json()["certificate"]["serial"] != serial:
        assert time.monotonic() < deadline, "the new certificate never took effect"
        time.sleep(0.05)


def test_file_rotation_under_load_fails_no_call(mesh: Mesh) -> None:
    ca = tlscerts.ca(TD)
    inv_dir, pay_dir = mesh.workdir / "inv", mesh.workdir / "pay"
    _, inventory = mesh.service("inventory", {"tls": file_tls(inv_dir, ca, "inventory")})
    _, payment = mesh.service("payment", {"tls": file_tls(pay_dir, ca, "payment")})
    mesh.wait_endpoints(payment, "inventory", 1)
    results: list[int] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client() as client:
            while not stop.is_set() and len(results) < 5000:
                try:
                    results.append(_call(payment, client=client).status_code)
                except httpx.HTTPError:
                    results.append(0)

    thread = threading.Thread(target=load)
    thread.start()
    try:
        for _ in range(3):
            _wait_serial(inventory, _rotate(inv_dir, ca, "inventory"))
            _wait_serial(payment, _rotate(pay_dir, ca, "payment"))
            # A new handshake meets the new certificate.
            ca_file = str(inv_dir / "bundle.crt")
            reply = tls_call(
                inventory.ports["inbound"],
                ca_file,
                (str(pay_dir / "payment.crt"), str(pay_dir / "payment.key")),
            )
            assert isinstance(reply, bytes) and reply.startswith(b"HTTP/1.1 200")
    finally:
        stop.set()
        thread.join(30)
    assert len(results) > 20
    assert results.count(200) == len(results), {s: results.count(s) for s in set(results)}


def test_dev_renewal_under_load_and_clean_stop(mesh: Mesh) -> None:
    # ttl 3 s: each sidecar issues itself a new leaf every 2 s.
    extra = {"tls": _dev_tls(mesh, dev={"ca_dir": str(mesh.workdir / "devca"), "ttl": 3})}
    _, inventory = mesh.service("inventory", extra)
    _, payment = mesh.service("payment", extra)
    mesh.wait_endpoints(payment, "inventory", 1)
    statuses: list[int] = []
    with httpx.Client() as client:
        deadline = time.monotonic() + 30
        while httpx.get(f"{inventory.admin}/certs", timeout=5).json()["generation"] < 3:
            assert time.monotonic() < deadline, "the dev source never renewed"
            for _ in range(10):
                statuses.append(_call(payment, client=client).status_code)
    assert statuses and statuses.count(200) == len(statuses)
    assert httpx.get(f"{payment.admin}/certs", timeout=5).json()["generation"] >= 2
    # The pooled connection outlived the leaves it was made with; new ones use the current.
    assert _call(payment).status_code == 200
    inventory.signal()
    assert inventory.wait() == 0


def test_strict_mesh_with_workers(mesh: Mesh) -> None:
    """workers: 2: each worker binds the inbound port itself (SO_REUSEPORT) and issues its
    own leaf; new connections, spread over the workers by the kernel, are all mTLS."""
    extra = {"tls": _dev_tls(mesh)}
    _, inventory = mesh.service("inventory", {**extra, "workers": 2})
    _, payment = mesh.service("payment", extra)
    mesh.wait_endpoints(payment, "inventory", 1)
    assert _call(payment).status_code == 200
    ca_dir = mesh.workdir / "devca"
    chain, key = devca.issue(devca.load_ca(ca_dir), spiffe_id("payment"), 600)
    client = tlscerts.Leaf(chain, key).write(mesh.workdir / "client", "payment")
    for _ in range(20):
        reply = tls_call(inventory.ports["inbound"], str(ca_dir / devca.CA_CERT), client)
        assert isinstance(reply, bytes) and reply.startswith(b"HTTP/1.1 200"), reply
    workers = httpx.get(f"{inventory.admin}/certs", timeout=5).json()["workers"]
    assert len(workers) == 2
    for worker in workers:
        assert httpx.get(worker["certs"], timeout=5).json()["identity"] == spiffe_id("inventory")


def test_active_health_checks_over_mtls(mesh: Mesh) -> None:
    ca = tlscerts.ca(TD)
    checks = {"upstream": {"health_check": {"enabled": True, "interval": 0.1, "path": "/health"}}}
    _, _inventory = mesh.service(
        "inventory", {"tls": file_tls(mesh.workdir / "inv", ca, "inventory")}
    )
    _, _impostor = mesh.service("catalog", {"tls": file_tls(mesh.workdir / "imp", ca, "billing")})
    _, payment = mesh.service(
        "payment", {"tls": file_tls(mesh.workdir / "pay", ca, "payment"), **checks}
    )
    mesh.wait_endpoints(payment, "inventory", 1)
    mesh.wait_endpoints(payment, "catalog", 1)
    deadline = time.monotonic() + 10
    while True:
        clusters = httpx.get(f"{payment.admin}/clusters", timeout=5).json()["outbound"]
        health = {
            name: [e["health"] for e in clusters[name]["endpoints"]]
            for name in ("inventory", "catalog")
        }
        if health == {"inventory": ["healthy"], "catalog": ["unhealthy"]}:
            break
        assert time.monotonic() < deadline, health
        time.sleep(0.05)
    assert _call(payment).status_code == 200


def test_stat_shows_the_callers_identities(mesh: Mesh) -> None:
    """`opus-sidecar stat` on the callee lists its callers by verified SPIFFE ID."""
    extra = {"tls": _dev_tls(mesh)}
    _, inventory = mesh.service("inventory", extra)
    _, payment = mesh.service("payment", extra)
    mesh.wait_endpoints(payment, "inventory", 1)
    argv = [sys.executable, "-m", "sidecar", "stat", "--admin", inventory.admin]
    stat = subprocess.Popen(
        [*argv, "--interval", "1.0", "--once"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    made = 0
    with httpx.Client() as client:
        while stat.poll() is None and made < 2000:  # calls across stat's window
            assert _call(payment, client=client).status_code == 200
            made += 1
    out, err = stat.communicate(timeout=20)
    assert stat.returncode == 0, err
    lines = out.decode().splitlines()
    header = lines.index(next(line for line in lines if line.startswith("CALLER (mTLS)")))
    caller = lines[header + 1].split()
    assert caller[0] == spiffe_id("payment") and caller[2] == "100.0%", lines
    assert float(caller[1]) > 0 and int(caller[3]) >= 1
