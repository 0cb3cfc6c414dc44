"""Outbound routing: which service an app's call is for, and the path it is sent with.

Tried in this order (first match wins):
  1. the RPC form `/v1/invoke/{service}/{method path}` -> `/{method path}` (query kept);
  2. an absolute-form target (`POST http://payment/create`, as HTTP_PROXY clients send);
  3. a Host / :authority naming a known service (`payment`, `payment:80`,
     `payment.default.svc.cluster.local`);
  4. explicit routes from config (path prefix, or gRPC service name).
"""

from __future__ import annotations

from collections.abc import Callable

from sidecar.config import RouteConfig
from sidecar.errors import BadRequest, UnknownService
from sidecar.messages import Request

INVOKE_PREFIX = b"/v1/invoke/"
_K8S_SUFFIXES = (".svc.cluster.local", ".svc")


def host_to_name(authority: bytes) -> str:
    """`Payment.default.svc.cluster.local:80` -> `payment.default.svc.cluster.local`."""
    host = authority.decode("latin-1").strip().lower()
    if host.startswith("["):  # IPv6 literal
        return host.split("]", 1)[0] + "]"
    return host.rsplit(":", 1)[0].rstrip(".") if ":" in host else host.rstrip(".")


class Router:
    def __init__(self, routes: tuple[RouteConfig, ...], known: Callable[[str], bool]) -> None:
        self.known = known
        self.prefix_routes = [
            (i, r.prefix.encode(), r.service) for i, r in enumerate(routes) if r.prefix
        ]
        self.grpc_routes = {
            r.grpc_service: (i, r.service) for i, r in enumerate(routes) if r.grpc_service
        }

    def service_for_host(self, authority: bytes) -> str | None:
        if not authority:
            return None
        name = host_to_name(authority)
        if self.known(name):
            return name
        if "." in name and not name[:1].isdigit():
            first = name.split(".", 1)[0]
            if name.endswith(_K8S_SUFFIXES) or self.known(first):
                return first if self.known(first) else None
        return None

    def resolve(self, request: Request) -> tuple[str, bytes, int]:
        """The target service, the path to send and the index of the configured route that
        matched (-1 for none); raises UnknownService or BadRequest."""
        path = request.path
        if path.startswith(INVOKE_PREFIX):
            return self._invoke(path)
        if request.absolute_form:
            service = self.service_for_host(request.authority)
            if service is None:
                name = host_to_name(request.authority)
                raise UnknownService(
                    f"unknown service {name!r} (from the request URL)", service=name
                )
            return service, path, -1
        service = self.service_for_host(request.authority)
        if service is not None:
            return service, path, -1
        for index, prefix, routed in self.prefix_routes:
            if path.startswith(prefix):
                return routed, path, index
        if self.grpc_routes and path[:1] == b"/":
            grpc_service = path[1:].split(b"/", 1)[0].decode("latin-1")
            routed_grpc = self.grpc_routes.get(grpc_service)
            if routed_grpc is not None:
                return routed_grpc[1], path, routed_grpc[0]
        host = host_to_name(request.authority) if request.authority else ""
        raise UnknownService(
            f"no service matches host {host!r} or path {path.decode('latin-1')!r}", service=host
        )

    def _invoke(self, path: bytes) -> tuple[str, bytes, int]:
        # split_invoke()'s steps inline: this is on every invoke-form call's path.
        rest = path[len(INVOKE_PREFIX) :]
        query = b""
        if b"?" in rest:
            rest, query = rest.split(b"?", 1)
            query = b"?" + query
        service_bytes, _, method = rest.partition(b"/")
        service = service_bytes.decode("latin-1").lower()
        if not service:
            raise BadRequest("invoke path needs a service: /v1/invoke/{service}/{method}")
        if not self.known(service):
            raise UnknownService(f"unknown service {service!r}", service=service)
        return service, b"/" + method + query, -1


def split_invoke(path: bytes) -> tuple[bytes, bytes]:
    """`/v1/invoke/{service}/{method path}?q` -> (service, `/{method path}?q`)."""
    rest = path[len(INVOKE_PREFIX) :]
    query = b""
    if b"?" in rest:
        rest, query = rest.split(b"?", 1)
        query = b"?" + query
    service, _, method = rest.partition(b"/")
    return service, b"/" + method + query


def upstream_path(path: bytes) -> bytes:
    """The path a call is sent with: the method path of an invoke-form path, else itself."""
    return split_invoke(path)[1] if path.startswith(INVOKE_PREFIX) else path
