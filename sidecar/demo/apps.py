"""The demo mesh's two apps: `payment` and `inventory`, plain aiohttp servers.

They know nothing about the mesh except one URL: `payment` reaches `inventory`
through its own sidecar at `$OPUS_SIDECAR_URL`, as any app in the mesh would.

    python -m sidecar.demo.apps payment --port 0 --ports-file F

binds 127.0.0.1 (port 0 picks a free one), then writes {"port": N} to F atomically,
which is the orchestrator's signal that the app is listening.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

SIDECAR_URL_ENV = "OPUS_SIDECAR_URL"
# Headers the sidecar adds to outbound responses; payment echoes them so the demo
# can show the second hop (payment -> inventory), which the demo client never sees.
UPSTREAM_HEADER = "x-opus-upstream"
UPSTREAM_PROTOCOL_HEADER = "x-opus-upstream-protocol"

SESSION = web.AppKey("session", aiohttp.ClientSession)
SIDECAR_URL = web.AppKey("sidecar_url", str)

log = logging.getLogger("sidecar.demo.apps")


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "UP"})


async def _json_object(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json() if request.can_read_body else {}
    except json.JSONDecodeError as exc:
        raise web.HTTPBadRequest(text=f"body is not JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text="body must be a JSON object")
    return body


async def reserve(request: web.Request) -> web.Response:
    body = await _json_object(request)
    return web.json_response(
        {
            "reservation_id": f"res-{uuid.uuid4().hex[:12]}",
            "item": body.get("item", "sku-1"),
            "quantity": body.get("quantity", 1),
            "status": "reserved",
        }
    )


async def create(request: web.Request) -> web.Response:
    body = await _json_object(request)
    url = f"{request.app[SIDECAR_URL]}/v1/invoke/inventory/reserve"
    try:
        async with request.app[SESSION].post(url, json={"item": "sku-1", "quantity": 1}) as resp:
            text = await resp.text()
            upstream = resp.headers.get(UPSTREAM_HEADER, "-")
            protocol = resp.headers.get(UPSTREAM_PROTOCOL_HEADER, "-")
            status = resp.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        reason = str(exc) or type(exc).__name__  # a TimeoutError has no message
        return web.json_response(
            {"error": f"inventory unreachable via {url}: {reason}"}, status=502
        )
    if status != 200:
        return web.json_response(
            {"error": f"inventory answered {status}", "inventory": text}, status=502
        )
    return web.json_response(
        {
            "payment_id": f"pay-{uuid.uuid4().hex[:12]}",
            "status": "created",
            "amount": body.get("amount", 100),
            "currency": body.get("currency", "USD"),
            "inventory": json.loads(text),
            "mesh": {"inventory_upstream": upstream, "inventory_protocol": protocol},
        }
    )


def inventory_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_post("/reserve", reserve)
    return app


def payment_app(sidecar_url: str) -> web.Application:
    app = web.Application()
    app[SIDECAR_URL] = sidecar_url.rstrip("/")

    async def client_session(app: web.Application) -> AsyncIterator[None]:
        # One session for the app's life: calls reuse the connection to the sidecar.
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            app[SESSION] = session
            yield

    app.cleanup_ctx.append(client_session)
    app.router.add_get("/health", health)
    app.router.add_post("/create", create)
    return app


def write_json_atomic(path: Path, data: dict[str, int]) -> None:
    """Write so a reader polling for `path` never sees a half-written file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


async def serve(app: web.Application, name: str, port: int, ports_file: Path | None) -> None:
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", port)
        await site.start()
        bound = runner.addresses[0][1]
        if ports_file is not None:
            write_json_atomic(ports_file, {"port": bound})
        log.info("%s app listening on 127.0.0.1:%d", name, bound)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sidecar.demo.apps")
    parser.add_argument("app", choices=["payment", "inventory"])
    parser.add_argument("--port", type=int, default=0, help="0: pick a free port")
    parser.add_argument("--ports-file", type=Path, help='write {"port": N} here once listening')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.app == "payment":
        sidecar_url = os.environ.get(SIDECAR_URL_ENV, "http://127.0.0.1:8080")
        app = payment_app(sidecar_url)
    else:
        app = inventory_app()
    asyncio.run(serve(app, args.app, args.port, args.ports_file))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
