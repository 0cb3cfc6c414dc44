"""The inbound mTLS bookkeeping: callers' identities by address, refusals and their log."""

from __future__ import annotations

import ssl

import pytest

from sidecar.listener import _handshake_refusal
from sidecar.tls import inbound
from sidecar.tls.contexts import TlsState
from sidecar.tls.inbound import InboundTls
from sidecar.tls.material import build
from tests import tlscerts

TD = "mesh.test"


class Transport:
    def __init__(self) -> None:
        self.closing = False

    def is_closing(self) -> bool:
        return self.closing


def _tls() -> InboundTls:
    issuer = tlscerts.ca(TD)
    leaf = tlscerts.leaf(issuer, (f"spiffe://{TD}/svc/inventory",))
    state = TlsState(TD, "1.3", build(leaf.cert_pem, leaf.key_pem, issuer.cert_pem, TD))
    return InboundTls("permissive", state, 1.0)


def test_identity_by_address_and_plaintext_clears_it() -> None:
    tls = _tls()
    assert tls.by == f"spiffe://{TD}/svc/inventory"
    tls.verified("127.0.0.1:5000", f"spiffe://{TD}/svc/payment", Transport())
    assert tls.identity("127.0.0.1:5000") == f"spiffe://{TD}/svc/payment"
    # The same address, later a plaintext connection: it must not inherit the identity.
    tls.plaintext_caller("127.0.0.1:5000")
    assert tls.identity("127.0.0.1:5000") == ""
    assert (tls.handshakes, tls.plaintext) == (1, 1)


def test_closed_connections_are_pruned() -> None:
    tls = _tls()
    transports = [Transport() for _ in range(1024)]
    for i, t in enumerate(transports):
        tls.verified(f"127.0.0.1:{i}", "spiffe://mesh.test/svc/a", t)
    for t in transports[:1000]:
        t.closing = True
    tls.verified("127.0.0.1:99999", "spiffe://mesh.test/svc/a", Transport())
    assert len(tls.peers) == 25


def test_refusals_counted_and_log_bounded(caplog: pytest.LogCaptureFixture) -> None:
    tls = _tls()
    seen: list[str] = []
    tls.on_refuse = seen.append
    for _ in range(inbound.LOG_BURST + 5):
        tls.refuse("certificate", "127.0.0.1:1", "certificate has expired")
    assert (
        tls.refused == {"certificate": inbound.LOG_BURST + 5} and len(seen) == inbound.LOG_BURST + 5
    )
    lines = [r for r in caplog.records if "refused connection" in r.message]
    assert len(lines) == inbound.LOG_BURST
    assert "127.0.0.1:1" in lines[0].message and "certificate has expired" in lines[0].message


def test_handshake_refusal_reasons() -> None:
    verify = ssl.SSLCertVerificationError(1, "x")
    verify.verify_message = "certificate has expired"
    assert _handshake_refusal(verify) == ("certificate", "certificate has expired")
    err = ssl.SSLError(1, "x")
    err.reason = "UNSUPPORTED_PROTOCOL"
    assert _handshake_refusal(err)[0] == "protocol_version"
    err.reason = "PEER_DID_NOT_RETURN_A_CERTIFICATE"
    assert _handshake_refusal(err)[0] == "no_certificate"
    assert (
        _handshake_refusal(ConnectionAbortedError("SSL handshake is taking longer than 1 seconds"))[
            0
        ]
        == "handshake_timeout"
    )
    assert _handshake_refusal(ConnectionResetError())[0] == "handshake"
