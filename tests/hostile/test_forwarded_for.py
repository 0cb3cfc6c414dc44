"""Duplicate x-forwarded-for through a real inbound sidecar (issue 15, finding 7): a
caller sending the header twice must not get its own value read as the last hop.

The app is a recorder on 127.0.0.1 that keeps every request head byte for byte (an
echo app folds repeated headers, which would hide the bug), so the test sees how many
x-forwarded-for lines reached the app and what they said.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import h2.config
import h2.connection
import h2.events
import httpx
import pytest

from tests.integration.conftest import Mesh

pytestmark = pytest.mark.integration

REPLY = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"
SPOOFED = [("x-forwarded-for", "1.1.1.1"), ("x-forwarded-for", "6.6.6.6")]


class HeadRecorder:
    """An HTTP/1.1 app that records each request head and answers 200, one per connection."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.heads: list[bytes] = []
        self.arrived = threading.Condition()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return  # closed
            with conn:
                conn.settimeout(5)
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    head += chunk
                with self.arrived:
                    self.heads.append(head.split(b"\r\n\r\n", 1)[0])
                    self.arrived.notify_all()
                conn.sendall(REPLY)

    def forwarded_for(self, path: bytes) -> list[bytes]:
        """The x-forwarded-for lines of the request head for `path`, once it has arrived."""
        line = b"GET " + path + b" HTTP/1.1"

        def head() -> bytes | None:
            return next((h for h in self.heads if h.startswith(line)), None)

        with self.arrived:
            assert self.arrived.wait_for(lambda: head() is not None, timeout=10), self.heads
            found = head()
        assert found is not None
        return [
            field for field in found.split(b"\r\n") if field.lower().startswith(b"x-forwarded-for:")
        ]

    def close(self) -> None:
        self.listener.close()
        self.thread.join(5)


@pytest.fixture
def recorder() -> Iterator[HeadRecorder]:
    app = HeadRecorder()
    try:
        yield app
    finally:
        app.close()


def _h2c_get(port: int, headers: list[tuple[str, str]]) -> int:
    """One GET over h2c with prior knowledge (the h2 library as the client); its status."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    request = [(":method", "GET"), (":scheme", "http"), (":path", "/who"), (":authority", "x")]
    conn.send_headers(1, [*request, *headers], end_stream=True)
    status = 0
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(conn.data_to_send())
        while True:
            data = sock.recv(65536)
            assert data, "the sidecar closed before the stream ended"
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    status = int(dict(event.headers)[b":status"])
                if isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                    return status
            sock.sendall(conn.data_to_send())


def test_two_forwarded_for_over_http11_reach_the_app_as_one(
    mesh: Mesh, recorder: HeadRecorder
) -> None:
    inventory = mesh.sidecar("inventory", recorder.port)
    with httpx.Client(timeout=10) as client:
        resp = client.get(f"{inventory.inbound}/who", headers=SPOOFED)
    assert resp.status_code == 200
    assert recorder.forwarded_for(b"/who") == [b"x-forwarded-for: 1.1.1.1, 6.6.6.6, 127.0.0.1"]


def test_two_forwarded_for_over_h2c_reach_the_app_as_one(
    mesh: Mesh, recorder: HeadRecorder
) -> None:
    inventory = mesh.sidecar("inventory", recorder.port)
    assert _h2c_get(inventory.ports["inbound"], SPOOFED) == 200
    assert recorder.forwarded_for(b"/who") == [b"x-forwarded-for: 1.1.1.1, 6.6.6.6, 127.0.0.1"]
