"""One call through two sidecars is one trace: a CLIENT span on the caller's sidecar, a
SERVER span on the callee's, parented across the hop by W3C traceparent (B3 accepted on
input). Both sidecars run in this process so the SDK's in-memory exporter sees both."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from sidecar.config import load_config
from sidecar.server import Sidecar
from sidecar.tracing import Tracing, tracing_enabled

pytestmark = pytest.mark.integration

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


async def _echo_app() -> tuple[web.AppRunner, int, list[dict[str, str]]]:
    seen: list[dict[str, str]] = []

    async def handle(request: web.Request) -> web.Response:
        seen.append({k.lower(): v for k, v in request.headers.items()})
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, runner.addresses[0][1], seen


def _sidecar(tmp: Path, name: str, app_port: int, provider: TracerProvider) -> Sidecar:
    config = {
        "service": {"name": name, "instance_id": name},
        "app": {"port": app_port},
        "listeners": {
            "outbound": {"host": "127.0.0.1", "port": 0},
            "inbound": {"host": "127.0.0.1", "port": 0},
            "admin": {"host": "127.0.0.1", "port": 0},
        },
        "discovery": {"file": {"directory": str(tmp / "registry")}},
        "log": {"access_log": str(tmp / f"{name}.access.log")},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(json.dumps(config))
    return Sidecar(load_config(str(path), {}), Tracing(provider))


async def _call(tmp: Path, headers: dict[str, str]) -> tuple[list[Any], list[dict[str, str]], Path]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    runner, app_port, seen = await _echo_app()
    inventory = _sidecar(tmp, "inventory", app_port, provider)
    payment = _sidecar(tmp, "payment", 1, provider)
    try:
        await inventory.start()
        ports = await payment.start()
        async with httpx.AsyncClient(timeout=10) as client:
            resp = await client.post(
                f"http://127.0.0.1:{ports['outbound']}/v1/invoke/inventory/reserve",
                headers=headers,
                content=b"{}",
            )
        assert resp.status_code == 200
    finally:
        await payment.close()
        await inventory.close()
        await runner.cleanup()
    return list(exporter.get_finished_spans()), seen, tmp / "payment.access.log"


def test_one_trace_spans_two_sidecars(tmp_path: Path) -> None:
    traceparent = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"
    spans, seen, access = asyncio.run(_call(tmp_path, {"traceparent": traceparent}))
    client = next(s for s in spans if s.kind == SpanKind.CLIENT)
    server = next(s for s in spans if s.kind == SpanKind.SERVER)
    assert len(spans) == 2
    # One trace: the caller's, continued.
    assert format(client.context.trace_id, "032x") == CALLER_TRACE
    assert format(server.context.trace_id, "032x") == CALLER_TRACE
    # Parented correctly: caller -> outbound sidecar (CLIENT) -> inbound sidecar (SERVER).
    assert format(client.parent.span_id, "016x") == CALLER_SPAN
    assert server.parent.span_id == client.context.span_id
    # The app is handed the SERVER span as its parent.
    app_parent = seen[0]["traceparent"].split("-")[2]
    assert app_parent == format(server.context.span_id, "016x")
    # HTTP semantic-convention attributes.
    assert client.attributes["http.request.method"] == "POST"
    assert client.attributes["url.path"] == "/reserve"
    assert client.attributes["server.address"] == "inventory"
    assert client.attributes["http.response.status_code"] == 200
    assert server.attributes["http.response.status_code"] == 200
    assert client.name == "POST inventory"
    assert client.attributes["opus.route"] in ("invoke", "host")  # how it was routed
    assert "opus.route" not in server.attributes  # inbound calls are not routed
    # The trace id is in the access log line.
    line = json.loads(access.read_text().splitlines()[-1])
    assert line["trace_id"] == CALLER_TRACE


def test_b3_is_accepted_on_input(tmp_path: Path) -> None:
    spans, seen, _ = asyncio.run(_call(tmp_path, {"b3": f"{CALLER_TRACE}-{CALLER_SPAN}-1"}))
    client = next(s for s in spans if s.kind == SpanKind.CLIENT)
    assert format(client.context.trace_id, "032x") == CALLER_TRACE
    assert format(client.parent.span_id, "016x") == CALLER_SPAN
    # W3C goes on, and the stale B3 header does not.
    assert "traceparent" in seen[0] and "b3" not in seen[0]


def test_tracing_is_off_without_an_exporter() -> None:
    assert not tracing_enabled({})
    assert tracing_enabled({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"})
    assert not tracing_enabled(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x", "OTEL_SDK_DISABLED": "true"}
    )
    assert not tracing_enabled(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x", "OTEL_TRACES_EXPORTER": "none"}
    )
    assert tracing_enabled({"OTEL_TRACES_EXPORTER": "console"})


def test_trace_id_logged_when_tracing_is_off(mesh: Any) -> None:
    mesh.service("inventory")
    _, payment = mesh.service("payment")
    traceparent = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"
    resp = httpx.get(
        f"{payment.outbound}/v1/invoke/inventory/x",
        headers={"traceparent": traceparent},
        timeout=10,
    )
    assert resp.status_code == 200
    # Headers travel untouched: the app sees the caller's own traceparent.
    assert resp.json()["headers"]["traceparent"] == traceparent
    assert payment.access_log(1)[-1]["trace_id"] == CALLER_TRACE
