"""The inbound handler: a peer sidecar's call for the local app, through the inbound
chain (signature checks first) to the app's cluster; the caller's address appended to
x-forwarded-for; with mTLS, the caller's verified identity to the app in
x-forwarded-client-cert. With authorization rules, the policy (authz.py) decides first."""

from __future__ import annotations

import logging
from collections.abc import Callable

from sidecar.accesslog import AccessLog
from sidecar.authz import AuthorizationStep, Identify, compile_policy
from sidecar.call import Call, Next
from sidecar.callbacks import CallbackCall
from sidecar.callhandler import CallHandler
from sidecar.cluster import Cluster
from sidecar.config import SidecarConfig
from sidecar.deadline import caller_deadline
from sidecar.intentions import Intentions, IntentionsStep
from sidecar.messages import (
    FIELD_NAME,
    Headers,
    Request,
)
from sidecar.metrics import Metrics
from sidecar.serving import ImmediateSink, ResponseSink
from sidecar.tls.inbound import InboundTls
from sidecar.tracing import Tracing

log = logging.getLogger("sidecar.proxy")

FORWARDED_FOR = b"x-forwarded-for"
# The last caller's address ("host:port", the connection's own string) and its host.
_last_peer, _last_host = "", b""


def _append_forwarded_for(request: Request) -> None:
    """Add the caller's address to x-forwarded-for (what the app sees is who called, not
    only what the caller claims). A caller's several x-forwarded-for headers are merged
    into one first (RFC 9110 5.3), so the real peer is the last hop whichever one the
    app reads."""
    global _last_peer, _last_host
    if request.peer is _last_peer:
        peer = _last_host  # the connection's previous call's (its peer string, shared)
    else:
        _last_peer = request.peer
        peer = _last_host = request.peer.rsplit(":", 1)[0].encode()
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


def _no_identity(request: Request) -> str:
    return ""  # no mTLS: every caller is a plaintext one


def _verified_identity(tls: InboundTls) -> Identify:
    peers = tls.identity
    return lambda request: peers(request.peer)


def _verified_peer(tls: InboundTls) -> Callable[[Request], tuple[str, str]]:
    peers, serials = tls.identity, tls.serial
    return lambda request: (peers(request.peer), serials(request.peer))


class InboundHandler(CallHandler):
    def __init__(
        self,
        cfg: SidecarConfig,
        app: Cluster,
        metrics: Metrics,
        access_log: AccessLog,
        tracing: Tracing,
        keep_chain_of: InboundHandler | None = None,
        tls: InboundTls | None = None,
        intentions: Intentions | None = None,
    ) -> None:
        super().__init__("inbound", cfg, metrics, access_log, tracing)
        self.service = cfg.service.name
        self._authority = self.service.encode()
        self.filter_chain: Next  # filters.inbound around the router
        if keep_chain_of is not None:
            # A reload that left filters.inbound as it was: the chain and its filters'
            # state (hmac_verify's replay cache above all) carry over, now owned here.
            self.filter_chain, self.filters = keep_chain_of.filter_chain, keep_chain_of.filters
            keep_chain_of.filters = []
        else:
            self.filter_chain = self.build_chain(cfg.filters.inbound, app, "filters.inbound")
        # The authorization policy runs first, before any filter sees a call it denies;
        # made anew from every config (a reload that changes only the rules keeps the
        # filters). No rules, no step: the chain, and its callback path, as they were.
        # Consul's intentions (authorization.intentions) decide after the local rules.
        self.chain: Next = self.filter_chain
        if intentions is not None and tls is not None:
            self.chain = IntentionsStep(
                intentions, _verified_peer(tls), self.chain, metrics.authz_denied
            )
        policy = compile_policy(cfg)
        if policy is not None:
            identify = _no_identity if tls is None else _verified_identity(tls)
            self.chain = AuthorizationStep(policy, identify, self.chain, metrics.authz_denied)
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
        intentions: Intentions | None = None,
    ) -> None:
        super().__init__(
            cfg,
            app,
            metrics,
            access_log,
            tracing,
            keep_chain_of=keep_chain_of,
            tls=tls,
            intentions=intentions,
        )
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
