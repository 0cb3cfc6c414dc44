"""The schema of the inbound authorization policy (docs/security.md, "Authorization
policy"): rules with an action, who may call (`from`) and what (`to`), Istio's
AuthorizationPolicy semantics. The rules are compiled and checked in sidecar/authz.py."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sidecar.config.routerules import HeaderMatch

AuthzAction = Literal["ALLOW", "DENY"]


@dataclass(frozen=True, slots=True)
class AuthzSource:
    """A caller: one of the identities (an exact SPIFFE ID, or a prefix ending in `*`),
    one of the services (`spiffe://<tls.trust_domain>/svc/<name>`, or the service's
    `services.<name>.identity`), or, with `unauthenticated: true`, a plaintext caller
    with no identity (permissive mode, or `tls.mode: disable`)."""

    identities: tuple[str, ...] = ()
    services: tuple[str, ...] = ()
    unauthenticated: bool = False


@dataclass(frozen=True, slots=True)
class AuthzOperation:
    """What is called: every list given must match (methods, paths, grpc), any of a
    list's entries. Paths are exact or prefixes ending in `*`, the query excluded; grpc
    entries are `pkg.Service/Method` or `pkg.Service/*`, for gRPC calls only."""

    methods: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    grpc: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class AuthzRule:
    """Matches a call when any `from` entry matches its caller (none: any caller), any
    `to` entry matches its request (none: any request) and every header condition holds."""

    name: str
    action: AuthzAction = "ALLOW"
    from_: tuple[AuthzSource, ...] = ()  # `from` in the YAML (a Python keyword)
    to: tuple[AuthzOperation, ...] = ()
    headers: tuple[HeaderMatch, ...] = ()


@dataclass(frozen=True, slots=True)
class IntentionsConfig:
    """Consul intentions deciding inbound calls (`source: consul`), through the agent
    `tls.consul.address` names: `PUT /v1/agent/connect/authorize` with the caller's
    verified SPIFFE ID, once per caller per `cache_ttl`. Fails closed: a caller the agent
    cannot be asked about (and has no earlier verdict) is denied."""

    source: Literal["", "consul"] = ""  # "": no intentions (the local rules alone)
    cache_ttl: float = 10.0  # seconds a verdict is reused for the same caller identity
    max_cached: int = 4096  # caller identities whose verdicts are kept
    timeout: float = 2.0  # an ask of the agent, seconds; past it, as an agent error
    # After an agent error, a caller's last verdict is reused for up to this long.
    stale_for: float = 300.0


@dataclass(frozen=True, slots=True)
class AuthorizationConfig:
    """No rules: every call is allowed, at no cost per call. DENY rules are tried first;
    when any ALLOW rule exists, a call no ALLOW rule matches is denied. With
    `intentions.source: consul`, a call the rules allow must be allowed by Consul's
    intentions too."""

    rules: tuple[AuthzRule, ...] = ()
    intentions: IntentionsConfig = IntentionsConfig()
