"""HTTP/2 abuse on a real sidecar's inbound listener, with raw frames over a socket.

Promised for each: the sidecar's memory and CPU stay bounded, a second client's calls
keep succeeding meanwhile, and where the abuse is a protocol violation the connection
is closed with the GOAWAY code RFC 9113 names; floods the protocol allows (rapid reset,
SETTINGS and PING floods) run into per-connection budgets and get GOAWAY
ENHANCE_YOUR_CALM.
"""

from __future__ import annotations

import httpx
import pytest
from hyperframe.frame import GoAwayFrame, HeadersFrame, PingFrame, RstStreamFrame, SettingsFrame

from tests.hostile.h2raw import (
    COMPRESSION_ERROR,
    ENHANCE_YOUR_CALM,
    PROTOCOL_ERROR,
    REFUSED_STREAM,
    RawH2,
    cpu_seconds,
    rss_bytes,
)
from tests.hostile.wire import app_calls
from tests.integration.conftest import Proc, Sidecar

pytestmark = pytest.mark.integration

RSS_SLACK = 64 * 1024 * 1024  # what one hostile connection may cost the sidecar


class Bounds:
    """RSS and CPU of the sidecar across a `with` block, and a bystander's call after it."""

    def __init__(self, sidecar: Sidecar, max_cpu: float) -> None:
        self.sidecar = sidecar
        self.max_cpu = max_cpu

    def __enter__(self) -> Bounds:
        pid = self.sidecar.proc.pid
        self.rss, self.cpu = rss_bytes(pid), cpu_seconds(pid)
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is not None:
            return
        pid = self.sidecar.proc.pid
        assert self.sidecar.proc.poll() is None, "the sidecar died"
        assert rss_bytes(pid) - self.rss < RSS_SLACK
        assert cpu_seconds(pid) - self.cpu < self.max_cpu
        assert httpx.get(f"{self.sidecar.inbound}/bystander", timeout=5).status_code == 200


def _rapid_reset(client: RawH2, pairs: int) -> int:
    sent = 0
    for stream_id in range(1, 2 * pairs, 2):
        if not client.send(client.request(stream_id, "/slow?ms=2000"), client.reset(stream_id)):
            break
        sent += 1
    return sent


def test_rapid_reset_is_bounded_and_reaches_no_app(target: tuple[Proc, Sidecar]) -> None:
    """CVE-2023-44487: 5000 streams opened and reset at once. Each reset cancels its call
    before it reaches the app; others are served throughout."""
    app, sidecar = target
    before = app_calls(app)
    with Bounds(sidecar, max_cpu=10.0):
        client = RawH2(sidecar.ports["inbound"])
        _rapid_reset(client, 5000)
        # A bystander during the flood's processing, not just after it.
        assert httpx.get(f"{sidecar.inbound}/during", timeout=10).status_code == 200
        client.close()
    assert app_calls(app) - before <= 2 + 100  # the bystanders, plus at most one window


def test_rapid_reset_gets_goaway_enhance_your_calm(target: tuple[Proc, Sidecar]) -> None:
    _, sidecar = target
    client = RawH2(sidecar.ports["inbound"])
    _rapid_reset(client, 5000)
    goaway = client.goaway(timeout=3)
    client.close()
    assert goaway is not None and goaway.error_code == ENHANCE_YOUR_CALM


def test_continuation_flood_is_cut_off(target: tuple[Proc, Sidecar]) -> None:
    """A header block that never ends (HEADERS without END_HEADERS, then CONTINUATION
    frames): the connection is closed long before the 64 MiB offered are buffered."""
    _, sidecar = target
    with Bounds(sidecar, max_cpu=5.0):
        client = RawH2(sidecar.ports["inbound"])
        head = HeadersFrame(1)
        head.data = client.headers_block(1)
        client.send(head)
        piece = client.encoder.encode([("x-a", "b" * 1000)]) * 16
        sent = 0
        for _ in range(4000):
            if not client.send(client.continuation(1, piece)):
                break
            sent += 1
        client.close()
    assert sent < 4000, "the sidecar kept reading an endless header block"


def _control_flood(target: tuple[Proc, Sidecar], make: object, count: int) -> tuple[RawH2, int]:
    _, sidecar = target
    client = RawH2(sidecar.ports["inbound"])
    batch = b"".join(make().serialize() for _ in range(100))  # type: ignore[operator]
    sent = 0
    while sent < count and client.send(batch):
        sent += 100
    return client, sent


FLOODS = {
    "settings": lambda: SettingsFrame(0),
    "ping": lambda: PingFrame(0, opaque_data=b"flooding"),
}


@pytest.mark.parametrize("kind", sorted(FLOODS))
def test_control_frame_flood_does_not_starve_others(
    target: tuple[Proc, Sidecar], kind: str
) -> None:
    """20 000 SETTINGS or PINGs whose ACKs the client never reads: memory stays bounded
    and a bystander is served."""
    _, sidecar = target
    with Bounds(sidecar, max_cpu=10.0):
        client, _ = _control_flood(target, FLOODS[kind], 20_000)
        assert httpx.get(f"{sidecar.inbound}/during", timeout=10).status_code == 200
        client.close()


@pytest.mark.parametrize("kind", sorted(FLOODS))
def test_control_frame_flood_gets_goaway(target: tuple[Proc, Sidecar], kind: str) -> None:
    client, _ = _control_flood(target, FLOODS[kind], 20_000)
    goaway = client.goaway(timeout=3)
    client.close()
    assert goaway is not None and goaway.error_code == ENHANCE_YOUR_CALM


def test_hpack_bomb_is_refused(target: tuple[Proc, Sidecar]) -> None:
    """A 4 KB header put in the dynamic table, then referenced 16 000 times by one-byte
    indices (64 MB decoded from 16 KB): refused past max_header_bytes, not decoded."""
    _, sidecar = target
    with Bounds(sidecar, max_cpu=5.0):
        client = RawH2(sidecar.ports["inbound"])
        first = HeadersFrame(1)
        first.data = client.headers_block(1, "/", [("x-big", "v" * 4000)])
        first.flags.add("END_HEADERS")
        first.flags.add("END_STREAM")
        bomb = HeadersFrame(3)
        bomb.data = client.headers_block(3) + bytes([0x80 | 62]) * 16000  # index 62: x-big
        bomb.flags.add("END_HEADERS")
        bomb.flags.add("END_STREAM")
        client.send(first, bomb)
        goaway = client.goaway(timeout=5)
        client.close()
    assert goaway is not None
    assert goaway.error_code in (ENHANCE_YOUR_CALM, COMPRESSION_ERROR, PROTOCOL_ERROR)


def test_streams_over_max_concurrent_are_refused(target: tuple[Proc, Sidecar]) -> None:
    """250 streams opened at once against max_concurrent_streams 100 (after the client
    acknowledged it): the excess is refused (RST REFUSED_STREAM or GOAWAY
    PROTOCOL_ERROR), and no more than 100 calls ever reach the app."""
    app, sidecar = target
    before = app_calls(app)
    with Bounds(sidecar, max_cpu=5.0):
        client = RawH2(sidecar.ports["inbound"])
        client.send(SettingsFrame(0, flags=["ACK"]))
        client.frames(timeout=0.3)  # the server's SETTINGS, now acknowledged
        for stream_id in range(1, 500, 2):
            client.send(client.request(stream_id, "/slow?ms=300"))
        frames = client.frames(timeout=2)
        client.close()
    refused = [
        f for f in frames if isinstance(f, RstStreamFrame) and f.error_code == REFUSED_STREAM
    ]
    goaways = [f.error_code for f in frames if isinstance(f, GoAwayFrame)]
    assert refused or goaways == [PROTOCOL_ERROR], frames[:5]
    assert app_calls(app) - before <= 100 + 1


def test_stream_ids_must_increase_and_the_last_one_works(target: tuple[Proc, Sidecar]) -> None:
    _, sidecar = target
    top = RawH2(sidecar.ports["inbound"])
    top.send(top.request(2**31 - 1, "/top"))
    answered = [f for f in top.frames(timeout=2) if isinstance(f, HeadersFrame)]
    top.close()
    assert answered and answered[0].stream_id == 2**31 - 1
    backwards = RawH2(sidecar.ports["inbound"])
    backwards.send(backwards.request(5), backwards.request(3))
    goaway = backwards.goaway(timeout=3)
    backwards.close()
    assert goaway is not None and goaway.error_code == PROTOCOL_ERROR


def test_undecodable_header_block_gets_compression_error(target: tuple[Proc, Sidecar]) -> None:
    """Three bytes on which jh2's compiled HPACK decoder panics (Python sees a
    BaseException, not an Exception): the connection ends with COMPRESSION_ERROR and the
    sidecar lives on."""
    _, sidecar = target
    with Bounds(sidecar, max_cpu=5.0):
        client = RawH2(sidecar.ports["inbound"])
        head = HeadersFrame(1)
        head.data = b"\xff\xff\xff"
        head.flags.add("END_HEADERS")
        client.send(head)
        goaway = client.goaway(timeout=3)
        client.close()
    assert goaway is not None and goaway.error_code == COMPRESSION_ERROR
