"""A hostile app for tests: answers every HTTP/1.1 request with fixed raw bytes.

Run as `python -m tests.hostile.raw_app --reply-file R --count-file C --ports-file F`.
It reads a request head (up to the blank line) and any Content-Length body, appends
one line to the count file, writes R's bytes verbatim and closes: whatever the
bytes are (bad header values, a lying x-opus-error), they reach the sidecar as is.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os


async def _serve(
    reply: bytes, count_file: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                await reader.readexactly(int(value.strip()))
        with open(count_file, "a") as fh:
            fh.write(head.split(b"\r\n", 1)[0].decode("latin-1") + "\n")
        writer.write(reply)
        await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
        pass
    finally:
        writer.close()


async def _main(args: argparse.Namespace) -> None:
    with open(args.reply_file, "rb") as fh:
        reply = fh.read()
    server = await asyncio.start_server(
        lambda r, w: _serve(reply, args.count_file, r, w), "127.0.0.1", 0
    )
    await announce_and_serve(server, args.ports_file)


async def announce_and_serve(server: asyncio.Server, ports_file: str) -> None:
    """Write the server's port to `ports_file` (atomically: the tests' readiness signal),
    then serve until the process is stopped."""
    port = server.sockets[0].getsockname()[1]
    tmp = ports_file + ".tmp"
    with open(tmp, "w") as fh:
        json.dump({"port": port}, fh)
    os.replace(tmp, ports_file)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reply-file", required=True)
    parser.add_argument("--count-file", required=True)
    parser.add_argument("--ports-file", required=True)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main(args))


if __name__ == "__main__":
    main()
