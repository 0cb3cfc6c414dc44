"""Apps for the HTTP/1.1 boundary tests, which keep their connections alive (unlike raw_app).

Run as `python -m tests.hostile.boundary_apps --kind h1|h2 --log-file L --ports-file F`.

- h1: parses requests with httptools and appends one JSON line per request to the log
  file (path, headers, trailers and the raw bytes of the connection so far, latin-1);
  `/cookie` is answered chunked with a `set-cookie` trailer, anything else with its own
  path as the body. The connection stays open.
- h2: an h2c app with the h2 library's outbound validation off, which answers every
  request with HEADERS, then (50 ms later, so the body is streamed) DATA `ok` and
  trailers whose value holds CRLF and a forged second response, as a malicious app
  behind `app.protocol: h2c` could.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json

import h2.config
import h2.connection
import h2.events
import httptools

from tests.hostile.raw_app import announce_and_serve

COOKIE_REPLY = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"2\r\nok\r\n0\r\nset-cookie: session=secret\r\n\r\n"
)
FORGED = "a\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 6\r\nx-forged: 1\r\n\r\nforged"


class _H1App(asyncio.Protocol):
    def __init__(self, log_file: str) -> None:
        self.log_file = log_file
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.raw = b""
        self.path = b""
        self.headers: list[list[str]] = []
        self.trailers: list[list[str]] = []
        self.in_trailers = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.raw += data
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.close()

    def on_message_begin(self) -> None:
        self.path, self.headers, self.trailers, self.in_trailers = b"", [], [], False

    def on_url(self, url: bytes) -> None:
        self.path += url

    def on_header(self, name: bytes, value: bytes) -> None:
        field = [name.decode("latin-1").lower(), value.decode("latin-1")]
        (self.trailers if self.in_trailers else self.headers).append(field)

    def on_headers_complete(self) -> None:
        self.in_trailers = True

    def on_message_complete(self) -> None:
        assert self.transport is not None
        record = {
            "path": self.path.decode("latin-1"),
            "headers": self.headers,
            "trailers": self.trailers,
            "raw": self.raw.decode("latin-1"),
        }
        with open(self.log_file, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.path == b"/cookie":
            self.transport.write(COOKIE_REPLY)
        else:
            self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(self.path))
            self.transport.write(self.path)


class _H2App(asyncio.Protocol):
    def __init__(self, log_file: str) -> None:
        self.log_file = log_file
        config = h2.config.H2Configuration(
            client_side=False,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
            validate_inbound_headers=False,
        )
        self.conn = h2.connection.H2Connection(config)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.conn.initiate_connection()
        transport.write(self.conn.data_to_send())

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        for event in self.conn.receive_data(data):
            if isinstance(event, h2.events.StreamEnded):
                sid = event.stream_id
                with open(self.log_file, "a") as fh:
                    fh.write(json.dumps({"stream": sid}) + "\n")
                self.conn.send_headers(sid, [(":status", "200")])
                # The rest a moment later, so the sidecar streams the body (chunked).
                asyncio.get_running_loop().call_later(0.05, self._finish, sid)
        self.transport.write(self.conn.data_to_send())

    def _finish(self, sid: int) -> None:
        assert self.transport is not None
        self.conn.send_data(sid, b"ok")
        self.conn.send_headers(sid, [("x-trailer", FORGED)], end_stream=True)
        self.transport.write(self.conn.data_to_send())


async def _main(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    kind = _H1App if args.kind == "h1" else _H2App
    server = await loop.create_server(lambda: kind(args.log_file), "127.0.0.1", 0)
    await announce_and_serve(server, args.ports_file)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kind", choices=("h1", "h2"), required=True)
    parser.add_argument("--log-file", required=True)
    parser.add_argument("--ports-file", required=True)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main(args))


if __name__ == "__main__":
    main()
