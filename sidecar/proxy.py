"""The request path, composed in one place.

Outbound (the local app's call into the mesh), in order:
  1. route: which service the call is for (routing.Router) - before anything that
     depends on the service, so an unknown one is answered without touching a pool;
  2. cluster: the service's endpoints, balancer and pool (created on first use);
  3. forward: pick an endpoint and send over pooled HTTP/2, resending only what the
     peer provably never saw;
  4. respond: stream the reply back, then metrics and one access-log line.
Inbound (a peer sidecar's call for the local app): forward to the app's cluster,
then respond, metrics and access log the same way.
"""

from __future__ import annotations

import asyncio
import logging
import time

from sidecar.accesslog import AccessLog, record
from sidecar.cluster import Cluster, ClusterManager
from sidecar.errors import MeshError, UnknownService, UpstreamReset, error_response
from sidecar.listener import ResponseSink
from sidecar.metrics import Metrics
from sidecar.proto.h2common import StreamGone
from sidecar.proto.messages import BodyError, Request, Response
from sidecar.routing import Router

log = logging.getLogger("sidecar.proxy")

_CLIENT_GONE = (ConnectionError, StreamGone)


class CallHandler:
    """One direction's handler: the shared respond/observe half of every call."""

    def __init__(self, direction: str, metrics: Metrics, access_log: AccessLog) -> None:
        self.direction = direction
        self.metrics = metrics
        self.access_log = access_log
        self.loop = asyncio.get_running_loop()

    async def _respond(
        self,
        request: Request,
        sink: ResponseSink,
        service: str,
        target: tuple[Cluster, bytes, bytes] | None,
        error: MeshError | None,
    ) -> None:
        """Forward to `target` (cluster, authority, path), or answer `error`, then observe."""
        flags = "-"
        upstream = "-"
        status = 0
        sent = 0
        response: Response | None = None
        cluster: Cluster | None = None
        endpoint = None
        try:
            if target is not None:
                cluster, authority, path = target
                try:
                    response, endpoint = await cluster.forward(request, authority, path)
                    upstream = endpoint.address
                    if self.direction == "outbound":
                        response.headers.append((b"x-opus-upstream", upstream.encode()))
                        response.headers.append(
                            (b"x-opus-upstream-protocol", cluster.pool.protocol.encode())
                        )
                except MeshError as exc:
                    error = exc
            if response is None:
                assert error is not None
                flags = error.flag
                response = error_response(error, grpc=request.is_grpc)
            status = response.status
            try:
                sent = await sink.send(response)
            except _CLIENT_GONE:
                flags = "DC"  # downstream went away: stop the upstream call
                response.body.cancel()
            except BodyError as exc:
                flags = UpstreamReset.flag
                log.debug("upstream body failed mid-response: %s", exc)
                raise
        except asyncio.CancelledError:
            flags = "DC"
            if response is not None:
                response.body.cancel()
            raise
        finally:
            if cluster is not None and endpoint is not None:
                cluster.release(endpoint)
            self._observe(request, service, status, flags, upstream, sent)

    def _observe(
        self, request: Request, service: str, status: int, flags: str, upstream: str, sent: int
    ) -> None:
        duration = time.monotonic() - request.start
        self.metrics.observe_request(self.direction, service, status, duration)
        if self.access_log.enabled:
            self.access_log.write(
                record(
                    start=time.time() - duration,
                    direction=self.direction,
                    service=service,
                    method=request.method.decode("latin-1"),
                    path=request.path.decode("latin-1"),
                    authority=request.authority.decode("latin-1"),
                    protocol=request.protocol,
                    status=status,
                    duration_s=duration,
                    upstream=upstream,
                    bytes_in=request.body.received,
                    bytes_out=sent,
                    flags=flags,
                )
            )


class OutboundHandler(CallHandler):
    def __init__(
        self,
        router: Router,
        clusters: ClusterManager,
        metrics: Metrics,
        access_log: AccessLog,
    ) -> None:
        super().__init__("outbound", metrics, access_log)
        self.router = router
        self.clusters = clusters

    async def __call__(self, request: Request, sink: ResponseSink) -> None:
        service = "-"
        try:
            service, path = self.router.resolve(request)
            cluster = self.clusters.get(service)
            if cluster is None:
                raise UnknownService(f"unknown service {service!r}", service=service)
        except MeshError as exc:
            await self._respond(request, sink, exc.service or service, None, exc)
            return
        await self._respond(request, sink, service, (cluster, service.encode(), path), None)


class InboundHandler(CallHandler):
    def __init__(self, service: str, app: Cluster, metrics: Metrics, access_log: AccessLog) -> None:
        super().__init__("inbound", metrics, access_log)
        self.service = service
        self.app = app

    async def __call__(self, request: Request, sink: ResponseSink) -> None:
        authority = request.authority or self.service.encode()
        await self._respond(request, sink, self.service, (self.app, authority, request.path), None)
