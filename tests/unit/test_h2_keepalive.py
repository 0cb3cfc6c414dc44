"""HTTP/2 PING keepalive on upstream connections: a quiet connection is pinged, an
answered PING keeps it, an unanswered one drops it (a dead peer is replaced).

The keepalive's clock is a FakeTimers moved by hand: no test waits in real time."""

from __future__ import annotations

import asyncio

import h2.config
import h2.connection
import h2.events

from sidecar.upstream.h2client import H2ClientConnection
from tests.unit.faketime import FakeTimers
from tests.unit.memtransport import MemoryTransport, attach, until


def _peer() -> h2.connection.H2Connection:
    peer = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=False, header_encoding=None)
    )
    peer.initiate_connection()
    return peer


async def step(timers: FakeTimers, seconds: float) -> None:
    """Move the clock on, then let the loop write what the timers queued (flush)."""
    timers.advance(seconds)
    for _ in range(3):
        await asyncio.sleep(0)


def pings(peer: h2.connection.H2Connection, transport: MemoryTransport) -> int:
    data = b"".join(transport.chunks)
    transport.chunks.clear()
    return sum(isinstance(e, h2.events.PingReceived) for e in peer.receive_data(data))


def test_unanswered_ping_drops_the_connection() -> None:
    async def go() -> None:
        changes: list[bool] = []
        timers = FakeTimers()
        client = H2ClientConnection(
            lambda c: changes.append(c.closed), keepalive=(0.05, 0.05), timers=timers
        )
        transport = attach(client)
        peer = _peer()
        await step(timers, 0.0)
        assert pings(peer, transport) == 0
        # The peer goes silent: the client pings after 50 ms, gives up 50 ms later.
        await step(timers, 0.049)
        assert pings(peer, transport) == 0
        await step(timers, 0.001)
        assert pings(peer, transport) == 1
        await step(timers, 0.049)
        assert not client.closed
        await step(timers, 0.001)
        await until(lambda: client.closed)
        assert pings(peer, transport) == 0  # one PING in all
        assert client.ping_timeouts == 1
        assert changes and changes[-1] is True  # the pool hears it died

    asyncio.run(asyncio.wait_for(go(), 5))


def test_answered_ping_keeps_the_connection() -> None:
    async def go() -> None:
        timers = FakeTimers()
        client = H2ClientConnection(None, keepalive=(0.05, 0.2), timers=timers)
        transport = attach(client)
        peer = _peer()
        answered = 0
        end = timers.time() + 0.5
        while timers.time() < end:
            answered += pings(peer, transport)
            out = peer.data_to_send()
            if out:
                client.data_received(out)
            await step(timers, 0.01)
        assert answered >= 2  # pinged repeatedly while quiet...
        assert not client.closed and client.ping_timeouts == 0  # ...and kept, since answered
        client.close()

    asyncio.run(asyncio.wait_for(go(), 5))


def test_traffic_defers_the_ping() -> None:
    async def go() -> None:
        timers = FakeTimers()
        client = H2ClientConnection(None, keepalive=(0.2, 0.2), timers=timers)
        transport = attach(client)
        peer = _peer()
        await step(timers, 0.0)
        pings(peer, transport)
        end = timers.time() + 0.5
        while timers.time() < end:
            # Frames keep arriving (a settings ACK stands in for traffic): no PING needed.
            peer.update_settings({})
            client.data_received(peer.data_to_send())
            await step(timers, 0.02)
        assert pings(peer, transport) == 0
        client.close()

    asyncio.run(asyncio.wait_for(go(), 5))
