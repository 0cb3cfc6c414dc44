"""The filter SDK (sidecar/sdk.py): exactly what it exports, that the built-in filters and
the example third-party package use nothing else of the sidecar, that the router's record
of a call is read-only to filters, and the helpers filters answer and count with."""

from __future__ import annotations

import ast
import asyncio
import json
import time
from collections.abc import Iterable
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

import sidecar.sdk
from sidecar.sdk import (
    DEADLINE_HEADER,
    Call,
    Filter,
    FilterContext,
    FilterMetrics,
    MeshError,
    Request,
    Response,
    UpstreamTimeout,
    caller_deadline,
    error_reply,
    fixed_body,
    format_grpc_timeout,
    parse_grpc_timeout,
    reply,
)

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_PACKAGE = REPO / "tests" / "fixtures" / "opus-filter-example" / "opus_filter_example"

EXPORTS = [
    "DEADLINE_HEADER",
    "GRPC_TIMEOUT_HEADER",
    "Body",
    "BodyError",
    "BodyTooLarge",
    "BufferBudgetExhausted",
    "Call",
    "Endpoint",
    "Filter",
    "FilterContext",
    "FilterFactory",
    "FilterFailed",
    "FilterMetrics",
    "Headers",
    "MeshError",
    "Next",
    "Request",
    "Response",
    "StreamRefused",
    "UpstreamConnectError",
    "UpstreamReset",
    "UpstreamTimeout",
    "caller_deadline",
    "error_reply",
    "fixed_body",
    "format_grpc_timeout",
    "parse_grpc_timeout",
    "read_response_body",
    "reply",
    "set_response_header",
    "signing",
]

# What a filter may import from the sidecar: the SDK (which carries the HMAC wire format
# the client library shares with hmac_sign and hmac_verify, as `signing`).
ALLOWED = {"sidecar.sdk"}

ROUTER_FIELDS = [
    "endpoint",
    "cluster",
    "tried",
    "tries",
    "upstream_protocol",
    "error",
    "flags",
    "local_reply_by",
    "route",
    "buffered",
]


def make_call(headers: list[tuple[bytes, bytes]] | None = None) -> Call:
    request = Request(b"GET", b"/items", b"inventory", headers or [], fixed_body())
    return Call(request, "outbound", "inventory", b"inventory", b"/items", 1 << 20)


def test_the_sdk_exports_exactly_its_api() -> None:
    assert sidecar.sdk.__all__ == EXPORTS
    for name in EXPORTS:
        assert getattr(sidecar.sdk, name) is not None, name
    # Everything public the module holds is exported: nothing leaks in by accident.
    public = {name for name in vars(sidecar.sdk) if not name.startswith("_")}
    assert public - {"annotations"} == set(EXPORTS)


def _sidecar_imports(path: Path) -> list[tuple[int, str]]:
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "sidecar":  # from sidecar import x: module sidecar.x
                found += [(node.lineno, f"sidecar.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, node.module))
    return [(line, name) for line, name in found if name.split(".")[0] == "sidecar"]


@pytest.mark.parametrize(
    "package", [REPO / "filters", EXAMPLE_PACKAGE], ids=["filters", "example-package"]
)
def test_filters_import_only_the_sdk_from_the_sidecar(package: Path) -> None:
    modules = sorted(package.rglob("*.py"))
    assert modules
    outside = [
        f"{path.relative_to(REPO)}:{line}: {name}"
        for path in modules
        for line, name in _sidecar_imports(path)
        if name not in ALLOWED
    ]
    assert outside == []


def test_the_example_package_uses_the_sdk() -> None:
    names = {name for path in EXAMPLE_PACKAGE.rglob("*.py") for _, name in _sidecar_imports(path)}
    assert names == {"sidecar.sdk"}


@pytest.mark.parametrize("field", ROUTER_FIELDS)
def test_the_routers_record_of_a_call_is_read_only_to_filters(field: str) -> None:
    call = make_call()
    with pytest.raises(AttributeError):
        setattr(call, field, getattr(call, field))


def test_a_call_starts_with_nothing_recorded() -> None:
    call = make_call()
    assert (call.endpoint, call.cluster, call.tried, call.tries) == (None, None, (), 0)
    assert (call.error, call.flags, call.local_reply_by, call.route) == (None, "-", "", "-")
    assert call.upstream_protocol == "" and call.buffered == 0


def test_what_a_filter_may_record() -> None:
    call = make_call()
    call.record_error(UpstreamTimeout("too slow"))
    assert isinstance(call.error, UpstreamTimeout) and call.flags == "UT"
    call.begin_try()
    assert call.error is None and call.flags == "-"
    call.set_flags("URX")
    call.note_local_reply("tenant")
    assert call.flags == "URX" and call.local_reply_by == "tenant"
    # What filters change about the request stays writable.
    call.path, call.authority, call.deadline, call.retryable = b"/v2", b"other", 1.0, True
    call.attrs["seen"] = True
    assert (call.path, call.authority, call.deadline, call.retryable) == (
        b"/v2",
        b"other",
        1.0,
        True,
    )


def test_reply_sets_content_length_unless_given() -> None:
    plain = reply(403, b'{"error":"blocked"}', [(b"content-type", b"application/json")])
    assert plain.status == 403
    assert plain.headers == [
        (b"content-type", b"application/json"),
        (b"content-length", b"19"),
    ]
    assert plain.body.read_nowait() == b'{"error":"blocked"}'
    assert reply(204).headers == []
    given = reply(200, b"abc", [(b"content-length", b"3")])
    assert given.headers == [(b"content-length", b"3")]


class Refused(MeshError):
    status = 429
    flag = "RL"


def test_error_reply_renders_the_error_and_records_it() -> None:
    call = make_call()
    response = error_reply(call, Refused("slow down", service="inventory"))
    assert response.status == 429
    assert json.loads(response.body.read_nowait() or b"")["error"] == "slow down"
    assert isinstance(call.error, Refused) and call.flags == "RL"
    grpc = make_call([(b"content-type", b"application/grpc")])
    answer = error_reply(grpc, Refused("slow down"))
    assert answer.status == 200 and (b"grpc-status", b"14") in answer.headers  # UNAVAILABLE


def test_a_filter_on_request_reply_is_noted_as_local() -> None:
    class Deny(Filter):
        async def on_request(self, call: Call) -> Response | None:
            return reply(403)

    flt = Deny()
    flt.name = "deny"
    call = make_call()

    async def never(call: Call) -> Response:
        raise AssertionError("the upstream must not be called")

    response = asyncio.run(flt.handle(call, never))
    assert response.status == 403 and call.local_reply_by == "deny"


def test_filter_metrics_are_prefixed_declared_once_and_checked() -> None:
    registry = CollectorRegistry()
    metrics = FilterMetrics(registry)
    stamps = metrics.counter("example_stamps", "Calls stamped, by service.", ["service"])
    assert metrics.counter("example_stamps", "Calls stamped, by service.", ["service"]) is stamps
    stamps.labels("inventory").inc()
    assert registry.get_sample_value("opus_example_stamps_total", {"service": "inventory"}) == 1
    with pytest.raises(ValueError, match="already declared as a counter with labels"):
        metrics.counter("example_stamps", "Calls stamped.", ["route"])
    with pytest.raises(ValueError, match="already declared"):
        metrics.gauge("example_stamps", "Calls stamped.", ["service"])
    with pytest.raises(ValueError, match="without the 'opus_' prefix"):
        metrics.counter("opus_example", "Doubly prefixed.")
    metrics.gauge("example_queue", "Waiting calls.").set(3)
    metrics.histogram("example_seconds", "Time taken.", buckets=(0.1, 1.0)).observe(0.5)
    assert registry.get_sample_value("opus_example_queue") == 3
    assert registry.get_sample_value("opus_example_seconds_bucket", {"le": "1.0"}) == 1


class Computed(Collector):
    made = 0

    def __init__(self) -> None:
        Computed.made += 1

    def collect(self) -> Iterable[Metric]:
        return []


def test_a_collector_is_registered_once_per_registry() -> None:
    metrics = FilterMetrics(CollectorRegistry())
    first = metrics.collector(Computed)
    assert metrics.collector(Computed) is first and Computed.made == 1


def test_the_context_clock_is_monotonic_unless_injected() -> None:
    assert FilterContext("outbound", "payment").clock is time.monotonic
    assert FilterContext("outbound", "payment", clock=lambda: 42.0).clock() == 42.0


def test_deadline_helpers() -> None:
    assert parse_grpc_timeout(b"250m") == 0.25
    assert parse_grpc_timeout(b"2S") == 2.0
    assert parse_grpc_timeout(b"123456789m") is None  # over 8 digits
    assert parse_grpc_timeout(b"5x") is None
    assert format_grpc_timeout(0.25) == b"250m"
    assert caller_deadline(make_call().request) is None
    with_deadline = make_call([(DEADLINE_HEADER, b"1500")]).request
    deadline = caller_deadline(with_deadline)
    assert deadline is not None
    assert 1.0 < deadline - time.monotonic() <= 1.5
