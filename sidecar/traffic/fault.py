"""Fault injection on a route (a rule's `fault`): a fixed delay for a share of calls, an
abort with an HTTP or gRPC status for a share, optionally only for calls that carry a
given request header. The first step of the rule's chain, so a delay is not counted
against the route's own timeout (as Envoy's fault filter sits before its router)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from sidecar.chain import Filter
from sidecar.errors import MeshError, error_response
from sidecar.messages import Response, fixed_body

if TYPE_CHECKING:
    from prometheus_client import Counter

    from sidecar.call import Call, Next
    from sidecar.config.routerules import FaultConfig

Sleep = Callable[[float], Awaitable[None]]

# gRPC status -> the HTTP status an HTTP caller gets for it (the gRPC/HTTP mapping's
# reverse, for an abort configured with a grpc_status only).
_HTTP_FOR_GRPC = {4: 504, 5: 404, 7: 403, 8: 429, 12: 501, 14: 503, 16: 401}
# HTTP status -> gRPC status (grpc's doc/http-grpc-status-mapping.md).
_GRPC_FOR_HTTP = {400: 13, 401: 16, 403: 7, 404: 12, 429: 14, 502: 14, 503: 14, 504: 14}


class FaultInjected(MeshError):
    flag = "FI"  # Envoy's response flag for an injected abort


class FaultFilter(Filter):
    def __init__(
        self,
        config: FaultConfig,
        delays: Counter | None = None,
        aborts: Counter | None = None,
        *,
        rand: Callable[[], float] = random.random,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.name = "fault"
        self.header = config.header.lower().encode()
        self.delay = config.delay
        self.abort = config.abort
        self.delays = delays
        self.aborts = aborts
        self.rand = rand
        self.sleep = sleep
        abort = config.abort
        http_status = grpc_status = 0
        if abort is not None:
            http_status = abort.http_status or _HTTP_FOR_GRPC.get(abort.grpc_status or 2, 500)
            grpc_status = (
                abort.grpc_status
                if abort.grpc_status is not None
                else _GRPC_FOR_HTTP.get(http_status, 2)
            )
        self.http_status = http_status
        self.grpc_status = grpc_status

    async def handle(self, call: Call, next: Next) -> Response:
        if self.header and call.request.header(self.header) is None:
            return await next(call)
        delay = self.delay
        if delay is not None and self.rand() * 100 < delay.percent:
            if self.delays is not None:
                self.delays.inc()
            call._flags = "DI"  # Envoy's flag for an injected delay
            await self.sleep(delay.fixed)
        abort = self.abort
        if abort is not None and self.rand() * 100 < abort.percent:
            if self.aborts is not None:
                self.aborts.inc()
            call._local_reply_by = self.name
            call._flags = FaultInjected.flag
            return self.aborted(call)
        return await next(call)

    def aborted(self, call: Call) -> Response:
        if call.request.is_grpc:
            # Trailers-only: the status in the head, as a gRPC server's own abort is.
            headers = [
                (b"content-type", b"application/grpc"),
                (b"grpc-status", str(self.grpc_status).encode()),
                (b"grpc-message", b"fault injected"),
                (b"x-opus-error", FaultInjected.flag.encode()),
            ]
            return Response(200, headers, fixed_body())
        error = FaultInjected("fault injected", service=call.service, status=self.http_status)
        return error_response(error)
