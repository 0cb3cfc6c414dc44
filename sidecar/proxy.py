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
Inbound (a peer sidecar's call for the local app, inbound.py): the inbound chain
(signature checks first), then the app's cluster, then respond and observe the same
way. What both share (chains, the callback decision, observing) is callhandler.py's.

A call whose chain is the router alone (no filters), with no deadline and no tracing,
to a cluster on an HTTP/1.1 pool, arriving with its whole body on HTTP/1.1, runs the
same steps on callbacks (callbacks.CallbackCall): no task, no coroutine per step.
"""

from __future__ import annotations

import logging
from functools import partial

from sidecar.accesslog import AccessLog
from sidecar.call import Call, Next
from sidecar.callbacks import CallbackCall
from sidecar.callhandler import CallHandler, router_step
from sidecar.chain import Filter, FilterContext, build_filters, compose
from sidecar.cluster import Cluster
from sidecar.clusters import ClusterManager
from sidecar.config import SidecarConfig
from sidecar.deadline import caller_deadline
from sidecar.errors import (
    MeshError,
    UnknownService,
)
from sidecar.messages import (
    Request,
)
from sidecar.metrics import Metrics
from sidecar.routing import INVOKE_PREFIX, Router, upstream_path
from sidecar.serving import ImmediateSink, ResponseSink, TaskWork
from sidecar.tracing import Tracing
from sidecar.traffic.fault import FaultFilter
from sidecar.traffic.mirror import MirrorFilter
from sidecar.traffic.table import Rule, RuleTable, Target

log = logging.getLogger("sidecar.proxy")


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
