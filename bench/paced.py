"""An evenly paced HTTP/1.1 client: `rate` POSTs a second on keep-alive connections,
one connection per call in flight, each call timed with perf_counter.

wrk cannot hold a fixed rate and wrk2 is not in Debian; at 1000 calls/s a uvloop client
with httptools is accurate to a few microseconds. Each call gets a unique query
(`?r=N`), so HMAC's replay check sees distinct calls. Prints JSON: latencies (seconds),
errors.

    python -m bench.paced URL --rate 1000 --duration 5 --body-size 1024
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import cast
from urllib.parse import urlsplit

import httptools
import uvloop


class _Conn(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.done: asyncio.Future[int] | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; they implement it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._finish(exc=e)

    def on_message_complete(self) -> None:
        self._finish(status=self.parser.get_status_code())

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


async def run(url: str, rate: float, duration: float, body_size: int) -> dict[str, object]:
    loop = asyncio.get_running_loop()
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    path = (parts.path or "/") + (f"?{parts.query}&" if parts.query else "?")
    head = (
        f"Host: {parts.netloc}\r\nContent-Type: application/octet-stream\r\n"
        f"Content-Length: {body_size}\r\n\r\n"
    ).encode()
    body = b"x" * body_size
    idle: list[_Conn] = []
    latencies: list[float] = []
    errors: list[str] = []
    tasks: set[asyncio.Task[None]] = set()

    async def one(i: int) -> None:
        conn = idle.pop() if idle else None
        if conn is None or conn.closed:
            _, conn = await loop.create_connection(_Conn, host, port)
        assert conn.transport is not None
        conn.done = loop.create_future()
        start = time.perf_counter()
        conn.transport.write(b"POST " + f"{path}r={i}".encode() + b" HTTP/1.1\r\n" + head + body)
        try:
            status = await conn.done
        except Exception as e:
            errors.append(repr(e))
            return
        latencies.append(time.perf_counter() - start)
        if status >= 400:
            errors.append(f"status {status}")
        idle.append(conn)

    count = int(rate * duration)
    interval = 1.0 / rate
    t0 = time.perf_counter()
    for i in range(count):
        # Absolute schedule: a late wake-up sends the calls it owes at once, so the mean
        # rate holds even with the loop's 1 ms timer granularity.
        delay = t0 + i * interval - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = loop.create_task(one(i))
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
    args = parser.parse_args(argv)
    result = uvloop.run(run(args.url, args.rate, args.duration, args.body_size))
    json.dump(result, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
