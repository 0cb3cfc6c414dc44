"""The filter chain: the typed API filters are written against, the registry that finds
them by name, and the composition that runs them around the router.

A filter wraps the rest of the chain (the onion model of tower and linkerd's stacks):
`handle(call, next)` may change the request, answer locally without calling `next`
(its reply then passes back through the filters already passed), call `next` once,
or call it again (retries); responses come back through the filters in reverse order.
Simple filters override `on_request` / `on_response` and leave `handle` alone.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from sidecar.errors import MeshError, error_response
from sidecar.proto.messages import Body, Headers, Request, Response, fixed_body
from sidecar.typedconfig import ConfigError, build_dataclass

if TYPE_CHECKING:
    from sidecar.cluster import Cluster
    from sidecar.config import FilterSpec, SidecarConfig
    from sidecar.discovery.base import Endpoint
    from sidecar.metrics import Metrics

log = logging.getLogger("sidecar.filters")

ENTRY_POINT_GROUP = "opus.filters"

# Built-in filters by name, as "module:factory" (nothing registers itself on import).
BUILTIN_FILTERS: dict[str, str] = {
    "hmac_sign": "filters.hmac_sign:factory",
    "hmac_verify": "filters.hmac_verify:factory",
    "retry": "filters.retry:factory",
    "timeout": "filters.timeout:factory",
    "rate_limit": "filters.rate_limit:factory",
    "circuit_breaker": "filters.circuit_breaker:factory",
    "headers": "filters.headers:factory",
    "wasm": "filters.wasm:factory",
}


class BodyTooLarge(MeshError):
    status = 413
    flag = "BL"  # body over the buffering limit


class BufferBudgetExhausted(MeshError):
    status = 503
    flag = "BB"  # the sidecar-wide budget for buffered request bodies is in use


class BufferBudget:
    """The request body bytes every call together may hold buffered in this process
    (filters.max_buffered_request_bytes): a call takes as it buffers and gives all of it
    back when it ends, however it ends (CallHandler.complete)."""

    __slots__ = ("capacity", "refusals", "used")

    def __init__(self, capacity: int, refusals: Callable[[], None] | None = None) -> None:
        self.capacity = capacity
        self.used = 0
        self.refusals = refusals  # counts each refusal (a metric)

    def take(self, size: int) -> bool:
        if self.used + size > self.capacity:
            if self.refusals is not None:
                self.refusals()
            return False
        self.used += size
        return True

    def give(self, size: int) -> None:
        self.used -= size


class FilterFailed(MeshError):
    status = 500
    flag = "FE"  # a filter raised


class Call:
    """One call as the filters see it: the request, where it is going, and what happened."""

    __slots__ = (
        "attrs",
        "authority",
        "budget",
        "buffered",
        "cluster",
        "deadline",
        "direction",
        "endpoint",
        "error",
        "flags",
        "local_reply_by",
        "max_body_bytes",
        "path",
        "request",
        "retryable",
        "route",
        "service",
        "tried",
        "tries",
        "upstream_protocol",
    )

    def __init__(
        self,
        request: Request,
        direction: str,
        service: str,
        authority: bytes,
        path: bytes,
        max_body_bytes: int,
    ) -> None:
        self.request = request
        self.direction = direction
        self.service = service
        self.authority = authority  # what the upstream will see as Host / :authority
        self.path = path  # the path (and query) the upstream will see
        self.max_body_bytes = max_body_bytes
        self.budget: BufferBudget | None = None  # the handler's, shared by every call
        self.buffered = 0  # request body bytes this call holds of the budget
        self.attrs: dict[str, Any] = {}  # scratch space filters share on one call
        self.deadline: float | None = None  # time.monotonic() by which the call must end
        self.endpoint: Endpoint | None = None  # the endpoint of the last try
        self.cluster: Cluster | None = None  # the cluster it belongs to
        self.tried: list[Endpoint] = []  # endpoints tried so far (a retry prefers others)
        self.tries = 0
        self.upstream_protocol = ""  # h2c or http1, once sent
        self.retryable = False  # a filter (or the caller) marked a non-idempotent call safe
        self.error: MeshError | None = None  # the mesh's own failure, when there was one
        self.flags = "-"
        self.local_reply_by = ""
        self.route = "-"  # how the call was routed (invoke, host, proxy, a route's match)

    @property
    def headers(self) -> Headers:
        return self.request.headers

    def header(self, name: bytes) -> bytes | None:
        return self.request.header(name)

    def set_header(self, name: bytes, value: bytes) -> None:
        _set(self.request.headers, name, value)

    def remove_header(self, name: bytes) -> None:
        self.request.headers[:] = [(n, v) for n, v in self.request.headers if n != name]

    async def read_body(self, limit: int | None = None) -> bytes:
        """Buffer the whole request body (then it can be read again and resent).

        Over `limit` (default: filters.max_body_bytes) the call is answered 413.
        """
        cap = self.max_body_bytes if limit is None else limit
        body = self.request.body
        whole = body.buffered_whole
        if whole is not None and len(whole) <= cap:
            return whole
        data = await read_whole(body, cap, "request", self)
        self.request.body = fixed_body(data)
        return data

    def hold(self, size: int) -> None:
        """Count `size` more buffered request bytes against the budget, or refuse (503)."""
        budget = self.budget
        if budget is None:
            return
        if not budget.take(size):
            self.request.body.cancel()
            raise BufferBudgetExhausted(
                f"request body refused: the sidecar's buffer budget "
                f"(filters.max_buffered_request_bytes = {budget.capacity}) is in use",
                service=self.service,
            )
        self.buffered += size

    def release(self) -> None:
        """The call is over: give its buffered bytes back to the budget."""
        if self.buffered and self.budget is not None:
            self.budget.give(self.buffered)
        self.buffered = 0

    def set_body(self, data: bytes) -> None:
        self.request.body = fixed_body(data)
        _set(self.request.headers, b"content-length", str(len(data)).encode())

    def reply(self, status: int, body: bytes = b"", headers: Headers | None = None) -> Response:
        """A local reply; returning it from a filter answers the call without the upstream."""
        out: Headers = list(headers or ())
        if body and not any(n == b"content-length" for n, _ in out):
            out.append((b"content-length", str(len(body)).encode()))
        return Response(status, out, fixed_body(body))


async def read_whole(body: Body, limit: int, what: str, holder: Call | None = None) -> bytes:
    """The whole body; a request's bytes are held against the budget via `holder`."""
    parts: list[bytes] = []
    size = 0
    while True:
        chunk = await body.read()
        if not chunk:
            return b"".join(parts)
        size += len(chunk)
        if size > limit:
            body.cancel()
            raise BodyTooLarge(f"{what} body over the {limit}-byte buffering limit", status=413)
        if holder is not None:
            holder.hold(len(chunk))
        parts.append(chunk)


async def read_response_body(response: Response, limit: int) -> bytes:
    """Buffer a response body whole (for filters that need it), keeping it readable."""
    data = await read_whole(response.body, limit, "response")
    response.body = fixed_body(data, response.body.trailers)
    return data


def _set(headers: Headers, name: bytes, value: bytes) -> None:
    for i, (n, _) in enumerate(headers):
        if n == name:
            headers[i] = (name, value)
            del_rest = [j for j in range(i + 1, len(headers)) if headers[j][0] == name]
            for j in reversed(del_rest):
                del headers[j]
            return
    headers.append((name, value))


def set_response_header(response: Response, name: bytes, value: bytes) -> None:
    _set(response.headers, name, value)


Next = Callable[[Call], Awaitable[Response]]


class Filter:
    """Base class of every filter. `name` is set from the chain config."""

    name: str = ""

    async def on_request(self, call: Call) -> Response | None:
        """Inspect or change the request; return a Response to answer locally and stop."""
        return None

    async def on_response(self, call: Call, response: Response) -> Response:
        """Inspect or change the response on its way back."""
        return response

    async def handle(self, call: Call, next: Next) -> Response:
        reply = await self.on_request(call)
        if reply is not None:
            call.local_reply_by = self.name
            return reply
        response = await next(call)
        try:
            return await self.on_response(call, response)
        except BaseException:
            response.body.cancel()  # nobody will read it: free the upstream stream
            raise

    def close(self) -> None:
        """Release what the filter holds (timers, files) when its chain is dropped."""


@dataclass(frozen=True, slots=True)
class FilterContext:
    """What a factory may use to build a filter; no globals."""

    direction: str
    service_name: str  # the local app's service
    metrics: Metrics | None = None
    extra: dict[str, Any] = field(default_factory=dict)


_C = TypeVar("_C")


@dataclass(frozen=True, slots=True)
class FilterFactory(Generic[_C]):
    """How a filter is made: its config dataclass, parsed and checked at load, then build()."""

    config_type: type[_C]
    build: Callable[[_C, FilterContext], Filter]

    def parse(self, raw: object, key: str) -> _C:
        return build_dataclass(self.config_type, raw, key)


def resolve_factory(name: str) -> FilterFactory[Any]:
    """A filter's factory: the built-in registry first, then the `opus.filters` entry points."""
    target = BUILTIN_FILTERS.get(name)
    if target is None:
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if ep.name == name:
                target = ep.value
                break
    if target is None:
        known = sorted(BUILTIN_FILTERS) + sorted(
            ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)
        )
        raise LookupError(f"unknown filter {name!r}; known filters: {', '.join(known)}")
    module_name, _, attr = target.partition(":")
    factory = getattr(importlib.import_module(module_name), attr or "factory", None)
    if not isinstance(factory, FilterFactory):
        raise LookupError(f"filter {name!r}: {target} is not a sidecar.chain.FilterFactory")
    return factory


def _chain_specs(cfg: SidecarConfig) -> list[tuple[str, tuple[FilterSpec, ...]]]:
    specs = [("filters.outbound", cfg.filters.outbound), ("filters.inbound", cfg.filters.inbound)]
    for name, override in cfg.services.items():
        if override.filters is not None:
            specs.append((f"services.{name}.filters", override.filters))
    for i, route in enumerate(cfg.routes):
        if route.filters is not None:
            specs.append((f"routes[{i}].filters", route.filters))
    return specs


def validate_filters(cfg: SidecarConfig) -> None:
    """Resolve every configured filter and check its config; ConfigError names the key."""
    for key, specs in _chain_specs(cfg):
        for i, spec in enumerate(specs):
            where = f"{key}[{i}]"
            try:
                factory = resolve_factory(spec.name)
            except (LookupError, ImportError) as exc:
                raise ConfigError(f"{where}.name", str(exc)) from None
            config = factory.parse(spec.config, f"{where}.config ({spec.name})")
            check = getattr(config, "validate", None)
            if callable(check):
                try:
                    check()
                except ValueError as exc:
                    raise ConfigError(f"{where}.config ({spec.name})", str(exc)) from None


def build_filters(specs: tuple[FilterSpec, ...], ctx: FilterContext, key: str) -> list[Filter]:
    filters: list[Filter] = []
    for i, spec in enumerate(specs):
        factory = resolve_factory(spec.name)
        config = factory.parse(spec.config, f"{key}[{i}].config ({spec.name})")
        flt = factory.build(config, ctx)
        flt.name = spec.name
        filters.append(flt)
    return filters


def compose(filters: list[Filter], terminal: Next, metrics: Metrics | None = None) -> Next:
    """Wrap `terminal` (the router) in the filters, first filter outermost."""
    handler = terminal
    for flt in reversed(filters):
        handler = _guarded(flt, handler, metrics)
    return handler


def _guarded(flt: Filter, next: Next, metrics: Metrics | None) -> Next:
    """Run one filter so that its failure is that call's failure, never the worker's."""

    async def run(call: Call) -> Response:
        try:
            return await flt.handle(call, next)
        except MeshError as exc:
            # A filter's own refusal (401, 413, 429, ...): rendered here, then passed back out.
            call.error = exc
            call.flags = exc.flag
            if not call.local_reply_by:
                call.local_reply_by = flt.name
            return error_response(exc, grpc=call.request.is_grpc)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("filter %r failed on a call to %s", flt.name, call.service)
            if metrics is not None:
                metrics.filter_errors.labels(flt.name).inc()
            error = FilterFailed(f"filter {flt.name!r} failed", service=call.service)
            call.error = error
            call.flags = error.flag
            call.local_reply_by = flt.name
            return error_response(error, grpc=call.request.is_grpc)

    return run
