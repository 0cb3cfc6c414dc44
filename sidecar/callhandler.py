"""What every call handler does, whichever way the call goes: build and keep the filter
chains, decide once per chain whether a call may run on callbacks (callbacks.py), strip
what only the mesh sets from a reply, and observe the call (metrics, access log, trace).
The router step, the innermost of every chain, sends the call through the cluster.
OutboundHandler (proxy.py) and InboundHandler (inbound.py) build on it."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from sidecar.accesslog import AccessLog, record
from sidecar.call import BufferBudget, Call, Next, set_response_header
from sidecar.chain import Filter, FilterContext, FilterFailed, build_filters, compose
from sidecar.cluster import Cluster
from sidecar.config import FilterSpec, SidecarConfig
from sidecar.deadline import DEADLINE_HEADER, caller_deadline
from sidecar.discovery.base import Endpoint
from sidecar.errors import (
    MeshError,
    UpstreamReset,
    UpstreamTimeout,
    error_response,
)
from sidecar.forwarding import CLIENT_GONE, not_routed, routed
from sidecar.messages import (
    FIELD_NAME,
    BodyError,
    Request,
    Response,
    unsafe_header,
)
from sidecar.metrics import Metrics
from sidecar.serving import ResponseSink
from sidecar.tls.inbound import InboundTls
from sidecar.tracing import Tracing, grpc_status_of, incoming_trace_id
from sidecar.upstream.h1pool import H1Pool

log = logging.getLogger("sidecar.proxy")

# Response headers only the mesh sets (filters included); stripped from apps' replies.
MESH_RESPONSE_HEADERS = frozenset(
    {
        b"x-opus-error",
        b"x-opus-upstream",
        b"x-opus-upstream-protocol",
        b"x-opus-attempt-count",
        b"x-opus-overloaded",
        b"x-opus-circuit",
    }
)


class RouterStep:
    """The innermost step of every chain: send the call to one of the cluster's endpoints."""

    __slots__ = ("cluster",)

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster

    async def __call__(self, call: Call) -> Response:
        cluster = self.cluster
        if call.deadline is not None:
            # The next hop should not wait longer than the caller will.
            remaining_ms = max(int((call.deadline - time.monotonic()) * 1000), 0)
            call.set_header(DEADLINE_HEADER, str(remaining_ms).encode())
            if call.header(b"grpc-timeout") is not None:
                call.set_header(b"grpc-timeout", b"%dm" % remaining_ms)
        try:
            response, endpoint = await cluster.forward(
                call.request, call.authority, call.path, call._tried_endpoints
            )
        except MeshError as exc:
            return not_routed(call, exc)
        routed(call, cluster, endpoint)
        return response


def router_step(cluster: Cluster) -> Next:
    return RouterStep(cluster)


_UPSTREAM_HEADERS = frozenset({b"x-opus-upstream", b"x-opus-upstream-protocol"})
_PROTOCOLS = {"http1": b"http1", "h2c": b"h2c"}


async def _until(deadline: float, chain: Next, call: Call) -> Response:
    """Run the chain until the response head arrives or the deadline passes (504 /
    DEADLINE_EXCEEDED; the cancelled inner call resets its upstream stream)."""
    try:
        async with asyncio.timeout(max(deadline - time.monotonic(), 0.0)):
            return await chain(call)
    except TimeoutError:
        error = UpstreamTimeout("the caller's deadline passed", service=call.service)
        call._error = error
        call._flags = error.flag
        return error_response(error, grpc=call.request.is_grpc)


class CallHandler:
    """One direction's handler: run the chain, respond, observe."""

    def __init__(
        self,
        direction: str,
        cfg: SidecarConfig,
        metrics: Metrics,
        access_log: AccessLog,
        tracing: Tracing,
    ):
        self.direction = direction
        self.tracing = tracing
        self.cfg = cfg
        self.metrics = metrics
        self.access_log = access_log
        self._logging = access_log.enabled  # a closed log drops records anyway
        self.max_body_bytes = cfg.filters.max_body_bytes
        self.budget: BufferBudget | None = None  # the sidecar's, shared by both directions
        self.filters: list[Filter] = []  # every filter built, to close them at shutdown
        self._last_endpoint: Endpoint | None = None  # and its address, for x-opus-upstream
        self._last_address = b""
        # mTLS inbound: callers' verified identities, for the access log's peer_identity.
        self.tls: InboundTls | None = None

    def build_chain(self, specs: tuple[FilterSpec, ...], cluster: Cluster, key: str) -> Next:
        ctx = FilterContext(self.direction, self.cfg.service.name, self.metrics.filters)
        filters = build_filters(specs, ctx, key)
        self.filters += filters
        return compose(filters, router_step(cluster), self.metrics)

    def _callbacks_for(self, chain: Next) -> Cluster | None:
        """The cluster a call on `chain` may run on callbacks with, or None."""
        if self.tracing.enabled or type(chain) is not RouterStep:
            return None
        cluster = chain.cluster
        return cluster if type(cluster.pool) is H1Pool else None

    async def run(
        self,
        request: Request,
        sink: ResponseSink,
        call: Call,
        chain: Next | None,
        response: Response | None = None,
    ) -> None:
        """Run the chain, respond, observe; or, given the `response` a callback call
        already prepared, just stream it and observe."""
        sent = 0
        span = self.tracing.start(call) if chain is not None and self.tracing.enabled else None
        call._budget = self.budget
        try:
            if chain is not None:
                deadline = caller_deadline(request)
                if deadline is None:
                    response = await chain(call)
                else:
                    call.deadline = deadline
                    response = await _until(deadline, chain, call)
                response = self.prepare(call, response)
            assert response is not None
            try:
                sent = await sink.send(response)
            except CLIENT_GONE:
                call._flags = "DC"  # downstream went away: stop the upstream call
                response.body.cancel()
            except BodyError as exc:
                call._flags = UpstreamReset.flag
                log.debug("upstream body failed mid-response: %s", exc)
                if call._cluster is not None and call._endpoint is not None:
                    # forward() saw a good head; the failure came later: outlier detection.
                    call._cluster.report(call._endpoint, UpstreamReset(str(exc)))
                raise
        except asyncio.CancelledError:
            call._flags = "DC"
            if response is not None:
                response.body.cancel()
            raise
        finally:
            self.complete(call, response, sent, span)

    def prepare(self, call: Call, response: Response) -> Response:
        """What happens to the chain's response before it is sent."""
        if call._local_reply_by or (call._error is not None and call._endpoint is None):
            who = call._local_reply_by or "router"
            self.metrics.local_replies.labels(who, str(response.status)).inc()
        if self.filters and (bad := unsafe_header(response.headers)) is not None:
            # Parsers reject such bytes on the way in; only a filter can put them here.
            log.error("refusing a reply whose header %r holds CR, LF or NUL", bad)
            response.body.cancel()
            error = FilterFailed(f"a filter set an invalid header {bad.decode('latin-1')!r}")
            call._error, call._flags = error, error.flag
            response = error_response(error, grpc=call.request.is_grpc)
        endpoint = call._endpoint
        if endpoint is not None:
            if self.direction == "outbound":
                # Ours to say: replace anything upstream sent under these names.
                if endpoint is not self._last_endpoint:
                    self._last_endpoint = endpoint
                    self._last_address = endpoint.address.encode()
                address = self._last_address
                protocol = _PROTOCOLS.get(call._upstream_protocol)
                if protocol is None:
                    protocol = call._upstream_protocol.encode()
                headers = response.headers
                if _UPSTREAM_HEADERS.isdisjoint(map(FIELD_NAME, headers)):
                    # The usual case (found at C speed): append, as set_response_header would.
                    headers.append((b"x-opus-upstream", address))
                    headers.append((b"x-opus-upstream-protocol", protocol))
                else:
                    set_response_header(response, b"x-opus-upstream", address)
                    set_response_header(response, b"x-opus-upstream-protocol", protocol)
            elif not call._local_reply_by:
                # The app's own reply may not speak for the mesh: a forged x-opus-error
                # would make callers resend calls the app already served.
                headers = response.headers
                if not MESH_RESPONSE_HEADERS.isdisjoint(map(FIELD_NAME, headers)):
                    headers[:] = [(n, v) for n, v in headers if n not in MESH_RESPONSE_HEADERS]
        return response

    def complete(self, call: Call, response: Response | None, sent: int, span: Any) -> None:
        """The call is over (answered, or abandoned): trace, metrics, access log."""
        if call._buffered:
            call.release()
        request = call.request
        grpc_status = grpc_status_of(response) if response is not None else ""
        trace_id = "-"
        if span is not None:
            trace_id = format(span.get_span_context().trace_id, "032x")
            self.tracing.finish(span, call, response, grpc_status)
        elif self._logging and request.headers:
            trace_id = incoming_trace_id(request)
        status = response.status if response is not None else 0
        self._observe(request, call, status, sent, grpc_status, trace_id)

    async def _reply_error(self, request: Request, sink: ResponseSink, error: MeshError) -> None:
        """Answer a call the mesh could not route (no chain ran)."""
        response = error_response(error, grpc=request.is_grpc)
        call = Call(request, self.direction, error.service or "-", b"", request.path, 0)
        call._error = error
        call._flags = error.flag
        sent = 0
        try:
            sent = await sink.send(response)
        except CLIENT_GONE:
            call._flags = "DC"
        finally:
            grpc_status = grpc_status_of(response)
            self._observe(
                request, call, response.status, sent, grpc_status, incoming_trace_id(request)
            )

    def _observe(
        self,
        request: Request,
        call: Call,
        status: int,
        sent: int,
        grpc_status: str,
        trace_id: str,
    ) -> None:
        duration = time.monotonic() - request.start
        grpc_method = ""
        if grpc_status and request.path[:1] == b"/":
            grpc_method = call.path[1:].split(b"?", 1)[0].decode("latin-1")
        self.metrics.observe_request(
            self.direction,
            call.service,
            status,
            duration,
            grpc_method,
            grpc_status,
            request.body.received,
            sent,
        )
        if self._logging:
            flags = call._flags
            if call._local_reply_by and flags == "-":
                flags = "LR"
            entry = record(
                start=time.time() - duration,
                direction=self.direction,
                service=call.service,
                method=request.method.decode("latin-1"),
                path=request.path.decode("latin-1"),
                authority=request.authority.decode("latin-1"),
                protocol=request.protocol,
                status=status,
                duration_s=duration,
                upstream=call._endpoint.address if call._endpoint is not None else "-",
                bytes_in=request.body.received,
                bytes_out=sent,
                flags=flags if not call._local_reply_by else f"{flags}:{call._local_reply_by}",
                trace_id=trace_id,
                route=call._route,
                grpc_status=grpc_status,
                tries=call._tries,
            )
            if self.tls is not None:
                entry["peer_identity"] = self.tls.identity(request.peer) or "-"
            self.access_log.write(entry)

    def close(self) -> None:
        for flt in self.filters:
            try:
                flt.close()
            except Exception:
                log.exception("closing filter %r", flt.name)
