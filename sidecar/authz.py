"""Inbound authorization policy, Istio AuthorizationPolicy semantics: the rules of
`authorization.rules` (sidecar/config/authz.py) compiled once per config into a
`Policy`, and the step the inbound chain runs first when there are rules.

A call is denied when a DENY rule matches it; else allowed when an ALLOW rule matches it
or there is no ALLOW rule at all; else denied (default deny). The caller is its verified
SPIFFE ID (mTLS), or nobody (a plaintext caller). A denied call gets 403 (gRPC:
PERMISSION_DENIED) naming the rule, and nothing reaches the app. With no rules there is
no step: the chain, and the cost of a call, are what they were.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import TYPE_CHECKING

from sidecar.call import Call, Next
from sidecar.errors import MeshError, error_response
from sidecar.messages import Request, Response
from sidecar.traffic.match import Facts, Matcher, compile_headers
from sidecar.typedconfig import ConfigError, show

if TYPE_CHECKING:
    from prometheus_client import Counter

    from sidecar.config.authz import AuthzOperation, AuthzRule, AuthzSource
    from sidecar.config.schema import SidecarConfig

log = logging.getLogger("sidecar.authz")

# What the metric and the reply name when no ALLOW rule matched.
NO_ALLOW_RULE = "(no allow rule)"

_RULE_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_SERVICE_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?")
_GRPC_PART = re.compile(r"[A-Za-z0-9_.]+")

Identify = Callable[[Request], str]  # the caller's verified SPIFFE ID; "" for none


class AuthorizationDenied(MeshError):
    status = 403
    flag = "RBAC"  # Envoy's response flag for a call its RBAC filter denied


class _Source:
    """A compiled `from` entry."""

    __slots__ = ("exact", "prefixes", "unauthenticated")

    def __init__(self, exact: frozenset[str], prefixes: tuple[str, ...], unauth: bool) -> None:
        self.exact = exact
        self.prefixes = prefixes
        self.unauthenticated = unauth

    def holds(self, identity: str) -> bool:
        if not identity:
            return self.unauthenticated
        return identity in self.exact or identity.startswith(self.prefixes)


class _Operation:
    """A compiled `to` entry; an empty set or tuple matches anything."""

    __slots__ = ("exact_paths", "grpc", "methods", "path_prefixes")

    def __init__(
        self,
        methods: frozenset[bytes],
        exact_paths: frozenset[bytes],
        path_prefixes: tuple[bytes, ...],
        grpc: tuple[tuple[bytes, bytes], ...],
    ) -> None:
        self.methods = methods
        self.exact_paths = exact_paths
        self.path_prefixes = path_prefixes
        self.grpc = grpc

    def holds(self, request: Request, path: bytes) -> bool:
        if self.methods and request.method.upper() not in self.methods:
            return False
        if (self.exact_paths or self.path_prefixes) and not (
            path in self.exact_paths or (self.path_prefixes and path.startswith(self.path_prefixes))
        ):
            return False
        if self.grpc:
            if path[:1] != b"/" or not request.is_grpc:
                return False
            service, _, method = path[1:].partition(b"/")
            return any(service == s and (not m or method == m) for s, m in self.grpc)
        return True


class Rule:
    """A compiled rule: who (any source), what (any operation), and every header condition."""

    __slots__ = ("action", "headers", "name", "operations", "sources")

    def __init__(
        self,
        name: str,
        action: str,
        sources: tuple[_Source, ...],
        operations: tuple[_Operation, ...],
        headers: Matcher | None,
    ) -> None:
        self.name = name
        self.action = action
        self.sources = sources
        self.operations = operations
        self.headers = headers

    def matches(self, request: Request, path: bytes, identity: str) -> bool:
        if self.sources and not any(s.holds(identity) for s in self.sources):
            return False
        if self.operations and not any(o.holds(request, path) for o in self.operations):
            return False
        return self.headers is None or self.headers.holds(Facts(request, path))


class Policy:
    """The compiled rules: `decide` gives the name of the rule that denies a call, or None."""

    __slots__ = ("allow", "deny")

    def __init__(self, rules: tuple[Rule, ...]) -> None:
        self.deny = tuple(r for r in rules if r.action == "DENY")
        self.allow = tuple(r for r in rules if r.action == "ALLOW")

    def decide(self, request: Request, identity: str) -> str | None:
        path = request.path
        query = path.find(b"?")
        if query >= 0:
            path = path[:query]
        if path[:1] == b"/" and (b"%" in path or b"/." in path or b"//" in path):
            path = normalize_path(path)
        for rule in self.deny:
            if rule.matches(request, path, identity):
                return rule.name
        if not self.allow:
            return None
        for rule in self.allow:
            if rule.matches(request, path, identity):
                return None
        return NO_ALLOW_RULE


_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_PERCENT = re.compile(rb"%([0-9A-Fa-f]{2})")


def _decode_unreserved(match: re.Match[bytes]) -> bytes:
    byte = int(match.group(1), 16)
    return bytes((byte,)) if byte in _UNRESERVED else match.group(0).upper()


def normalize_path(path: bytes) -> bytes:
    """The path the rules are matched against, so that `/public/../admin` or
    `/%61dmin` cannot pass for something else: unreserved characters percent-decoded
    (RFC 3986 6.2.2.2), repeated slashes merged, `.` and `..` segments removed (5.2.4).
    An encoded `/` (`%2F`) stays encoded: it is not a segment boundary here."""
    if b"%" in path:
        path = _PERCENT.sub(_decode_unreserved, path)
    out: list[bytes] = []
    segments = path.split(b"/")
    for segment in segments[1:]:
        if segment == b"..":
            if out:
                out.pop()
        elif segment and segment != b".":
            out.append(segment)
    trailing = segments[-1] in (b"", b".", b"..") and len(segments) > 2
    return b"/" + b"/".join(out) + (b"/" if trailing and out else b"")


def compile_policy(cfg: SidecarConfig) -> Policy | None:
    """The config's policy, None without rules; a ConfigError names the rule's key."""
    rules = cfg.authorization.rules
    if not rules:
        return None
    names: dict[str, str] = {}
    compiled = []
    for i, rule in enumerate(rules):
        key = f"authorization.rules[{i}]"
        if not _RULE_NAME.fullmatch(rule.name):
            raise ConfigError(
                f"{key}.name", f"must be letters, digits, '-', '_' and '.', got {show(rule.name)}"
            )
        if rule.name in names:
            raise ConfigError(
                f"{key}.name", f"{show(rule.name)} is already the name of {names[rule.name]}"
            )
        names[rule.name] = key
        compiled.append(_compile_rule(cfg, key, rule))
    return Policy(tuple(compiled))


def _compile_rule(cfg: SidecarConfig, key: str, rule: AuthzRule) -> Rule:
    sources = tuple(_source(cfg, f"{key}.from[{j}]", s) for j, s in enumerate(rule.from_))
    operations = tuple(_operation(f"{key}.to[{j}]", o) for j, o in enumerate(rule.to))
    headers = None
    if rule.headers:
        # The route rules' header conditions, compiled the same way.
        headers = compile_headers(rule.headers, key)
    return Rule(rule.name, rule.action, sources, operations, headers)


def _source(cfg: SidecarConfig, key: str, source: AuthzSource) -> _Source:
    if not (source.identities or source.services or source.unauthenticated):
        raise ConfigError(key, "must set identities, services or unauthenticated: true")
    exact: set[str] = set()
    prefixes: list[str] = []
    for i, identity in enumerate(source.identities):
        where = f"{key}.identities[{i}]"
        if not identity.startswith("spiffe://") or "*" in identity[:-1]:
            raise ConfigError(
                where,
                "must be a SPIFFE ID (spiffe://<trust-domain>/...) or a prefix of one ending "
                f"in '*', got {show(identity)}",
            )
        if identity.endswith("*"):
            prefixes.append(identity[:-1])
        else:
            exact.add(identity)
    for i, service in enumerate(source.services):
        where = f"{key}.services[{i}]"
        if not _SERVICE_NAME.fullmatch(service):
            raise ConfigError(where, f"is not a valid service name: {show(service)}")
        override = cfg.services.get(service)
        if override is not None and override.identity is not None:
            exact.add(override.identity)
        elif not cfg.tls.trust_domain:
            raise ConfigError(
                where,
                "names a service by its identity, spiffe://<tls.trust_domain>/svc/<name>: "
                "set tls.trust_domain (or services.<name>.identity)",
            )
        else:
            exact.add(f"spiffe://{cfg.tls.trust_domain}/svc/{service}")
    return _Source(frozenset(exact), tuple(prefixes), source.unauthenticated)


def _operation(key: str, operation: AuthzOperation) -> _Operation:
    for i, method in enumerate(operation.methods):
        if not _TOKEN.fullmatch(method):
            raise ConfigError(f"{key}.methods[{i}]", f"is not an HTTP method: {show(method)}")
    exact: set[bytes] = set()
    prefixes: list[bytes] = []
    for i, path in enumerate(operation.paths):
        if not path.startswith("/") or "*" in path[:-1] or "?" in path:
            raise ConfigError(
                f"{key}.paths[{i}]",
                f"must be a path starting with '/' (a prefix ending in '*'), got {show(path)}",
            )
        if path.endswith("*"):
            prefixes.append(path[:-1].encode())
        else:
            exact.add(path.encode())
    grpc: list[tuple[bytes, bytes]] = []
    for i, target in enumerate(operation.grpc):
        service, slash, method = target.partition("/")
        if (
            not slash
            or not _GRPC_PART.fullmatch(service)
            or not (method == "*" or _GRPC_PART.fullmatch(method))
        ):
            raise ConfigError(
                f"{key}.grpc[{i}]",
                f"must be pkg.Service/Method or pkg.Service/*, got {show(target)}",
            )
        grpc.append((service.encode(), b"" if method == "*" else method.encode()))
    return _Operation(
        frozenset(m.upper().encode() for m in operation.methods),
        frozenset(exact),
        tuple(prefixes),
        tuple(grpc),
    )


class AuthorizationStep:
    """The first step of the inbound chain when there are rules: a denied call is
    answered here, before any filter and the app see it."""

    __slots__ = ("denied", "identify", "next", "policy")

    def __init__(self, policy: Policy, identify: Identify, next: Next, denied: Counter) -> None:
        self.policy = policy
        self.identify = identify
        self.next = next
        self.denied = denied

    async def __call__(self, call: Call) -> Response:
        request = call.request
        identity = self.identify(request)
        rule = self.policy.decide(request, identity)
        if rule is None:
            return await self.next(call)
        self.denied.labels(rule).inc()
        who = identity or "a caller with no identity"
        if rule == NO_ALLOW_RULE:
            reason = f"denied by the authorization policy: no ALLOW rule matches {who}"
        else:
            reason = f"denied by authorization rule {rule!r} for {who}"
        log.debug("%s %s: %s", request.method.decode("latin-1"), call.path, reason)
        error = AuthorizationDenied(reason, service=call.service)
        call.record_error(error)
        call.note_local_reply("authz")
        return error_response(error, grpc=request.is_grpc)
