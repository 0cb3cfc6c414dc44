"""Outbound routing: which service a call is for, the path it is sent with and the
configured route that matched (-1 when none did)."""

from __future__ import annotations

import pytest

from sidecar.config import RouteConfig
from sidecar.errors import BadRequest, UnknownService
from sidecar.messages import Request, fixed_body
from sidecar.routing import Router, host_to_name

KNOWN = frozenset({"payment", "orders", "inventory"})


def router(*routes: RouteConfig) -> Router:
    return Router(routes, KNOWN.__contains__)


def call(path: bytes, authority: bytes = b"localhost:15001", *, absolute: bool = False) -> Request:
    return Request(b"GET", path, authority, [], fixed_body(), absolute_form=absolute)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (b"/v1/invoke/payment/charge", ("payment", b"/charge", -1)),
        (b"/v1/invoke/payment/a/b?x=1", ("payment", b"/a/b?x=1", -1)),
        (b"/v1/invoke/payment?x=1", ("payment", b"/?x=1", -1)),
        (b"/v1/invoke/payment", ("payment", b"/", -1)),
        (b"/v1/invoke/Payment/a?q=/v1/invoke/x", ("payment", b"/a?q=/v1/invoke/x", -1)),
    ],
)
def test_invoke_form_names_the_service_and_keeps_the_method_path(
    path: bytes, expected: tuple[str, bytes, int]
) -> None:
    assert router().resolve(call(path)) == expected


def test_invoke_with_an_empty_service_is_a_bad_request() -> None:
    with pytest.raises(BadRequest) as info:
        router().resolve(call(b"/v1/invoke//charge"))
    assert info.value.status == 400
    assert info.value.flag == "DPE"


def test_invoke_of_an_unknown_service_is_503_naming_it() -> None:
    with pytest.raises(UnknownService) as info:
        router().resolve(call(b"/v1/invoke/nope/x"))
    assert info.value.status == 503
    assert info.value.flag == "NR"
    assert info.value.service == "nope"


def test_absolute_form_routes_on_the_url_host() -> None:
    request = call(b"/create?id=7", b"payment:8080", absolute=True)
    assert router().resolve(request) == ("payment", b"/create?id=7", -1)


def test_absolute_form_to_an_unknown_host_does_not_fall_back_to_routes() -> None:
    # A prefix route that would match the path must not capture a URL naming another host.
    r = router(RouteConfig(service="orders", prefix="/"))
    with pytest.raises(UnknownService) as info:
        r.resolve(call(b"/x", b"example.com", absolute=True))
    assert info.value.service == "example.com"


@pytest.mark.parametrize(
    "authority",
    [
        b"payment",
        b"payment:80",
        b"Payment.",
        b"PAYMENT:8080",
        b"payment.default.svc.cluster.local",
        b"payment.default.svc.cluster.local.:80",
        b"payment.default.svc",
        b" payment ",
    ],
)
def test_host_forms_naming_a_known_service(authority: bytes) -> None:
    assert router().resolve(call(b"/charge", authority)) == ("payment", b"/charge", -1)


@pytest.mark.parametrize(
    ("authority", "name"),
    [
        (b"Payment.default.svc.cluster.local:80", "payment.default.svc.cluster.local"),
        (b"payment.", "payment"),
        (b"[::1]:8080", "[::1]"),
        (b"[fe80::1]", "[fe80::1]"),
        (b"10.0.0.1:15001", "10.0.0.1"),
    ],
)
def test_host_to_name(authority: bytes, name: str) -> None:
    assert host_to_name(authority) == name


@pytest.mark.parametrize(
    "authority",
    [b"[::1]:8080", b"[::ffff:10.0.0.1]:80", b"10.0.0.1:15001", b"other.default.svc.cluster.local"],
)
def test_hosts_that_name_no_service(authority: bytes) -> None:
    r = router()
    assert r.service_for_host(authority) is None
    with pytest.raises(UnknownService) as info:
        r.resolve(call(b"/x", authority))
    assert info.value.service == host_to_name(authority)


def test_ipv6_literal_host_falls_through_to_a_prefix_route() -> None:
    r = router(RouteConfig(service="orders", prefix="/orders/"))
    assert r.resolve(call(b"/orders/1", b"[::1]:15001")) == ("orders", b"/orders/1", 0)


def test_prefix_route() -> None:
    r = router(RouteConfig(service="orders", prefix="/orders/"))
    assert r.resolve(call(b"/orders/42?full=1")) == ("orders", b"/orders/42?full=1", 0)
    with pytest.raises(UnknownService):
        r.resolve(call(b"/order"))


def test_grpc_service_route() -> None:
    r = router(RouteConfig(service="payment", grpc_service="shop.v1.Payment"))
    assert r.resolve(call(b"/shop.v1.Payment/Charge")) == ("payment", b"/shop.v1.Payment/Charge", 0)
    with pytest.raises(UnknownService):
        r.resolve(call(b"/shop.v1.Refunds/Create"))


def test_no_host_and_no_route_is_unknown_service() -> None:
    with pytest.raises(UnknownService) as info:
        router().resolve(call(b"/x", b""))
    assert info.value.service == ""


def test_invoke_beats_host() -> None:
    assert router().resolve(call(b"/v1/invoke/orders/list", b"payment")) == (
        "orders",
        b"/list",
        -1,
    )


def test_invoke_beats_absolute_form() -> None:
    request = call(b"/v1/invoke/orders/list", b"payment:80", absolute=True)
    assert router().resolve(request) == ("orders", b"/list", -1)


def test_host_beats_prefix_and_grpc_routes() -> None:
    r = router(
        RouteConfig(service="orders", prefix="/"),
        RouteConfig(service="inventory", grpc_service="shop.v1.Payment"),
    )
    assert r.resolve(call(b"/shop.v1.Payment/Charge", b"payment")) == (
        "payment",
        b"/shop.v1.Payment/Charge",
        -1,
    )


def test_prefix_routes_are_tried_in_config_order_before_grpc_routes() -> None:
    r = router(
        RouteConfig(service="inventory", grpc_service="shop.v1.Payment"),
        RouteConfig(service="orders", prefix="/shop."),
        RouteConfig(service="payment", prefix="/shop.v1."),
    )
    assert r.resolve(call(b"/shop.v1.Payment/Charge")) == ("orders", b"/shop.v1.Payment/Charge", 1)


def test_route_index_is_the_position_in_the_configured_routes() -> None:
    r = router(
        RouteConfig(service="orders", prefix="/orders/"),
        RouteConfig(service="inventory", prefix="/stock/"),
        RouteConfig(service="payment", grpc_service="shop.v1.Payment"),
    )
    assert r.resolve(call(b"/stock/9"))[2] == 1
    assert r.resolve(call(b"/shop.v1.Payment/Charge"))[2] == 2
    assert r.resolve(call(b"/orders/1"))[2] == 0
