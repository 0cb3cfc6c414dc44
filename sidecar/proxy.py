"""The request path, composed in one place.

Outbound (the local app's call into the mesh), in order:
  1. route: which service the call is for (routing.Router), before anything that
     depends on the service, so an unknown one is answered without touching a pool;
  2. cluster: the service's endpoints, balancer and pool (created on first use);
  3. filters: the chain for that service or route (signing, retries, limits, ...),
     which may answer locally; built once per service/route and kept, so per-service
     state (token buckets, breakers) lives in its filter instances;
  4. router: pick an endpoint and send over pooled HTTP/2, resending only what the
     peer provably never saw; the remaining deadline travels with the call;
  5. respond: stream the reply back, then metrics and one access-log line.
Inbound (a peer sidecar's call for the local app): the inbound chain (signature
checks first), then the app's cluster, then respond and observe the same way.

A call whose chain is the router alone (no filters), with no deadline and no tracing,
to a cluster on an HTTP/1.1 pool, arriving with its whole body on HTTP/1.1, runs the
same steps on callbacks (callbacks.CallbackCall): no task, no coroutine per step.
"""

from __future__ import annotations

import asyncio
import logging
import time
from functools import partial
from typing import Any

from sidecar.accesslog import AccessLog, record
from sidecar.call import BufferBudget, Call, Next, set_response_header
from sidecar.callbacks import CallbackCall
from sidecar.chain import Filter, FilterContext, FilterFailed, build_filters, compose
from sidecar.cluster import Cluster, ClusterManager
from sidecar.config import FilterSpec, SidecarConfig
from sidecar.deadline import DEADLINE_HEADER, caller_deadline
from sidecar.discovery.base import Endpoint
from sidecar.errors import (
    MeshError,
    UnknownService,
    UpstreamReset,
    UpstreamTimeout,
    error_response,
)
from sidecar.forwarding import CLIENT_GONE, not_routed, routed
from sidecar.messages import (
    FIELD_NAME,
    BodyError,
    Headers,
    Request,
    Response,
    unsafe_header,
)
from sidecar.metrics import Metrics
from sidecar.routing import INVOKE_PREFIX, Router, upstream_path
from sidecar.serving import ImmediateSink, ResponseSink, TaskWork
from sidecar.tls.inbound import InboundTls
from sidecar.tracing import Tracing, grpc_status_of, incoming_trace_id
from sidecar.traffic.fault import FaultFilter
from sidecar.traffic.mirror import MirrorFilter
from sidecar.traffic.table import Rule, RuleTable, Target
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
                for name, _ in headers:
                    if name in _UPSTREAM_HEADERS:
                        set_response_header(response, b"x-opus-upstream", address)
                        set_response_header(response, b"x-opus-upstream-protocol", protocol)
                        break
                else:  # the usual case: append, as set_response_header would
                    headers.append((b"x-opus-upstream", address))
                    headers.append((b"x-opus-upstream-protocol", protocol))
            elif not call._local_reply_by:
                # The app's own reply may not speak for the mesh: a forged x-opus-error
                # would make callers resend calls the app already served.
                headers = response.headers
                for name, _ in headers:
                    if name in MESH_RESPONSE_HEADERS:
                        headers[:] = [(n, v) for n, v in headers if n not in MESH_RESPONSE_HEADERS]
                        break
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


class OutboundHandler(CallHandler):
    def __init__(
        self,
        cfg: SidecarConfig,
        router: Router,
        clusters: ClusterManager,
        metrics: Metrics,
        access_log: AccessLog,
        tracing: Tracing,
    ) -> None:
        super().__init__("outbound", cfg, metrics, access_log, tracing)
        self.router = router
        self.clusters = clusters
        self._chains: dict[tuple[str, str], Next] = {}
        self._by_route: dict[tuple[str, int], Next] = {}
        # Route rules (docs/traffic.md), compiled once. A call meets a table only when
        # its level has rules: None, and a service absent from the dict, cost nothing.
        self._listener_rules: RuleTable | None = None
        if cfg.route_rules:
            self._listener_rules = RuleTable(cfg.route_rules, "route_rules")
        self._service_rules = {
            name: RuleTable(override.route_rules, f"services.{name}.route_rules", name)
            for name, override in cfg.services.items()
            if override.route_rules
        }
        self._rule_steps: dict[str, list[Filter]] = {}  # a rule's fault and mirror steps
        # One check on every call: a config without rules never looks further.
        self._has_rules = bool(self._listener_rules is not None or self._service_rules)

    def _chain(self, service: str, route: int, cluster: Cluster) -> Next:
        chain = self._by_route.get((service, route))
        if chain is not None:
            return chain
        cfg = self.cfg
        override = cfg.services.get(service)
        route_filters = cfg.routes[route].filters if route >= 0 else None
        if route_filters is not None:
            specs, where = route_filters, f"routes[{route}].filters"
        elif override is not None and override.filters is not None:
            specs, where = override.filters, f"services.{service}.filters"
        else:
            specs, where = cfg.filters.outbound, "filters.outbound"
        # One chain (and so one set of per-service filter state) per service and config
        # key: a route without filters of its own shares the service's chain.
        chain = self._chains.get((service, where))
        if chain is None:
            chain = self.build_chain(specs, cluster, where)
            self._chains[(service, where)] = chain
        self._by_route[(service, route)] = chain
        return chain

    def _route_name(self, request: Request, route: int) -> str:
        if route >= 0:
            spec = self.cfg.routes[route]
            return spec.prefix or spec.grpc_service
        if request.path.startswith(INVOKE_PREFIX):
            return "invoke"
        return "proxy" if request.absolute_form else "host"

    def _resolve(self, request: Request) -> tuple[str, bytes, int, Cluster]:
        """Where the call goes: service, upstream path, route index and cluster."""
        service, path, route = self.router.resolve(request)
        cluster = self.clusters.get(service)
        if cluster is None:
            raise UnknownService(f"unknown service {service!r}", service=service)
        return service, path, route, cluster

    async def __call__(self, request: Request, sink: ResponseSink) -> None:
        if self._has_rules:
            await self._call_by_rules(request, sink)
            return
        try:
            service, path, route, cluster = self._resolve(request)
        except MeshError as exc:
            await self._reply_error(request, sink, exc)
            return
        await self._forward(request, sink, service, path, route, cluster)

    async def _forward(
        self,
        request: Request,
        sink: ResponseSink,
        service: str,
        path: bytes,
        route: int,
        cluster: Cluster,
    ) -> None:
        call = Call(request, "outbound", service, service.encode(), path, self.max_body_bytes)
        call._route = self._route_name(request, route)
        await self.run(request, sink, call, self._chain(service, route, cluster))

    def start_now(self, request: Request, sink: ImmediateSink) -> CallbackCall | TaskWork | None:
        """The listener's callback path (see CallbackCall). The call is routed here, once:
        a call that cannot run on callbacks goes on in a task with that route (TaskWork).
        None (nothing done) when tracing is on, which only the task path does."""
        if self.tracing.enabled:
            return None
        if self._has_rules:
            return self._start_by_rules(request, sink)
        try:
            service, path, route, cluster = self._resolve(request)
        except MeshError as exc:
            return TaskWork(partial(self._reply_error, request, sink, exc))
        if (
            not cluster.endpoints
            or self._callbacks_for(self._chain(service, route, cluster)) is None
            or (request.headers and caller_deadline(request) is not None)
        ):
            return TaskWork(partial(self._forward, request, sink, service, path, route, cluster))
        call = CallbackCall(self, sink, cluster, request, service, service.encode(), path)
        call._route = self._route_name(request, route)
        call.start()
        return call

    # -- route rules (docs/traffic.md); a config without any never comes here --

    def _resolve_by_rules(self, request: Request) -> tuple[str, bytes, Cluster, Next, str]:
        """_resolve() when the config has route rules: the listener's first, then the
        resolved service's, else as without rules."""
        listener_rules = self._listener_rules
        if listener_rules is not None:
            rule = listener_rules.match(request, request.path)
            if rule is not None:
                return self._listener_rule(request, rule)
        service, path, route = self.router.resolve(request)
        cluster = self.clusters.get(service)
        if cluster is None:
            raise UnknownService(f"unknown service {service!r}", service=service)
        table = self._service_rules.get(service)
        if table is not None:
            rule = table.match(request, path)
            if rule is not None:
                return self._on_rule(rule.pick() or rule.target_for(service), path)
        return (
            service,
            path,
            cluster,
            self._chain(service, route, cluster),
            self._route_name(request, route),
        )

    def _listener_rule(self, request: Request, rule: Rule) -> tuple[str, bytes, Cluster, Next, str]:
        target = rule.pick()
        if target is None:  # the rule sets policy only: the call goes where it would
            service, path, _ = self.router.resolve(request)
            target = rule.target_for(service)
        else:
            path = upstream_path(request.path)
        return self._on_rule(target, path)

    def _on_rule(self, target: Target, path: bytes) -> tuple[str, bytes, Cluster, Next, str]:
        cluster, chain = target.resolve(self._cluster_of, self._rule_chain)
        counted = target.counted
        if counted is None:
            labels = (target.rule.name, target.service, target.subset)
            counted = target.counted = self.metrics.route_requests.labels(*labels)
        counted.inc()
        return target.service, path, cluster, chain, target.rule.name

    def _cluster_of(self, service: str, subset: str) -> Cluster | None:
        cluster = self.clusters.get(service)
        if cluster is None or not subset:
            return cluster
        # The config check made sure every subset a rule names is defined.
        return cluster.subset(subset, self.cfg.services[service].subsets[subset])

    def _rule_chain(self, rule: Rule, service: str, cluster: Cluster) -> Next:
        """The chain of a rule's calls to one destination: the rule's fault and mirror
        steps (one each per rule), its timeout, retry and header rewrites, then its own
        filters or else the ones the service's calls run."""
        spec = rule.spec
        cfg = self.cfg
        override = cfg.services.get(service)
        if spec.filters is not None:
            specs, where = spec.filters, f"{rule.key}.filters"
        elif override is not None and override.filters is not None:
            specs, where = override.filters, f"services.{service}.filters"
        else:
            specs, where = cfg.filters.outbound, "filters.outbound"
        steps = self._rule_steps.get(rule.key)
        if steps is None:
            steps = self._rule_steps[rule.key] = self._steps(rule)
            self.filters += steps
        ctx = FilterContext(self.direction, cfg.service.name, self.metrics.filters)
        filters = list(steps)
        for key, policy in spec.policy_filters():
            filters += build_filters((policy,), ctx, f"{rule.key}.{key}")
        filters += build_filters(specs, ctx, where)
        self.filters += filters[len(steps) :]
        return compose(filters, router_step(cluster), self.metrics)

    def _steps(self, rule: Rule) -> list[Filter]:
        spec = rule.spec
        steps: list[Filter] = []
        if spec.fault is not None:
            faults = self.metrics.faults
            steps.append(
                FaultFilter(
                    spec.fault, faults.labels(rule.name, "delay"), faults.labels(rule.name, "abort")
                )
            )
        if spec.mirror is not None:
            mirror = spec.mirror
            mirrors = self.metrics.mirrors
            steps.append(
                MirrorFilter(
                    mirror,
                    partial(self._cluster_of, mirror.service, mirror.subset),
                    partial(mirrors.labels, rule.name),
                )
            )
        return steps

    async def _call_by_rules(self, request: Request, sink: ResponseSink) -> None:
        try:
            service, path, _, chain, route = self._resolve_by_rules(request)
        except MeshError as exc:
            await self._reply_error(request, sink, exc)
            return
        await self._run_routed(request, sink, service, path, chain, route)

    async def _run_routed(
        self,
        request: Request,
        sink: ResponseSink,
        service: str,
        path: bytes,
        chain: Next,
        route: str,
    ) -> None:
        call = Call(request, "outbound", service, service.encode(), path, self.max_body_bytes)
        call._route = route
        await self.run(request, sink, call, chain)

    def _start_by_rules(
        self, request: Request, sink: ImmediateSink
    ) -> CallbackCall | TaskWork | None:
        """start_now() when the config has route rules (the same steps, routed by them)."""
        try:
            service, path, cluster, chain, route = self._resolve_by_rules(request)
        except MeshError as exc:
            return TaskWork(partial(self._reply_error, request, sink, exc))
        if (
            not cluster.endpoints
            or self._callbacks_for(chain) is None
            or (request.headers and caller_deadline(request) is not None)
        ):
            return TaskWork(partial(self._run_routed, request, sink, service, path, chain, route))
        call = CallbackCall(self, sink, cluster, request, service, service.encode(), path)
        call._route = route
        call.start()
        return call


FORWARDED_FOR = b"x-forwarded-for"


def _append_forwarded_for(request: Request) -> None:
    """Add the caller's address to x-forwarded-for (what the app sees is who called, not
    only what the caller claims). A caller's several x-forwarded-for headers are merged
    into one first (RFC 9110 5.3), so the real peer is the last hop whichever one the
    app reads."""
    peer = request.peer.rsplit(":", 1)[0].encode()
    if not peer:
        return
    headers = request.headers
    names = list(map(FIELD_NAME, headers))  # the scans below run at C speed
    count = names.count(FORWARDED_FOR)
    if count == 0:
        headers.append((FORWARDED_FOR, peer))
        return
    first = names.index(FORWARDED_FOR)
    if count > 1:
        _merge_forwarded_for(headers, first, peer)
        return
    value = headers[first][1]
    headers[first] = (FORWARDED_FOR, value + b", " + peer if value else peer)


def _merge_forwarded_for(headers: Headers, first: int, peer: bytes) -> None:
    """The rare path: the caller sent x-forwarded-for more than once. One header, at the
    first one's place, its values in order (empty ones dropped), then the peer."""
    hops = [value for name, value in headers[first:] if name == FORWARDED_FOR and value]
    hops.append(peer)
    rest = [field for field in headers[first + 1 :] if field[0] != FORWARDED_FOR]
    headers[first:] = [(FORWARDED_FOR, b", ".join(hops)), *rest]


class InboundHandler(CallHandler):
    def __init__(
        self,
        cfg: SidecarConfig,
        app: Cluster,
        metrics: Metrics,
        access_log: AccessLog,
        tracing: Tracing,
        keep_chain_of: InboundHandler | None = None,
    ) -> None:
        super().__init__("inbound", cfg, metrics, access_log, tracing)
        self.service = cfg.service.name
        self._authority = self.service.encode()
        self.chain: Next
        if keep_chain_of is not None:
            # A reload that left filters.inbound as it was: the chain and its filters'
            # state (hmac_verify's replay cache above all) carry over, now owned here.
            self.chain, self.filters = keep_chain_of.chain, keep_chain_of.filters
            keep_chain_of.filters = []
        else:
            self.chain = self.build_chain(cfg.filters.inbound, app, "filters.inbound")
        self._callback_cluster = self._callbacks_for(self.chain)

    async def __call__(self, request: Request, sink: ResponseSink) -> None:
        authority = request.authority or self._authority
        _append_forwarded_for(request)
        call = Call(request, "inbound", self.service, authority, request.path, self.max_body_bytes)
        await self.run(request, sink, call, self.chain)

    def start_now(self, request: Request, sink: ImmediateSink) -> CallbackCall | None:
        """The listener's callback path (see CallbackCall); None to take the task path."""
        cluster = self._callback_cluster
        if cluster is None or not cluster.endpoints:
            return None
        if request.headers and caller_deadline(request) is not None:
            return None
        authority = request.authority or self._authority
        _append_forwarded_for(request)
        call = CallbackCall(self, sink, cluster, request, self.service, authority, request.path)
        call.start()
        return call


CLIENT_CERT = b"x-forwarded-client-cert"


class TlsInboundHandler(InboundHandler):
    """The inbound handler of an mTLS listener: the caller's verified identity goes to
    the app in `x-forwarded-client-cert` (Envoy's format, `By=<us>;URI=<caller>`), and
    whatever the caller sent in that header is dropped first, so the app can trust it.
    A plaintext caller (permissive mode) reaches the app with none."""

    def __init__(
        self,
        cfg: SidecarConfig,
        app: Cluster,
        metrics: Metrics,
        access_log: AccessLog,
        tracing: Tracing,
        tls: InboundTls,
        keep_chain_of: InboundHandler | None = None,
    ) -> None:
        super().__init__(cfg, app, metrics, access_log, tracing, keep_chain_of=keep_chain_of)
        self.tls = tls
        self._tls = tls
        self._peer_requests = metrics.tls_peer_requests

    def _client_cert(self, request: Request) -> None:
        headers = request.headers
        if any(name == CLIENT_CERT for name, _ in headers):
            headers[:] = [field for field in headers if field[0] != CLIENT_CERT]
        identity = self._tls.identity(request.peer)
        if identity:
            headers.append((CLIENT_CERT, f"By={self._tls.by};URI={identity}".encode()))

    def _observe(
        self,
        request: Request,
        call: Call,
        status: int,
        sent: int,
        grpc_status: str,
        trace_id: str,
    ) -> None:
        super()._observe(request, call, status, sent, grpc_status, trace_id)
        self._peer_requests.labels(self._tls.identity(request.peer) or "none").inc()

    async def __call__(self, request: Request, sink: ResponseSink) -> None:
        self._client_cert(request)  # again if start_now declined: the same header, once
        await super().__call__(request, sink)

    def start_now(self, request: Request, sink: ImmediateSink) -> CallbackCall | None:
        self._client_cert(request)
        return super().start_now(request, sink)
