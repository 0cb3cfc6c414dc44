"""The filter chain: the Filter base class, how filters are made (FilterFactory,
FilterContext), the registry that finds them by name, and the composition that runs them
around the router. Filter authors import all of it from `sidecar.sdk`.

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
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from sidecar.call import Call, Next
from sidecar.errors import MeshError, error_response
from sidecar.messages import Response
from sidecar.typedconfig import ConfigError, build_dataclass

if TYPE_CHECKING:
    from sidecar.config import FilterSpec, SidecarConfig
    from sidecar.filtermetrics import FilterMetrics
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


class FilterFailed(MeshError):
    status = 500
    flag = "FE"  # a filter raised


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
            call._local_reply_by = self.name
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
    metrics: FilterMetrics | None = None  # declares the filter's own metrics; None: kept nowhere
    extra: dict[str, Any] = field(default_factory=dict)
    clock: Callable[[], float] = time.monotonic  # for deadlines and rates; a test's fake here


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
    levels = [("route_rules", cfg.route_rules)]
    levels += [(f"services.{n}.route_rules", o.route_rules) for n, o in cfg.services.items()]
    for level, rules in levels:
        for i, rule in enumerate(rules):
            if rule.filters is not None:
                specs.append((f"{level}[{i}].filters", rule.filters))
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
            call._error = exc
            call._flags = exc.flag
            if not call._local_reply_by:
                call._local_reply_by = flt.name
            return error_response(exc, grpc=call.request.is_grpc)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("filter %r failed on a call to %s", flt.name, call.service)
            if metrics is not None:
                metrics.filter_errors.labels(flt.name).inc()
            error = FilterFailed(f"filter {flt.name!r} failed", service=call.service)
            call._error = error
            call._flags = error.flag
            call._local_reply_by = flt.name
            return error_response(error, grpc=call.request.is_grpc)

    return run
