"""Property tests for header validation: the headers filter's config check, and the
HTTP/1.1 writer given header values no validated path should ever hand it."""

from __future__ import annotations

import asyncio
import re

from hypothesis import given, settings
from hypothesis import strategies as st

from filters.headers import HeadersConfig, HeadersFilter
from sidecar.adapters.h1server import H1ServerProtocol
from sidecar.config import Http2ServerConfig, LimitsConfig
from sidecar.messages import Request, Response, fixed_body
from sidecar.serving import ListenerContext, ResponseSink
from tests.unit.chain_helpers import make_call
from tests.unit.memtransport import attach

BOUNDED = settings(max_examples=100, deadline=1000)
TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
text = st.text(st.characters(codec="utf-8"), max_size=20) | st.sampled_from(
    ["a\r\nx-injected: 1", "a\nb", "a\rb", "a\x00b", "ok", "X-Ok"]
)


@BOUNDED
@given(st.dictionaries(text, text, max_size=4), st.lists(text, max_size=3))
def test_headers_config_accepts_only_safe_names_and_values(
    values: dict[str, str], remove: list[str]
) -> None:
    config = HeadersConfig(request_headers_to_set=values, response_headers_to_remove=tuple(remove))
    try:
        config.validate()
    except ValueError:
        return
    for name, value in values.items():
        assert TOKEN.fullmatch(name)
        assert not re.search(r"[\r\n\x00]", value)
    call = make_call()
    asyncio.run(HeadersFilter(config).on_request(call))
    for raw_name, raw_value in call.request.headers:
        assert b"\r" not in raw_name + raw_value and b"\n" not in raw_name + raw_value


async def _write(headers: list[tuple[bytes, bytes]]) -> bytes:
    async def handler(request: Request, sink: ResponseSink) -> None:
        await sink.send(Response(200, headers, fixed_body(b"ok")))

    proto = H1ServerProtocol(ListenerContext("t", handler, Http2ServerConfig(), LimitsConfig()))
    transport = attach(proto)
    proto.data_received(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    for _ in range(100):
        if transport.data:
            break
        await asyncio.sleep(0)
    return transport.data


@settings(max_examples=50, deadline=1000)
@given(st.sampled_from([b"\r\nx-injected: 1", b"a\nx-injected: 1", b"a\rb"]))
def test_h1_writer_never_emits_cr_or_lf_from_a_header_value(value: bytes) -> None:
    written = asyncio.run(_write([(b"x-from-upstream", value)]))
    head = written.split(b"\r\n\r\n", 1)[0]
    assert b"x-injected" not in head and b"\n" not in head.replace(b"\r\n", b"")
    assert b"\r" not in head.replace(b"\r\n", b"")
