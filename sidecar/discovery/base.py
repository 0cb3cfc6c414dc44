"""The discovery interface every backend implements, and the value types it speaks.

A backend keeps, for every service it knows, the current set of healthy endpoints
(the addresses of the target sidecars' inbound listeners) and tells subscribers
when a set changes. Calls never ask the backend anything on their own path: they
read the cluster's endpoint set, which the backend's watch keeps current.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field

# mTLS: the metadata key naming the SPIFFE ID an instance runs as (its `service.meta`).
IDENTITY_META = "spiffe_id"


def registered_identity(endpoint: Endpoint) -> str:
    """The SPIFFE ID the registry entry names for `endpoint`, or ""."""
    for key, value in endpoint.meta:
        if key == IDENTITY_META:
            return value
    return ""


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: str
    port: int
    zone: str = ""
    weight: int = 1
    instance_id: str = ""
    # The backend's metadata of the instance as (key, value) pairs, which route rules'
    # subsets select on (docs/traffic.md says where each backend's comes from). Not part
    # of the endpoint's identity: relabelled, it is the same peer (its outlier state and
    # active count stay); backends tell a change of it with `same_endpoints`.
    meta: frozenset[tuple[str, str]] = field(default=frozenset(), compare=False)
    # Worked out once: every call hashes its endpoint several times (balancer, active
    # counts, outlier records) and names it in a header and the access log.
    address: str = field(init=False, repr=False, compare=False)
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "address", f"{self.host}:{self.port}")
        fields = (self.host, self.port, self.zone, self.weight, self.instance_id)
        object.__setattr__(self, "_hash", hash(fields))

    def __hash__(self) -> int:
        return self._hash


@dataclass(frozen=True, slots=True)
class Instance:
    """What a sidecar registers for its local app."""

    service: str
    instance_id: str
    host: str
    port: int
    zone: str = ""
    protocol: str = "h2c"
    tags: tuple[str, ...] = ()
    meta: dict[str, str] = field(default_factory=dict)


def endpoint_meta(meta: object = None, tags: object = None) -> frozenset[tuple[str, str]]:
    """An endpoint's metadata from a backend's own form: a mapping of strings (Consul's
    Meta, Nacos's metadata, a registry record's meta) and a list of tags (Consul's Tags,
    the record's tags), a tag `k=v` read as `k: v` and a bare tag `t` as `t: "true"`. The
    mapping wins over a tag of the same key; entries that are not strings are skipped."""
    pairs: dict[str, str] = {}
    if isinstance(tags, list | tuple):
        for tag in tags:
            if isinstance(tag, str) and tag:
                key, sep, value = tag.partition("=")
                pairs[key] = value if sep else "true"
    if isinstance(meta, dict):
        for key, value in meta.items():
            if isinstance(key, str) and isinstance(value, str):
                pairs[key] = value
    return frozenset(pairs.items())


def same_endpoints(before: tuple[Endpoint, ...] | None, after: tuple[Endpoint, ...] | None) -> bool:
    """The same endpoints with the same metadata (what a backend need not announce)."""
    if before != after:
        return False
    if before is None or after is None:
        return True
    return all(a.meta == b.meta for a, b in zip(before, after, strict=True))


# Called with (service, endpoints) whenever a service's endpoint set changes.
EndpointsListener = Callable[[str, tuple[Endpoint, ...]], None]


class Discovery(abc.ABC):
    """A discovery backend.

    `start()` returns once the first sync is done (readiness waits on it). After
    that, `endpoints()` and `services()` answer from memory, and subscribers hear
    about every change to a service's endpoint set.
    """

    def __init__(self) -> None:
        self._listeners: dict[str, list[EndpointsListener]] = {}

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop watching. Does not deregister: call `deregister()` first."""

    @abc.abstractmethod
    def services(self) -> frozenset[str]:
        """Names of every service the backend knows, with or without endpoints."""

    @abc.abstractmethod
    def endpoints(self, service: str) -> tuple[Endpoint, ...] | None:
        """Healthy endpoints of `service`; None when the service is unknown."""

    @abc.abstractmethod
    async def register(self, instance: Instance) -> None:
        """Register the local app and keep it registered (heartbeats) until deregistered."""

    @abc.abstractmethod
    async def deregister(self) -> None:
        """Remove the instance registered by `register()`, if any."""

    def refresh(self) -> None:
        """Re-read what can be re-read at once (a backend with a local view overrides it).

        Called after registering, so readiness is not reported before the sidecar
        sees its own instance."""
        return None

    def subscribe(self, service: str, listener: EndpointsListener) -> None:
        self._listeners.setdefault(service, []).append(listener)

    def unsubscribe(self, service: str, listener: EndpointsListener) -> None:
        listeners = self._listeners.get(service, [])
        if listener in listeners:
            listeners.remove(listener)

    def _notify(self, service: str, endpoints: tuple[Endpoint, ...]) -> None:
        for listener in tuple(self._listeners.get(service, ())):
            listener(service, endpoints)
