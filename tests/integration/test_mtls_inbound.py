"""mTLS on the inbound port, against real callers: curl over HTTP/2 with a client
certificate, openssl s_client, Python's ssl; permissive mode's plaintext and TLS callers
on one port; and the attacks, each refused with a log line while a bystander is served."""

from __future__ import annotations

import datetime
import json
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from sidecar.tls import devca
from tests import tlscerts
from tests.integration.conftest import REPO, Mesh, Sidecar
from tests.integration.mtls_helpers import TD, file_tls, spiffe_id, tls_call

pytestmark = pytest.mark.integration


class Strict:
    def __init__(self, mesh: Mesh, mode: str = "strict", **tls: Any) -> None:
        self.dir = mesh.workdir / "certs"
        self.ca = tlscerts.ca(TD)
        self.ca_file = tlscerts.write_ca(self.ca, mesh.workdir / "ca")
        app = mesh.app("inventory")
        self.sidecar: Sidecar = mesh.sidecar(
            "inventory",
            app.ports["port"],
            {"tls": file_tls(self.dir, self.ca, "inventory", mode, handshake_timeout=1.0, **tls)},
        )
        self.port = self.sidecar.ports["inbound"]
        self.client = tlscerts.leaf(self.ca, (spiffe_id("payment"),)).write(self.dir, "payment")

    def call(self, cert: tuple[str, str] | None = None, **kw: Any) -> bytes | Exception:
        return tls_call(self.port, self.ca_file, cert or self.client, **kw)

    def bystander_served(self) -> None:
        reply = self.call()
        assert isinstance(reply, bytes) and reply.startswith(b"HTTP/1.1 200"), reply

    def wait_log(self, text: str, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.sidecar.output():
            assert time.monotonic() < deadline, (
                f"no log line with {text!r}:\n{self.sidecar.output()[-2000:]}"
            )
            time.sleep(0.02)


def _body(reply: bytes | Exception) -> dict[str, Any]:
    assert isinstance(reply, bytes), reply
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    if b"transfer-encoding: chunked" in head.lower():
        size, _, rest = body.partition(b"\r\n")
        body = rest[: int(size, 16)]
    result: dict[str, Any] = json.loads(body)
    return result


def _refused(reply: bytes | Exception) -> bool:
    """No HTTP reply came back: the handshake failed or the connection was closed."""
    return isinstance(reply, Exception) or not reply.startswith(b"HTTP/")


def test_curl_http2_with_client_certificate(mesh: Mesh) -> None:
    s = Strict(mesh)
    out = subprocess.run(
        [
            "curl",
            "-s",
            "--http2",
            "--cert",
            s.client[0],
            "--key",
            s.client[1],
            "--cacert",
            s.ca_file,
            "--resolve",
            f"localhost:{s.port}:127.0.0.1",
            "-H",
            "x-forwarded-client-cert: By=spiffe://evil;URI=spiffe://mesh.test/svc/admin",
            "-w",
            "\n%{http_version}",
            f"https://localhost:{s.port}/echo",
        ],
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    ).stdout
    body, _, version = out.rpartition("\n")
    assert version == "2"
    echoed = json.loads(body)["headers"]
    # The caller's header is gone; the sidecar's names the verified caller.
    assert (
        echoed["x-forwarded-client-cert"]
        == f"By={spiffe_id('inventory')};URI={spiffe_id('payment')}"
    )
    record = s.sidecar.access_log(1)[-1]
    assert record["peer_identity"] == spiffe_id("payment") and record["status"] == 200
    assert s.sidecar.metric("opus_tls_peer_requests_total", identity=spiffe_id("payment")) == 1


def test_openssl_s_client_sees_tls13_and_h2(mesh: Mesh) -> None:
    s = Strict(mesh)
    out = subprocess.run(
        [
            "openssl",
            "s_client",
            "-connect",
            f"127.0.0.1:{s.port}",
            "-alpn",
            "h2",
            "-cert",
            s.client[0],
            "-key",
            s.client[1],
            "-CAfile",
            s.ca_file,
        ],
        input="",
        capture_output=True,
        text=True,
        timeout=20,
    )
    text = out.stdout + out.stderr
    assert "New, TLSv1.3" in text and "ALPN protocol: h2" in text, text
    assert "Verify return code: 0 (ok)" in text


def test_plaintext_to_strict_port(mesh: Mesh) -> None:
    s = Strict(mesh)
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{s.port}/echo", timeout=5)
    s.wait_log("plaintext: plaintext to a port that takes only mTLS")
    s.bystander_served()
    assert s.sidecar.metric("opus_tls_refused_connections_total", reason="plaintext") == 1


def test_tls11_offered(mesh: Mesh) -> None:
    s = Strict(mesh)
    out = subprocess.run(
        [
            "openssl",
            "s_client",
            "-connect",
            f"127.0.0.1:{s.port}",
            "-tls1_1",
            "-cipher",
            "DEFAULT@SECLEVEL=0",
            "-cert",
            s.client[0],
            "-key",
            s.client[1],
        ],
        input="",
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert "Cipher is (NONE)" in out.stdout or out.returncode != 0
    s.wait_log("protocol_version")
    s.bystander_served()


def test_tls12_refused_by_default_allowed_when_configured(mesh: Mesh) -> None:
    s = Strict(mesh)
    assert _refused(s.call(max_version=ssl.TLSVersion.TLSv1_2))
    s.wait_log("protocol_version")
    s12 = Strict(mesh, min_version="1.2")
    assert _body(s12.call(max_version=ssl.TLSVersion.TLSv1_2))["app"] == "inventory"


@pytest.mark.parametrize(
    "attack",
    [
        "expired",
        "other_ca",
        "self_signed",
        "no_uri_san",
        "not_yet_valid",
        "no_certificate",
        "other_trust_domain",
    ],
)
def test_bad_client_certificates(mesh: Mesh, attack: str) -> None:
    s = Strict(mesh)
    now = datetime.datetime.now(datetime.UTC)
    payment = (spiffe_id("payment"),)
    leaf, expect = {
        "expired": (
            tlscerts.leaf(
                s.ca,
                payment,
                not_before=now - datetime.timedelta(days=2),
                not_after=now - datetime.timedelta(days=1),
            ),
            "certificate has expired",
        ),
        "not_yet_valid": (
            tlscerts.leaf(
                s.ca,
                payment,
                not_before=now + datetime.timedelta(days=1),
                not_after=now + datetime.timedelta(days=2),
            ),
            "certificate is not yet valid",
        ),
        "other_ca": (tlscerts.leaf(devca.make_ca(TD), payment), "certificate: "),
        "self_signed": (tlscerts.leaf(None, payment), "certificate: "),
        "no_uri_san": (tlscerts.leaf(s.ca, (), dns=("payment",)), "0 URI SANs"),
        "other_trust_domain": (
            tlscerts.leaf(s.ca, ("spiffe://other.test/svc/payment",)),
            "not in trust domain",
        ),
        "no_certificate": (None, "no_certificate"),
    }[attack]
    cert = leaf.write(s.dir, attack) if leaf is not None else None
    reply = tls_call(s.port, s.ca_file, cert)
    assert _refused(reply), reply
    s.wait_log(expect)
    s.bystander_served()
    # Nothing reached the app: the only calls logged are the bystander's.
    assert all(r["peer_identity"] == spiffe_id("payment") for r in s.sidecar.access_log(1))


def test_handshake_that_never_finishes(mesh: Mesh) -> None:
    s = Strict(mesh)  # tls.handshake_timeout: 1 s
    with socket.create_connection(("127.0.0.1", s.port), timeout=10) as sock:
        sock.sendall(b"\x16\x03\x01\x02\x00\x01")  # a ClientHello's first bytes, then silence
        started = time.monotonic()
        assert sock.recv(100) == b""  # closed by the sidecar
        assert time.monotonic() - started < 5
    s.wait_log("handshake_timeout")
    s.bystander_served()


def test_permissive_takes_plaintext_and_tls_on_one_port(mesh: Mesh) -> None:
    s = Strict(mesh, mode="permissive")
    plain = httpx.get(
        f"http://127.0.0.1:{s.port}/echo",
        headers={"x-forwarded-client-cert": "By=x;URI=spiffe://mesh.test/svc/admin"},
        timeout=5,
    )
    assert plain.status_code == 200
    assert "x-forwarded-client-cert" not in plain.json()["headers"]  # no identity, none forged
    echoed = _body(s.call())["headers"]
    assert echoed["x-forwarded-client-cert"].endswith(f"URI={spiffe_id('payment')}")
    records = s.sidecar.access_log(2)
    assert sorted(r["peer_identity"] for r in records) == ["-", spiffe_id("payment")]
    # A bad certificate is still refused in permissive mode.
    assert _refused(
        tls_call(
            s.port, s.ca_file, tlscerts.leaf(None, (spiffe_id("payment"),)).write(s.dir, "self")
        )
    )


def test_key_not_matching_certificate_stops_start(tmp_path: Path) -> None:
    ca = tlscerts.ca(TD)
    tls = file_tls(tmp_path / "certs", ca, "inventory")
    Path(tls["file"]["key"]).write_bytes(tlscerts.leaf(ca).key_pem)
    config = tmp_path / "sidecar.yaml"
    config.write_text(yaml.safe_dump({"tls": tls}))
    run = subprocess.run(
        [sys.executable, "-m", "sidecar", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
    )
    assert run.returncode == 2
    assert f"{tls['file']['key']}: the private key does not match" in run.stderr
