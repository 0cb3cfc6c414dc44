"""A real HTTP app for integration tests: echoes what reached it.

Run as `python -m tests.integration.echo_app --port 0 --ports-file F [--name N] [--h2c]`;
writes {"port": N} to F once it listens.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os

from aiohttp import web


def _app(name: str) -> web.Application:
    state = {"calls": 0}

    async def echo(request: web.Request) -> web.StreamResponse:
        state["calls"] += 1
        digest = hashlib.sha256()
        size = 0
        async for chunk in request.content.iter_any():
            digest.update(chunk)
            size += len(chunk)
        return web.json_response(
            {
                "app": name,
                "method": request.method,
                "path": request.path_qs,
                "host": request.host,
                "headers": {k.lower(): v for k, v in request.headers.items()},
                "body_len": size,
                "body_sha256": digest.hexdigest(),
            },
            headers={"x-app": name},
        )

    async def data(request: web.Request) -> web.StreamResponse:
        size = int(request.query.get("n", "0"))
        resp = web.StreamResponse(
            headers={"x-app": name, "content-type": "application/octet-stream"}
        )
        await resp.prepare(request)
        block = bytes(range(256)) * 256  # 64 KiB, a known pattern
        left = size
        while left > 0:
            piece = block[: min(left, len(block))]
            await resp.write(piece)
            left -= len(piece)
        await resp.write_eof()
        return resp

    async def slow(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(int(request.query.get("ms", "500")) / 1000)
        return web.json_response({"app": name, "slept_ms": int(request.query.get("ms", "500"))})

    async def status(request: web.Request) -> web.StreamResponse:
        return web.json_response({"app": name}, status=int(request.match_info["code"]))

    async def health(request: web.Request) -> web.StreamResponse:
        return web.json_response({"status": "UP"})

    async def calls(request: web.Request) -> web.StreamResponse:
        return web.json_response({"calls": state["calls"]})

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_get("/health", health)
    app.router.add_get("/calls", calls)
    app.router.add_get("/data", data)
    app.router.add_get("/slow", slow)
    app.router.add_route("*", "/status/{code}", status)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


async def _main(args: argparse.Namespace) -> None:
    runner = web.AppRunner(_app(args.name), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", args.port)
    await site.start()
    port = runner.addresses[0][1]
    tmp = args.ports_file + ".tmp"
    with open(tmp, "w") as fh:
        json.dump({"port": port}, fh)
    os.replace(tmp, args.ports_file)
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--ports-file", required=True)
    parser.add_argument("--name", default="echo")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main(args))


if __name__ == "__main__":
    main()
