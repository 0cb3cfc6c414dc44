"""SPIFFE IDs: the three shapes the mesh reads, and what the spec refuses."""

from __future__ import annotations

import pytest

from sidecar.tls import spiffe


def test_istio_workload_form() -> None:
    ident = spiffe.parse("spiffe://cluster.local/ns/shop/sa/payment")
    assert (ident.trust_domain, ident.kind, ident.namespace) == ("cluster.local", "k8s", "shop")
    assert ident.service == ""
    assert str(ident) == "spiffe://cluster.local/ns/shop/sa/payment"


def test_service_form() -> None:
    ident = spiffe.parse("spiffe://mesh.test/svc/inventory")
    assert (ident.kind, ident.service) == ("svc", "inventory")
    assert spiffe.service_id("mesh.test", "inventory") == str(ident)


def test_consul_form() -> None:
    ident = spiffe.parse("spiffe://7b6f.consul/ns/default/dc/dc1/svc/web")
    assert (ident.kind, ident.service, ident.namespace) == ("consul", "web", "default")
    # The same path outside a .consul trust domain is just a valid ID.
    assert spiffe.parse("spiffe://td/ns/default/dc/dc1/svc/web").kind == "other"


def test_trust_domain_alone() -> None:
    ident = spiffe.parse("spiffe://mesh.test")
    assert (ident.path, ident.segments) == ("", ())


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("http://td/svc/a", "must start with 'spiffe://'"),
        ("SPIFFE://td/svc/a", "lower-case"),
        ("spiffe:///svc/a", "no trust domain"),
        ("spiffe://TD/svc/a", "trust domain"),
        ("spiffe://td:8443/svc/a", "port"),
        ("spiffe://user@td/svc/a", "user info"),
        ("spiffe://td/svc/a?x=1", "query"),
        ("spiffe://td/svc/a#f", "fragment"),
        ("spiffe://td/svc//a", "empty path segment"),
        ("spiffe://td/svc/a/", "empty path segment"),
        ("spiffe://td/", "must not end with '/'"),
        ("spiffe://td/svc/../a", "'..' path segment"),
        ("spiffe://td/svc/./a", "'.' path segment"),
        ("spiffe://td/svc/a b", "path segment"),
        ("spiffe://td/" + "a" * 2100, "longer than"),
    ],
)
def test_invalid(text: str, why: str) -> None:
    with pytest.raises(spiffe.SpiffeError, match=why):
        spiffe.parse(text)


def test_trust_domain_check() -> None:
    assert spiffe.check_trust_domain("mesh.test") == "mesh.test"
    for bad in ("", "Mesh", "a/b", "td:1"):
        with pytest.raises(spiffe.SpiffeError):
            spiffe.check_trust_domain(bad)
