"""OpusClient over httpx.MockTransport: what goes on the wire, and what comes back.

The transport is in memory; the real sidecar is in tests/integration/test_client_mesh.py.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable

import httpx
import pytest
from google.protobuf import struct_pb2

from opus_client import ClientClosedError, NonRetryableError, OpusClient, RetryableError
from opus_client.exceptions import DecodeError
from sidecar import signing

Handler = Callable[[httpx.Request], httpx.Response]


class Recorder:
    """A scripted sidecar: answers each request with the next of `replies`."""

    def __init__(self, *replies: httpx.Response | Exception) -> None:
        self.replies = list(replies)
        self.requests: list[httpx.Request] = []
        self.seen = threading.Event()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        self.seen.set()
        reply = self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]
        if isinstance(reply, Exception):
            raise reply
        return reply


def client(recorder: Recorder, **kw: object) -> OpusClient:
    kw.setdefault("retry_delay", 0.0)
    return OpusClient(
        "http://sidecar:8080",
        transport=httpx.MockTransport(recorder),
        **kw,  # type: ignore[arg-type]
    )


def ok(body: object = None) -> httpx.Response:
    return httpx.Response(200, json=body if body is not None else {"ok": True})


def test_call_goes_to_the_invoke_route_as_json() -> None:
    rec = Recorder(ok({"id": 1}))
    with client(rec, auth_token="tok") as c:
        reply = c.call_service("payment", "create", {"amount": 100}, timeout=2.0)
    assert (reply.status_code, reply.json(), reply.attempts) == (200, {"id": 1}, 1)
    (request,) = rec.requests
    assert request.method == "POST"
    assert str(request.url) == "http://sidecar:8080/v1/invoke/payment/create"
    assert request.content == b'{"amount":100}'
    assert request.headers["content-type"] == "application/json"
    assert request.headers["authorization"] == "Bearer tok"
    assert request.headers["x-opus-client-attempt"] == "1"
    assert 0 < int(request.headers["x-opus-deadline-ms"]) <= 2000
    assert "x-opus-retryable" not in request.headers


def test_bytes_and_protobuf_bodies_and_caller_headers() -> None:
    rec = Recorder(ok())
    message = struct_pb2.Struct()
    message.update({"amount": 100})
    with client(rec) as c:
        c.call_service("svc", "raw", b"\x00\x01")
        c.call_service("svc", "pb", message)
        c.call_service("svc", "csv", b"a,b", headers={"content-type": "text/csv"})
    raw, pb, csv = rec.requests
    assert raw.headers["content-type"] == "application/octet-stream"
    assert pb.headers["content-type"] == "application/x-protobuf"
    assert struct_pb2.Struct.FromString(pb.content) == message
    assert csv.headers["content-type"] == "text/csv"


def test_reply_decodes_as_protobuf_and_refuses_bad_bodies() -> None:
    message = struct_pb2.Struct()
    message.update({"k": "v"})
    rec = Recorder(httpx.Response(200, content=message.SerializeToString()))
    with client(rec) as c:
        reply = c.call_service("svc", "pb", message)
    assert reply.protobuf(struct_pb2.Struct) == message
    with pytest.raises(DecodeError, match="not JSON"):
        reply.json()
    with pytest.raises(TypeError, match="JSON-serialisable"):
        client(rec).call_service("svc", "x", object())


def test_a_refusal_is_resent_and_the_attempt_is_marked() -> None:
    rec = Recorder(httpx.Response(503, json={"error": "no healthy upstream"}), ok())
    with client(rec) as c:
        reply = c.call_service("payment", "create", {})
    assert reply.attempts == 2
    assert [r.headers["x-opus-client-attempt"] for r in rec.requests] == ["1", "2"]


def test_connection_refused_is_resent_then_raises_retryable() -> None:
    rec = Recorder(httpx.ConnectError("refused"))
    with client(rec, max_retries=2) as c, pytest.raises(RetryableError) as info:
        c.call_service("payment", "create", {})
    assert info.value.attempts == 3
    assert len(rec.requests) == 3


def test_a_reset_is_resent_only_for_idempotent_calls() -> None:
    rec = Recorder(httpx.ReadError("reset"), ok())
    with client(rec) as c, pytest.raises(RetryableError, match="not marked idempotent"):
        c.call_service("inventory", "reserve", {})
    rec = Recorder(httpx.ReadError("reset"), ok())
    with client(rec) as c:
        assert c.call_service("inventory", "get", {}, idempotent=True).attempts == 2
    assert rec.requests[0].headers["x-opus-retryable"] == "true"


def test_a_4xx_raises_without_resending() -> None:
    rec = Recorder(httpx.Response(404, text="no such method"))
    with client(rec) as c, pytest.raises(NonRetryableError) as info:
        c.call_service("payment", "nope", {})
    assert (info.value.status, info.value.body) == (404, b"no such method")
    assert len(rec.requests) == 1


def test_signature_covers_the_path_the_target_app_sees() -> None:
    rec = Recorder(ok())
    with client(rec, signing_key=b"k", signing_key_id="k1") as c:
        c.call_service("payment", "create?trace=1", {"amount": 1})
    (request,) = rec.requests
    assert request.url.raw_path == b"/v1/invoke/payment/create?trace=1"
    timestamp = int(request.headers[signing.TIMESTAMP_HEADER])
    expected = signing.sign(b"k", "POST", "/create?trace=1", timestamp, request.content)
    assert request.headers[signing.SIGNATURE_HEADER] == expected
    assert request.headers[signing.KEY_ID_HEADER] == "k1"


def test_future_returns_the_reply() -> None:
    rec = Recorder(ok({"n": 1}))
    with client(rec) as c:
        assert c.call_service_async("svc", "m", {}).result(timeout=5).json() == {"n": 1}


def test_cancelling_a_future_stops_its_retries() -> None:
    rec = Recorder(httpx.Response(503))
    with client(rec, retry_delay=30.0, timeout=None) as c:
        future = c.call_service_async("svc", "m", {})
        assert rec.seen.wait(5)
        assert future.cancel()
        assert future.cancelled()
    # The worker was in its 30 s backoff wait; the cancel ended it without a resend.
    assert len(rec.requests) == 1


def test_a_closed_client_refuses_calls() -> None:
    c = client(Recorder(ok()))
    c.close()
    with pytest.raises(ClientClosedError):
        c.call_service("svc", "m")
    with pytest.raises(ClientClosedError):
        c.call_service_async("svc", "m")


def test_base_url_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPUS_SIDECAR_URL", "http://10.0.0.1:18080")
    assert OpusClient().base_url == "http://10.0.0.1:18080"
    monkeypatch.delenv("OPUS_SIDECAR_URL")
    assert OpusClient().base_url == "http://localhost:8080"
    with pytest.raises(ValueError, match="base_url"):
        OpusClient("ftp://x")


def test_reply_text_uses_the_charset() -> None:
    body = "café".encode("latin-1")
    rec = Recorder(
        httpx.Response(200, content=body, headers={"content-type": "text/plain; charset=latin-1"})
    )
    with client(rec) as c:
        assert c.call_service("svc", "m").text == "café"
    assert json.loads(b'"x"') == "x"
