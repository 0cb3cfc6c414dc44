"""HMAC under attack, with real sidecars: endless signed-looking bodies against the
buffer budget (finding 5), one signed call replayed to a 2-worker sidecar and a key
scoped to another service (finding 6), and gRPC with the nonce extension (finding 11)."""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
import httpx
import pytest

from tests.hostile.h2raw import rss_bytes
from tests.integration.conftest import Mesh, Proc, Sidecar
from tests.integration.test_hmac_mesh import SECRETS, app_calls, signed_headers, write_keys

pytestmark = pytest.mark.integration


def verify(keys: Path, **config: Any) -> dict[str, Any]:
    return {"name": "hmac_verify", "config": {"key_file": str(keys), **config}}


def sign(keys: Path, **config: Any) -> dict[str, Any]:
    return {"name": "hmac_sign", "config": {"key_file": str(keys), "key_id": "k1", **config}}


# --- Finding 5 ---------------------------------------------------------------------------


def _flood(port: int, connections: int, streams: int, per_stream: int, seconds: float) -> int:
    """Open `streams` streams on each of `connections` h2c connections, each with a random
    well-formed signature and a fresh timestamp, and push up to `per_stream` bytes on each,
    never ending any. Returns how many streams the sidecar answered or reset."""
    # Per connection: its socket, its h2 state and the bytes sent on each stream.
    conns: list[tuple[socket.socket, h2.connection.H2Connection, dict[int, int]]] = []
    for _ in range(connections):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.setblocking(False)
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        conns.append((sock, conn, {}))
    ended: set[tuple[int, int]] = set()
    for index, (sock, conn, sent) in enumerate(conns):
        for n in range(streams):
            sid = conn.get_next_available_stream_id()
            conn.send_headers(
                sid,
                [
                    (":method", "POST"),
                    (":scheme", "http"),
                    (":path", f"/transfer?n={n}"),
                    (":authority", "inventory"),
                    ("x-opus-signature", os.urandom(32).hex()),
                    ("x-opus-timestamp", str(int(time.time()))),
                ],
            )
            sent[sid] = 0
        sock.sendall(conn.data_to_send())
        del index
    chunk = b"x" * 16384
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        progress = False
        for index, (sock, conn, sent) in enumerate(conns):
            try:
                data = sock.recv(1 << 20)
            except BlockingIOError:
                data = None
            if data == b"":
                return len(ended)
            if data:
                for event in conn.receive_data(data):
                    if isinstance(event, (h2.events.StreamReset, h2.events.ResponseReceived)):
                        ended.add((index, event.stream_id))
            for sid, count in sent.items():
                if (index, sid) in ended or count >= per_stream:
                    continue
                room = min(conn.local_flow_control_window(sid), len(chunk))
                if room > 0:
                    conn.send_data(sid, chunk[:room])
                    sent[sid] = count + room
                    progress = True
            out = conn.data_to_send()
            if out:
                try:
                    sock.sendall(out)
                except BlockingIOError:
                    sock.setblocking(True)
                    sock.sendall(out)
                    sock.setblocking(False)
        if not progress:
            time.sleep(0.01)
        if all(
            c >= per_stream or (i, s) in ended
            for i, (_, _, d) in enumerate(conns)
            for s, c in d.items()
        ):
            break
    for sock, _, _ in conns:
        sock.close()
    return len(ended)


def test_endless_bodies_are_bounded_by_the_buffer_budget_and_a_bystander_passes(
    mesh: Mesh,
) -> None:
    keys = mesh.workdir / "keys.json"
    write_keys(keys, {"k1": SECRETS["k1"]})
    budget = 16 * 1024 * 1024
    inventory_app, inventory = mesh.service(
        "inventory",
        {"filters": {"inbound": [verify(keys)], "max_buffered_request_bytes": budget}},
    )
    _, payment = mesh.service("payment", {"filters": {"outbound": [sign(keys)]}})
    mesh.wait_endpoints(payment, "inventory", 1)
    before = rss_bytes(inventory.proc.pid)
    answered = _flood(inventory.ports["inbound"], 2, 100, 1024 * 1024, seconds=40)
    grown = rss_bytes(inventory.proc.pid) - before
    print(
        f"flood: {answered} streams answered, RSS {before / 2**20:.0f} MiB + {grown / 2**20:.0f} MiB"
    )
    # Unbounded, 200 streams x 1 MB grew it by ~200 MB; with a 16 MiB budget it grew ~60 MiB
    # (the budget, 64 KiB windows and replay buffers of 200 streams, allocator slack).
    assert grown < 100 * 1024 * 1024, f"RSS grew {grown / 2**20:.0f} MiB"
    assert answered > 100  # the streams past the budget were answered 503, not left hanging
    assert inventory.metric("opus_buffer_budget_refusals_total") > 0
    calls = app_calls(inventory_app)
    resp = httpx.post(f"{payment.outbound}/v1/invoke/inventory/ok", content=b"{}", timeout=10)
    assert resp.status_code == 200, resp.text
    assert app_calls(inventory_app) == calls + 1


# --- Finding 6 ---------------------------------------------------------------------------


def test_one_signed_post_sent_8_times_to_two_workers_runs_once(mesh: Mesh) -> None:
    keys = mesh.workdir / "keys.json"
    write_keys(keys, {"k1": SECRETS["k1"]})
    app, inventory = mesh.service(
        "inventory", {"workers": 2, "filters": {"inbound": [verify(keys)]}}
    )
    body = b'{"to":"alice","amount":100}'
    headers = signed_headers("k1", "/transfer?to=alice", body)
    before = app_calls(app)
    statuses = []
    for _ in range(8):
        # A new connection each time, so the kernel spreads them over both workers.
        resp = httpx.post(
            f"{inventory.inbound}/transfer?to=alice",
            content=body,
            headers={**headers, "connection": "close"},
            timeout=10,
        )
        statuses.append(resp.status_code)
        if resp.status_code == 401:
            assert "replay" in resp.json()["error"]
    assert statuses.count(200) == 1 and statuses.count(401) == 7, statuses
    assert app_calls(app) == before + 1


def test_key_scoped_to_one_service_is_refused_by_another(mesh: Mesh) -> None:
    keys = mesh.workdir / "keys.json"
    keys.write_text(json.dumps({"k1": {"secret": SECRETS["k1"], "services": ["inventory"]}}))
    inventory_app, inventory = mesh.service("inventory", {"filters": {"inbound": [verify(keys)]}})
    billing_app, billing = mesh.service("billing", {"filters": {"inbound": [verify(keys)]}})
    body = b'{"to":"alice"}'
    headers = signed_headers("k1", "/transfer", body)
    ok = httpx.post(f"{inventory.inbound}/transfer", content=body, headers=headers, timeout=10)
    assert ok.status_code == 200
    refused = httpx.post(f"{billing.inbound}/transfer", content=body, headers=headers, timeout=10)
    assert refused.status_code == 401
    assert "key 'k1' is not scoped to service 'billing'" in refused.json()["error"]
    assert app_calls(billing_app) == 0 and app_calls(inventory_app) == 1
    assert billing.metric("opus_hmac_failures_total", reason="key_scope") == 1


# --- Finding 11 --------------------------------------------------------------------------


def _grpc_pair(
    mesh: Mesh, sign_config: dict[str, Any], verify_config: dict[str, Any]
) -> tuple[Proc, Sidecar]:
    keys = mesh.workdir / "keys.json"
    write_keys(keys, {"k1": SECRETS["k1"]})
    app = Proc("grpc-app", [sys.executable, "-m", "tests.integration.grpc_app"], mesh.workdir, None)
    mesh.procs.append(app)
    mesh.sidecar(
        "inventory",
        app.ports["port"],
        {"app": {"protocol": "h2c"}, "filters": {"inbound": [verify(keys, **verify_config)]}},
    )
    _, payment = mesh.service(
        "payment",
        {
            "routes": [{"grpc_service": "test.Echo", "service": "inventory"}],
            "filters": {"outbound": [sign(keys, **sign_config)]},
        },
    )
    return app, payment


def _unary_results(payment: Sidecar, count: int) -> list[tuple[grpc.StatusCode, str]]:
    out = []
    target = f"127.0.0.1:{payment.ports['outbound']}"
    with grpc.insecure_channel(target, options=[("grpc.default_authority", "inventory")]) as ch:
        unary = ch.unary_unary("/test.Echo/Unary")
        for i in range(count):
            try:
                unary(f"call {i}".encode(), timeout=10)
                out.append((grpc.StatusCode.OK, ""))
            except grpc.RpcError as exc:
                out.append((exc.code(), exc.details() or ""))
    return out


def test_grpc_calls_in_one_second_all_pass_with_the_nonce(mesh: Mesh) -> None:
    _, payment = _grpc_pair(
        mesh,
        {"oversize": "unsigned_body", "nonce": True},
        {"allow_unsigned_body": True, "require_nonce": True},
    )
    start = time.monotonic()
    results = _unary_results(payment, 8)
    assert time.monotonic() - start < 5
    assert results == [(grpc.StatusCode.OK, "")] * 8


def test_grpc_without_the_nonce_stays_as_documented(mesh: Mesh) -> None:
    _, payment = _grpc_pair(mesh, {"oversize": "unsigned_body"}, {"allow_unsigned_body": True})
    results = _unary_results(payment, 8)
    passed = [code for code, _ in results if code == grpc.StatusCode.OK]
    refused = [d for code, d in results if code == grpc.StatusCode.UNAUTHENTICATED]
    # One call per method per second: 8 quick calls span at most two seconds.
    assert 1 <= len(passed) <= 2 and len(refused) == 8 - len(passed)
    assert all("replay" in d for d in refused)


def test_grpc_refusal_says_the_body_is_streamed(mesh: Mesh) -> None:
    _, payment = _grpc_pair(mesh, {}, {})
    [(code, details)] = _unary_results(payment, 1)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED or code != grpc.StatusCode.OK
    assert "streamed" in details and "1048576" not in details, details
