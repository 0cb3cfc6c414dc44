"""The client side's secure naming: which identity a target must present, and the check."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from sidecar.config import ClusterOverride, load_config
from sidecar.config.schema import TlsConfig
from sidecar.discovery.base import Endpoint
from sidecar.errors import UpstreamConnectError, UpstreamIdentityError
from sidecar.tls.contexts import TlsState
from sidecar.tls.material import build
from sidecar.tls.setup import MeshTls
from sidecar.tls.sources import Source
from sidecar.tls.upstream import UpstreamTls
from tests import tlscerts

TD = "mesh.test"


class _Ssl:
    def __init__(self, uris: tuple[str, ...], alpn: str = "h2") -> None:
        self.uris, self.alpn = uris, alpn

    def getpeercert(self) -> dict[str, Any]:
        return {"subjectAltName": tuple(("URI", u) for u in self.uris)}

    def selected_alpn_protocol(self) -> str:
        return self.alpn


class _Transport:
    def __init__(self, ssl_object: _Ssl) -> None:
        self.ssl_object = ssl_object

    def get_extra_info(self, name: str) -> Any:
        return self.ssl_object if name == "ssl_object" else None


def _state() -> TlsState:
    issuer = tlscerts.ca(TD)
    leaf = tlscerts.leaf(issuer, (f"spiffe://{TD}/svc/payment",))
    return TlsState(TD, "1.3", build(leaf.cert_pem, leaf.key_pem, issuer.cert_pem, TD))


def _upstream() -> UpstreamTls:
    return UpstreamTls(_state(), lambda svc, reg: reg or f"spiffe://{TD}/svc/{svc}", 1.0)


def test_the_target_services_identity_passes() -> None:
    closed: list[int] = []
    got = _upstream().verify(
        _Transport(_Ssl((f"spiffe://{TD}/svc/inventory",))),
        "inventory",
        Endpoint("10.0.0.1", 15006),
        "h2",
        lambda: closed.append(1),
    )
    assert got == f"spiffe://{TD}/svc/inventory" and closed == []


@pytest.mark.parametrize(
    ("uris", "alpn", "why"),
    [
        (
            (f"spiffe://{TD}/svc/billing",),
            "h2",
            "presented spiffe://mesh.test/svc/billing, not spiffe://mesh.test/svc/inventory",
        ),
        ((), "h2", "0 URI SANs"),
        (("spiffe://other/svc/inventory",), "h2", "not in trust domain"),
        ((f"spiffe://{TD}/svc/inventory",), "http/1.1", "ALPN"),
    ],
)
def test_refusals_close_and_name_the_reason(uris: tuple[str, ...], alpn: str, why: str) -> None:
    closed: list[int] = []
    up = _upstream()
    reasons: list[str] = []
    up.on_refuse = reasons.append
    with pytest.raises(UpstreamIdentityError) as err:
        up.verify(
            _Transport(_Ssl(uris, alpn)),
            "inventory",
            Endpoint("10.0.0.1", 15006),
            "h2",
            lambda: closed.append(1),
        )
    assert why in err.value.reason and "10.0.0.1:15006" in err.value.reason
    assert isinstance(err.value, UpstreamConnectError)  # never sent: another endpoint may take it
    assert err.value.status == 503 and closed == [1] and len(reasons) == 1


def test_registry_identity_is_used() -> None:
    ident = f"spiffe://{TD}/ns/shop/sa/inventory"
    got = _upstream().verify(
        _Transport(_Ssl((ident,))),
        "inventory",
        Endpoint("h", 1, meta=frozenset({("spiffe_id", ident)})),
        "h2",
        lambda: None,
    )
    assert got == ident


def test_expected_identity_order() -> None:
    cfg = dataclasses.replace(
        load_config(None, environ={}),
        tls=TlsConfig(mode="strict", trust_domain=TD),
        services={"inventory": ClusterOverride(identity=f"spiffe://{TD}/ns/a/sa/b")},
    )

    class Fixed(Source):
        def load(self) -> Any:
            return _state().material

    tls = MeshTls(cfg, Fixed())
    # The config first, then the registry entry, then the default.
    assert tls.expected_identity("inventory", f"spiffe://{TD}/x") == f"spiffe://{TD}/ns/a/sa/b"
    assert tls.expected_identity("catalog", f"spiffe://{TD}/x") == f"spiffe://{TD}/x"
    assert tls.expected_identity("catalog") == f"spiffe://{TD}/svc/catalog"
