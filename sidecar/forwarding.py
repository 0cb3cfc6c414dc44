"""The forwarding steps both ways of running a call share: the coroutine path
(proxy.CallHandler.run, proxy.RouterStep) and the callback path (callbacks.CallbackCall).

What the router records on a call once a try got a response head (`routed`), its
answer when the call could not be sent (`not_routed`), what a sink raises when the
caller is gone (`CLIENT_GONE`), and what a callback call needs of its handler
(`Responder`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from sidecar.adapters.h2common import StreamGone
from sidecar.errors import MeshError, error_response

if TYPE_CHECKING:
    from sidecar.call import Call, Next
    from sidecar.cluster import Cluster
    from sidecar.discovery.base import Endpoint
    from sidecar.messages import Request, Response
    from sidecar.serving import ResponseSink

# A caller gone: the sink raises these when it cannot write.
CLIENT_GONE = (ConnectionError, StreamGone)


class Responder(Protocol):
    """What a callback call needs of its handler (proxy.CallHandler)."""

    direction: str
    max_body_bytes: int

    def prepare(self, call: Call, response: Response) -> Response: ...

    def complete(self, call: Call, response: Response | None, sent: int, span: Any) -> None: ...

    async def run(
        self,
        request: Request,
        sink: ResponseSink,
        call: Call,
        chain: Next | None,
        response: Response | None = None,
    ) -> None: ...


def routed(call: Call, cluster: Cluster, endpoint: Endpoint) -> None:
    """The router's bookkeeping for a try that got a response head."""
    call._endpoint = endpoint
    call._cluster = cluster
    call._upstream_protocol = cluster.pool.protocol
    call._tried_endpoints.append(endpoint)
    call._tries += 1


def not_routed(call: Call, exc: MeshError) -> Response:
    """The router's answer when the call could not be sent (or sent again)."""
    call._error = exc
    call._flags = exc.flag
    return error_response(exc, grpc=call.request.is_grpc)
