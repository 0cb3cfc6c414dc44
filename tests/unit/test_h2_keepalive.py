"""HTTP/2 PING keepalive on upstream connections: a quiet connection is pinged, an
answered PING keeps it, an unanswered one drops it (a dead peer is replaced)."""

from __future__ import annotations

import asyncio

import h2.config
import h2.connection
import h2.events

from sidecar.upstream.h2client import H2ClientConnection
from tests.unit.memtransport import attach, until


def _peer() -> h2.connection.H2Connection:
    peer = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=False, header_encoding=None)
    )
    peer.initiate_connection()
    return peer


def test_unanswered_ping_drops_the_connection() -> None:
    async def go() -> None:
        changes: list[bool] = []
        client = H2ClientConnection(lambda c: changes.append(c.closed), keepalive=(0.05, 0.05))
        transport = attach(client)
        peer = _peer()
        peer.receive_data(b"".join(transport.chunks))
        transport.chunks.clear()
        # The peer goes silent: the client pings after 50 ms, gives up 50 ms later.
        await until(lambda: client.closed, turns=10**7)
        pings = [
            e
            for e in peer.receive_data(b"".join(transport.chunks))
            if isinstance(e, h2.events.PingReceived)
        ]
        assert len(pings) == 1
        assert client.ping_timeouts == 1
        assert changes and changes[-1] is True  # the pool hears it died

    asyncio.run(asyncio.wait_for(go(), 5))


def test_answered_ping_keeps_the_connection() -> None:
    async def go() -> None:
        client = H2ClientConnection(None, keepalive=(0.05, 0.2))
        transport = attach(client)
        peer = _peer()
        answered = 0
        loop = asyncio.get_running_loop()
        end = loop.time() + 0.5
        while loop.time() < end:
            data = b"".join(transport.chunks)
            transport.chunks.clear()
            for event in peer.receive_data(data):
                if isinstance(event, h2.events.PingReceived):
                    answered += 1
            out = peer.data_to_send()
            if out:
                client.data_received(out)
            await asyncio.sleep(0.01)
        assert answered >= 2  # pinged repeatedly while quiet...
        assert not client.closed and client.ping_timeouts == 0  # ...and kept, since answered
        client.close()

    asyncio.run(asyncio.wait_for(go(), 5))


def test_traffic_defers_the_ping() -> None:
    async def go() -> None:
        client = H2ClientConnection(None, keepalive=(0.2, 0.2))
        transport = attach(client)
        peer = _peer()
        peer.receive_data(b"".join(transport.chunks))
        transport.chunks.clear()
        loop = asyncio.get_running_loop()
        end = loop.time() + 0.5
        while loop.time() < end:
            # Frames keep arriving (a settings ACK stands in for traffic): no PING needed.
            peer.update_settings({})
            client.data_received(peer.data_to_send())
            await asyncio.sleep(0.02)
        sent = peer.receive_data(b"".join(transport.chunks))
        assert not [e for e in sent if isinstance(e, h2.events.PingReceived)]
        client.close()

    asyncio.run(asyncio.wait_for(go(), 5))
