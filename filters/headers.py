"""The `headers` filter: add, set and remove request and response headers.

Applied in the order remove, set, add, on the request before it goes on and on the
response on its way back. Names are lower-cased (HTTP/2 requires it). A value holding
CR, LF or NUL would let a config smuggle extra headers onto the wire, so it is refused
when the config is loaded, naming the header.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from sidecar.sdk import Call, Filter, FilterContext, FilterFactory, Headers, Response

_FORBIDDEN_VALUE = re.compile(r"[\r\n\x00]")
# RFC 9110 5.6.2 token characters.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


@dataclass(frozen=True, slots=True)
class HeadersConfig:
    request_headers_to_add: dict[str, str] = field(default_factory=dict)  # appended
    request_headers_to_set: dict[str, str] = field(default_factory=dict)  # replace any
    request_headers_to_remove: tuple[str, ...] = ()
    response_headers_to_add: dict[str, str] = field(default_factory=dict)
    response_headers_to_set: dict[str, str] = field(default_factory=dict)
    response_headers_to_remove: tuple[str, ...] = ()

    def validate(self) -> None:
        for key in ("request_headers_to_add", "request_headers_to_set"):
            _check_values(key, getattr(self, key))
        for key in ("response_headers_to_add", "response_headers_to_set"):
            _check_values(key, getattr(self, key))
        for key in ("request_headers_to_remove", "response_headers_to_remove"):
            for name in getattr(self, key):
                _check_name(key, name)


def _check_name(key: str, name: str) -> None:
    if not _TOKEN.fullmatch(name):
        raise ValueError(f"{key}: {name!r} is not a valid header name")


def _check_values(key: str, headers: dict[str, str]) -> None:
    seen: set[str] = set()
    for name, value in headers.items():
        _check_name(key, name)
        if name.lower() in seen:
            raise ValueError(f"{key}: header {name!r} is given twice (names are case-blind)")
        seen.add(name.lower())
        if _FORBIDDEN_VALUE.search(value):
            raise ValueError(f"{key}: the value of header {name!r} contains CR, LF or NUL")


@dataclass(frozen=True, slots=True)
class _Edits:
    """One side's edits, encoded once at build time."""

    remove: frozenset[bytes]
    set: tuple[tuple[bytes, bytes], ...]
    add: tuple[tuple[bytes, bytes], ...]

    @classmethod
    def of(cls, add: dict[str, str], set_: dict[str, str], remove: tuple[str, ...]) -> _Edits:
        return cls(
            frozenset(n.lower().encode() for n in remove),
            tuple((n.lower().encode(), v.encode()) for n, v in set_.items()),
            tuple((n.lower().encode(), v.encode()) for n, v in add.items()),
        )

    def apply(self, headers: Headers) -> None:
        # Setting a header is removing every copy of it and adding one.
        drop = self.remove | {name for name, _ in self.set}
        if drop:
            headers[:] = [(n, v) for n, v in headers if n not in drop]
        headers.extend(self.set)
        headers.extend(self.add)


class HeadersFilter(Filter):
    def __init__(self, config: HeadersConfig) -> None:
        self.request = _Edits.of(
            config.request_headers_to_add,
            config.request_headers_to_set,
            config.request_headers_to_remove,
        )
        self.response = _Edits.of(
            config.response_headers_to_add,
            config.response_headers_to_set,
            config.response_headers_to_remove,
        )

    async def on_request(self, call: Call) -> Response | None:
        self.request.apply(call.request.headers)
        return None

    async def on_response(self, call: Call, response: Response) -> Response:
        self.response.apply(response.headers)
        return response


def _build(config: HeadersConfig, ctx: FilterContext) -> Filter:
    return HeadersFilter(config)


factory = FilterFactory(HeadersConfig, _build)
