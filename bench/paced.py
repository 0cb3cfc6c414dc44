"""An evenly paced client, HTTP/1.1 or h2c: `rate` POSTs a second, one call in flight
per connection (HTTP/1.1 keep-alive; h2c one stream at a time), each call timed with
perf_counter, on an absolute schedule.

wrk cannot hold a fixed rate and wrk2 is not in Debian; at 1000 calls/s a uvloop client
with httptools (HTTP/1.1) or the sidecar's own Sans-IO HTTP/2 engine (h2c, a few
microseconds per call, tested against h2, nghttp2 and grpcio) is accurate to a few
microseconds. h2load's `--rps` starts its clients together, so its calls arrive in
bursts: `--burst N` asks for that shape on purpose, N calls sent together at each tick
(rate / N ticks a second). Each call gets a unique query (`?r=N`), so HMAC's replay check
sees distinct calls. Prints JSON: latencies (seconds), errors.

    python -m bench.paced URL --rate 1000 --duration 5 --body-size 1024 [--proto h2c]
    python -m bench.paced URL --rate 1000 --burst 10 --proto h2c
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable
from typing import cast
from urllib.parse import urlsplit

import httptools
import uvloop

from sidecar.proto import h2engine


class _Client(asyncio.Protocol):
    """One connection carrying one call at a time: `done` gets the call's status."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.done: asyncio.Future[int] | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; they implement it.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._finish(exc=exc or ConnectionError("closed"))

    def _finish(self, status: int = 0, exc: BaseException | None = None) -> None:
        done, self.done = self.done, None
        if done is not None and not done.done():
            if exc is not None:
                done.set_exception(exc)
            else:
                done.set_result(status)


class _Conn(_Client):
    """HTTP/1.1 keep-alive."""

    def __init__(self) -> None:
        super().__init__()
        self.parser = httptools.HttpResponseParser(self)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._finish(exc=e)

    def on_message_complete(self) -> None:
        self._finish(status=self.parser.get_status_code())


class _H2Conn(_Client):
    """One h2c connection carrying one stream at a time."""

    def __init__(self) -> None:
        super().__init__()
        self.engine = h2engine.H2Connection(client_side=True)
        self.engine.initiate_connection()
        self.status = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert self.transport is not None
        self.transport.write(self.engine.data_to_send())

    def send(self, head: list[tuple[bytes, bytes]], body: bytes) -> None:
        stream_id = self.engine.get_next_available_stream_id()
        self.engine.send_headers(stream_id, head)
        self.engine.send_data(stream_id, body, end_stream=True)
        assert self.transport is not None
        self.transport.write(self.engine.data_to_send())

    def data_received(self, data: bytes) -> None:
        try:
            events = self.engine.receive_data(data)
        except h2engine.ProtocolError as e:
            self._finish(exc=e)
            return
        for event in events:
            if isinstance(event, h2engine.ResponseReceived):
                self.status = int(dict(event.headers)[b":status"])
            elif isinstance(event, h2engine.DataReceived):
                self.engine.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2engine.StreamEnded):
                self._finish(status=self.status)
            elif isinstance(event, h2engine.StreamReset):
                self._finish(exc=ConnectionError(f"stream reset, code {event.error_code}"))
            elif isinstance(event, h2engine.ConnectionTerminated):
                self.closed = True
                self._finish(exc=ConnectionError(f"GOAWAY, code {event.error_code}"))
        out = self.engine.data_to_send()
        if out and self.transport is not None:
            self.transport.write(out)


async def run(
    url: str, rate: float, duration: float, body_size: int, proto: str = "h1", burst: int = 1
) -> dict[str, object]:
    loop = asyncio.get_running_loop()
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    path = (parts.path or "/") + (f"?{parts.query}&" if parts.query else "?")
    head = (
        f"Host: {parts.netloc}\r\nContent-Type: application/octet-stream\r\n"
        f"Content-Length: {body_size}\r\n\r\n"
    ).encode()
    fields = [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":authority", parts.netloc.encode()),
        (b":path", b""),
        (b"content-type", b"application/octet-stream"),
        (b"content-length", str(body_size).encode()),
    ]
    body = b"x" * body_size
    idle: list[_Conn] = []
    idle_h2: list[_H2Conn] = []
    latencies: list[float] = []
    errors: list[str] = []
    tasks: set[asyncio.Task[None]] = set()

    async def send_h1(target: bytes) -> tuple[asyncio.Future[int], float, Callable[[], None]]:
        conn = idle.pop() if idle else None
        if conn is None or conn.closed:
            _, conn = await loop.create_connection(_Conn, host, port)
        assert conn.transport is not None
        done = conn.done = loop.create_future()
        start = time.perf_counter()
        conn.transport.write(b"POST " + target + b" HTTP/1.1\r\n" + head + body)
        return done, start, lambda: idle.append(conn)

    async def send_h2(target: bytes) -> tuple[asyncio.Future[int], float, Callable[[], None]]:
        conn = idle_h2.pop() if idle_h2 else None
        if conn is None or conn.closed:
            _, conn = await loop.create_connection(_H2Conn, host, port)
        done = conn.done = loop.create_future()
        fields[3] = (b":path", target)
        start = time.perf_counter()
        conn.send(fields, body)
        return done, start, lambda: idle_h2.append(conn)

    send = send_h2 if proto == "h2c" else send_h1

    async def one(i: int) -> None:
        done, start, release = await send(f"{path}r={i}".encode())
        try:
            status = await done
        except Exception as e:
            errors.append(repr(e))
            return
        latencies.append(time.perf_counter() - start)
        if status >= 400:
            errors.append(f"status {status}")
        release()

    ticks = max(1, int(rate * duration) // burst)
    interval = burst / rate
    t0 = time.perf_counter()
    for tick in range(ticks):
        # Absolute schedule: a late wake-up sends the calls it owes at once, so the mean
        # rate holds even with the loop's 1 ms timer granularity.
        delay = t0 + tick * interval - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        for k in range(burst):
            task = loop.create_task(one(tick * burst + k))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks, timeout=10.0)
    elapsed = time.perf_counter() - t0
    return {
        "latencies": latencies,
        "errors": errors[:20],
        "error_count": len(errors),
        "elapsed": elapsed,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.paced")
    parser.add_argument("url")
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--body-size", type=int, default=1024)
    parser.add_argument("--proto", choices=("h1", "h2c"), default="h1")
    parser.add_argument(
        "--burst", type=int, default=1, help="calls sent together at each tick (default 1)"
    )
    args = parser.parse_args(argv)
    result = uvloop.run(
        run(args.url, args.rate, args.duration, args.body_size, args.proto, args.burst)
    )
    json.dump(result, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
