"""gRPC through two sidecars with a real grpcio client and server: the four call shapes,
metadata and trailers, large messages, deadlines, cancellation and mesh-made statuses."""

from __future__ import annotations

import json
import sys
import time

import grpc
import httpx
import pytest

from tests.integration.conftest import Mesh, Proc, Sidecar

pytestmark = pytest.mark.integration

_BIG = 64 * 1024 * 1024


def _grpc_mesh(mesh: Mesh) -> tuple[Proc, Sidecar, Sidecar]:
    app = Proc("grpc-app", [sys.executable, "-m", "tests.integration.grpc_app"], mesh.workdir, None)
    mesh.procs.append(app)
    inventory = mesh.sidecar("inventory", app.ports["port"], {"app": {"protocol": "h2c"}})
    _, payment = mesh.service(
        "payment", {"routes": [{"grpc_service": "test.Echo", "service": "inventory"}]}
    )
    return app, inventory, payment


def _channel(sidecar: Sidecar, authority: str | None = "inventory") -> grpc.Channel:
    options: list[tuple[str, str | int]] = [
        ("grpc.max_receive_message_length", _BIG),
        ("grpc.max_send_message_length", _BIG),
    ]
    if authority:
        options.append(("grpc.default_authority", authority))
    return grpc.insecure_channel(f"127.0.0.1:{sidecar.ports['outbound']}", options=options)


def _method(channel: grpc.Channel, kind: str, name: str) -> grpc.UnaryUnaryMultiCallable:
    return getattr(channel, kind)(f"/test.Echo/{name}")


def test_four_call_shapes_with_metadata_and_trailers(mesh: Mesh) -> None:
    _, _, payment = _grpc_mesh(mesh)
    with _channel(payment) as channel:
        unary = _method(channel, "unary_unary", "Unary")
        reply, call = unary.with_call(
            b"hello", metadata=[("x-meta", "v1"), ("x-meta-bin", b"\x00\xffbin")], timeout=10
        )
        assert reply == b"hello"
        trailing = dict(call.trailing_metadata())
        assert trailing["x-meta"] == "v1"
        assert trailing["x-meta-bin"] == b"\x00\xffbin"
        assert call.code() == grpc.StatusCode.OK

        stream = _method(channel, "unary_stream", "ServerStream")
        replies = list(stream(b"300", timeout=10))  # 300 KiB: several flow-control windows
        assert len(replies) == 300 and replies[7] == bytes([7]) * 1024

        client_stream = _method(channel, "stream_unary", "ClientStream")
        total = client_stream(iter([b"a" * 100_000] * 5), timeout=10)
        assert total == b"500000"

        bidi = _method(channel, "stream_stream", "Bidi")
        echoed = list(bidi(iter([b"one", b"two", b"three"]), timeout=10))
        assert echoed == [b"one", b"two", b"three"]


def test_status_and_message_cross_the_mesh(mesh: Mesh) -> None:
    _, _, payment = _grpc_mesh(mesh)
    with _channel(payment) as channel:
        unary = _method(channel, "unary_unary", "Unary")
        with pytest.raises(grpc.RpcError) as info:
            unary(b"x", metadata=[("x-fail", "PERMISSION_DENIED")], timeout=10)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "ünïcode" in info.value.details()


def test_message_larger_than_the_flow_control_window(mesh: Mesh) -> None:
    _, _, payment = _grpc_mesh(mesh)
    big = bytes(range(256)) * (3 * 1024 * 1024 // 256)  # 3 MiB each way
    with _channel(payment) as channel:
        assert _method(channel, "unary_unary", "Unary")(big, timeout=30) == big


def test_routing_by_grpc_service_name(mesh: Mesh) -> None:
    """No authority naming a service: the route maps /test.Echo/* to inventory."""
    _, _, payment = _grpc_mesh(mesh)
    with _channel(payment, authority=None) as channel:
        assert _method(channel, "unary_unary", "Unary")(b"routed", timeout=10) == b"routed"


def _wait_app_in_flight(sidecar: Sidecar) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        inbound = httpx.get(f"{sidecar.admin}/clusters", timeout=5).json()["inbound"]
        if any(e["active_requests"] for c in inbound.values() for e in c["endpoints"]):
            return
        time.sleep(0.02)
    raise AssertionError("the call never reached the app")


def test_deadline_exceeded(mesh: Mesh) -> None:
    _, _, payment = _grpc_mesh(mesh)
    with _channel(payment) as channel:
        unary = _method(channel, "unary_unary", "Unary")
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            unary(b"x", metadata=[("x-sleep-ms", "3000")], timeout=0.5)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 2.5


def test_sidecar_honours_grpc_timeout(mesh: Mesh) -> None:
    """A raw HTTP/2 caller that never gives up itself: the sidecar enforces grpc-timeout,
    answers DEADLINE_EXCEEDED, and passes the remaining time on."""
    _, _, payment = _grpc_mesh(mesh)
    frame = b"\x00" + (1).to_bytes(4, "big") + b"x"
    started = time.monotonic()
    with httpx.Client() as client:
        resp = client.post(
            f"{payment.outbound}/test.Echo/Unary",
            headers={"content-type": "application/grpc", "te": "trailers", "host": "inventory",
                     "grpc-timeout": "700m", "x-sleep-ms": "3000"},
            content=frame, timeout=10,
        )  # fmt: skip
    assert time.monotonic() - started < 2.5
    assert resp.status_code == 200 and resp.headers["grpc-status"] == "4"
    log = mesh.workdir / f"{payment.name}.access.log"
    deadline = time.monotonic() + 5  # the line is written just after the reply is sent
    while time.monotonic() < deadline and not log.read_text().strip():
        time.sleep(0.02)
    assert json.loads(log.read_text().splitlines()[-1])["flags"] == "UT"


def test_cancellation_reaches_the_server(mesh: Mesh) -> None:
    app, inventory, payment = _grpc_mesh(mesh)
    admin = f"http://127.0.0.1:{app.ports['admin']}/"
    with _channel(payment) as channel:
        future = _method(channel, "unary_unary", "Wait").future(b"x", timeout=20)
        _wait_app_in_flight(inventory)
        future.cancel()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if httpx.get(admin, timeout=5).json()["count"] >= 1:
                break
            time.sleep(0.05)
        assert httpx.get(admin, timeout=5).json()["count"] == 1


def test_mesh_failures_are_grpc_statuses(mesh: Mesh) -> None:
    _, payment = mesh.service("payment")
    with _channel(payment, authority="nosuch") as channel:
        with pytest.raises(grpc.RpcError) as info:
            _method(channel, "unary_unary", "Unary")(b"x", timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "nosuch" in info.value.details()
