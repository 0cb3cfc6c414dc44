"""A keep-alive pool of HTTP/1.1 connections to the local app (h1conn.py), one call at a
time each.

The pool hands a connection released to the oldest call waiting for one to the same
endpoint, and a freed slot to the oldest call waiting at all, rather than waking every
waiter to look again; one timer covers every waiter's `pending_timeout`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable, Coroutine
from functools import partial
from typing import Any, overload

from sidecar.discovery.base import Endpoint
from sidecar.errors import PoolExhausted, UpstreamConnectError
from sidecar.messages import Request, Response
from sidecar.metrics import Metrics
from sidecar.upstream.h1conn import H1ClientConnection, HeadCallback
from sidecar.upstream.pool import PoolLimits, PoolMetrics

# What a call waiting for a connection is told: one to use, or why there is none.
ConnCallback = Callable[[H1ClientConnection | Exception], None]


class Ticket:
    """A call waiting for a connection to `endpoint` until `deadline` (loop time)."""

    __slots__ = ("deadline", "endpoint", "give", "key", "opening")

    def __init__(self, endpoint: Endpoint, deadline: float, give: ConnCallback) -> None:
        self.endpoint = endpoint
        self.key = (endpoint.host, endpoint.port)
        self.deadline = deadline
        self.give: ConnCallback | None = give  # None once the caller gave up
        self.opening: asyncio.Task[tuple[Any, H1ClientConnection]] | None = None


# How a pool opens a connection: loop.create_connection's shape (injected in tests).
Connect = Callable[
    [Callable[[], H1ClientConnection], str, int],
    Coroutine[Any, Any, tuple[asyncio.BaseTransport, H1ClientConnection]],
]


class H1Pool:
    """Keep-alive HTTP/1.1 connections, one call at a time each (to the local app).

    A call takes two steps: a connection (`idle_connection()`, else `acquire()`, whose
    `give` gets one or the error; `abandon()` if the caller goes first), then `send()`,
    whose `on_head` gets the response head or the error. The proxy's callback path
    (callbacks.py) takes them itself; `request()` (the Pool protocol's call) is the same
    two steps, with futures for the callbacks. A connection handed to a caller that has
    gone goes back with `release()`.

    Its connections tell it what happens to them through the `ConnectionOwner` protocol
    (h1conn.py): `release`, `park`, `hand_on`, `lost`, `slot_freed`.
    """

    protocol = "http1"

    def __init__(
        self,
        service: str,
        limits: PoolLimits,
        metrics: Metrics,
        connect: Connect | None = None,
        max_header_bytes: int = 65536,
    ) -> None:
        self.service = service
        self.limits = limits
        # A response head, and its trailers apart, may hold this much (limits.max_header_bytes).
        self.max_header_bytes = max_header_bytes
        self.loop = asyncio.get_running_loop()
        self._connect: Connect = connect or self.loop.create_connection
        self._idle: dict[tuple[str, int], list[H1ClientConnection]] = {}
        self._all: set[H1ClientConnection] = set()
        self._connecting = 0
        self._waiters: deque[Ticket] = deque()
        self._expiry: asyncio.TimerHandle | None = None
        self._expiry_at = 0.0
        self._sweeper: asyncio.TimerHandle | None = None
        self._metrics = PoolMetrics(metrics, service, self.protocol)

    async def request(
        self, endpoint: Endpoint, request: Request, authority: bytes, path: bytes
    ) -> Response:
        """Both steps, awaited: returns once the response head has arrived."""
        conn = self.idle_connection(endpoint)
        if conn is None:
            conn = await self._acquired(endpoint)
        head = self.send(conn, request, authority, path)
        try:
            return await head
        except asyncio.CancelledError:
            conn.abandon()
            raise

    async def _acquired(self, endpoint: Endpoint) -> H1ClientConnection:
        """acquire(), awaited."""
        waiter: asyncio.Future[H1ClientConnection] = self.loop.create_future()
        ticket = self.acquire(endpoint, partial(self._settle, waiter))
        try:
            return await waiter
        except asyncio.CancelledError:
            self.abandon(ticket)
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self.release(waiter.result(), True)  # handed over as the caller went away
            raise

    def _settle(
        self, waiter: asyncio.Future[H1ClientConnection], got: H1ClientConnection | Exception
    ) -> None:
        if waiter.done():
            if isinstance(got, H1ClientConnection):
                self.release(got, True)  # its caller was cancelled meanwhile
        elif isinstance(got, H1ClientConnection):
            waiter.set_result(got)
        else:
            waiter.set_exception(got)

    # -- the two steps --
    def idle_connection(self, endpoint: Endpoint) -> H1ClientConnection | None:
        """An idle connection to `endpoint`, unless calls are waiting for one."""
        key = (endpoint.host, endpoint.port)
        idle = self._idle.get(key)
        if idle and not (self._waiters and self._queued(key)):
            while idle:
                conn = idle.pop()  # most recently used: least likely closed by the app
                if not conn.closed:
                    return conn
        return None

    def _queued(self, key: tuple[str, int]) -> bool:
        return any(ticket.key == key for ticket in self._waiters)

    def acquire(self, endpoint: Endpoint, give: ConnCallback) -> Ticket:
        """For a call that found no idle connection: open one if the pool has room, else
        wait for one (at most `pending_timeout`); `give` gets it, or the error."""
        ticket = Ticket(endpoint, self.loop.time() + self.limits.pending_timeout, give)
        if self._waiters and self._queued(ticket.key):
            self._wait(ticket)  # behind the calls already waiting
        else:
            self._serve(ticket)
        return ticket

    def abandon(self, ticket: Ticket) -> None:
        """The caller stopped waiting: leave the queue, stop the connect made for it."""
        ticket.give = None
        if ticket.opening is not None:
            ticket.opening.cancel()
        with contextlib.suppress(ValueError):
            self._waiters.remove(ticket)

    @overload
    def send(
        self, conn: H1ClientConnection, request: Request, authority: bytes, path: bytes
    ) -> asyncio.Future[Response]: ...

    @overload
    def send(
        self,
        conn: H1ClientConnection,
        request: Request,
        authority: bytes,
        path: bytes,
        on_head: HeadCallback,
    ) -> None: ...

    def send(
        self,
        conn: H1ClientConnection,
        request: Request,
        authority: bytes,
        path: bytes,
        on_head: HeadCallback | None = None,
    ) -> asyncio.Future[Response] | None:
        """Send the call on `conn`: `on_head`, or the future returned without it, gets the
        response head or the error (a write refused without `on_head` raises)."""
        self._metrics.stream()
        return conn.send(request, authority, path, on_head)

    # -- handing out connections --
    def _serve(self, ticket: Ticket) -> None:
        """Look (again) for a connection for a waiting call."""
        give = ticket.give
        if give is None:
            return
        idle = self._idle.get(ticket.key)
        while idle:
            conn = idle.pop()
            if not conn.closed:
                ticket.give = None
                give(conn)
                return
        limits = self.limits
        if len(self._all) + self._connecting < limits.max_connections:
            self._open(ticket)
            return
        if self.loop.time() >= ticket.deadline:
            ticket.give = None
            give(
                PoolExhausted(
                    f"all {limits.max_connections} connections to {ticket.endpoint.address} "
                    f"busy for {limits.pending_timeout}s",
                    service=self.service,
                )
            )
            return
        self._wait(ticket)

    def _wait(self, ticket: Ticket) -> None:
        self._waiters.append(ticket)
        self._arm(ticket.deadline)

    def _arm(self, deadline: float) -> None:
        """The expiry timer fires by `deadline` (one timer for every waiting call)."""
        if self._expiry is not None:
            if self._expiry_at <= deadline:
                return
            self._expiry.cancel()
        self._expiry_at = deadline
        self._expiry = self.loop.call_at(deadline, self._expire)

    def _expire(self) -> None:
        """Calls whose wait ran out look once more, then fail (PoolExhausted)."""
        self._expiry = None
        now = self.loop.time()
        waiters = self._waiters
        expired = [t for t in waiters if t.deadline <= now]
        for ticket in expired:
            waiters.remove(ticket)
        for ticket in expired:
            self._serve(ticket)
        if waiters:
            self._arm(min(t.deadline for t in waiters))

    def _open(self, ticket: Ticket) -> None:
        self._connecting += 1
        endpoint = ticket.endpoint
        key = ticket.key
        connect = self._connect(lambda: H1ClientConnection(self, key), endpoint.host, endpoint.port)
        task = self.loop.create_task(asyncio.wait_for(connect, self.limits.connect_timeout))
        ticket.opening = task
        task.add_done_callback(partial(self._opened, ticket))

    def _opened(self, ticket: Ticket, task: asyncio.Task[tuple[Any, H1ClientConnection]]) -> None:
        self._connecting -= 1
        ticket.opening = None
        give = ticket.give
        ticket.give = None
        if task.cancelled():
            self.slot_freed()
            return
        exc = task.exception()
        if exc is not None:
            if give is not None:
                if isinstance(exc, (OSError, TimeoutError)):
                    exc = UpstreamConnectError(
                        f"cannot connect to {ticket.endpoint.address}: {exc or 'timed out'}",
                        service=self.service,
                    )
                # Its caller first (a resend may take the slot), as when it connected itself.
                give(exc if isinstance(exc, Exception) else RuntimeError(str(exc)))
            self.slot_freed()
            return
        conn = task.result()[1]
        self._all.add(conn)
        self._metrics.opened()
        if give is not None:
            give(conn)
        else:
            self.release(conn, True)  # opened for a call that went away

    # -- what its connections tell it (ConnectionOwner) --
    def release(self, conn: H1ClientConnection, keep: bool) -> None:
        """A call is through with `conn`: take it back, then hand it on."""
        self.park(conn, keep)
        self.hand_on(conn)

    def park(self, conn: H1ClientConnection, keep: bool) -> None:
        """Take a connection back: idle, or closed if it cannot serve another call."""
        if conn not in self._all:
            return
        if not keep or conn.closed:
            conn.close()  # the slot frees when the connection is lost
            return
        conn.last_active = self.loop.time()
        idle = self._idle.get(conn.key)
        if idle is None:
            idle = self._idle[conn.key] = []
        idle.append(conn)
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(self.limits.idle_timeout, self._sweep)

    def hand_on(self, conn: H1ClientConnection) -> None:
        """A connection just parked goes to the oldest call waiting for its endpoint."""
        waiters = self._waiters
        if not waiters:
            return
        key = conn.key
        idle = self._idle.get(key)
        if not idle or idle[-1] is not conn or conn.closed:
            return  # taken or closed meanwhile
        for i, ticket in enumerate(waiters):
            # Every ticket queued has a caller (abandon() and _serve() take theirs out).
            if ticket.key == key and ticket.give is not None:
                del waiters[i]
                idle.pop()
                give = ticket.give
                ticket.give = None
                give(conn)
                return

    def lost(self, conn: H1ClientConnection) -> bool:
        """Forget a lost connection; False if the pool no longer knew it."""
        if conn not in self._all:
            return False
        self._all.discard(conn)
        idle = self._idle.get(conn.key)
        if idle is not None and conn in idle:
            idle.remove(conn)
        self._metrics.closed(conn.uses)
        return True

    def slot_freed(self) -> None:
        """Room for one more connection: the oldest waiting call opens it."""
        waiters = self._waiters
        if waiters and len(self._all) + self._connecting < self.limits.max_connections:
            self._serve(waiters.popleft())

    def _sweep(self) -> None:
        self._sweeper = None
        cutoff = self.loop.time() - self.limits.idle_timeout
        pending = False
        for conns in self._idle.values():
            for conn in list(conns):
                if conn.last_active <= cutoff:
                    conn.close()
                else:
                    pending = True
        if pending:
            self._sweeper = self.loop.call_later(self.limits.idle_timeout / 2, self._sweep)

    def connection_count(self) -> int:
        return len(self._all)

    def snapshot(self, endpoint: Endpoint) -> dict[str, Any]:
        key = (endpoint.host, endpoint.port)
        idle = len(self._idle.get(key, ()))
        total = sum(1 for c in self._all if c.key == key)
        return {"protocol": self.protocol, "connections": total, "idle": idle}

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conn in list(self._all):
            conn.close()
