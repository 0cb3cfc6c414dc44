"""The app behind the differential tests: records every byte it receives, or answers
with bytes a test chose.

Run as `python -m tests.hostile.diff_app --mode record|reply --dir D --ports-file F`.

- record: connection N's bytes go to `D/conn-N.bin` as they arrive. Once a request is
  complete (httptools says so) it answers 200 with `connection: close`, reads on until
  the sidecar closes (at most 3 s) and writes `D/conn-N.done`: from then on the file
  holds everything the sidecar ever sent on that connection.
- reply: a request for `/r/<token>/<id>` gets `D/reply-<id>.bin` verbatim with every
  `{TOKEN}` replaced by the token, when that file exists, else a plain keep-alive 200
  whose body is the token. Connections stay open (so the sidecar pools them) until idle
  for 0.5 s (a reply whose framing promises more than it sends ends there).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from pathlib import Path

import httptools

from tests.hostile.raw_app import announce_and_serve

IDLE_SECONDS = 0.5
# Only a request left unfinished waits this long (a failing example): generous, so a busy
# machine's delay does not pass for one.
RECORD_IDLE_SECONDS = 3.0
RECORD_RESPONSE = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"


class _Messages:
    """httptools callbacks: the targets of the requests completed so far."""

    def __init__(self) -> None:
        self.url = b""
        self.done: list[bytes] = []

    def on_message_begin(self) -> None:
        self.url = b""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_message_complete(self) -> None:
        self.done.append(self.url)


async def _record(
    directory: Path, number: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    messages = _Messages()
    parser = httptools.HttpRequestParser(messages)
    answered = False
    with (directory / f"conn-{number}.bin").open("wb") as out:
        try:
            while True:
                try:
                    chunk = await asyncio.wait_for(reader.read(65536), RECORD_IDLE_SECONDS)
                except TimeoutError:
                    break
                if not chunk:
                    break
                out.write(chunk)
                out.flush()
                if answered:
                    continue
                try:
                    parser.feed_data(chunk)
                except httptools.HttpParserError:
                    messages.done.append(b"")  # answer anyway: the bytes are on record
                if messages.done:
                    answered = True
                    writer.write(RECORD_RESPONSE)
                    await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
    (directory / f"conn-{number}.done").touch()


async def _reply(
    directory: Path, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    messages = _Messages()
    parser = httptools.HttpRequestParser(messages)
    try:
        while True:
            try:
                chunk = await asyncio.wait_for(reader.read(65536), IDLE_SECONDS)
            except TimeoutError:
                break
            if not chunk:
                break
            try:
                parser.feed_data(chunk)
            except httptools.HttpParserError:
                break
            for url in messages.done:
                parts = url.split(b"/")
                token = parts[2] if len(parts) > 2 else b"-"
                reply = (
                    directory / f"reply-{parts[3].decode('latin-1')}.bin"
                    if len(parts) > 3
                    else None
                )
                if reply is not None and reply.exists():
                    writer.write(reply.read_bytes().replace(b"{TOKEN}", token))
                else:
                    writer.write(
                        b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(token), token)
                    )
            messages.done.clear()
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def _main(args: argparse.Namespace) -> None:
    directory = Path(args.dir)
    counter = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal counter
        counter += 1
        if args.mode == "record":
            await _record(directory, counter, reader, writer)
        else:
            await _reply(directory, reader, writer)

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    await announce_and_serve(server, args.ports_file)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["record", "reply"], required=True)
    parser.add_argument("--dir", required=True)
    parser.add_argument("--ports-file", required=True)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main(args))


if __name__ == "__main__":
    main()
