"""The HTTP/1.1 boundary on real sidecars: what an HTTP/2 caller, an app or a client may
not smuggle through the mesh's HTTP/1.1 writers and readers (issue 15, findings 1-3, 8).

Promised: a request whose fields HTTP/1.1 cannot carry never reaches the app (the caller
gets a 400-class answer, or its stream is refused) and the app's pooled connection
serves the next caller; trailers stay trailers, of the message they came with, in both
directions; a trailer that would split the response is dropped; Host and
Transfer-Encoding follow RFC 9112 (400, 501), also behind a filter that reads the body.
"""

from __future__ import annotations

import json
import socket
import sys
import time
from pathlib import Path
from typing import Any

import httptools
import httpx
import pytest
from hpack import Decoder
from hyperframe.frame import HeadersFrame, RstStreamFrame

from tests.hostile.h2raw import RawH2
from tests.hostile.wire import exchange, statuses
from tests.integration.conftest import Mesh, Proc

pytestmark = pytest.mark.integration


def _boundary_app(mesh: Mesh, kind: str) -> tuple[Proc, Path]:
    log = mesh.workdir / f"boundary-{kind}.jsonl"
    log.touch()
    argv = [sys.executable, "-m", "tests.hostile.boundary_apps", "--kind", kind]
    proc = Proc(f"boundary-{kind}", [*argv, "--log-file", str(log)], mesh.workdir, None)
    mesh.procs.append(proc)
    return proc, log


def _seen(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def _h2_status(
    port: int, extra: list[tuple[str, str]], path: str = "/v1/invoke/inventory/x"
) -> Any:
    """One raw h2c request (headers no client library would send); the :status the
    sidecar answered, or the RST_STREAM it refused the stream with."""
    raw = RawH2(port)
    try:
        frame = HeadersFrame(1)
        frame.data = raw.encoder.encode(
            [(":method", "GET"), (":scheme", "http"), (":path", path), (":authority", "x"), *extra]
        )
        frame.flags.add("END_HEADERS")
        frame.flags.add("END_STREAM")
        raw.send(frame)
        deadline = time.monotonic() + 5
        decoder = Decoder()
        while time.monotonic() < deadline:
            for got in raw.frames(timeout=1.0):
                if isinstance(got, HeadersFrame) and got.stream_id == 1:
                    # str pairs (raw=False), though hpack annotates them as bytes
                    fields: dict[Any, Any] = dict(decoder.decode(got.data))
                    return fields[":status"]
                if isinstance(got, RstStreamFrame) and got.stream_id == 1:
                    return got
            if raw.closed:
                return None
        raise AssertionError("no answer to the h2c request")
    finally:
        raw.close()


def _responses(raw: bytes) -> list[tuple[int, bytes]]:
    """Every response in `raw` as an HTTP/1.1 client reads it: (status, body)."""
    out: list[tuple[int, bytes]] = []
    body = bytearray()

    class Reader:
        def on_body(self, data: bytes) -> None:
            body.extend(data)

        def on_message_complete(self) -> None:
            out.append((parser.get_status_code(), bytes(body)))
            body.clear()

    parser = httptools.HttpResponseParser(Reader())
    parser.feed_data(raw)
    return out


SMUGGLE = "a\r\ncontent-length: 0\r\n\r\nGET /smuggled HTTP/1.1\r\nx-pad: z"


@pytest.mark.parametrize(
    "extra",
    [
        [("x-a", SMUGGLE)],
        [("x-a\r\nx-injected", "1")],
        [("x-a", "nul\x00byte")],
        [("x a", "space in the name")],
    ],
    ids=["crlf-value", "crlf-name", "nul-value", "space-name"],
)
def test_h2_fields_http11_cannot_carry_never_reach_the_app(mesh: Mesh, extra: Any) -> None:
    """Finding 1: over h2c to the outbound, through the mesh (h2c between sidecars) to an
    HTTP/1.1 app; the app sees only the bystander's call, on the same pooled connection."""
    app, log = _boundary_app(mesh, "h1")
    mesh.sidecar("inventory", app.ports["port"])
    _, payment = mesh.service("payment")
    mesh.wait_endpoints(payment, "inventory", 1)
    before = len(_seen(log))
    answer = _h2_status(payment.ports["outbound"], extra)
    assert answer is None or isinstance(answer, RstStreamFrame) or str(answer).startswith("4"), (
        answer
    )
    resp = httpx.get(f"{payment.outbound}/v1/invoke/inventory/bystander", timeout=5)
    assert resp.status_code == 200 and resp.text == "/bystander"
    seen = _seen(log)[before:]
    assert [r["path"] for r in seen] == ["/bystander"]
    assert "smuggled" not in seen[0]["raw"] and "x-injected" not in seen[0]["raw"]


def test_an_h2c_apps_trailer_cannot_split_the_http11_response(mesh: Mesh) -> None:
    """Finding 2: an h2c app's trailer value holds CRLF and a forged second response. The
    HTTP/1.1 caller on a keep-alive connection reads one response per request, and the
    forged one never (the inbound engine refuses the trailer block: the body is cut)."""
    app, _ = _boundary_app(mesh, "h2")
    sidecar = mesh.sidecar("inventory", app.ports["port"], {"app": {"protocol": "h2c"}})
    with socket.create_connection(("127.0.0.1", sidecar.ports["inbound"]), timeout=5) as sock:
        received = b""
        for i in range(2):
            try:
                sock.sendall(b"GET /t%d HTTP/1.1\r\nHost: x\r\n\r\n" % i)
            except OSError:
                break  # closed after a refused response (below)
            deadline = time.monotonic() + 5
            while received.count(b"0\r\n\r\n") <= i and time.monotonic() < deadline:
                try:
                    chunk = sock.recv(65536)
                except TimeoutError:
                    break
                if not chunk:
                    break
                received += chunk
    assert b"forged" not in received, received
    responses = _responses(received)
    if len(responses) < 2:
        # The inbound's HTTP/2 engine refuses the malformed trailer block as a stream
        # error (RFC 9113 8.1.1): the body cannot end cleanly, so the caller's connection
        # closes mid-body. One truncated response, nothing forged after it.
        assert received.startswith(b"HTTP/1.1 200 OK\r\n"), received
        assert received.count(b"HTTP/1.1 ") == 1 and not received.endswith(b"0\r\n\r\n")
    else:
        assert [status for status, _ in responses] == [200, 200], received
        assert all(body == b"ok" for _, body in responses)


def test_an_apps_response_trailers_never_reach_the_next_caller(mesh: Mesh) -> None:
    """Finding 3: a chunked reply's `set-cookie` trailer, then an unrelated caller's call on
    the same pooled app connection: the second caller never sees the cookie."""
    app, log = _boundary_app(mesh, "h1")
    mesh.sidecar("inventory", app.ports["port"])
    _, payment = mesh.service("payment")
    mesh.wait_endpoints(payment, "inventory", 1)
    with httpx.Client(timeout=5) as first:
        assert first.get(f"{payment.outbound}/v1/invoke/inventory/cookie").text == "ok"
    with httpx.Client(timeout=5) as second:
        resp = second.get(f"{payment.outbound}/v1/invoke/inventory/next")
    assert resp.status_code == 200 and resp.text == "/next"
    assert "set-cookie" not in resp.headers
    last = _seen(log)[-1]
    assert "GET /cookie" in last["raw"] and "GET /next" in last["raw"]  # one pooled connection


def test_request_trailers_reach_the_app_as_trailers_not_headers(mesh: Mesh) -> None:
    """Finding 3, requests: a trailer `x-forwarded-for` is never a header at the app."""
    app, log = _boundary_app(mesh, "h1")
    sidecar = mesh.sidecar("inventory", app.ports["port"])
    request = (
        b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\nx-forwarded-for: 6.6.6.6\r\nx-checksum: 1\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", sidecar.ports["inbound"]), timeout=5) as sock:
        sock.sendall(request)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
    (record,) = _seen(log)
    assert record["path"] == "/upload"
    assert all("6.6.6.6" not in value for _, value in record["headers"])
    assert ["x-checksum", "1"] in record["trailers"]
    assert ["x-forwarded-for", "6.6.6.6"] in record["trailers"]


@pytest.mark.parametrize(
    ("request_bytes", "status", "says"),
    [
        (b"GET /a HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", 400, b"Host"),
        (b"GET /a HTTP/1.1\r\nx-a: 1\r\n\r\n", 400, b"Host"),
        (
            b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
            501,
            b"gzip",
        ),
    ],
    ids=["two-hosts", "no-host", "gzip-chunked"],
)
def test_host_and_transfer_coding_rules(
    mesh: Mesh, request_bytes: bytes, status: int, says: bytes
) -> None:
    """Finding 8 on a real inbound listener: answered before the app sees anything."""
    app, log = _boundary_app(mesh, "h1")
    sidecar = mesh.sidecar("inventory", app.ports["port"])
    raw = exchange(sidecar.ports["inbound"], request_bytes)
    assert statuses(raw) == [status], raw
    assert says in raw
    assert exchange(sidecar.ports["inbound"], b"GET /a HTTP/1.0\r\n\r\n").startswith(
        b"HTTP/1.1 200"
    )  # HTTP/1.0 may omit Host
    assert [r["path"] for r in _seen(log)] == ["/a"]


def test_content_length_in_a_chunked_requests_trailers_is_400_behind_hmac_sign(
    mesh: Mesh,
) -> None:
    """Finding 8: behind a filter that reads the body (hmac_sign), a framing field in the
    trailers is the caller's 400, not a 500 blamed on the filter."""
    keys = mesh.workdir / "keys.json"
    keys.write_text(json.dumps({"k1": "boundary-secret"}))
    sign = {"name": "hmac_sign", "config": {"key_file": str(keys), "key_id": "k1"}}
    app, log = _boundary_app(mesh, "h1")
    mesh.sidecar("inventory", app.ports["port"])
    _, payment = mesh.service("payment", {"filters": {"outbound": [sign]}})
    mesh.wait_endpoints(payment, "inventory", 1)
    before = len(_seen(log))
    raw = exchange(
        payment.ports["outbound"],
        b"POST /v1/invoke/inventory/pay HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\ncontent-length: 5\r\n\r\n",
    )
    assert statuses(raw) == [400], raw
    assert b"hmac_sign" not in raw
    assert len(_seen(log)) == before
