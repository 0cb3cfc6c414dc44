"""A route rule's `match`, compiled once per config into checks over the request.

Each condition is one small object with `holds(request, path)`; a rule matches when all
of its conditions hold. Regexes are compiled here, once, and match the whole value (as
Envoy's and Istio's do). Errors name the config key.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl

from sidecar.typedconfig import ConfigError, show

if TYPE_CHECKING:
    from sidecar.config.routerules import HeaderMatch, PathMatch, QueryMatch, RouteMatch
    from sidecar.messages import Request

# RFC 9110 5.6.2 token characters (header names, methods).
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def _regex(pattern: str, key: str) -> re.Pattern[bytes]:
    try:
        return re.compile(pattern.encode())
    except re.error as exc:
        raise ConfigError(key, f"is not a valid regular expression: {exc}") from None


def _only_path(path: bytes) -> bytes:
    query = path.find(b"?")
    return path if query < 0 else path[:query]


class Facts:
    """One call as its rules test it: the request, the path matched (with its query) and,
    made on first use and shared by every rule tried, its headers by name (repeated
    ones joined with ',', as RFC 9110 5.3 allows) and its query parameters."""

    __slots__ = ("_headers", "_query", "only_path", "path", "request")

    def __init__(self, request: Request, path: bytes) -> None:
        self.request = request
        self.path = path
        self.only_path = _only_path(path)
        self._headers: dict[bytes, bytes] | None = None
        self._query: dict[str, str] | None = None

    def header(self, name: bytes) -> bytes | None:
        headers = self._headers
        if headers is None:
            headers = self._headers = {}
            for key, value in self.request.headers:
                seen = headers.get(key)
                headers[key] = value if seen is None else seen + b"," + value
        return headers.get(name)

    def query(self, name: str) -> str | None:
        """The parameter's first value ("" for `?flag`); None when absent."""
        query = self._query
        if query is None:
            query = self._query = {}
            at = self.path.find(b"?")
            if at >= 0:
                text = self.path[at + 1 :].decode("latin-1")
                for key, value in parse_qsl(text, keep_blank_values=True):
                    query.setdefault(key, value)
        return query.get(name)


class _Exact:
    __slots__ = ("value",)

    def __init__(self, value: bytes) -> None:
        self.value = value

    def holds(self, facts: Facts) -> bool:
        return facts.only_path == self.value


class _Prefix:
    __slots__ = ("value",)

    def __init__(self, value: bytes) -> None:
        self.value = value

    def holds(self, facts: Facts) -> bool:
        return facts.path.startswith(self.value)


class _PathRegex:
    __slots__ = ("regex",)

    def __init__(self, regex: re.Pattern[bytes]) -> None:
        self.regex = regex

    def holds(self, facts: Facts) -> bool:
        return self.regex.fullmatch(facts.only_path) is not None


class _Methods:
    __slots__ = ("methods",)

    def __init__(self, methods: frozenset[bytes]) -> None:
        self.methods = methods

    def holds(self, facts: Facts) -> bool:
        return facts.request.method in self.methods


class _Header:
    __slots__ = ("exact", "name", "prefix", "present", "regex")

    def __init__(
        self,
        name: bytes,
        *,
        exact: bytes | None = None,
        prefix: bytes | None = None,
        regex: re.Pattern[bytes] | None = None,
        present: bool = True,
    ) -> None:
        self.name = name
        self.exact = exact
        self.prefix = prefix
        self.regex = regex
        self.present = present

    def holds(self, facts: Facts) -> bool:
        value = facts.header(self.name)
        if value is None:
            return not self.present
        if not self.present:
            return False
        if self.exact is not None:
            return value == self.exact
        if self.prefix is not None:
            return value.startswith(self.prefix)
        if self.regex is not None:
            return self.regex.fullmatch(value) is not None
        return True


class _Query:
    __slots__ = ("exact", "name", "regex")

    def __init__(
        self, name: str, exact: str | None = None, regex: re.Pattern[bytes] | None = None
    ) -> None:
        self.name = name
        self.exact = exact
        self.regex = regex

    def holds(self, facts: Facts) -> bool:
        value = facts.query(self.name)
        if value is None:
            return False
        if self.exact is not None:
            return value == self.exact
        if self.regex is not None:
            return self.regex.fullmatch(value.encode("latin-1")) is not None
        return True


class _Grpc:
    __slots__ = ("method", "service")

    def __init__(self, service: bytes, method: bytes) -> None:
        self.service = service
        self.method = method

    def holds(self, facts: Facts) -> bool:
        if facts.only_path[:1] != b"/" or not facts.request.is_grpc:
            return False
        service, _, method = facts.only_path[1:].partition(b"/")
        return service == self.service and (not self.method or method == self.method)


_Condition = _Exact | _Prefix | _PathRegex | _Methods | _Header | _Query | _Grpc


class Matcher:
    """A compiled `match`: every condition must hold."""

    __slots__ = ("conditions",)

    def __init__(self, conditions: tuple[_Condition, ...]) -> None:
        self.conditions = conditions

    def holds(self, facts: Facts) -> bool:
        # A loop, not all() over a generator: this runs for every rule tried on a call.
        for condition in self.conditions:  # noqa: SIM110
            if not condition.holds(facts):
                return False
        return True

    def matches(self, request: Request, path: bytes) -> bool:
        """One rule alone (a table shares one Facts among the rules it tries)."""
        return self.holds(Facts(request, path))


def compile_match(match: RouteMatch, key: str) -> Matcher:
    """`key` is the match's own (`route_rules[0].match`); errors name the field under it."""
    conditions: list[_Condition] = []
    if match.path is not None:
        conditions.append(_path(match.path, f"{key}.path"))
    if match.methods:
        for i, method in enumerate(match.methods):
            if not _TOKEN.fullmatch(method):
                raise ConfigError(f"{key}.methods[{i}]", f"is not an HTTP method: {show(method)}")
        conditions.append(_Methods(frozenset(m.upper().encode() for m in match.methods)))
    for i, header in enumerate(match.headers):
        conditions.append(_header(header, f"{key}.headers[{i}]"))
    for i, query in enumerate(match.query):
        conditions.append(_query(query, f"{key}.query[{i}]"))
    if match.grpc is not None:
        grpc = match.grpc
        if not grpc.service:
            raise ConfigError(f"{key}.grpc.service", "must name a gRPC service (pkg.Service)")
        for name, value in (("service", grpc.service), ("method", grpc.method)):
            if "/" in value or "?" in value:
                raise ConfigError(
                    f"{key}.grpc.{name}", f"must not hold '/' or '?', got {show(value)}"
                )
        conditions.append(_Grpc(grpc.service.encode(), grpc.method.encode()))
    return Matcher(tuple(conditions))


def compile_headers(headers: tuple[HeaderMatch, ...], key: str) -> Matcher:
    """Header conditions alone (the authorization rules'), errors naming `key.headers[i]`."""
    return Matcher(tuple(_header(h, f"{key}.headers[{i}]") for i, h in enumerate(headers)))


def _path(path: PathMatch, key: str) -> _Exact | _Prefix | _PathRegex:
    given = [name for name in ("exact", "prefix", "regex") if getattr(path, name)]
    if len(given) != 1:
        raise ConfigError(key, "must set exactly one of exact, prefix and regex")
    if path.regex:
        return _PathRegex(_regex(path.regex, f"{key}.regex"))
    name = given[0]
    value: str = getattr(path, name)
    if not value.startswith("/"):
        raise ConfigError(f"{key}.{name}", f"must start with '/', got {show(value)}")
    return _Exact(value.encode()) if name == "exact" else _Prefix(value.encode())


def _header(header: HeaderMatch, key: str) -> _Header:
    if not _TOKEN.fullmatch(header.name):
        raise ConfigError(f"{key}.name", f"is not a valid header name: {show(header.name)}")
    name = header.name.lower().encode()
    given = [
        n
        for n in ("exact", "prefix", "regex", "present", "absent")
        if getattr(header, n) not in (None, False)
    ]
    if len(given) != 1:
        raise ConfigError(
            key, "must set exactly one of exact, prefix, regex, present: true and absent: true"
        )
    if header.exact is not None:
        return _Header(name, exact=header.exact.encode("latin-1"))
    if header.prefix is not None:
        return _Header(name, prefix=header.prefix.encode("latin-1"))
    if header.regex is not None:
        return _Header(name, regex=_regex(header.regex, f"{key}.regex"))
    return _Header(name, present=header.present)


def _query(query: QueryMatch, key: str) -> _Query:
    if not query.name:
        raise ConfigError(f"{key}.name", "must name a query parameter")
    given = [n for n in ("exact", "regex", "present") if getattr(query, n) not in (None, False)]
    if len(given) != 1:
        raise ConfigError(key, "must set exactly one of exact, regex and present: true")
    if query.regex is not None:
        return _Query(query.name, regex=_regex(query.regex, f"{key}.regex"))
    return _Query(query.name, exact=query.exact)
