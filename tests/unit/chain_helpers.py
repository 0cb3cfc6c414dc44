"""Test-only filters and stand-ins for the filter chain's unit tests (no sockets).

These are never in the built-in registry: tests reach them by constructing them directly,
or by pointing a patched `opus.filters` entry point at `recorder_factory` here. The
filters a sidecar *process* loads live in tests/fixtures/opus-filter-example instead.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from importlib.metadata import EntryPoint, EntryPoints

from sidecar.call import Call, Next
from sidecar.chain import Filter, FilterContext, FilterFactory, compose
from sidecar.discovery.base import Endpoint
from sidecar.errors import MeshError
from sidecar.messages import Body, Headers, Request, Response, fixed_body
from sidecar.metrics import Metrics


def make_request(
    body: bytes = b"",
    headers: Headers | None = None,
    path: bytes = b"/echo",
    method: bytes = b"POST",
) -> Request:
    return Request(method, path, b"inventory", list(headers or []), fixed_body(body))


def streamed(chunks: Iterable[bytes]) -> Body:
    """A body that arrives in several chunks, as a connection would feed it."""
    body = Body()
    for chunk in chunks:
        body.feed(chunk)
    body.finish()
    return body


def make_call(
    body: bytes = b"",
    headers: Headers | None = None,
    max_body_bytes: int = 1024,
    request: Request | None = None,
) -> Call:
    req = request if request is not None else make_request(body, headers)
    return Call(req, "outbound", "inventory", b"inventory", req.path, max_body_bytes)


def named(flt: Filter, name: str) -> Filter:
    """What build_filters does with the name from the chain config."""
    flt.name = name
    return flt


class Terminal:
    """Stands in for the router: records each call it gets, answers 200 with the body it read."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.headers: list[Headers] = []

    async def __call__(self, call: Call) -> Response:
        parts = []
        while chunk := await call.request.body.read():
            parts.append(chunk)
        self.bodies.append(b"".join(parts))
        self.headers.append(list(call.request.headers))
        call._endpoint = Endpoint("127.0.0.1", 9)  # as the router records it
        return Response(200, [(b"x-terminal", b"yes")], fixed_body(b"from upstream"))

    @property
    def calls(self) -> int:
        return len(self.bodies)


class Recorder(Filter):
    """Appends `>tag` on the way in and `<tag` on the way out to a shared journal."""

    def __init__(self, tag: str, journal: list[str]) -> None:
        self.tag = tag
        self.journal = journal

    async def on_request(self, call: Call) -> Response | None:
        self.journal.append(f">{self.tag}")
        call.set_header(b"x-chain", self.tag.encode())
        return None

    async def on_response(self, call: Call, response: Response) -> Response:
        self.journal.append(f"<{self.tag}")
        response.headers.append((b"x-seen-by", self.tag.encode()))
        return response


class LocalReply(Filter):
    """Answers every call itself, the way an auth or rate-limit filter refuses one."""

    def __init__(self, status: int = 418, journal: list[str] | None = None) -> None:
        self.status = status
        self.journal = journal if journal is not None else []

    async def on_request(self, call: Call) -> Response | None:
        self.journal.append(">local")
        return call.reply(self.status, b"answered locally")


class Raising(Filter):
    """Raises a plain exception on calls that carry `x-explode` (on the given phase)."""

    def __init__(self, phase: str = "request") -> None:
        self.phase = phase

    async def on_request(self, call: Call) -> Response | None:
        if self.phase == "request" and call.header(b"x-explode") is not None:
            raise RuntimeError("boom on the request")
        return None

    async def on_response(self, call: Call, response: Response) -> Response:
        if self.phase == "response" and call.header(b"x-explode") is not None:
            raise RuntimeError("boom on the response")
        return response


class Refusing(Filter):
    """Raises the mesh's own error, which carries the status the caller should see."""

    async def on_request(self, call: Call) -> Response | None:
        raise MeshError("slow down", status=429, service=call.service)


class BufferAndResend(Filter):
    """Buffers the request body, then sends the call twice (as a retry filter would),
    rewinding the body in between the way the router does for a safe resend."""

    async def handle(self, call: Call, next: Next) -> Response:
        call.attrs["body"] = await call.read_body()
        first = await next(call)
        first.body.cancel()
        call.attrs["rewound"] = call.request.body.rewind()
        return await next(call)


def chain(
    filters: list[tuple[str, Filter]], terminal: Next, metrics: Metrics | None = None
) -> Next:
    return compose([named(f, n) for n, f in filters], terminal, metrics)


async def read_response(response: Response) -> bytes:
    parts = []
    while chunk := await response.body.read():
        parts.append(chunk)
    return b"".join(parts)


async def read_json(response: Response) -> dict[str, object]:
    data: dict[str, object] = json.loads(await read_response(response))
    return data


# --- A configurable test filter, for config validation and per-service/route chains ---


@dataclass(frozen=True, slots=True)
class TagConfig:
    tag: str
    repeat: int = 1

    def validate(self) -> None:
        if not self.tag.isidentifier():
            raise ValueError(f"tag must be an identifier, got {self.tag!r}")


class TagFilter(Filter):
    """Sets `x-chain: <tag>` on the request, so a test can tell which chain ran, and
    `x-chain-calls` to the calls this instance has seen (its per-chain state)."""

    def __init__(self, config: TagConfig) -> None:
        self.value = ",".join([config.tag] * config.repeat).encode()
        self.calls = 0

    async def on_request(self, call: Call) -> Response | None:
        self.calls += 1
        call.set_header(b"x-chain", self.value)
        call.set_header(b"x-chain-calls", str(self.calls).encode())
        return None


def _build_tag(config: TagConfig, ctx: FilterContext) -> Filter:
    return TagFilter(config)


tag_factory = FilterFactory(TagConfig, _build_tag)


def fake_entry_points(**targets: str) -> EntryPoints:
    """`opus.filters` entry points as an installed distribution would declare them."""
    return EntryPoints(EntryPoint(name, target, "opus.filters") for name, target in targets.items())
