"""Two independent HTTP/1.1 parsers over the same bytes, for the differential tests:
httptools (llhttp, what the sidecar itself uses) and h11 (pure Python, written apart).

Each turns a byte stream into the requests it holds, or says why it cannot; a test
then asks that both agree and that they saw exactly one request."""

from __future__ import annotations

from dataclasses import dataclass, field

import h11
import httptools

Fields = list[tuple[bytes, bytes]]


@dataclass
class Parsed:
    method: bytes
    target: bytes
    headers: Fields
    body: bytes = b""
    trailers: Fields = field(default_factory=list)


class _Collect:
    def __init__(self) -> None:
        self.begun = 0
        self.done: list[Parsed] = []
        self.url = b""
        self.headers: Fields = []
        self.trailers: Fields = []
        self.body = b""
        self.in_trailers = False
        self.parser: httptools.HttpRequestParser | None = None

    def on_message_begin(self) -> None:
        self.begun += 1
        self.url, self.headers, self.trailers, self.body = b"", [], [], b""
        self.in_trailers = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        pair = (name.lower(), value.strip(b" \t"))
        (self.trailers if self.in_trailers else self.headers).append(pair)

    def on_headers_complete(self) -> None:
        self.in_trailers = True

    def on_body(self, data: bytes) -> None:
        self.body += data

    def on_message_complete(self) -> None:
        assert self.parser is not None
        method = self.parser.get_method()
        self.done.append(Parsed(method, self.url, self.headers, self.body, self.trailers))


def with_httptools(data: bytes) -> list[Parsed] | str:
    """The requests in `data` per httptools, or the error (a message left unfinished is one)."""
    collect = _Collect()
    parser = httptools.HttpRequestParser(collect)
    collect.parser = parser
    try:
        parser.feed_data(data)
    except httptools.HttpParserUpgrade:
        return "httptools: upgrade request"
    except httptools.HttpParserError as exc:
        return f"httptools: {exc}"
    if collect.begun != len(collect.done):
        return f"httptools: {collect.begun - len(collect.done)} request(s) left unfinished"
    return collect.done


def with_h11(data: bytes) -> list[Parsed] | str:
    """The requests in `data` per h11, or the error (bytes left unparsed are one)."""
    out: list[Parsed] = []
    while data:
        conn = h11.Connection(h11.SERVER)
        conn.receive_data(data)
        current: Parsed | None = None
        try:
            while True:
                event = conn.next_event()
                if isinstance(event, h11.Request):
                    headers = [(bytes(n), bytes(v)) for n, v in event.headers]
                    current = Parsed(event.method, event.target, headers)
                elif isinstance(event, h11.Data):
                    assert current is not None
                    current.body += bytes(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    assert current is not None
                    current.trailers = [(bytes(n), bytes(v)) for n, v in event.headers]
                    out.append(current)
                    break
                else:  # NEED_DATA or PAUSED before the message ended
                    return f"h11: request unfinished ({event!r})"
        except h11.RemoteProtocolError as exc:
            return f"h11: {exc}"
        data = conn.trailing_data[0]
    return out
