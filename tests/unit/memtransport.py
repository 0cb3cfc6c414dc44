"""An in-memory stand-in for an asyncio socket transport, for the unit tier.

`MemoryTransport` records what its protocol writes and, when joined to a peer by
`connect()`, hands those bytes to the peer's protocol on a later loop turn (via
`loop.call_soon`), the way a socket would: writes made in one callback arrive
in order, after the writer has returned. `close()` reaches both ends, after the
bytes already in flight.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any


class MemoryTransport(asyncio.Transport):
    def __init__(self, peername: tuple[str, int] = ("127.0.0.1", 40000)) -> None:
        super().__init__(extra={"peername": peername, "sockname": ("127.0.0.1", 15001)})
        self.loop = asyncio.get_running_loop()
        self.protocol: asyncio.Protocol | None = None
        self.peer: MemoryTransport | None = None
        self.chunks: list[bytes] = []
        self.closed = False
        self.reading_paused = False
        self.pause_count = 0
        self._inbox: list[bytes] = []
        self._lost = False

    # -- what the protocol under test sees --
    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.closed:
            return  # a closed socket transport drops late writes too
        chunk = bytes(data)
        self.chunks.append(chunk)
        if self.peer is not None:
            self.loop.call_soon(self.peer._deliver, chunk)

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def can_write_eof(self) -> bool:
        return False

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.loop.call_soon(self._connection_lost)
        if self.peer is not None:
            self.loop.call_soon(self.peer.close)

    def abort(self) -> None:
        self.close()

    def pause_reading(self) -> None:
        self.reading_paused = True
        self.pause_count += 1

    def resume_reading(self) -> None:
        self.reading_paused = False
        inbox, self._inbox = self._inbox, []
        for chunk in inbox:
            self._deliver(chunk)

    def is_reading(self) -> bool:
        return not self.reading_paused

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        assert isinstance(protocol, asyncio.Protocol)
        self.protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self.protocol is not None
        return self.protocol

    def get_write_buffer_size(self) -> int:
        return 0

    # -- test side --
    @property
    def data(self) -> bytes:
        """Everything written so far."""
        return b"".join(self.chunks)

    def _deliver(self, chunk: bytes) -> None:
        if self._lost or self.protocol is None:
            return
        if self.reading_paused:
            self._inbox.append(chunk)
            return
        self.protocol.data_received(chunk)

    def _connection_lost(self) -> None:
        if self._lost:
            return
        self._lost = True
        if self.protocol is not None:
            self.protocol.connection_lost(None)


def attach(
    protocol: asyncio.Protocol, peername: tuple[str, int] = ("127.0.0.1", 40000)
) -> MemoryTransport:
    """A transport for one protocol, with nobody on the other end: the test feeds bytes."""
    transport = MemoryTransport(peername)
    transport.set_protocol(protocol)
    protocol.connection_made(transport)
    return transport


def connect(
    client: asyncio.Protocol, server: asyncio.Protocol
) -> tuple[MemoryTransport, MemoryTransport]:
    """Join two protocols back to back; returns (client transport, server transport)."""
    client_side = MemoryTransport(("127.0.0.1", 15001))
    server_side = MemoryTransport(("127.0.0.1", 40000))
    client_side.peer, server_side.peer = server_side, client_side
    client_side.set_protocol(client)
    server_side.set_protocol(server)
    server.connection_made(server_side)
    client.connection_made(client_side)
    return client_side, server_side


async def until(predicate: Callable[[], object], turns: int = 10_000) -> None:
    """Let the loop run until `predicate()` holds; fails (no wall-clock wait) if it never does."""
    for _ in range(turns):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"condition not reached after {turns} loop turns")
