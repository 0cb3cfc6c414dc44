"""The callback path: a call run on callbacks rather than by a task.

For a call whose chain is the router alone (no filters), with no deadline and no tracing,
to a cluster on an HTTP/1.1 pool, whose request arrived whole on HTTP/1.1 (the common
hop of a mesh), the proxy's steps (proxy.CallHandler.run, RouterStep, Cluster.forward)
are taken here as the events they wait for arrive (a pooled connection, the response
head), each step doing what its coroutine does, in the same order, without the task,
the futures and the stack of coroutines a call costs on that path. Only a response whose
body is still arriving is handed to a task (sink.spawn), which streams it as the
coroutine path does.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, cast

from sidecar.call import Call
from sidecar.errors import MeshError
from sidecar.forwarding import CLIENT_GONE, Responder, not_routed, routed
from sidecar.messages import Request, Response
from sidecar.upstream.h1conn import H1ClientConnection
from sidecar.upstream.h1pool import H1Pool, Ticket

if TYPE_CHECKING:
    from sidecar.cluster import Cluster
    from sidecar.discovery.base import Endpoint
    from sidecar.serving import ImmediateSink


class CallbackCall(Call):
    """One call on the callback path; the listener holds it as its running call."""

    __slots__ = (
        "_conn",
        "_handler",
        "_over",
        "_pool",
        "_sink",
        "_started",
        "_target",
        "_task",
        "_ticket",
        "_tried_here",
        "_trying",
    )

    def __init__(
        self,
        handler: Responder,
        sink: ImmediateSink,
        cluster: Cluster,
        request: Request,
        service: str,
        authority: bytes,
        path: bytes,
    ) -> None:
        super().__init__(
            request, handler.direction, service, authority, path, handler.max_body_bytes
        )
        self._handler = handler
        self._sink = sink
        self._target = cluster
        self._pool = cast(H1Pool, cluster.pool)
        self._tried_here: list[Endpoint] = []  # forward()'s own list (call.tried is empty)
        self._trying: Endpoint | None = None  # counted active in the cluster
        self._ticket: Ticket | None = None  # waiting for a connection
        self._conn: H1ClientConnection | None = None  # waiting for the response head
        self._task: asyncio.Task[None] | None = None  # streaming the response body
        self._started = False
        self._over = False

    # -- what the listener sees (RunningCall) --
    def done(self) -> bool:
        return self._over if self._task is None else self._task.done()

    def cancel(self) -> None:
        """The caller went away: as a cancelled task would, give up and observe."""
        if self._over:
            return
        task = self._task
        if task is not None:
            if self._started:
                task.cancel()
            # else: its first step finds the caller gone, as a cancelled send would.
            return
        self._over = True
        try:
            if self._ticket is not None:
                self._pool.abandon(self._ticket)
                self._ticket = None
            if self._conn is not None:
                self._conn.abandon()
                self._conn = None
            self._release()
            self._flags = "DC"
            self._handler.complete(self, None, 0, None)
        except Exception:
            self._sink.crashed()
            return
        self._sink.done()

    # -- the steps --
    def start(self) -> None:
        try:
            self._try()
        except Exception:
            self._crash()

    def _try(self) -> None:
        """One try of Cluster.forward()'s loop: an endpoint, then a connection to it."""
        try:
            endpoint = self._target.begin(self.request, self._tried_here)
        except MeshError as exc:
            self._respond(not_routed(self, exc))
            return
        self._trying = endpoint
        pool = self._pool
        conn = pool.idle_connection(endpoint)
        if conn is not None:
            self._send(conn)
            return
        ticket = pool.acquire(endpoint, self._on_conn)
        if ticket.give is not None:
            self._ticket = ticket

    def _on_conn(self, got: H1ClientConnection | Exception) -> None:
        self._ticket = None
        if self._over:
            if isinstance(got, H1ClientConnection):
                self._pool.release(got, True)
            return
        try:
            if isinstance(got, H1ClientConnection):
                self._send(got)
            elif isinstance(got, MeshError):
                self._tried(got)
            else:
                raise got
        except Exception:
            self._crash()

    def _send(self, conn: H1ClientConnection) -> None:
        self._conn = conn
        self._pool.send(conn, self.request, self.authority, self.path, self._on_head)

    def _on_head(self, got: Response | MeshError) -> None:
        self._conn = None
        if self._over:
            return
        try:
            if isinstance(got, MeshError):
                self._tried(got)
                return
            endpoint = self._trying
            assert endpoint is not None
            self._trying = None
            cluster = self._target
            if cluster.answered(endpoint, got, self.request, self._tried_here, 0):
                self._try()
                return
            routed(self, cluster, endpoint)
        except Exception:
            self._crash()
            return
        self._respond(got)

    def _tried(self, exc: MeshError) -> None:
        """A try failed: send again (Cluster.failed) or answer with the error."""
        endpoint = self._trying
        assert endpoint is not None
        self._trying = None
        if self._target.failed(endpoint, exc, self.request, self._tried_here, 0):
            self._try()
        else:
            self._respond(not_routed(self, exc))

    def _respond(self, response: Response) -> None:
        handler = self._handler
        sent = 0
        try:
            response = handler.prepare(self, response)
            try:
                written = self._sink.send_now(response)
            except CLIENT_GONE:
                self._flags = "DC"  # downstream went away: stop the upstream call
                response.body.cancel()
            else:
                if written is None:
                    self._stream(response)
                    return
                sent = written
        except Exception:
            self._crash(response, sent)
            return
        self._over = True
        try:
            handler.complete(self, response, sent, None)
        except Exception:
            self._sink.crashed()
            return
        self._sink.done()

    def _stream(self, response: Response) -> None:
        async def stream() -> None:
            self._started = True
            await self._handler.run(self.request, self._sink, self, None, response)

        self._task = self._sink.spawn(stream)

    def _release(self) -> None:
        if self._trying is not None:
            self._target.release(self._trying)
            self._trying = None

    def _crash(self, response: Response | None = None, sent: int = 0) -> None:
        """Code on the call's path raised: as when a task's handler raises (called from
        the except block, so the listener logs the traceback)."""
        self._over = True
        try:
            self._release()
            self._handler.complete(self, response, sent, None)
        finally:
            self._sink.crashed()
