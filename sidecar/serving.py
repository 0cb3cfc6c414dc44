"""The types a listener and its connections share, below both.

The protocol adapters (`sidecar.adapters.h1server`, `h2server`) serve calls against a
`ListenerContext`; the listener (`sidecar.listener`) builds one per port and the proxy
implements the handler (and, for HTTP/1.1, its callback path `StartNow`). Everything
here depends only on the message types, so the protocol layer never reaches up into
the listener for them.

The context also decides which new connections to take (`Admission`): none beyond a
listener's `limits.max_connections`, and none once the process's open downstream
connections would eat into the file descriptors kept back (`limits.fd_reserve`) for
what must keep working when callers flood it: pooled upstream connections, the admin
port, the registry heartbeat. A refused connection is counted and logged (rate-limited).
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol

from sidecar.messages import Request, Response

if TYPE_CHECKING:
    from sidecar.clock import Timers
    from sidecar.config import Http2ServerConfig, LimitsConfig

# At most one log line per listener this often about refused connections.
REFUSAL_LOG_INTERVAL = 10.0


class ResponseSink(Protocol):
    async def send(self, response: Response) -> int:
        """Write the response (head, streamed body, trailers); returns body bytes written."""
        ...


class ImmediateSink(ResponseSink, Protocol):
    """The HTTP/1.1 sink as a call run on callbacks sees it (h1server.py)."""

    def send_now(self, response: Response) -> int | None:
        """Write the response if its body is all here; None, writing nothing, if not."""
        ...

    def done(self) -> None: ...

    def crashed(self) -> None: ...

    def spawn(self, work: Callable[[], Awaitable[None]]) -> asyncio.Task[None]: ...


class RunningCall(Protocol):
    """A call in progress on a connection, which a lost connection cancels."""

    def cancel(self) -> object: ...

    def done(self) -> bool: ...


Handler = Callable[[Request, ResponseSink], Awaitable[None]]


class TaskWork:
    """What a handler's callback path returns when it has routed the call but the call
    must run in a task (a chain with filters, an HTTP/2 pool): the listener runs `work`
    in the call's task instead of the handler, so the call is not routed again."""

    __slots__ = ("work",)

    def __init__(self, work: Callable[[], Awaitable[None]]) -> None:
        self.work = work


# A handler's callback path: takes the call (returning it), hands back the rest of it
# for a task (TaskWork), or declines (None) having changed nothing, and then the
# handler's coroutine runs in a task.
StartNow = Callable[[Request, ImmediateSink], RunningCall | TaskWork | None]


class ServerConnection(Protocol):
    def close_if_idle(self) -> None: ...


class Admission:
    """The process-wide half of the connection limits, shared by a sidecar's listeners:
    how many downstream connections the fd limit leaves room for."""

    def __init__(self, fd_budget: int | None = None) -> None:
        self.fd_budget = fd_budget  # None: no fd limit to keep under
        self.contexts: list[ListenerContext] = []

    @classmethod
    def from_rlimit(cls, reserve: int) -> Admission:
        """The budget: RLIMIT_NOFILE's soft limit less the fds open now and `reserve`."""
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            return cls(None)
        try:
            open_now = len(os.listdir("/proc/self/fd"))
        except OSError:
            open_now = 64  # no procfs: a typical start-up figure
        budget = soft - open_now - reserve
        if budget < (soft - open_now) // 2:
            # A reserve that leaves next to nothing would refuse every caller.
            budget = (soft - open_now) // 2
            logging.getLogger("sidecar.listener").warning(
                "RLIMIT_NOFILE %d with %d fds open leaves too little for limits.fd_reserve=%d:"
                " downstream connections are capped at %d",
                soft,
                open_now,
                reserve,
                budget,
            )
        return cls(max(budget, 1))

    def full(self) -> bool:
        budget = self.fd_budget
        return budget is not None and sum(len(c.connections) for c in self.contexts) >= budget


class ListenerContext:
    """What every connection of one listener shares.

    `start_now` is the handler's callback path for HTTP/1.1 calls whose body is whole
    when their head is parsed; without one, every call runs `handler` in a task.
    """

    def __init__(
        self,
        name: str,
        handler: Handler,
        http2: Http2ServerConfig,
        limits: LimitsConfig,
        admission: Admission | None = None,
        start_now: StartNow | None = None,
        timers: Timers | None = None,
    ) -> None:
        self.name = name
        self.timers = timers  # the connections' clock and timers; None: their loop's
        self.reconfigure(handler, start_now, http2, limits)
        self.admission = admission if admission is not None else Admission()
        self.admission.contexts.append(self)
        self.log = logging.getLogger(f"sidecar.listener.{name}")
        self.connections: set[ServerConnection] = set()
        self.draining = False
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.on_accept: Callable[[], None] | None = None  # counts accepted connections
        self.on_refuse: Callable[[str], None] | None = None  # counts refusals, by reason
        self.on_timeout: Callable[[str], None] | None = None  # counts closes, by timeout
        self._refused = 0  # since the last log line about it
        self._refusal_logged = -REFUSAL_LOG_INTERVAL

    def reconfigure(
        self,
        handler: Handler,
        start_now: StartNow | None,
        http2: Http2ServerConfig,
        limits: LimitsConfig,
    ) -> None:
        """What new calls (handler) and new connections (limits) take; a reload swaps
        them in one step, so the event loop sees the old set or the new one. Calls and
        connections already running keep what they started with."""
        self.handler = handler
        self.start_now = start_now
        self.http2 = http2
        self.limits = limits
        # A connection's one timer never sleeps longer than the shortest timeout, so a
        # deadline set after it was armed is still met without re-arming it.
        self.timer_tick = min(
            limits.preface_timeout,
            limits.header_read_timeout,
            limits.body_read_timeout,
            limits.idle_timeout,
        )

    def refusal(self) -> str | None:
        """Why a new connection cannot be taken now, or None."""
        if len(self.connections) >= self.limits.max_connections:
            return "max_connections"
        if self.admission.full():
            return "fd_reserve"
        return None

    def refused(self, reason: str, now: float) -> None:
        if self.on_refuse is not None:
            self.on_refuse(reason)
        self._refused += 1
        if now - self._refusal_logged >= REFUSAL_LOG_INTERVAL:
            self.log.warning(
                "refused %d new connection(s) at limits.%s (%d open on %s, fd budget %s)",
                self._refused,
                reason,
                len(self.connections),
                self.name,
                self.admission.fd_budget,
            )
            self._refused = 0
            self._refusal_logged = now

    def timed_out(self, timeout: str, peer: str) -> None:
        """A connection is closed by one of its timeouts (limits.<timeout>_timeout)."""
        if self.on_timeout is not None:
            self.on_timeout(timeout)
        self.log.debug("closing connection from %s: %s_timeout", peer, timeout)
