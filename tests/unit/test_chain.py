"""The filter chain without sockets: order, local replies, the guard around a failing
filter, body buffering, config validation by key, and which chain a call gets."""

from __future__ import annotations

import asyncio
import logging
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import sidecar.chain
from sidecar.accesslog import AccessLog
from sidecar.call import BodyTooLarge, Call, read_response_body
from sidecar.chain import FilterContext, build_filters, resolve_factory
from sidecar.config import ConfigError, FilterSpec, load_config
from sidecar.discovery.base import Endpoint
from sidecar.messages import Body, Headers, Request, Response, fixed_body
from sidecar.metrics import Metrics
from sidecar.proxy import OutboundHandler
from sidecar.routing import Router
from sidecar.tracing import Tracing
from tests.unit.chain_helpers import (
    BufferAndResend,
    LocalReply,
    Raising,
    Recorder,
    Refusing,
    TagFilter,
    Terminal,
    chain,
    fake_entry_points,
    make_call,
    make_request,
    read_json,
    read_response,
    streamed,
    tag_factory,
)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def header_values(headers: Headers, name: bytes) -> list[bytes]:
    return [v for n, v in headers if n == name]


# --- Order ----------------------------------------------------------------------------


def test_requests_pass_filters_in_order_and_responses_in_reverse() -> None:
    journal: list[str] = []
    terminal = Terminal()
    handler = chain(
        [
            ("a", Recorder("a", journal)),
            ("b", Recorder("b", journal)),
            ("c", Recorder("c", journal)),
        ],
        terminal,
    )
    call = make_call(b"payload")

    response = run(handler(call))

    assert journal == [">a", ">b", ">c", "<c", "<b", "<a"]
    assert terminal.bodies == [b"payload"]
    assert header_values(terminal.headers[0], b"x-chain") == [b"c"]  # the last writer won
    assert header_values(response.headers, b"x-seen-by") == [b"c", b"b", b"a"]
    assert response.status == 200
    assert call.local_reply_by == ""


def test_a_local_reply_skips_later_filters_and_the_router_but_passes_back_out() -> None:
    journal: list[str] = []
    terminal = Terminal()
    handler = chain(
        [
            ("first", Recorder("first", journal)),
            ("deny", LocalReply(418, journal)),
            ("third", Recorder("third", journal)),
        ],
        terminal,
    )
    call = make_call()

    response = run(handler(call))

    assert journal == [">first", ">local", "<first"]
    assert terminal.calls == 0
    assert response.status == 418
    assert run(read_response(response)) == b"answered locally"
    assert header_values(response.headers, b"content-length") == [b"16"]
    assert header_values(response.headers, b"x-seen-by") == [b"first"]
    assert call.local_reply_by == "deny"
    assert call.endpoint is None


# --- The guard ----------------------------------------------------------------------


@pytest.mark.parametrize("phase", ["request", "response"])
def test_a_raising_filter_answers_500_naming_it_and_the_chain_keeps_working(
    phase: str, caplog: pytest.LogCaptureFixture
) -> None:
    journal: list[str] = []
    terminal = Terminal()
    metrics = Metrics()
    handler = chain(
        [("outer", Recorder("outer", journal)), ("explode", Raising(phase))], terminal, metrics
    )
    call = make_call(headers=[(b"x-explode", b"1")])

    with caplog.at_level(logging.ERROR, logger="sidecar.filters"):
        response = run(handler(call))

    assert response.status == 500
    assert header_values(response.headers, b"content-type") == [b"application/json"]
    assert header_values(response.headers, b"x-opus-error") == [b"FE"]
    assert run(read_json(response)) == {
        "error": "filter 'explode' failed",
        "status": 500,
        "service": "inventory",
    }
    assert call.local_reply_by == "explode"
    assert call.flags == "FE"
    assert call.error is not None and call.error.status == 500
    assert journal[-1] == "<outer"  # the 500 passes back out through the filters before it
    assert [r.getMessage() for r in caplog.records] == [
        "filter 'explode' failed on a call to inventory"
    ]
    assert caplog.records[0].exc_info is not None  # the traceback is in the log
    assert metrics.registry.get_sample_value("opus_filter_errors_total", {"filter": "explode"}) == 1

    # The failure was that call's alone: the next call through the same chain succeeds.
    calls_before = terminal.calls
    again = make_call(b"fine")
    ok = run(handler(again))
    assert ok.status == 200
    assert run(read_response(ok)) == b"from upstream"
    assert terminal.calls == calls_before + 1
    assert again.local_reply_by == "" and again.error is None


def test_a_raising_filter_answers_a_grpc_caller_with_a_grpc_status() -> None:
    handler = chain([("explode", Raising())], Terminal())
    call = make_call(headers=[(b"content-type", b"application/grpc"), (b"x-explode", b"1")])

    response = run(handler(call))

    assert response.status == 200  # trailers-only gRPC reply
    assert header_values(response.headers, b"grpc-status") == [b"2"]  # UNKNOWN
    assert header_values(response.headers, b"grpc-message") == [b"filter 'explode' failed"]


def test_a_mesh_error_from_a_filter_is_rendered_with_its_status() -> None:
    journal: list[str] = []
    terminal = Terminal()
    handler = chain([("outer", Recorder("outer", journal)), ("limit", Refusing())], terminal)
    call = make_call()

    response = run(handler(call))

    assert response.status == 429
    assert run(read_json(response)) == {"error": "slow down", "status": 429, "service": "inventory"}
    assert header_values(response.headers, b"x-opus-error") == [b"LR"]
    assert call.local_reply_by == "limit"
    assert call.error is not None and call.error.reason == "slow down"
    assert terminal.calls == 0
    assert journal == [">outer", "<outer"]


def test_a_filter_raising_on_the_response_releases_the_upstream_body() -> None:
    # The upstream response is dropped for the 500; its body must be cancelled so the pool
    # resets the stream (an HTTP/2 stream slot, an HTTP/1.1 connection) instead of leaking it.
    cancelled: list[bool] = []

    async def terminal(call: Call) -> Response:
        body = Body()
        body.feed(b"partial upstream reply")  # more would follow: the stream is still open
        body.on_cancel = lambda: cancelled.append(True)
        return Response(200, [], body)

    handler = chain([("explode", Raising("response"))], terminal)

    response = run(handler(make_call(headers=[(b"x-explode", b"1")])))

    assert response.status == 500
    assert cancelled == [True], "the upstream body was never cancelled"


# --- Bodies ---------------------------------------------------------------------------


def test_read_body_buffers_the_request_so_a_filter_can_send_it_twice() -> None:
    terminal = Terminal()
    flt = BufferAndResend()
    handler = chain([("resend", flt)], terminal)
    request = Request(b"POST", b"/x", b"inventory", [], streamed([b"ab", b"cd", b"ef"]))
    call = make_call(request=request)

    response = run(handler(call))

    assert response.status == 200
    assert call.attrs["body"] == b"abcdef"
    assert call.attrs["rewound"] is True
    assert terminal.bodies == [b"abcdef", b"abcdef"]


def test_a_buffered_body_over_the_replay_limit_can_still_be_resent() -> None:
    terminal = Terminal()
    payload = bytes(range(256)) * 400  # 100 KiB: under max_body_bytes, over REPLAY_LIMIT
    handler = chain([("resend", BufferAndResend())], terminal)
    call = make_call(request=make_request(payload), max_body_bytes=1024 * 1024)

    run(handler(call))

    assert call.attrs["rewound"] is True
    assert terminal.bodies == [payload, payload]


def test_read_body_over_the_limit_answers_413_and_stops_the_upload() -> None:
    terminal = Terminal()
    handler = chain([("resend", BufferAndResend())], terminal)
    body = streamed([b"abc", b"def", b"ghi"])
    stopped: list[bool] = []
    body.on_cancel = lambda: stopped.append(True)
    call = make_call(request=Request(b"POST", b"/x", b"inventory", [], body), max_body_bytes=5)

    response = run(handler(call))

    assert response.status == 413
    assert run(read_json(response)) == {
        "error": "request body over the 5-byte buffering limit",
        "status": 413,
    }
    assert header_values(response.headers, b"x-opus-error") == [b"BL"]
    assert call.flags == "BL"
    assert call.local_reply_by == "resend"
    assert terminal.calls == 0
    assert stopped == [True]


def test_read_body_limit_argument_overrides_the_configured_limit() -> None:
    small = make_call(b"x" * 10, max_body_bytes=5)
    assert run(small.read_body(limit=10)) == b"x" * 10
    with pytest.raises(BodyTooLarge):
        run(make_call(b"x" * 10, max_body_bytes=100).read_body(limit=9))


def test_set_body_replaces_the_body_and_its_content_length() -> None:
    call = make_call(
        b"old",
        headers=[(b"content-length", b"3"), (b"x-a", b"1"), (b"content-length", b"3")],
    )

    call.set_body(b"hello, world")

    assert header_values(call.headers, b"content-length") == [b"12"]
    assert header_values(call.headers, b"x-a") == [b"1"]
    assert run(call.read_body()) == b"hello, world"


def test_set_and_remove_header() -> None:
    call = make_call(headers=[(b"x-a", b"1"), (b"x-b", b"2"), (b"x-a", b"3")])
    call.set_header(b"x-a", b"only")
    call.remove_header(b"x-b")
    assert call.headers == [(b"x-a", b"only")]
    assert call.header(b"x-a") == b"only"


def test_read_response_body_buffers_and_keeps_the_response_readable() -> None:
    body = streamed([b"hello ", b"world"])
    body.trailers = [(b"grpc-status", b"0")]
    response = Response(200, [], body)

    async def scenario() -> tuple[bytes, bytes]:
        data = await read_response_body(response, 64)
        return data, await read_response(response)

    data, again = run(scenario())
    assert data == again == b"hello world"
    assert response.body.trailers == [(b"grpc-status", b"0")]
    assert response.body.complete


def test_read_response_body_over_the_limit_raises_body_too_large() -> None:
    response = Response(200, [], streamed([b"12345", b"67890"]))
    with pytest.raises(BodyTooLarge, match="response body over the 8-byte buffering limit"):
        run(read_response_body(response, 8))


def test_reply_sets_content_length_once() -> None:
    call = make_call()
    plain = call.reply(403, b"nope")
    assert plain.headers == [(b"content-length", b"4")]
    given = call.reply(403, b"nope", [(b"content-length", b"4"), (b"x-why", b"policy")])
    assert header_values(given.headers, b"content-length") == [b"4"]
    assert call.reply(204).headers == []


# --- Config: names and filter configs checked at load, errors naming the key ---------


@pytest.fixture
def tag_installed(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """Install `tag` (and any extra targets) as `opus.filters` entry points."""

    def install(**extra: str) -> None:
        eps = fake_entry_points(tag="tests.unit.chain_helpers:tag_factory", **extra)
        monkeypatch.setattr(sidecar.chain, "entry_points", lambda group: eps.select(group=group))

    install()
    return install


def config_error(tmp_path: Path, body: str) -> ConfigError:
    path = tmp_path / "sidecar.yaml"
    path.write_text("service: {name: payment}\n" + textwrap.dedent(body))
    with pytest.raises(ConfigError) as info:
        load_config(str(path), environ={})
    return info.value


def test_a_third_party_filter_is_found_through_its_entry_point(
    tag_installed: None, tmp_path: Path
) -> None:
    path = tmp_path / "sidecar.yaml"
    path.write_text("filters:\n  outbound:\n    - {name: tag, config: {tag: blue, repeat: 2}}\n")
    cfg = load_config(str(path), environ={})
    assert cfg.filters.outbound == (FilterSpec("tag", {"tag": "blue", "repeat": 2}),)
    (flt,) = build_filters(cfg.filters.outbound, FilterContext("outbound", "payment"), "k")
    assert isinstance(flt, TagFilter)
    assert flt.name == "tag"
    assert flt.value == b"blue,blue"


def test_an_unknown_filter_name_is_an_error_naming_the_key_and_the_known_filters(
    tag_installed: None, tmp_path: Path
) -> None:
    error = config_error(
        tmp_path,
        """
        filters:
          outbound:
            - {name: tagg}
        """,
    )
    assert error.key == "filters.outbound[0].name"
    assert "unknown filter 'tagg'" in error.message
    known = error.message.split("known filters: ", 1)[1].split(", ")
    assert "tag" in known
    assert set(sidecar.chain.BUILTIN_FILTERS) <= set(known)
    assert str(error).startswith(
        f"{tmp_path / 'sidecar.yaml'}: config key 'filters.outbound[0].name'"
    )


@pytest.mark.parametrize(
    ("body", "key"),
    [
        (
            """
            services:
              inventory:
                filters: [{name: tag, config: {tag: a}}, {name: nope}]
            """,
            "services.inventory.filters[1].name",
        ),
        (
            """
            routes:
              - {prefix: /shop/, service: catalog, filters: [{name: nope}]}
            """,
            "routes[0].filters[0].name",
        ),
        (
            """
            filters:
              inbound: [{name: nope}]
            """,
            "filters.inbound[0].name",
        ),
    ],
)
def test_unknown_filter_names_are_found_in_every_chain(
    tag_installed: None, tmp_path: Path, body: str, key: str
) -> None:
    assert config_error(tmp_path, body).key == key


@pytest.mark.parametrize(
    ("filter_config", "key", "message"),
    [
        ("{tag: a, colour: red}", "filters.outbound[0].config (tag).colour", "unknown key"),
        ("{tag: a, repat: 2}", "filters.outbound[0].config (tag).repat", "did you mean 'repeat'"),
        ("{tag: a, repeat: many}", "filters.outbound[0].config (tag).repeat", "must be an integer"),
        ("{repeat: 2}", "filters.outbound[0].config (tag).tag", "is required"),
        ("[a, b]", "filters.outbound[0].config", "must be a mapping"),
        (
            "{tag: not-an-identifier}",
            "filters.outbound[0].config (tag)",
            "tag must be an identifier",
        ),
    ],
)
def test_a_bad_filter_config_is_an_error_naming_the_key(
    tag_installed: None, tmp_path: Path, filter_config: str, key: str, message: str
) -> None:
    error = config_error(
        tmp_path,
        f"""
        filters:
          outbound:
            - {{name: tag, config: {filter_config}}}
        """,
    )
    assert error.key == key
    assert message in error.message


def test_an_entry_point_to_a_missing_module_is_a_config_error(
    tag_installed: Callable[..., None], tmp_path: Path
) -> None:
    tag_installed(gone="opus_no_such_module:factory")
    error = config_error(tmp_path, "filters: {outbound: [{name: gone}]}\n")
    assert error.key == "filters.outbound[0].name"
    assert "opus_no_such_module" in error.message


def test_an_entry_point_to_something_not_a_factory_is_a_config_error(
    tag_installed: Callable[..., None], tmp_path: Path
) -> None:
    tag_installed(odd="tests.unit.chain_helpers:TagConfig")
    error = config_error(tmp_path, "filters: {outbound: [{name: odd}]}\n")
    assert error.key == "filters.outbound[0].name"
    assert "is not a sidecar.chain.FilterFactory" in error.message


def test_an_entry_point_to_a_missing_attribute_is_a_config_error(
    tag_installed: Callable[..., None], tmp_path: Path
) -> None:
    tag_installed(typo="tests.unit.chain_helpers:tag_factroy")
    error = config_error(tmp_path, "filters: {outbound: [{name: typo}]}\n")
    assert error.key == "filters.outbound[0].name"
    assert "tag_factroy" in error.message


def test_the_builtin_registry_wins_over_an_entry_point_of_the_same_name(
    tag_installed: Callable[..., None], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A static "module:factory" registry: nothing registers itself on import.
    for name, target in sidecar.chain.BUILTIN_FILTERS.items():
        assert target == f"filters.{name}:factory"
    # An installed package cannot take over a built-in's name.
    tag_installed(shadow="tests.unit.chain_helpers:TagConfig")  # not a factory
    monkeypatch.setitem(
        sidecar.chain.BUILTIN_FILTERS, "shadow", "tests.unit.chain_helpers:tag_factory"
    )
    assert resolve_factory("shadow") is tag_factory


# --- Which chain a call gets: listener, per-service, per-route -------------------------


class FakeCluster:
    """Stands in for a service's cluster: answers with the chain headers the call carried."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.pool = type("Pool", (), {"protocol": "h2c"})()

    async def forward(
        self, request: Request, authority: bytes, path: bytes, avoid: list[Endpoint] | None = None
    ) -> tuple[Response, Endpoint]:
        headers = [(n, v) for n, v in request.headers if n.startswith(b"x-chain")]
        return Response(200, headers, fixed_body(self.name.encode())), Endpoint("127.0.0.1", 1)


class FakeClusters:
    def __init__(self, services: set[str]) -> None:
        self.clusters = {name: FakeCluster(name) for name in services}

    def knows(self, service: str) -> bool:
        return service in self.clusters

    def get(self, service: str) -> FakeCluster | None:
        return self.clusters.get(service)


class Sink:
    def __init__(self) -> None:
        self.responses: list[Response] = []

    async def send(self, response: Response) -> int:
        self.responses.append(response)
        return len(await read_response(response))


OVERRIDES = """
filters:
  outbound: [{name: tag, config: {tag: listener}}]
services:
  inventory: {filters: [{name: tag, config: {tag: service}}]}
  billing: {filters: []}
routes:
  - {prefix: /shop/, service: catalog, filters: [{name: tag, config: {tag: route}}]}
  - {prefix: /inv/, service: inventory}
"""


@pytest.fixture
def outbound(tag_installed: None, tmp_path: Path) -> OutboundHandler:
    path = tmp_path / "sidecar.yaml"
    path.write_text("service: {name: payment}\n" + OVERRIDES)
    cfg = load_config(str(path), environ={})
    clusters = FakeClusters({"inventory", "catalog", "billing"})
    router = Router(cfg.routes, clusters.knows)
    return OutboundHandler(cfg, router, clusters, Metrics(), AccessLog(""), Tracing(None))  # type: ignore[arg-type]


def send(handler: OutboundHandler, path: bytes) -> Response:
    sink = Sink()
    request = make_request(path=path, method=b"GET")
    request.authority = b"127.0.0.1:8080"
    run(handler(request, sink))
    (response,) = sink.responses
    return response


@pytest.mark.parametrize(
    ("path", "chain_tag"),
    [
        (b"/v1/invoke/catalog/x", b"listener"),  # no override: the listener's chain
        (b"/v1/invoke/inventory/x", b"service"),  # services.inventory.filters
        (b"/shop/x", b"route"),  # routes[0].filters, over the listener's chain
        (b"/inv/x", b"service"),  # a route without filters keeps the service's chain
        (b"/v1/invoke/billing/x", None),  # an empty override: no filters at all
    ],
)
def test_per_service_and_per_route_filters_select_the_chain(
    outbound: OutboundHandler, path: bytes, chain_tag: bytes | None
) -> None:
    response = send(outbound, path)
    assert response.status == 200
    assert header_values(response.headers, b"x-chain") == ([chain_tag] if chain_tag else [])


def test_chains_are_built_once_and_keep_their_state(outbound: OutboundHandler) -> None:
    for expected in (b"1", b"2", b"3"):
        response = send(outbound, b"/v1/invoke/inventory/x")
        assert header_values(response.headers, b"x-chain-calls") == [expected]
    assert len(outbound.filters) == 1
    send(outbound, b"/v1/invoke/catalog/x")
    assert len(outbound.filters) == 2  # the listener's chain, built for catalog


def test_a_route_without_filters_shares_the_service_chain_state(
    outbound: OutboundHandler,
) -> None:
    assert header_values(send(outbound, b"/v1/invoke/inventory/x").headers, b"x-chain-calls") == [
        b"1"
    ]
    assert header_values(send(outbound, b"/inv/x").headers, b"x-chain-calls") == [b"2"]
    assert len(outbound.filters) == 1
