"""The `consul` certificate source (`tls.source: consul`): Consul service mesh's own CA,
through the local agent's API with py-consul.

- roots: `GET /v1/agent/connect/ca/roots` -> `{ActiveRootID, TrustDomain, Roots: [{ID,
  RootCert, IntermediateCerts, Active, ...}]}`; every root listed goes into the bundle,
  so peers whose leaves still chain to the previous root are accepted mid-rotation;
- the leaf: `GET /v1/agent/connect/ca/leaf/<service>` -> `{SerialNumber, CertPEM,
  PrivateKeyPEM, Service, ServiceURI, ValidAfter, ValidBefore, ...}`, whose URI SAN is
  `spiffe://<td>.consul/ns/<ns>/dc/<dc>/svc/<service>`.

Both are watched with blocking queries (`?index=&wait=`, `X-Consul-Index`), so a
rotation of the roots or the agent's renewal of the leaf arrives as it happens. If no
new leaf has come by 2/3 of the current one's lifetime, it is asked for without
blocking. A failing agent never takes the sidecar down: the material in use stays,
queries are retried with a capped back-off, the outage is logged once and counted.
Each watch is rate-limited (`max_queries_per_second`, burst 2), as Consul advises.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import re
import time
import urllib.parse
import warnings
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import aiohttp
import consul
import consul.aio
import requests
from consul.callback import CB

from sidecar.tls import material, spiffe
from sidecar.tls.contexts import TlsState
from sidecar.tls.material import Material, MaterialError
from sidecar.tls.sources import RENEW_AT, Scheduler, Source, _utcnow

log = logging.getLogger("sidecar.tls")

NAME = re.compile(r"[A-Za-z0-9._-]+")  # a service, datacenter or namespace name
ROOTS_PATH = "/v1/agent/connect/ca/roots"
LEAF_PATH = "/v1/agent/connect/ca/leaf/"
DEFAULT_NAMESPACE = "default"
_RETRY_FIRST = 0.1  # the first back-off after a failed query; doubles up to retry_max
_ERRORS = (consul.ConsulException, aiohttp.ClientError, requests.RequestException, OSError)
Kind = Literal["roots", "leaf"]


class ConsulCaError(MaterialError):
    """An agent answer that cannot be used; the message names the endpoint."""


def split_address(address: str) -> dict[str, Any]:
    """py-consul's host, port and scheme for `address` ("" : py-consul's defaults)."""
    if not address:
        return {}
    parsed = urllib.parse.urlsplit(address if "//" in address else "//" + address)
    scheme = parsed.scheme or "http"
    if scheme not in ("http", "https"):
        raise ValueError(f"scheme must be http or https, got {scheme!r} in {address!r}")
    try:
        port = parsed.port or 8500
    except ValueError:
        raise ValueError(f"{address!r} has no valid port") from None
    if not parsed.hostname or parsed.path not in ("", "/"):
        raise ValueError(f"must be 'host:port' or 'http[s]://host:port', got {address!r}")
    return {"host": parsed.hostname, "port": port, "scheme": scheme}


def parse_roots(data: object) -> tuple[bytes, str]:
    """The trust bundle (every root, active or not, with its intermediates) and the
    trust domain, from a /v1/agent/connect/ca/roots answer."""
    if not isinstance(data, dict) or not isinstance(data.get("Roots"), list):
        raise ConsulCaError(f"{ROOTS_PATH}: not an object with a Roots list")
    pems: list[str] = []
    for root in data["Roots"]:
        cert = root.get("RootCert") if isinstance(root, dict) else None
        if not isinstance(cert, str) or "BEGIN CERTIFICATE" not in cert:
            raise ConsulCaError(f"{ROOTS_PATH}: a root without a PEM RootCert")
        pems.append(cert.strip())
        pems += [c.strip() for c in root.get("IntermediateCerts") or () if isinstance(c, str)]
    if not pems:
        raise ConsulCaError(f"{ROOTS_PATH}: no roots (is Connect enabled on the agent?)")
    trust_domain = data.get("TrustDomain")
    return ("\n".join(pems) + "\n").encode(), trust_domain if isinstance(trust_domain, str) else ""


def parse_leaf(data: object) -> tuple[bytes, bytes]:
    """The chain (leaf first) and its key, from a /v1/agent/connect/ca/leaf answer."""
    path = LEAF_PATH + "<service>"
    if not isinstance(data, dict):
        raise ConsulCaError(f"{path}: not an object")
    cert, key = data.get("CertPEM"), data.get("PrivateKeyPEM")
    if not isinstance(cert, str) or not isinstance(key, str):
        raise ConsulCaError(f"{path}: CertPEM and PrivateKeyPEM must be PEM strings")
    return cert.encode(), key.encode()


def consul_identity(trust_domain: str, namespace: str, datacenter: str, service: str) -> str:
    """The SPIFFE ID Consul issues `service`."""
    return f"spiffe://{trust_domain}/ns/{namespace}/dc/{datacenter}/svc/{service}"


def _duration(seconds: float) -> str:
    return f"{round(seconds * 1000)}ms"  # a Go duration, as Consul reads `wait`


def quiet(factory: Callable[..., Any], **kwargs: Any) -> Any:
    # py-consul builds its aiohttp connector with arguments aiohttp has deprecated.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return factory(**kwargs)


class ConsulSource(Source):
    name = "consul"

    def __init__(
        self,
        *,
        address: str,
        token: str,
        service: str,
        trust_domain: str,
        namespace: str = "",
        datacenter: str = "",
        wait: float = 300.0,
        request_timeout: float = 10.0,
        retry_max: float = 30.0,
        max_queries_per_second: float = 10.0,
        start_timeout: float = 30.0,
        now: Callable[[], datetime.datetime] = _utcnow,
        client: Any = None,  # a consul.aio.Consul (tests: anything with `.http.get`)
        sync_client: Any = None,  # a consul.Consul, for the first material at start
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(now)
        self.address = address
        self.token = token
        self.service = service
        self.trust_domain = trust_domain
        self.namespace = namespace
        self.datacenter = datacenter
        self.wait = wait
        self.request_timeout = request_timeout
        self.retry_max = retry_max
        self.start_timeout = start_timeout
        self.max_queries_per_second = max_queries_per_second
        self._client = client
        self._sync_client = sync_client
        self._sleep = sleep
        self._monotonic = monotonic
        self.index: dict[Kind, int] = {"roots": 0, "leaf": 0}
        self.bundle_pem = b""
        self.leaf: tuple[bytes, bytes] = (b"", b"")
        self.built: Material | None = None
        self.failures = 0  # failed queries and unusable answers
        self.updates = 0  # material put in use after the first
        self._closing: asyncio.Task[object] | None = None
        self._down = False  # an outage is logged once, and its end
        self._refetched: int | None = None  # the serial a due re-fetch returned unchanged
        self._tasks: list[asyncio.Task[None]] = []

    # -- the agent ------------------------------------------------------------------

    def _path(self, kind: Kind) -> str:
        return ROOTS_PATH if kind == "roots" else LEAF_PATH + self.service

    def _params(self, index: int, wait: float) -> list[tuple[str, str]]:
        params = [("index", str(index)), ("wait", _duration(wait))] if index else []
        if self.namespace:
            params.append(("ns", self.namespace))
        return params

    def _headers(self) -> dict[str, str]:
        return {"X-Consul-Token": self.token} if self.token else {}

    def _consul(self) -> Any:
        if self._client is None:
            self._client = quiet(consul.aio.Consul, **split_address(self.address))
        return self._client

    # -- material -------------------------------------------------------------------

    def take(self, kind: Kind, data: object) -> bool:
        """Record an answer; True if it changes the material. Nothing is recorded when
        the answer, with the rest, does not make usable material (MaterialError)."""
        bundle, leaf = self.bundle_pem, self.leaf
        if kind == "roots":
            bundle, trust_domain = parse_roots(data)
            if trust_domain and trust_domain != self.trust_domain:
                raise ConsulCaError(
                    f"{ROOTS_PATH}: the agent's trust domain is {trust_domain!r},"
                    f" tls.trust_domain is {self.trust_domain!r}"
                )
        else:
            leaf = parse_leaf(data)
        if (bundle, leaf) == (self.bundle_pem, self.leaf):
            return False
        if bundle and leaf[0]:
            self.built = material.build(*leaf, bundle, self.trust_domain)
        self.bundle_pem, self.leaf = bundle, leaf
        return True

    def build(self) -> Material:
        """The material from the last roots and leaf (checked by `take`)."""
        built = self.built
        if built is None:
            raise ConsulCaError("no roots and leaf from the agent yet")
        if self.datacenter == "":
            ident = spiffe.parse(built.identity)
            if ident.kind == "consul":
                self.datacenter = ident.segments[3]  # the agent's, for secure naming
        return built

    def load(self) -> Material:
        """The first roots and leaf, asked for until `start_timeout` (before any port is
        bound: without them the sidecar has nothing to handshake with)."""
        client = self._sync_client or consul.Consul(
            **split_address(self.address), connections_timeout=self.request_timeout
        )
        deadline = time.monotonic() + self.start_timeout
        delay = _RETRY_FIRST
        while True:
            try:
                for kind in ("roots", "leaf"):
                    index, data = client.http.get(
                        CB.json(index=True, allow_404=False),
                        self._path(kind),
                        params=self._params(0, 0),
                        headers=self._headers(),
                    )
                    self.index[kind] = _next_index(0, index)
                    self.take(kind, data)
                return self.build()
            except (*_ERRORS, MaterialError) as exc:
                if time.monotonic() + delay > deadline:
                    raise MaterialError(
                        f"no certificate from the Consul agent at {self.address or 'default'}"
                        f" within {self.start_timeout:g} s: {exc}",
                        "tls.consul",
                    ) from None
                log.warning("Consul agent CA not ready (retrying): %s", exc)
                time.sleep(delay)
                delay = min(delay * 2, self.retry_max)

    # -- renewal --------------------------------------------------------------------

    def renew_at(self) -> datetime.datetime:
        m = self.state.material if self.state is not None else self.build()
        return m.not_before + datetime.timedelta(seconds=m.lifetime() * RENEW_AT)

    def renew_due(self) -> bool:
        """Past 2/3 of the leaf's lifetime with no new leaf (and not re-fetched already)."""
        if self.state is None:
            return False
        serial = self.state.material.leaf.serial_number
        return self.now() >= self.renew_at() and self._refetched != serial

    def leaf_wait(self) -> float:
        """The leaf query's wait: the configured one, cut short at the renewal time."""
        if self.state is None and self.built is None:
            return self.wait  # nothing to renew yet
        left = (self.renew_at() - self.now()).total_seconds()
        return max(1.0, min(self.wait, left))

    # -- the watches ----------------------------------------------------------------

    def start(self, state: TlsState, loop: Scheduler) -> None:
        super().start(state, loop)
        for kind in ("roots", "leaf"):
            self._tasks.append(asyncio.ensure_future(self._watch(kind)))

    def close(self) -> None:
        super().close()
        for task in self._tasks:
            task.cancel()
        client, self._client = self._client, None
        if isinstance(client, consul.aio.Consul):
            with contextlib.suppress(RuntimeError):  # no loop: nothing was ever opened
                self._closing = asyncio.get_running_loop().create_task(client.close())

    async def _watch(self, kind: Kind) -> None:
        delay = _RETRY_FIRST
        bucket = _Pace(self.max_queries_per_second, self._monotonic)
        while not self._closed:
            paced = bucket.delay()
            if paced > 0:
                await self._sleep(paced)
                if self._closed:
                    return
            pause = await self.step(kind)
            if pause:
                await self._sleep(delay)
                delay = min(delay * 2, self.retry_max)
            else:
                delay = _RETRY_FIRST

    async def step(self, kind: Kind) -> bool:
        """One query and its answer put to use; True if it failed (back off)."""
        due = kind == "leaf" and self.renew_due()
        index = 0 if due else self.index[kind]
        wait = self.leaf_wait() if kind == "leaf" else self.wait
        try:
            async with asyncio.timeout(wait + self.request_timeout):
                got, data = await self._consul().http.get(
                    CB.json(index=True, allow_404=False),
                    self._path(kind),
                    params=self._params(index, wait),
                    headers=self._headers(),
                )
        except (*_ERRORS, TimeoutError) as exc:
            self._failed(f"{self._path(kind)}: {type(exc).__name__}: {exc}")
            return True
        if self._down:
            self._down = False
            log.warning("Consul agent CA reachable again")
        self.index[kind] = _next_index(self.index[kind], got)
        try:
            changed = self.take(kind, data)
            if changed and self.state is not None:
                self.state.update(self.build())
                self.updates += 1
        except MaterialError as exc:
            self._failed(f"an answer that cannot be used (keeping the material in use): {exc}")
            return True
        if due and self.state is not None and not changed:
            self._refetched = self.state.material.leaf.serial_number
        return False

    def _failed(self, why: str) -> None:
        self.failures += 1
        if self.on_failure is not None:
            self.on_failure()
        if not self._down:
            self._down = True
            log.error("Consul agent CA query failed (keeping the material in use): %s", why)
        else:
            log.debug("Consul agent CA query failed again: %s", why)
        self.check_expiry()


class _Pace:
    """A token bucket (burst 2) by an injected clock: how long to wait before a query.
    (The discovery backend has its own; importing it here would tie config to discovery.)"""

    def __init__(self, rate: float, now: Callable[[], float]) -> None:
        self._rate, self._now = rate, now
        self._tokens, self._last = 2.0, now()

    def delay(self) -> float:
        now = self._now()
        self._tokens = min(2.0, self._tokens + (now - self._last) * self._rate) - 1
        self._last = now
        return 0.0 if self._tokens >= 0 else -self._tokens / self._rate


def _next_index(previous: int, returned: object) -> int:
    # Consul's rules: reset when the index goes backwards, never below 1.
    try:
        index = int(str(returned))
    except ValueError:
        return 0
    return 0 if index < previous else max(index, 1)


async def authorize(
    client: Any, target: str, client_uri: str, client_serial: str, token: str = ""
) -> tuple[bool, str]:
    """Consul intentions' verdict on `client_uri` calling `target`, through the agent's
    `PUT /v1/agent/connect/authorize` (py-consul's `agent.connect.authorize`): whether
    the call is authorized and the agent's reason. Errors are the caller's to map (a
    sidecar deciding inbound calls by it fails closed)."""
    answer = await client.agent.connect.authorize(
        target, client_uri, client_serial, token=token or None
    )
    if not isinstance(answer, dict) or not isinstance(answer.get("Authorized"), bool):
        raise ConsulCaError(f"/v1/agent/connect/authorize: not an answer: {answer!r}")
    reason = answer.get("Reason")
    return answer["Authorized"], reason if isinstance(reason, str) else ""
