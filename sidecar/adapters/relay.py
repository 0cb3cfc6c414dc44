"""Plain TCP relaying for the capture listener: two asyncio Protocols, one per socket,
each writing what it reads to the other, with half-close and backpressure passed on."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import cast

__all__ = ["TcpRelay"]


class TcpRelay(asyncio.Protocol):
    """One end of a TCP relay: what its socket reads is written to the other end's."""

    def __init__(
        self, count: Callable[[int], None], live: set[TcpRelay], gone: asyncio.Event
    ) -> None:
        self.count = count
        self.live = live  # the listener's open relay ends, closed at shutdown
        self.gone = gone  # set when the last of them is lost (what drain waits for)
        self.transport: asyncio.Transport | None = None
        self.other: TcpRelay | None = None
        self.read_eof = False
        self.lost = False
        self.on_lost: Callable[[], None] | None = None
        self.early: list[bytes] | None = []  # read before the other end is connected

    @staticmethod
    def pair(a: TcpRelay, b: TcpRelay) -> None:
        a.other, b.other = b, a

    def _other_transport(self) -> asyncio.Transport | None:
        other = self.other
        if other is None or other.transport is None or other.transport.is_closing():
            return None
        return other.transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast("asyncio.Transport", transport)
        self.live.add(self)

    def data_received(self, data: bytes) -> None:
        self.count(len(data))
        if self.early is not None:  # still dialling: hold it, and read no more for now
            self.early.append(data)
            if self.transport is not None:
                self.transport.pause_reading()
            return
        other = self._other_transport()
        if other is not None:
            other.write(data)

    def connected(self) -> None:
        """The other end is there: send what was held, and read again."""
        early, self.early = self.early or [], None
        other = self._other_transport()
        if other is not None:
            other.writelines(early)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def eof_received(self) -> bool:
        self.read_eof = True
        other = self._other_transport()
        if other is not None:
            other.write_eof()  # pass the half-close on; the other direction keeps flowing
            if self.other is not None and self.other.read_eof:
                other.close()  # both directions done; close() flushes what is queued
                if self.transport is not None:
                    self.transport.close()
        return True  # keep our write side open

    # Our socket's send buffer is full: stop reading the socket that fills it.
    def pause_writing(self) -> None:
        other = self._other_transport()
        if other is not None:
            other.pause_reading()

    def resume_writing(self) -> None:
        other = self._other_transport()
        if other is not None:
            other.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.live.discard(self)
        if not self.live:
            self.gone.set()
        if self.on_lost is not None:
            self.on_lost()
        other = self._other_transport()
        if other is not None:
            if exc is None:
                other.close()
            else:
                other.abort()  # a reset stays a reset
