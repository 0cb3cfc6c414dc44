"""The capture listener's core, without sockets: original-dst parsing, protocol
detection, the routing decision, and the TCP relay over in-memory transports."""

from __future__ import annotations

import asyncio
import socket
import struct
import sys
from typing import Any

import pytest

from sidecar.adapters.relay import TcpRelay as _Relay
from sidecar.capture import CaptureListener, CaptureRouter, _Capture
from sidecar.config import ConfigError, load_config
from sidecar.discovery.base import Endpoint
from sidecar.messages import Request, Response, fixed_body
from sidecar.metrics import Metrics
from sidecar.proto.sniff import Decision, Detector, classify, parse_sockaddr
from sidecar.serving import ResponseSink
from tests.unit.memtransport import attach, until

H2_START = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04"


def _family(family: int) -> bytes:
    return family.to_bytes(2, sys.byteorder)


def test_parse_sockaddr_in_and_in6() -> None:
    raw4 = _family(socket.AF_INET) + struct.pack("!H", 8080) + socket.inet_aton("10.1.2.3")
    assert parse_sockaddr(raw4 + b"\0" * 8) == ("10.1.2.3", 8080)
    raw6 = (
        _family(socket.AF_INET6)
        + struct.pack("!HI", 443, 0)
        + socket.inet_pton(socket.AF_INET6, "fd00::7")
        + b"\0" * 4
    )
    assert parse_sockaddr(raw6) == ("fd00::7", 443)
    with pytest.raises(ValueError):
        parse_sockaddr(_family(socket.AF_UNIX) + b"\0" * 14)


@pytest.mark.parametrize(
    ("first", "expected"),
    [
        (b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n", "http1"),
        (b"POST http://svc/a?b=1 HTTP/1.0\n", "http1"),
        (H2_START, "h2c"),
        (b"", "more"),
        (b"PRI * HTT", "more"),  # could still be the h2 preface
        (b"GE", "more"),
        (b"DELETE /items/1 HTTP/1.", "more"),
        (b"\x16\x03\x01\x02\x00\x01", "other"),  # a TLS ClientHello
        (b"SSH-2.0-OpenSSH_9.2\r\n", "other"),
        (b"PING\r\n", "other"),  # Redis inline command: no HTTP version
        (b"get / HTTP/1.1\r\n", "other"),
        (b"GET / HTTP/2.0\r\n", "other"),
        (b"GET /a  b HTTP/1.1\r\n", "other"),
        (b"*1\r\n$4\r\nPING\r\n", "other"),
    ],
)
def test_classify(first: bytes, expected: str) -> None:
    assert classify(first) == expected


def test_classify_gives_up_on_an_endless_request_line() -> None:
    assert classify(b"GET /" + b"a" * 100, max_line=64) == "other"
    assert classify(b"GET /" + b"a" * 50, max_line=64) == "more"


def test_router_prefers_ip_port_then_ip_then_discovery() -> None:
    endpoints = [("payment", Endpoint("10.0.0.9", 15006))]
    router = CaptureRouter(
        {"10.96.0.10:80": "inventory", "10.96.0.11": "ledger", "[fd00::1]:80": "six"},
        lambda: endpoints,
    )
    assert router.service_for(("10.96.0.10", 80)) == "inventory"
    assert router.service_for(("10.96.0.10", 81)) is None
    assert router.service_for(("10.96.0.11", 5000)) == "ledger"
    assert router.service_for(("fd00::1", 80)) == "six"
    assert router.service_for(("10.0.0.9", 15006)) == "payment"
    assert router.service_for(("203.0.113.5", 80)) is None


def test_router_reindexes_discovery_at_most_once_per_refresh() -> None:
    clock = [100.0]
    endpoints: list[tuple[str, Endpoint]] = []
    calls = []

    def known() -> list[tuple[str, Endpoint]]:
        calls.append(clock[0])
        return list(endpoints)

    router = CaptureRouter({}, known, refresh=1.0, now=lambda: clock[0])
    assert router.service_for(("10.0.0.9", 15006)) is None
    endpoints.append(("payment", Endpoint("10.0.0.9", 15006)))
    clock[0] += 0.5
    assert router.service_for(("10.0.0.9", 15006)) is None  # the index is still fresh
    clock[0] += 0.5
    assert router.service_for(("10.0.0.9", 15006)) == "payment"
    assert calls == [100.0, 101.0]


def _detector(dst: tuple[str, int], opaque: tuple[int, ...] = (3306,)) -> Detector:
    router = CaptureRouter({"10.96.0.10:80": "inventory"})
    return Detector(dst, router, frozenset(opaque), max_line=8192)


def test_opaque_port_is_decided_before_any_byte() -> None:
    assert _detector(("10.0.0.5", 3306)).start() == Decision("opaque")
    assert _detector(("10.0.0.5", 3307)).start() is None


def test_http_to_a_known_service_is_meshed_even_when_split() -> None:
    detector = _detector(("10.96.0.10", 80))
    assert detector.feed(b"GET /items HT") is None
    assert detector.feed(b"TP/1.1\r\nhost: 10.96.0.10\r\n") == Decision(
        "meshed", "inventory", "http1"
    )
    assert detector.buffer.startswith(b"GET /items HTTP/1.1\r\n")  # handed on whole


def test_h2c_to_a_known_service_is_meshed() -> None:
    assert _detector(("10.96.0.10", 80)).feed(H2_START) == Decision("meshed", "inventory", "h2c")


def test_http_to_an_unknown_address_passes_through() -> None:
    assert _detector(("93.184.216.34", 80)).feed(b"GET / HTTP/1.1\r\n") == Decision("passthrough")


def test_non_http_silence_and_half_close_pass_through() -> None:
    assert _detector(("10.96.0.10", 80)).feed(b"\x16\x03\x01") == Decision("passthrough")
    silent = _detector(("10.96.0.10", 80))
    assert silent.timeout() == Decision("passthrough")
    partial = _detector(("10.96.0.10", 80))
    assert partial.feed(b"GET /") is None
    assert partial.eof() == Decision("passthrough")


# --- the relay, over in-memory transports ---------------------------------------------


class _Transport(asyncio.Transport):
    """Records writes, EOF, pauses and closes; what a socket transport would do with them."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.eof_written = False
        self.reading = True
        self.closed = False
        self.aborted = False

    def write(self, data: Any) -> None:
        self.written += data

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof_written = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = self.aborted = True


def _relay_pair() -> tuple[_Relay, _Relay, _Transport, _Transport, list[int], list[int]]:
    counted_up: list[int] = []
    counted_down: list[int] = []
    live: set[_Relay] = set()
    gone = asyncio.Event()
    down, up = _Relay(counted_up.append, live, gone), _Relay(counted_down.append, live, gone)
    _Relay.pair(down, up)
    client, server = _Transport(), _Transport()
    down.connection_made(client)
    up.connection_made(server)
    return down, up, client, server, counted_up, counted_down


def test_relay_holds_early_bytes_until_connected_then_pumps_both_ways() -> None:
    down, up, client, server, counted_up, counted_down = _relay_pair()
    up.data_received(b"220 banner\r\n")  # server-first, before the pair is wired up
    assert client.written == b"" and not server.reading
    down.connected()
    up.connected()
    assert client.written == b"220 banner\r\n" and server.reading
    down.data_received(b"HELO x\r\n")
    up.data_received(b"250 ok\r\n")
    assert server.written == b"HELO x\r\n"
    assert client.written == b"220 banner\r\n250 ok\r\n"
    assert counted_up == [8] and counted_down == [12, 8]


def test_relay_backpressure_pauses_the_other_side() -> None:
    down, up, client, server, *_ = _relay_pair()
    down.connected()
    up.connected()
    up.pause_writing()  # the upstream socket's buffer is full: stop reading the app
    assert not client.reading and server.reading
    up.resume_writing()
    assert client.reading
    down.pause_writing()  # the app is slow to read: stop reading the upstream
    assert not server.reading
    down.resume_writing()
    assert server.reading


def test_relay_half_close_then_close_when_both_directions_end() -> None:
    down, up, client, server, *_ = _relay_pair()
    down.connected()
    up.connected()
    assert down.eof_received() is True  # keep the transport open for the reply
    assert server.eof_written and not server.closed and not client.closed
    up.data_received(b"reply after the app's FIN")
    assert client.written == b"reply after the app's FIN"
    up.eof_received()
    assert client.eof_written and client.closed and server.closed


def test_relay_reset_is_passed_on_as_a_reset() -> None:
    down, up, client, _, *_ = _relay_pair()
    down.connected()
    up.connected()
    up.connection_lost(ConnectionResetError())
    assert client.aborted
    down, _, _, server, *_ = _relay_pair()
    down.connection_lost(None)  # a clean close is a clean close
    assert server.closed and not server.aborted


# --- drain (issue 15, finding 10) ----------------------------------------------------


def test_drain_waits_for_a_captured_call(tmp_path: Any) -> None:
    """A call meshed through the capture listener is waited for like any listener's:
    wait_idle holds until it is answered, and its context is marked draining."""
    config = tmp_path / "sidecar.yaml"
    config.write_text("capture:\n  service_ips: {'10.96.0.10:80': inventory}\n")
    cfg = load_config(str(config), {})

    async def go() -> tuple[bool, bool, bytes]:
        gate = asyncio.Event()

        async def outbound(request: Request, sink: ResponseSink) -> None:
            await gate.wait()
            await sink.send(Response(200, [], fixed_body(b"late")))

        lst = CaptureListener(
            cfg, outbound, None, Metrics(), original_dst=lambda _: ("10.96.0.10", 80)
        )
        capture = _Capture(lst)
        app = attach(capture)
        capture.data_received(b"GET /slow HTTP/1.1\r\nHost: 10.96.0.10\r\n\r\n")
        ctx = lst.contexts["inventory"]
        await until(lambda: ctx.in_flight == 1)
        lst.begin_drain()
        waiting = asyncio.get_running_loop().create_task(lst.wait_idle(5.0))
        for _ in range(50):
            await asyncio.sleep(0)
        early = waiting.done()
        gate.set()
        finished = await waiting
        return early, finished and ctx.draining, app.data

    early, finished, reply = asyncio.run(go())
    assert not early, "drain did not wait for the captured call"
    assert finished
    assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"late")


def test_drain_waits_for_a_connection_still_being_sniffed(tmp_path: Any) -> None:
    """Accepted before SIGTERM, its request line not in yet: drain waits for the
    decision and for the call it turns into."""
    config = tmp_path / "sidecar.yaml"
    config.write_text("capture:\n  service_ips: {'10.96.0.10:80': inventory}\n")
    cfg = load_config(str(config), {})

    async def go() -> tuple[bool, bool, bytes]:
        async def outbound(request: Request, sink: ResponseSink) -> None:
            await sink.send(Response(200, [], fixed_body(b"ok")))

        lst = CaptureListener(
            cfg, outbound, None, Metrics(), original_dst=lambda _: ("10.96.0.10", 80)
        )
        capture = _Capture(lst)
        app = attach(capture)
        capture.data_received(b"GET /a HT")  # not decided yet
        lst.begin_drain()
        waiting = asyncio.get_running_loop().create_task(lst.wait_idle(5.0))
        for _ in range(50):
            await asyncio.sleep(0)
        early = waiting.done()
        capture.data_received(b"TP/1.1\r\nHost: x\r\n\r\n")
        return early, await waiting, app.data

    early, finished, reply = asyncio.run(go())
    assert not early and finished
    assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"ok")


def test_drain_gives_passthrough_relays_the_drain_deadline() -> None:
    """An open relay holds wait_idle until it closes or the time given runs out."""

    async def go() -> tuple[bool, bool]:
        cfg = load_config(None, {})
        lst = CaptureListener(cfg, _never_called, None, Metrics())
        down = _Relay(lambda _: None, lst.relays, lst.relays_gone)
        down.connection_made(_Transport())
        timed_out = await lst.wait_idle(0.05)
        waiting = asyncio.get_running_loop().create_task(lst.wait_idle(5.0))
        await asyncio.sleep(0)
        down.connection_lost(None)
        return timed_out, await waiting

    assert asyncio.run(go()) == (False, True)


async def _never_called(request: Request, sink: ResponseSink) -> None:
    raise AssertionError("no call expected")


# --- config --------------------------------------------------------------------------


def test_capture_config_defaults() -> None:
    cfg = load_config(None, {})
    assert cfg.listeners.capture.enabled is False
    assert (cfg.listeners.capture.host, cfg.listeners.capture.port) == ("0.0.0.0", 15001)
    assert cfg.capture.detect_timeout == 0.2
    assert cfg.capture.opaque_ports == (25, 587, 3306, 4444, 5432, 6379, 9300, 11211)


@pytest.mark.parametrize(
    ("env", "key"),
    [
        ({"OPUS_CAPTURE_DETECT_TIMEOUT": "0"}, "capture.detect_timeout"),
        ({"OPUS_CAPTURE_CONNECT_TIMEOUT": "-1"}, "capture.connect_timeout"),
        ({"OPUS_LISTENERS_CAPTURE_ENABLED": "maybe"}, "listeners.capture.enabled"),
        ({"OPUS_LISTENERS_CAPTURE_PORT": "70000"}, "listeners.capture.port"),
    ],
)
def test_capture_config_errors_name_the_key(env: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, env)
    assert info.value.key == key


def test_service_ips_keys_and_names_are_checked(tmp_path: Any) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("capture:\n  service_ips: {'10.96.0.10:80': inventory, '10.96.0.11': a}\n")
    assert load_config(str(good), {}).capture.service_ips["10.96.0.10:80"] == "inventory"
    bad = tmp_path / "bad.yaml"
    bad.write_text("capture:\n  service_ips: {'inventory:80': inventory}\n")
    with pytest.raises(ConfigError, match="ip:port"):
        load_config(str(bad), {})
    bad.write_text("capture:\n  service_ips: {'10.96.0.10': Not_A_Name}\n")
    with pytest.raises(ConfigError, match="service name"):
        load_config(str(bad), {})
    bad.write_text("capture:\n  opaque_ports: [25, 70000]\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(bad), {})
    assert info.value.key == "capture.opaque_ports[1]"
