"""Consul intentions deciding inbound calls (`authorization.intentions.source: consul`).

The callee's sidecar asks its local Consul agent whether the caller's verified SPIFFE ID
may call this service (`PUT /v1/agent/connect/authorize`, as Consul's own built-in proxy
does), and remembers the verdict per caller identity for `cache_ttl` seconds, so a call
in steady state costs a dict lookup, not a request to the agent. Concurrent calls from a
caller whose verdict is not known share one ask.

It fails closed: a caller with no certificate (permissive mode's plaintext) is denied,
since intentions are decided by the certificate; so is a caller the agent cannot be
asked about, unless an earlier verdict for it is at most `stale_for` seconds old (an
agent restart does not deny every caller it allowed a moment ago). Agent errors are
counted and logged once per outage, never raised into the call.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from sidecar.authz import AuthorizationDenied
from sidecar.call import Call, Next
from sidecar.errors import error_response
from sidecar.messages import Request, Response

if TYPE_CHECKING:
    from prometheus_client import Counter

    from sidecar.config.authz import IntentionsConfig
    from sidecar.config.schema import SidecarConfig

log = logging.getLogger("sidecar.authz")

RULE = "consul-intentions"  # opus_authz_denied's rule label for the intentions' denials

Ask = Callable[[str, str], Awaitable[tuple[bool, str]]]  # (client URI, serial) -> verdict


class _Verdict:
    __slots__ = ("allowed", "at", "reason")

    def __init__(self, allowed: bool, reason: str, at: float) -> None:
        self.allowed = allowed
        self.reason = reason
        self.at = at


class Intentions:
    """The verdicts of the agent's intentions, per caller identity, cached and bounded."""

    def __init__(
        self,
        ask: Ask,
        target: str,
        cfg: IntentionsConfig,
        errors: Counter | None = None,
        clock: Callable[[], float] = time.monotonic,
        close: Callable[[], Awaitable[object]] | None = None,
    ) -> None:
        self._ask = ask
        self.target = target  # the service the agent is asked about (this one)
        self.ttl = cfg.cache_ttl
        self.max_cached = cfg.max_cached
        self.timeout = cfg.timeout
        self.stale_for = cfg.stale_for
        self._errors = errors
        self._clock = clock
        self._close = close
        self._verdicts: OrderedDict[str, _Verdict] = OrderedDict()
        self._asking: dict[str, asyncio.Future[_Verdict]] = {}  # asks under way
        self.asks = 0  # requests made to the agent
        self.failures = 0
        self._down = False

    async def decide(self, identity: str, serial: str) -> tuple[bool, str]:
        """Whether the caller `identity` may call, and the agent's (or our) reason."""
        if not identity:
            return False, "the caller presented no certificate (intentions decide by it)"
        verdict = self._verdicts.get(identity)
        now = self._clock()
        if verdict is None or now - verdict.at >= self.ttl:
            verdict = await self._refresh(identity, serial, verdict)
        return verdict.allowed, verdict.reason

    async def _refresh(self, identity: str, serial: str, last: _Verdict | None) -> _Verdict:
        # One ask per identity at a time, in a task of its own, so a caller that goes
        # away (cancelled) neither cancels it nor leaves the others without an answer.
        task = self._asking.get(identity)
        if task is None:
            task = asyncio.ensure_future(self._fetch(identity, serial, last))
            self._asking[identity] = task
            task.add_done_callback(lambda _: self._asking.pop(identity, None))
        return await asyncio.shield(task)

    async def _fetch(self, identity: str, serial: str, last: _Verdict | None) -> _Verdict:
        self.asks += 1
        try:
            allowed, reason = await asyncio.wait_for(self._ask(identity, serial), self.timeout)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the agent down, slow or answering nonsense
            return self._failed(identity, exc, last)
        if self._down:
            self._down = False
            log.warning("consul intentions: the agent answers again")
        verdict = _Verdict(allowed, reason, self._clock())
        self._verdicts[identity] = verdict
        self._verdicts.move_to_end(identity)
        while len(self._verdicts) > self.max_cached:
            self._verdicts.popitem(last=False)
        return verdict

    def _failed(self, identity: str, exc: BaseException, last: _Verdict | None) -> _Verdict:
        self.failures += 1
        if self._errors is not None:
            self._errors.inc()
        why = str(exc) or type(exc).__name__
        if not self._down:
            self._down = True
            log.error("consul intentions: cannot ask the agent (%s); failing closed", why)
        if last is not None and self._clock() - last.at < self.ttl + self.stale_for:
            return last  # not stored again: the next call asks again
        return _Verdict(False, f"Consul intentions unavailable: {why}", self._clock())

    async def close(self) -> None:
        if self._close is not None:
            await self._close()


def consul_intentions(cfg: SidecarConfig, errors: Counter | None = None) -> Intentions:
    """Intentions asked of the agent `tls.consul.address` names (py-consul's aio client,
    made here; closed with the Intentions), for the service `tls.consul.service` (else
    `service.name`)."""
    import consul.aio

    from sidecar.tls.consul_source import authorize, quiet, split_address

    agent = cfg.tls.consul
    client = quiet(consul.aio.Consul, **split_address(agent.address))
    target = agent.service or cfg.service.name

    async def ask(client_uri: str, serial: str) -> tuple[bool, str]:
        return await authorize(client, target, client_uri, serial, agent.token)

    return Intentions(ask, target, cfg.authorization.intentions, errors, close=client.close)


class IntentionsStep:
    """A step of the inbound chain, after the local authorization rules: a call Consul's
    intentions deny is answered here (403 / PERMISSION_DENIED), before any filter."""

    __slots__ = ("denied", "intentions", "next", "peer")

    def __init__(
        self,
        intentions: Intentions,
        peer: Callable[[Request], tuple[str, str]],
        next: Next,
        denied: Counter,
    ) -> None:
        self.intentions = intentions
        self.peer = peer  # the caller's verified SPIFFE ID and certificate serial
        self.next = next
        self.denied = denied

    async def __call__(self, call: Call) -> Response:
        request = call.request
        identity, serial = self.peer(request)
        allowed, reason = await self.intentions.decide(identity, serial)
        if allowed:
            return await self.next(call)
        self.denied.labels(RULE).inc()
        who = identity or "a caller with no identity"
        message = f"denied by Consul intentions for {who}: {reason}"
        log.debug("%s %s: %s", request.method.decode("latin-1"), call.path, message)
        error = AuthorizationDenied(message, service=call.service)
        call.record_error(error)
        call.note_local_reply("authz")
        return error_response(error, grpc=request.is_grpc)
