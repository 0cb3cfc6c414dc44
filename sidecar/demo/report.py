"""The demo's calls through the mesh, and what it prints about them."""

from __future__ import annotations

import contextlib
import json
import shlex
from dataclasses import dataclass
from typing import Any, TextIO

from sidecar.demo import _http
from sidecar.demo.mesh import SEED_PORTS, Mesh

ROUTE = "payment.create -> inventory.reserve"
PAYMENT_BODY = {"amount": 100, "currency": "USD"}
RESERVE_BODY = {"item": "sku-1", "quantity": 1}
HEADER = ("call", "route", "endpoints (payment, inventory)", "protocol", "status", "latency")
ROW = "{:<6} {:<36} {:<34} {:<13} {:<6} {:>10}"


@dataclass(frozen=True, slots=True)
class Call:
    status: int
    # Hop 1 (demo -> payment) from the reply's headers; hop 2 (payment -> inventory)
    # as the payment app saw it on its own call.
    endpoints: str
    protocols: str
    latency_ms: float
    body: str


def call_payment(mesh: Mesh) -> Call:
    url = f"{mesh.payment.outbound_url}/v1/invoke/payment/create"
    try:
        reply = _http.request("POST", url, PAYMENT_BODY)
    except OSError as exc:
        return Call(0, "-", "-", 0.0, f"unreachable: {exc!r}")
    body = reply.body.decode(errors="replace")
    mesh_info: dict[str, Any] = {}
    with contextlib.suppress(ValueError, AttributeError):
        mesh_info = json.loads(body).get("mesh", {})
    return Call(
        reply.status,
        f"{reply.header('x-opus-upstream')}, {mesh_info.get('inventory_upstream', '-')}",
        f"{reply.header('x-opus-upstream-protocol')}, {mesh_info.get('inventory_protocol', '-')}",
        reply.latency_ms,
        body,
    )


def run_calls(mesh: Mesh, count: int, out: TextIO) -> list[Call]:
    print(ROW.format(*HEADER), file=out)
    calls = []
    for index in range(1, count + 1):
        call = call_payment(mesh)
        calls.append(call)
        print(
            ROW.format(
                f"{index}/{count}",
                ROUTE,
                call.endpoints,
                call.protocols,
                call.status or "ERR",
                f"{call.latency_ms:.1f} ms",
            ),
            file=out,
            flush=True,
        )
    return calls


def base_url_snippet(mesh: Mesh) -> str:
    return f'OpusClient("{mesh.payment.outbound_url}")'


def displaced_warning(mesh: Mesh) -> str:
    """A box saying which of the ports payment's sidecar asked for were busy and, when the
    outbound one was, which base_url reaches this mesh; "" when it got them all."""
    if not mesh.displaced:
        return ""
    lines = [
        f"port {mesh.wanted[name]} was busy: payment's sidecar {name} is on :{used} instead"
        for name, used in mesh.displaced.items()
    ]
    if "outbound" in mesh.displaced:
        wanted, seed = mesh.wanted["outbound"], SEED_PORTS["outbound"]
        lines += [
            f"Code calling localhost:{wanted} reaches whatever holds it, not this mesh",
            f"(the seed's snippet and OpusClient's default call localhost:{seed}).",
            "Call this mesh with:",
            f"    {base_url_snippet(mesh)}",
            f"    or OPUS_SIDECAR_URL={mesh.payment.outbound_url}",
        ]
    width = max(len(line) for line in lines)
    rule = "!" * (width + 4)
    body = [f"! {line:<{width}} !" for line in lines]
    title = " WARNING "
    top = rule[:2] + title + rule[2 + len(title) :]
    return "\n".join([top, *body, rule])


def _pretty(body: str) -> str:
    try:
        return json.dumps(json.loads(body), indent=2)
    except ValueError:
        return body


def print_summary(mesh: Mesh, calls: list[Call], out: TextIO, *, show_logs: bool) -> None:
    p, i = mesh.payment, mesh.inventory
    if calls:
        print(
            f"\nLast reply (HTTP {calls[-1].status or 'ERR'}):\n{_pretty(calls[-1].body)}", file=out
        )

    print("\nPorts:", file=out)
    for stack in (p, i):
        print(
            f"  {stack.service:<9} app 127.0.0.1:{stack.app_port}   sidecar outbound "
            f":{stack.outbound}  inbound :{stack.inbound}  admin :{stack.admin}",
            file=out,
        )
    warning = displaced_warning(mesh)
    if warning:
        print(f"\n{warning}", file=out)

    print("\nAdmin:", file=out)
    for stack in (p, i):
        for path in ("health", "ready", "metrics", "clusters"):
            print(f"  {stack.service:<9} {stack.admin_url}/{path}", file=out)

    print(
        "\nTry it while the demo runs (without --once), through payment's sidecar as the demo did:",
        file=out,
    )
    json_header = "-H 'content-type: application/json'"
    print(
        f"  curl -s -X POST {p.outbound_url}/v1/invoke/payment/create {json_header} "
        f"-d {shlex.quote(json.dumps(PAYMENT_BODY, separators=(',', ':')))}",
        file=out,
    )
    print(
        f"  curl -s -x {p.outbound_url} http://inventory/reserve {json_header} "
        f"-d {shlex.quote(json.dumps(RESERVE_BODY, separators=(',', ':')))}",
        file=out,
    )
    print(f"  curl -s {p.admin_url}/clusters", file=out)
    print(
        f"  python -c 'from opus_client import OpusClient; print({base_url_snippet(mesh)}"
        f'.call_service("payment", "create", {json.dumps(PAYMENT_BODY)}).json())\'',
        file=out,
    )

    if show_logs:
        print(f"\nLogs (removed when the demo stops) in {mesh.workdir}:", file=out)
        for stack in (p, i):
            print(f"  {stack.sidecar_log}  {stack.access_log}", file=out)
    out.flush()
