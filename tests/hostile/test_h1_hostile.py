"""Hostile HTTP/1.1 on a real sidecar's inbound listener (the port the pod network reaches).

Promised: a request whose framing two parsers could read differently (smuggling shapes)
is answered 400 and the connection closed, and nothing of it reaches the app; requests
over the size limits get 414/431/413 before the app sees them; a client that trickles
its headers is cut off after limits.header_read_timeout; meanwhile other clients are
served. llhttp (httptools) is used strictly: none of its lenient flags are set.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.hostile.wire import app_calls, exchange, raw_app, statuses
from tests.integration.conftest import Mesh, Proc, Sidecar

pytestmark = pytest.mark.integration

SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"

SMUGGLING_SHAPES = {
    "content-length-then-transfer-encoding": b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    + SMUGGLED,
    "transfer-encoding-then-content-length": b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 40\r\n\r\n0\r\n\r\n"
    + SMUGGLED,
    "two-content-lengths": b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nContent-Length: 37\r\n\r\n"
    + SMUGGLED,
    "two-equal-content-lengths": b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n"
    + SMUGGLED,
    "content-length-list": b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 0, 37\r\n\r\n"
    + SMUGGLED,
    "signed-content-length": b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: +0\r\n\r\n"
    + SMUGGLED,
    "transfer-encoding-not-chunked-last": b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n"
    + SMUGGLED,
    "transfer-encoding-twice": b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    + SMUGGLED,
    "obs-fold": b"GET /a HTTP/1.1\r\nHost: x\r\nX-A: a\r\n Transfer-Encoding: chunked\r\n\r\n"
    + SMUGGLED,
    "bare-lf-line-endings": b"GET /a HTTP/1.1\nHost: x\n\n" + SMUGGLED,
    "bare-lf-in-headers": b"GET /a HTTP/1.1\r\nHost: x\nX-A: b\r\n\r\n" + SMUGGLED,
    "bare-cr-in-headers": b"GET /a HTTP/1.1\r\nHost: x\rX-A: b\r\n\r\n" + SMUGGLED,
    "space-before-colon": b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\nContent-Length: 0\r\n\r\n"
    + SMUGGLED,
    "whitespace-before-first-header": b"GET /a HTTP/1.1\r\n Host: x\r\n\r\n" + SMUGGLED,
    "nul-in-header-value": b"GET /a HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n" + SMUGGLED,
    "lf-in-request-target": b"GET /a\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n" + SMUGGLED,
}


# Bad framing that llhttp reports only after on_headers_complete: the call had started.
BODY_FRAMING_SHAPES = {
    "transfer-encoding-unknown": b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n"
    + SMUGGLED,
    "invalid-chunk-size": b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"
    + SMUGGLED,
    "chunk-size-overflow": b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n10000000000000000\r\n"
    + SMUGGLED,
    "chunk-extension-bare-lf": b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0;x\n\r\n"
    + SMUGGLED,
}


@pytest.fixture(scope="module")
def echo_pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Proc, Sidecar]]:
    """One app and its sidecar for the whole module (a start costs about a second)."""
    mesh = Mesh(tmp_path_factory.mktemp("h1"))
    try:
        yield mesh.service("inventory", {"limits": {"header_read_timeout": 1.0}})
    finally:
        mesh.stop()


def _app_saw(sidecar: Sidecar, path: str) -> bool:
    log = sidecar.log_path.parent / f"{sidecar.name}.access.log"
    return any(json.loads(line)["path"] == path for line in log.read_text().splitlines())


@pytest.mark.parametrize("shape", sorted(SMUGGLING_SHAPES))
def test_smuggling_shapes_are_400_and_never_forwarded(
    echo_pair: tuple[Proc, Sidecar], shape: str
) -> None:
    app, sidecar = echo_pair
    before = app_calls(app)
    raw = exchange(sidecar.ports["inbound"], SMUGGLING_SHAPES[shape])
    assert statuses(raw) == [400], raw[:300]
    assert b"connection: close" in raw.lower()
    assert app_calls(app) == before  # neither the outer nor the smuggled request got through
    # The listener still serves everyone else.
    assert httpx.get(f"{sidecar.inbound}/after", timeout=5).status_code == 200


@pytest.mark.parametrize("shape", sorted(BODY_FRAMING_SHAPES))
def test_bad_body_framing_fails_the_call_promptly(
    echo_pair: tuple[Proc, Sidecar], shape: str
) -> None:
    """The head was valid, so the call had started (and streamed to the app) when the
    chunked framing turned out bad. Promised: the client gets 400 (or at least a close)
    within 2 s, and the smuggled second request never reaches the app."""
    _, sidecar = echo_pair
    start = time.monotonic()
    raw = exchange(sidecar.ports["inbound"], BODY_FRAMING_SHAPES[shape], timeout=2.5)
    elapsed = time.monotonic() - start
    assert not _app_saw(sidecar, "/smuggled")
    assert elapsed < 2.0, f"no reply and no close for {elapsed:.1f}s"
    assert statuses(raw) in ([400], [502], [])


def test_valid_pipeline_then_garbage_forwards_only_the_valid_request(
    echo_pair: tuple[Proc, Sidecar],
) -> None:
    """A valid request pipelined ahead of a smuggling shape: the first is answered, then
    the connection closes (the bad one is refused by closing, as a reply to it could be
    mistaken for the first one's by a confused intermediary)."""
    app, sidecar = echo_pair
    before = app_calls(app)
    good = b"POST /one HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
    raw = exchange(sidecar.ports["inbound"], good + SMUGGLING_SHAPES["two-content-lengths"])
    assert statuses(raw) in ([200], [200, 400]), raw[:600]
    assert app_calls(app) == before + 1
    assert not _app_saw(sidecar, "/smuggled")


def test_oversized_request_line_is_414(mesh: Mesh) -> None:
    app, sidecar = mesh.service("inventory", {"limits": {"max_request_line": 1024}})
    before = app_calls(app)
    raw = exchange(
        sidecar.ports["inbound"], b"GET /" + b"a" * 2000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    assert statuses(raw) == [414]
    assert app_calls(app) == before


def test_oversized_headers_are_431(mesh: Mesh) -> None:
    app, sidecar = mesh.service("inventory", {"limits": {"max_header_bytes": 4096}})
    before = app_calls(app)
    headers = b"".join(b"x-h%d: %s\r\n" % (i, b"v" * 100) for i in range(60))
    raw = exchange(sidecar.ports["inbound"], b"GET / HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
    assert statuses(raw) == [431]
    assert app_calls(app) == before


def test_body_over_a_buffering_filters_limit_is_413(mesh: Mesh) -> None:
    """hmac_verify must buffer the body to check it: past max_body_bytes the call is 413."""
    keys = mesh.workdir / "keys.json"
    keys.write_text(json.dumps({"k1": "hostile-k1-secret"}))
    config = {"key_file": str(keys), "max_body_bytes": 1024}
    app, sidecar = mesh.service(
        "inventory", {"filters": {"inbound": [{"name": "hmac_verify", "config": config}]}}
    )
    from sidecar import signing

    body = b"x" * 4096
    ts = int(time.time())
    headers = {
        signing.SIGNATURE_HEADER: signing.sign(b"hostile-k1-secret", "POST", "/big", ts, body),
        signing.TIMESTAMP_HEADER: str(ts),
        signing.KEY_ID_HEADER: "k1",
    }
    before = app_calls(app)
    resp = httpx.post(f"{sidecar.inbound}/big", content=body, headers=headers, timeout=10)
    assert resp.status_code == 413, resp.text
    assert app_calls(app) == before


def test_slowloris_is_cut_off_after_the_header_read_timeout(
    echo_pair: tuple[Proc, Sidecar],
) -> None:
    """Headers trickled one byte every 0.2 s: limits.header_read_timeout (1 s) ends it with
    408 and a close, while a second client keeps being served."""
    app, sidecar = echo_pair
    before = app_calls(app)
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", sidecar.ports["inbound"]), timeout=5) as sock:
        sock.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n")
        closed_after = None
        received = b""
        for i in range(40):  # at most 8 s of trickling
            try:
                sock.sendall(b"x-trickle-%d: y\r\n" % i)
            except (BrokenPipeError, ConnectionResetError):
                closed_after = time.monotonic() - start
                break
            assert httpx.get(f"{sidecar.inbound}/other", timeout=5).status_code == 200
            sock.settimeout(0.2)
            try:
                chunk = sock.recv(4096)
            except TimeoutError:
                continue
            received += chunk
            if not chunk or received.endswith(b"}"):
                closed_after = time.monotonic() - start
                break
    assert closed_after is not None, "the trickling client was never cut off"
    assert closed_after < 3.0
    assert statuses(received) in ([408], [])
    assert app_calls(app) == before + i + 1  # only the /other probes reached the app


def test_crlf_from_the_app_never_reaches_the_caller_as_a_header(mesh: Mesh) -> None:
    """An app that answers with a bare LF inside a header value (an attempt to inject a
    second header) is a malformed upstream reply: the caller sees 502/503, never the
    injected header."""
    reply = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-a: a\nx-injected: yes\r\n\r\nok"
    app, _ = raw_app(mesh, reply)
    sidecar = mesh.sidecar("inventory", app.ports["port"])
    for protocol_client in (httpx.Client(timeout=5), httpx.Client(timeout=5, http2=False)):
        with protocol_client as client:
            resp = client.get(f"{sidecar.inbound}/x")
            assert resp.status_code in (502, 503), resp.headers
            assert "x-injected" not in resp.headers
