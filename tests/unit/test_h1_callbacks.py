"""The HTTP/1.1 callback path (callbacks.CallbackCall) against the task path it stands in for.

Each scenario runs twice over in-memory transports, through the real listener, handler,
cluster and pool, with a scripted app behind: once as the listener runs it (calls with
no filters go on callbacks) and once with the callback path turned off (every call a
task running the handler's coroutine). What the caller and the app receive, the access
log and the metrics must be the same.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httptools
import pytest

from sidecar.accesslog import AccessLog
from sidecar.adapters.h1server import H1ServerProtocol
from sidecar.callbacks import CallbackCall
from sidecar.cluster import Cluster
from sidecar.config import load_config
from sidecar.discovery.base import Endpoint
from sidecar.inbound import InboundHandler
from sidecar.lb import RoundRobin
from sidecar.messages import Request
from sidecar.metrics import Metrics
from sidecar.proxy import OutboundHandler
from sidecar.routing import Router
from sidecar.serving import ListenerContext
from sidecar.tracing import Tracing
from sidecar.upstream.h1conn import H1ClientConnection
from sidecar.upstream.h1pool import H1Pool
from sidecar.upstream.pool import PoolLimits
from tests.unit.memtransport import MemoryTransport, attach, connect, until

OK = b"HTTP/1.1 200 OK\r\nServer: app\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"
REPLIES: dict[bytes, list[bytes]] = {
    b"/a": [OK],
    b"/echo": [b"HTTP/1.1 201 Created\r\nContent-Length: 4\r\nConnection: keep-alive\r\n\r\necho"],
    b"/nolength": [b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil-close"],
    b"/204": [b"HTTP/1.1 204 No Content\r\nServer: app\r\n\r\n"],
    b"/mesh": [
        b"HTTP/1.1 503 Service Unavailable\r\nX-Opus-Error: UF\r\nX-Opus-Upstream: forged\r\n"
        b"Content-Length: 4\r\n\r\nnope"
    ],
    b"/drop": [
        b"HTTP/1.1 200 OK\r\nConnection: x-private, keep-alive\r\nX-Private: secret\r\n"
        b"Keep-Alive: timeout=5\r\nX-Public: yes\r\nContent-Length: 2\r\n\r\nok"
    ],
    b"/close": [b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 3\r\n\r\nbye"],
    b"/stream": [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
        b"6\r\n world\r\n",
        b"0\r\ngrpc-status: 0\r\n\r\n",
    ],
    b"/split": [b"HTTP/1.1 200 OK\r\nContent-", b"Length: 5\r\n\r\nab", b"cde"],
    b"/informational": [b"HTTP/1.1 100 Continue\r\n\r\n", OK],
    b"/trailers": [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n",
        b"0\r\nSet-Cookie: session=secret\r\nHost: elsewhere\r\n\r\n",
    ],
    b"/gzip": [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"],
    b"/bighead": [
        b"HTTP/1.1 200 OK\r\nX-Big: " + b"b" * 70000 + b"\r\nContent-Length: 2\r\n\r\nok"
    ],
    b"/twolengths": [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 7\r\n\r\nok"],
    b"/reset": [],  # the app closes without a reply
    b"/hang": [],  # the app never answers (the test decides what happens)
}


class ScriptedApp(asyncio.Protocol):
    """The local app: answers each request by its path with the writes in REPLIES (each
    write reaches the sidecar as a segment of its own)."""

    def __init__(self, rig: Rig) -> None:
        self.rig = rig
        self.parser = httptools.HttpRequestParser(self)
        self.transport: MemoryTransport | None = None
        self.path = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, MemoryTransport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_url(self, url: bytes) -> None:
        self.path = url.split(b"?")[0]

    def on_message_complete(self) -> None:
        assert self.transport is not None
        self.rig.app_paths.append(self.path)
        if self.path == b"/hang":
            self.rig.hanging.append(self.transport)
            return
        for part in REPLIES[self.path]:
            self.transport.write(part)
        if self.path in (b"/reset", b"/close", b"/nolength"):
            self.transport.close()


class Clusters:
    def __init__(self, clusters: dict[str, Cluster]) -> None:
        self.clusters = clusters

    def knows(self, service: str) -> bool:
        return service in self.clusters

    def get(self, service: str) -> Cluster | None:
        return self.clusters.get(service)


class Rig:
    """A sidecar listener (inbound or outbound) before a scripted app, in memory."""

    def __init__(
        self,
        direction: str,
        workdir: Path,
        *,
        callbacks: bool,
        max_connections: int = 64,
        pending_timeout: float = 1.0,
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        config = workdir / "sidecar.yaml"
        config.write_text("service: {name: payment}\n")
        cfg = load_config(str(config), environ={})
        self.log_path = workdir / "access.log"
        self.access_log = AccessLog(str(self.log_path))
        self.metrics = Metrics()
        self.app_paths: list[bytes] = []
        self.app_sides: list[MemoryTransport] = []  # what the sidecar wrote to the app
        self.hanging: list[MemoryTransport] = []
        self.connects = 0
        self.refuse = False
        limits = PoolLimits(max_connections=max_connections, pending_timeout=pending_timeout)
        self.pool = H1Pool("inventory", limits, self.metrics, connect=self._connect)
        self.cluster = Cluster("inventory", self.pool, RoundRobin())
        self.cluster.update((Endpoint("127.0.0.1", 8080, instance_id="app"),))
        tracing = Tracing(None)
        handler: InboundHandler | OutboundHandler
        if direction == "inbound":
            handler = InboundHandler(cfg, self.cluster, self.metrics, self.access_log, tracing)
        else:
            clusters = Clusters({"inventory": self.cluster})
            router = Router(cfg.routes, clusters.knows)
            handler = OutboundHandler(
                cfg,
                router,
                clusters,  # type: ignore[arg-type]
                self.metrics,
                self.access_log,
                tracing,
            )
        start_now = handler.start_now if callbacks else None
        self.ctx = ListenerContext(direction, handler, cfg.http2, cfg.limits, start_now=start_now)

    async def _connect(
        self, factory: Callable[[], H1ClientConnection], host: str, port: int
    ) -> tuple[asyncio.BaseTransport, H1ClientConnection]:
        self.connects += 1
        if self.refuse:
            raise ConnectionRefusedError(111, "Connection refused")
        client = factory()
        client_side, _ = connect(client, ScriptedApp(self))
        self.app_sides.append(client_side)
        return client_side, client

    def caller(self, port: int = 5000) -> tuple[H1ServerProtocol, MemoryTransport]:
        proto = H1ServerProtocol(self.ctx)
        return proto, attach(proto, ("10.0.0.7", port))

    async def settle(self) -> None:
        await until(lambda: self.ctx.in_flight == 0 and not self.cluster.active)
        for _ in range(20):  # late callbacks: releases, closes
            await asyncio.sleep(0)

    def records(self) -> list[dict[str, Any]]:
        self.access_log.close()  # flushed; later records are dropped
        lines = self.log_path.read_text().splitlines() if self.log_path.exists() else []
        out = []
        for line in lines:
            record = json.loads(line)
            del record["time"], record["duration_ms"]
            out.append(record)
        return out

    def samples(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        out = {}
        for family in self.metrics.registry.collect():
            for sample in family.samples:
                name = sample.name
                if not name.startswith("opus_") or name.startswith("opus_request_duration"):
                    continue
                if name.endswith("_created"):
                    continue
                out[(name, tuple(sorted(sample.labels.items())))] = sample.value
        return out


def request(path: bytes, method: bytes = b"GET", body: bytes = b"", extra: bytes = b"") -> bytes:
    length = b"Content-Length: %d\r\n" % len(body) if body or method == b"POST" else b""
    return b"%s %s HTTP/1.1\r\nHost: inventory\r\n%s%s\r\n%s" % (method, path, extra, length, body)


def target(direction: str, path: bytes) -> bytes:
    return path if direction == "inbound" else b"/v1/invoke/inventory" + path


Outcome = tuple[bytes, list[bytes], list[bytes], list[dict[str, Any]], dict[Any, float]]


async def run_scenario(rig: Rig, feeds: list[bytes]) -> Outcome:
    proto, caller = rig.caller()
    for data in feeds:
        proto.data_received(data)
        await rig.settle()
    await rig.settle()
    return (
        caller.data,
        rig.app_paths,
        [side.data for side in rig.app_sides],
        rig.records(),
        rig.samples(),
    )


SCENARIOS: dict[str, Callable[[str], list[bytes]]] = {
    "get": lambda d: [request(target(d, b"/a?x=1"), extra=b"X-Trace: 1\r\n")],
    "post": lambda d: [request(target(d, b"/echo"), b"POST", b"hello")],
    "post-empty": lambda d: [request(target(d, b"/echo"), b"POST")],
    "head": lambda d: [request(target(d, b"/a"), b"HEAD")],
    "204": lambda d: [request(target(d, b"/204"), b"DELETE"), request(target(d, b"/a"))],
    "mesh-headers": lambda d: [request(target(d, b"/mesh"))],
    "connection-tokens": lambda d: [request(target(d, b"/drop"))],
    "app-closes": lambda d: [request(target(d, b"/close")), request(target(d, b"/a"))],
    "no-length": lambda d: [request(target(d, b"/nolength"))],
    "streamed": lambda d: [request(target(d, b"/stream"))],
    "split-head": lambda d: [request(target(d, b"/split"))],
    "informational": lambda d: [request(target(d, b"/informational"))],
    "app-resets": lambda d: [request(target(d, b"/reset"), b"POST", b"x")],
    "forwarded-for": lambda d: [request(target(d, b"/a"), extra=b"X-Forwarded-For: 192.0.2.1\r\n")],
    "keep-alive": lambda d: [request(target(d, b"/a")), request(target(d, b"/echo"))],
    "pipelined": lambda d: [
        request(target(d, b"/a")) + request(target(d, b"/echo"), b"POST", b"x")
    ],
    "caller-closes": lambda d: [request(target(d, b"/a"), extra=b"Connection: close\r\n")],
    "http10": lambda d: [request(target(d, b"/stream")).replace(b"HTTP/1.1", b"HTTP/1.0")],
    "response-trailers-then-next": lambda d: [
        request(target(d, b"/trailers")),
        request(target(d, b"/a")),
    ],
    "request-trailers": lambda d: [
        b"POST %s HTTP/1.1\r\nHost: inventory\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\nX-Forwarded-For: 6.6.6.6\r\nX-Sum: 1\r\n\r\n" % target(d, b"/echo")
    ],
    "app-transfer-coding": lambda d: [request(target(d, b"/gzip")), request(target(d, b"/a"))],
    "app-head-too-big": lambda d: [request(target(d, b"/bighead")), request(target(d, b"/a"))],
    "body-in-two-segments": lambda d: [
        request(target(d, b"/echo"), b"POST", b"hello")[:-2],
        b"lo",
    ],
}


@pytest.mark.parametrize("direction", ["inbound", "outbound"])
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_the_callback_path_matches_the_task_path(
    direction: str, scenario: str, tmp_path: Path
) -> None:
    async def run(callbacks: bool) -> Outcome:
        rig = Rig(direction, tmp_path / f"callbacks-{callbacks}", callbacks=callbacks)
        return await run_scenario(rig, SCENARIOS[scenario](direction))

    on_callbacks = asyncio.run(run(True))
    in_tasks = asyncio.run(run(False))
    assert on_callbacks == in_tasks
    assert on_callbacks[0]  # the caller got an answer


def test_a_plain_call_runs_without_a_task(tmp_path: Path) -> None:
    async def go() -> tuple[object, int]:
        rig = Rig("inbound", tmp_path, callbacks=True)
        proto, caller = rig.caller()
        tasks = len(asyncio.all_tasks())
        proto.data_received(request(b"/a"))
        await until(lambda: rig.pool.connection_count() == 1)  # the first call connects
        await rig.settle()
        proto.data_received(request(b"/a"))
        await asyncio.sleep(0)  # it starts once the loop has read what else arrived
        running = proto._active_task
        new_tasks = len(asyncio.all_tasks()) - tasks
        await rig.settle()
        rig.access_log.close()
        assert caller.data.count(b"200 OK") == 2
        return running, new_tasks

    running, new_tasks = asyncio.run(go())
    assert isinstance(running, CallbackCall)
    assert new_tasks == 0


def test_a_call_with_a_deadline_takes_the_task_path(tmp_path: Path) -> None:
    async def go() -> object:
        rig = Rig("inbound", tmp_path, callbacks=True)
        proto, caller = rig.caller()
        proto.data_received(request(b"/a", extra=b"X-Opus-Deadline-Ms: 5000\r\n"))
        await asyncio.sleep(0)
        running = proto._active_task
        await rig.settle()
        rig.access_log.close()
        assert b"200 OK" in caller.data
        return running

    assert isinstance(asyncio.run(go()), asyncio.Task)


@pytest.mark.parametrize("extra", [b"", b"X-Opus-Deadline-Ms: 5000\r\n"])
def test_an_outbound_call_is_routed_once_on_either_path(tmp_path: Path, extra: bytes) -> None:
    """The callback path routes the call; when it must run in a task (a deadline here; an
    HTTP/2 pool or filters alike), the task goes on with that route, never routing again."""

    async def go() -> tuple[int, object]:
        rig = Rig("outbound", tmp_path, callbacks=True)
        handler = rig.ctx.handler
        assert isinstance(handler, OutboundHandler)
        resolves = 0
        resolve = handler.router.resolve

        def counting(request: Request) -> tuple[str, bytes, int]:
            nonlocal resolves
            resolves += 1
            return resolve(request)

        handler.router.resolve = counting  # type: ignore[method-assign]
        proto, caller = rig.caller()
        proto.data_received(request(target("outbound", b"/a"), extra=extra))
        await asyncio.sleep(0)
        running = proto._active_task
        await rig.settle()
        rig.access_log.close()
        assert b"200 OK" in caller.data
        return resolves, running

    resolves, running = asyncio.run(go())
    assert resolves == 1
    assert isinstance(running, asyncio.Task if extra else CallbackCall)


# -- what a lost caller, a full pool and a refused connect do, both ways ----------------


@pytest.mark.parametrize("direction", ["inbound", "outbound"])
def test_a_caller_gone_while_the_app_works_closes_the_app_connection(
    direction: str, tmp_path: Path
) -> None:
    async def run(callbacks: bool) -> tuple[Any, ...]:
        rig = Rig(direction, tmp_path / f"callbacks-{callbacks}", callbacks=callbacks)
        proto, caller = rig.caller()
        proto.data_received(request(target(direction, b"/hang")))
        await until(lambda: bool(rig.hanging))
        caller.close()
        await rig.settle()
        return rig.records(), rig.samples(), rig.hanging[0].closed, dict(rig.cluster.active)

    on_callbacks, in_tasks = asyncio.run(run(True)), asyncio.run(run(False))
    assert on_callbacks == in_tasks
    records, _, app_side_closed, active = on_callbacks
    assert records[0]["flags"] == "DC" and records[0]["status"] == 0
    assert app_side_closed and active == {}


@pytest.mark.parametrize("callbacks", [True, False])
def test_calls_wait_for_a_busy_pool_in_order_and_in_time(tmp_path: Path, callbacks: bool) -> None:
    """One connection: the second and third callers wait for it, oldest first; a caller
    gone meanwhile leaves the queue; a wait past pending_timeout is 503 UO."""

    async def go() -> tuple[list[bytes], list[dict[str, Any]], int]:
        rig = Rig("inbound", tmp_path, callbacks=callbacks, max_connections=1)
        first, first_side = rig.caller(5001)
        first.data_received(request(b"/hang"))
        await until(lambda: bool(rig.hanging))
        callers = [rig.caller(5002 + i) for i in range(3)]
        for proto, _ in callers:
            proto.data_received(request(b"/a"))
        callers[1][1].close()  # gone while waiting
        for _ in range(20):
            await asyncio.sleep(0)
        rig.hanging[0].write(OK)  # the first call ends: its connection is handed on
        await rig.settle()
        assert not rig.pool._waiters
        late, _ = rig.caller(5009)
        late.data_received(request(b"/hang"))
        await until(lambda: len(rig.hanging) == 2)
        rig.pool.limits = PoolLimits(max_connections=1, pending_timeout=0.001)
        timed_out, timed_out_side = rig.caller(5010)
        timed_out.data_received(request(b"/a"))
        await until(lambda: b"503" in timed_out_side.data, turns=100_000)
        bodies = [side.data for side in (first_side, callers[0][1], callers[2][1])]
        return [*bodies, timed_out_side.data], rig.records(), rig.connects

    bodies, records, connects = asyncio.run(go())
    assert all(b"200 OK" in body for body in bodies[:3])
    assert b"x-opus-error: UO" in bodies[3]
    assert [r["flags"] for r in records] == ["DC", "-", "-", "-", "UO"]
    assert [r["bytes_out"] for r in records[1:4]] == [2, 2, 2]
    assert connects == 1


@pytest.mark.parametrize("direction", ["inbound", "outbound"])
def test_a_refused_connect_is_resent_then_answered_503(direction: str, tmp_path: Path) -> None:
    async def run(callbacks: bool) -> tuple[Any, ...]:
        rig = Rig(direction, tmp_path / f"callbacks-{callbacks}", callbacks=callbacks)
        rig.refuse = True
        proto, caller = rig.caller()
        proto.data_received(request(target(direction, b"/a")))
        await until(lambda: b"\r\n\r\n" in caller.data)
        await rig.settle()
        return caller.data, rig.records(), rig.samples(), rig.connects

    on_callbacks, in_tasks = asyncio.run(run(True)), asyncio.run(run(False))
    assert on_callbacks == in_tasks
    data, records, _, connects = on_callbacks
    assert data.startswith(b"HTTP/1.1 503") and b"x-opus-error: UF" in data
    assert connects == 4  # the first try and three resends
    assert records[0]["flags"] == "UF"


# -- the pool's connections ------------------------------------------------------------


def test_cancelling_a_whole_body_after_the_release_leaves_the_connection_open(
    tmp_path: Path,
) -> None:
    """A caller that cancels a finished body late (a 204 it did not read, a client gone)
    must not close the connection, which may serve another call by then."""

    async def go() -> tuple[bool, int]:
        rig = Rig("inbound", tmp_path, callbacks=False)
        endpoint = rig.cluster.endpoints[0]
        first = await rig.pool.request(endpoint, make_request(b"/204"), b"app", b"/204")
        await rig.settle()
        (conn,) = rig.pool._all
        second = await rig.pool.request(endpoint, make_request(b"/a"), b"app", b"/a")
        first.body.cancel()
        await rig.settle()
        rig.access_log.close()
        return conn.closed, second.status

    assert asyncio.run(go()) == (False, 200)


def make_request(path: bytes) -> Any:
    from sidecar.messages import Request, fixed_body

    return Request(b"GET", path, b"app", [], fixed_body())


def test_a_late_head_timer_rearms_for_the_head_being_read(tmp_path: Path) -> None:
    """One timer per connection: when it fires for a head read long ago, the head being
    read now gets its own full time; when that passes too, 408."""

    async def go() -> tuple[bool, bytes]:
        rig = Rig("inbound", tmp_path, callbacks=True)
        proto, caller = rig.caller()
        proto.data_received(b"GET /a HTTP/1.1\r\nHost: x\r\n")  # a head, half read
        assert proto._timer is not None
        proto._header_deadline = proto.loop.time() + 60  # as if it began just now
        proto._on_timer()
        rearmed = proto._timer is not None and not caller.closed
        proto._header_deadline = proto.loop.time() - 1
        proto._on_timer()
        await until(lambda: caller.closed)
        rig.access_log.close()
        return rearmed, caller.data

    rearmed, data = asyncio.run(go())
    assert rearmed
    assert data.startswith(b"HTTP/1.1 408 Request Timeout")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        (b"x-a", b"1\r\nx-injected: 1"),
        (b"x-a", b"1\nx"),
        (b"x-a", b"1\rx"),
        (b"x-a", b"1\0x"),
        (b"x-a\r\nx-b", b"1"),
        (b"x-a", b"ok"),
    ],
)
def test_a_header_holding_cr_lf_or_nul_never_reaches_the_wire(
    tmp_path: Path, name: bytes, value: bytes
) -> None:
    """Whatever put it there (parsers refuse them; a filter might not), the sink answers
    500 instead of writing a head such a header would split."""
    from sidecar.messages import Response, fixed_body

    async def handler(request: Any, sink: Any) -> None:
        await sink.send(Response(200, [(name, value)], fixed_body(b"body")))

    async def go() -> bytes:
        workdir = tmp_path / "app"
        workdir.mkdir()
        (workdir / "sidecar.yaml").write_text("service: {name: payment}\n")
        cfg = load_config(str(workdir / "sidecar.yaml"), environ={})
        proto = H1ServerProtocol(ListenerContext("inbound", handler, cfg.http2, cfg.limits))
        caller = attach(proto)
        proto.data_received(request(b"/a"))
        await until(lambda: bool(caller.data))
        return caller.data

    data = asyncio.run(go())
    if value == b"ok":
        assert data.startswith(b"HTTP/1.1 200 OK\r\nx-a: ok\r\n")
    else:
        assert data.startswith(b"HTTP/1.1 500 Internal Server Error\r\n")
        assert b"x-injected" not in data and b"x-b" not in data


# -- issue 15: the HTTP/1.1 boundary, both paths ---------------------------------------


@pytest.mark.parametrize("callbacks", [True, False])
def test_an_apps_response_trailers_never_reach_the_next_caller(
    tmp_path: Path, callbacks: bool
) -> None:
    """The app's trailers (set-cookie) end its response; on the same pooled connection
    the next caller's response has only its own headers."""

    async def go() -> tuple[bytes, bytes, int]:
        rig = Rig("inbound", tmp_path, callbacks=callbacks)
        first, first_side = rig.caller(5001)
        first.data_received(request(b"/trailers"))
        await rig.settle()
        second, second_side = rig.caller(5002)
        second.data_received(request(b"/a"))
        await rig.settle()
        rig.access_log.close()
        return first_side.data, second_side.data, rig.connects

    first, second, connects = asyncio.run(go())
    assert connects == 1  # the same pooled connection
    assert first.startswith(b"HTTP/1.1 200 OK") and b"\r\n\r\nok" in first
    assert second.startswith(b"HTTP/1.1 200 OK") and second.endswith(b"\r\n\r\nok")
    assert b"set-cookie" not in second.lower() and b"secret" not in second


def test_the_pool_hands_response_trailers_on_as_trailers(tmp_path: Path) -> None:
    async def go() -> tuple[Any, Any]:
        rig = Rig("inbound", tmp_path, callbacks=False)
        endpoint = rig.cluster.endpoints[0]
        response = await rig.pool.request(
            endpoint, make_request(b"/trailers"), b"app", b"/trailers"
        )
        while await response.body.read():
            pass
        after = await rig.pool.request(endpoint, make_request(b"/a"), b"app", b"/a")
        rig.access_log.close()
        return response, after

    response, after = asyncio.run(go())
    # Framing fields are no trailers (RFC 9110 6.5.1): dropped.
    assert response.body.trailers == [(b"set-cookie", b"session=secret")]
    assert all(name != b"set-cookie" for name, _ in response.headers + after.headers)


@pytest.mark.parametrize("callbacks", [True, False])
def test_request_trailers_reach_the_app_as_trailers(tmp_path: Path, callbacks: bool) -> None:
    async def go() -> bytes:
        rig = Rig("inbound", tmp_path, callbacks=callbacks)
        await run_scenario(rig, SCENARIOS["request-trailers"]("inbound"))
        return rig.app_sides[0].data

    sent = asyncio.run(go())
    head, _, rest = sent.partition(b"\r\n\r\n")
    assert b"x-forwarded-for: 6.6.6.6" not in head and b"transfer-encoding: chunked" in head
    assert rest.endswith(b"0\r\nx-forwarded-for: 6.6.6.6\r\nx-sum: 1\r\n\r\n")


@pytest.mark.parametrize("path", [b"/gzip", b"/bighead", b"/twolengths"])
def test_an_app_response_the_client_cannot_read_safely_is_502(tmp_path: Path, path: bytes) -> None:
    async def go() -> bytes:
        rig = Rig("inbound", tmp_path, callbacks=True)
        proto, caller = rig.caller()
        proto.data_received(request(path))
        await rig.settle()
        rig.access_log.close()
        return caller.data

    data = asyncio.run(go())
    assert data.startswith(b"HTTP/1.1 502 ")
    reasons = {
        b"/gzip": b"gzip",
        b"/bighead": b"max_header_bytes",
        b"/twolengths": b"Content-Length",
    }
    assert reasons[path] in data


UNWRITABLE = [
    (b"GET", b"/a", b"app", [(b"x-a", b"a\r\ncontent-length: 0\r\n\r\nGET /smuggled HTTP/1.1")]),
    (b"GET", b"/a", b"app", [(b"x-a\r\nx-injected", b"1")]),
    (b"GET", b"/a", b"app", [(b"x a", b"1")]),
    (b"GET", b"/a", b"app", [(b"x-a", b"\x00")]),
    (b"GET", b"/a", b"app", [(b"x-a", b"\x01")]),
    (b"GET", b"/a", b"app", [(b"", b"1")]),
    (b"GET", b"/a HTTP/1.1\r\nx: y", b"app", []),
    (b"GET", b"/a b", b"app", []),
    (b"GET", b"a", b"app", []),
    (b"GET\r\nX", b"/a", b"app", []),
    (b"GE T", b"/a", b"app", []),
    (b"GET", b"/a", b"app\r\nx-injected: 1", []),
    (b"GET", b"/a", b"app x", []),
    (b"POST", b"/a", b"app", [(b"content-length", b"1, 2")]),
]


@pytest.mark.parametrize(("method", "path", "authority", "headers"), UNWRITABLE)
@pytest.mark.parametrize("callbacks", [True, False])
def test_a_request_http11_cannot_carry_is_refused_and_the_connection_serves_the_next(
    tmp_path: Path,
    callbacks: bool,
    method: bytes,
    path: bytes,
    authority: bytes,
    headers: list[tuple[bytes, bytes]],
) -> None:
    """Fields an HTTP/2 caller (or a filter) could send: the writer fails the call with a
    400 naming the part, writes nothing, and the pooled connection serves the next call."""
    from sidecar.errors import BadRequest
    from sidecar.messages import Body, Request, Response, fixed_body

    async def go() -> tuple[BaseException | Response | None, bytes, int, tuple[int, bytes]]:
        rig = Rig("inbound", tmp_path, callbacks=False)
        endpoint = rig.cluster.endpoints[0]
        await rig.pool.request(endpoint, make_request(b"/a"), b"app", b"/a")
        await rig.settle()
        written = len(rig.app_sides[0].data)
        body: Body = fixed_body()
        if method == b"POST":
            body = Body()  # streamed: its declared length is what frames it
        bad = Request(method, path, authority, list(headers), body)
        outcome: BaseException | Response | None = None
        if callbacks:
            (conn,) = rig.pool._idle[("127.0.0.1", 8080)]
            rig.pool.idle_connection(endpoint)
            got: list[Response | BaseException] = []
            rig.pool.send(conn, bad, authority, path, got.append)
            outcome = got[0]
        else:
            try:
                await rig.pool.request(endpoint, bad, authority, path)
            except BadRequest as exc:
                outcome = exc
        refused_wrote = rig.app_sides[0].data[written:]
        after = await rig.pool.request(endpoint, make_request(b"/a"), b"app", b"/a")
        await rig.settle()
        rig.access_log.close()
        return outcome, refused_wrote, rig.connects, (after.status, rig.app_sides[0].data)

    outcome, refused_wrote, connects, (status, app_saw) = asyncio.run(go())
    assert isinstance(outcome, BadRequest) and outcome.status == 400
    assert "cannot be sent as HTTP/1.1" in outcome.reason
    assert refused_wrote == b""
    assert connects == 1 and status == 200
    assert app_saw.count(b"GET /a HTTP/1.1\r\n") == 2 and b"injected" not in app_saw
