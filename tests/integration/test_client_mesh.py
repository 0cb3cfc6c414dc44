"""opus_client against a real mesh: a real sidecar (tests/integration/conftest.py) in
front of a scripted app, and `python -m sidecar demo` for the seed's own snippet.

The scripted app is a stdlib HTTP server on 127.0.0.1:0 in this process, so a test can
make it fail once, stall, or echo raw bytes, and read back what reached it.
"""

from __future__ import annotations

import ast
import asyncio
import json
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import CancelledError
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from opus_client import (
    AsyncOpusClient,
    CallTimeout,
    NonRetryableError,
    OpusClient,
    RetryableError,
)
from opus_client.vault import Vault
from sidecar import signing
from tests import tlscerts
from tests.emulators.vault_emulator import VaultEmulator
from tests.integration.conftest import REPO, Mesh, Sidecar, refusing_port

pytestmark = pytest.mark.integration

SEED_SNIPPET = """\
from opus_client import OpusClient
from opus_client.exceptions import RetryableError
client = OpusClient(base_url="http://localhost:8080", max_retries=3, retry_delay=0.5)
response = client.call_service(service="payment", method="create",
                               body={"amount": 100, "currency": "USD"}, timeout=2.0)
print(response.json())
"""


class AppHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: ScriptedApp

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._send(200, b'{"status":"UP"}')

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        headers = {k.lower(): v for k, v in self.headers.items()}
        with self.server.lock:
            self.server.calls.append((self.path, headers, body))
            seen = sum(1 for path, _, _ in self.server.calls if path == self.path)
        if self.path == "/raw":
            self._send(200, body, headers.get("content-type", "application/octet-stream"))
        elif self.path == "/flaky" and seen == 1:
            self._send(503, b'{"error":"warming up"}')
        elif self.path.startswith("/status/"):
            self._send(int(self.path.rsplit("/", 1)[1]), b'{"error":"refused by the app"}')
        elif self.path == "/slow":
            self.server.release.wait(10)  # held until the test ends
            self._send(200, b"{}")
        else:
            reply = {"path": self.path, "headers": headers, "body": body.decode("latin-1")}
            self._send(200, json.dumps(reply).encode())


class ScriptedApp(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), AppHandler)
        self.calls: list[tuple[str, dict[str, str], bytes]] = []
        self.lock = threading.Lock()
        self.release = threading.Event()
        self.port = self.server_address[1]

    def paths(self) -> list[str]:
        with self.lock:
            return [path for path, _, _ in self.calls]


@pytest.fixture
def app() -> Iterator[ScriptedApp]:
    server = ScriptedApp()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.release.set()
        server.shutdown()
        server.server_close()


@pytest.fixture
def shop(mesh: Mesh, app: ScriptedApp) -> Sidecar:
    """A sidecar for service `shop` in front of the scripted app; its own outbound
    listener reaches `shop` through its inbound, as a call between two pods would."""
    sidecar = mesh.sidecar("shop", app.port)
    mesh.wait_endpoints(sidecar, "shop", 1)
    return sidecar


def outbound_503s(sidecar: Sidecar) -> float:
    return sidecar.metric("opus_requests_total", direction="outbound", service="shop", code="503")


def test_seed_snippet_runs_unchanged_against_the_demo() -> None:
    demo = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "demo", "--calls", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
    )
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        for line in demo.stdout or ():
            lines.put(line)

    reader = threading.Thread(target=read)
    reader.start()
    output, url = "", None
    try:
        deadline = time.monotonic() + 30
        while "Press Ctrl-C" not in output:  # the demo's own signal that the mesh is up
            assert demo.poll() is None, output
            output += lines.get(timeout=max(0.1, deadline - time.monotonic()))
        match = re.search(r"payment's sidecar \((http://127\.0\.0\.1:\d+)\)", output)
        assert match, output
        url = match.group(1)
        snippet = SEED_SNIPPET
        if not url.endswith(":8080"):  # 8080 was busy, so the demo moved payment's sidecar
            snippet = snippet.replace("http://localhost:8080", url)
        result = subprocess.run(
            [sys.executable, "-c", snippet], capture_output=True, text=True, timeout=30, cwd=REPO
        )
    finally:
        demo.send_signal(signal.SIGTERM)
        demo.wait(20)
        reader.join(5)
        assert demo.stdout is not None
        demo.stdout.close()
    assert result.returncode == 0, result.stderr
    printed = ast.literal_eval(result.stdout.strip())
    assert printed["status"] == "created"
    assert (printed["amount"], printed["currency"]) == (100, "USD")
    assert printed["inventory"]["status"] == "reserved"  # payment's own call crossed the mesh


def test_async_forms(shop: Sidecar, app: ScriptedApp) -> None:
    async def with_asyncio() -> list[Any]:
        async with AsyncOpusClient(shop.outbound) as client:
            replies = await asyncio.gather(
                *(client.call_service("shop", "echo", {"n": n}) for n in range(5))
            )
            with pytest.raises(CallTimeout):
                async with asyncio.timeout(5):  # the call's own deadline fires first
                    await client.call_service("shop", "slow", {}, timeout=0.3)
            return [json.loads(r.json()["body"])["n"] for r in replies]

    assert sorted(asyncio.run(with_asyncio())) == [0, 1, 2, 3, 4]

    with OpusClient(shop.outbound) as client:
        futures = [client.call_service_async("shop", "echo", {"n": n}) for n in range(5)]
        got = [json.loads(f.result(timeout=10).json()["body"])["n"] for f in futures]
        assert got == [0, 1, 2, 3, 4]
        slow = client.call_service_async("shop", "slow", {})
        while "/slow" not in app.paths()[-1:]:  # the call reached the app and waits there
            time.sleep(0.01)
        assert slow.cancel()
        with pytest.raises(CancelledError):
            slow.result(timeout=1)


def test_a_call_recovers_when_the_endpoint_fails_once(shop: Sidecar, app: ScriptedApp) -> None:
    with OpusClient(shop.outbound, retry_delay=0.05) as client:
        reply = client.call_service("shop", "flaky", {"amount": 100})
    assert (reply.status_code, reply.attempts) == (200, 2)
    assert [h["x-opus-client-attempt"] for p, h, _ in app.calls if p == "/flaky"] == ["1", "2"]
    assert outbound_503s(shop) == 1


def test_retryable_error_once_the_retries_are_spent(mesh: Mesh) -> None:
    gone = mesh.sidecar("gone", refusing_port())  # its app is not up: the sidecar answers 503
    with (
        OpusClient(gone.outbound, max_retries=3, retry_delay=0.01) as client,
        pytest.raises(RetryableError) as info,
    ):
        client.call_service("gone", "create", {"amount": 100})
    assert (info.value.status, info.value.attempts) == (503, 4)
    assert gone.metric("opus_requests_total", direction="outbound", code="503") == 4

    dead = f"http://127.0.0.1:{refusing_port()}"  # refused before reaching any sidecar
    with (
        OpusClient(dead, max_retries=2, retry_delay=0.01) as client,
        pytest.raises(RetryableError) as info,
    ):
        client.call_service("gone", "create", {})
    assert (info.value.status, info.value.attempts) == (None, 3)


def test_a_4xx_raises_without_retrying(shop: Sidecar, app: ScriptedApp) -> None:
    with (
        OpusClient(shop.outbound, retry_delay=0.01) as client,
        pytest.raises(NonRetryableError) as info,
    ):
        client.call_service("shop", "status/409", {"amount": 100})
    assert info.value.status == 409
    assert json.loads(info.value.body) == {"error": "refused by the app"}
    assert app.paths() == ["/status/409"]
    assert shop.metric("opus_requests_total", direction="outbound", code="409") == 1


def test_timeouts_fire(shop: Sidecar, app: ScriptedApp) -> None:
    with OpusClient(shop.outbound) as client:
        start = time.monotonic()
        with pytest.raises(CallTimeout) as info:
            client.call_service("shop", "slow", {}, timeout=0.3)
        assert time.monotonic() - start < 2.0
        assert info.value.attempts == 1  # a timed-out POST may have run: not resent


def test_token_callable_is_called_again_after_token_ttl(shop: Sidecar, app: ScriptedApp) -> None:
    issued: list[str] = []
    now = [0.0]

    def provider() -> str:
        issued.append(f"token-{len(issued) + 1}")
        return issued[-1]

    with OpusClient(shop.outbound, auth_token=provider, token_ttl=3600, clock=lambda: now[0]) as c:
        c.call_service("shop", "echo", {})
        now[0] += 1800
        c.call_service("shop", "echo", {})
        now[0] += 1800  # an hour on: the first token's ttl has run out
        c.call_service("shop", "echo", {})
    seen = [h["authorization"] for _, h, _ in app.calls]
    assert seen == ["Bearer token-1", "Bearer token-1", "Bearer token-2"]


def _payment_message_class() -> Any:
    """A generated-style message class built at run time (no protoc needed)."""
    fdp = descriptor_pb2.FileDescriptorProto(name="opus_test_payment.proto", package="opustest")
    msg = fdp.message_type.add(name="CreatePayment")
    for number, (name, kind) in enumerate([("amount", 3), ("currency", 9)], start=1):
        msg.field.add(name=name, number=number, type=kind, label=1)  # 3 int64, 9 string
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("opustest.CreatePayment"))


def test_a_protobuf_body_round_trips(shop: Sidecar, app: ScriptedApp) -> None:
    create_payment = _payment_message_class()
    sent = create_payment(amount=100, currency="USD")
    with OpusClient(shop.outbound) as client:
        reply = client.call_service("shop", "raw", sent)
    assert reply.headers["content-type"] == "application/x-protobuf"
    assert reply.protobuf(create_payment) == sent
    assert app.calls[0][1]["content-type"] == "application/x-protobuf"


def test_the_signature_verifies_against_what_the_app_sees(shop: Sidecar, app: ScriptedApp) -> None:
    with OpusClient(shop.outbound, signing_key=b"s3cret", signing_key_id="k1") as client:
        client.call_service("shop", "echo?trace=1", {"amount": 100})
    path, headers, body = app.calls[0]
    assert path == "/echo?trace=1"
    timestamp = int(headers["x-opus-timestamp"])
    expected = signing.sign(b"s3cret", "POST", path, timestamp, body)  # hmac_verify's check
    assert signing.signature_matches(expected, headers["x-opus-signature"])
    assert headers["x-opus-key-id"] == "k1"


def _peers(port: int) -> set[int]:
    """Client ports of the connections the listener on `port` holds open now (the kernel's
    view of the sidecar's accepted sockets; the sidecar has no per-connection metric)."""
    peers = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, remote, state = line.split()[1:4]
            if int(local.rsplit(":", 1)[1], 16) == port and state == "01":  # ESTABLISHED
                peers.add(int(remote.rsplit(":", 1)[1], 16))
    return peers


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux's /proc/net/tcp")
def test_connections_are_reused_across_calls_and_threads(shop: Sidecar, app: ScriptedApp) -> None:
    port = shop.ports["outbound"]
    seen: set[int] = set()

    def call(client: OpusClient) -> None:
        client.call_service("shop", "echo", {})
        seen.update(_peers(port))

    with OpusClient(shop.outbound) as client:
        for _ in range(5):
            call(client)
        for _ in range(5):  # one thread at a time, each its own
            thread = threading.Thread(target=call, args=(client,))
            thread.start()
            thread.join()
        client.call_service_async("shop", "echo", {}).result(timeout=10)
        seen.update(_peers(port))
    assert len(seen) == 1

    fresh: set[int] = set()  # the same count with one client per call sees every connection
    for _ in range(3):
        with OpusClient(shop.outbound) as one_off:
            one_off.call_service("shop", "echo", {})
            fresh.update(_peers(port))
    assert len(fresh) == 3
    assert shop.metric("opus_requests_total", direction="outbound", code="200") >= 14


def test_vault_token_provider(shop: Sidecar, app: ScriptedApp) -> None:
    vault_server = VaultEmulator(tlscerts.ca()).start()  # its KV version 1 read
    vault_server.secrets["opus/creds/prod"] = {"token": "vault-token-1"}
    try:
        vault = Vault(url=vault_server.address, token="root")
        secret = vault.read("opus/creds/prod")  # the seed's form
        now = [0.0]
        with OpusClient(shop.outbound, auth_token=secret["token"], token_ttl=3600) as client:
            client.call_service("shop", "echo", {})
        with OpusClient(
            shop.outbound,
            auth_token=vault.token_provider("opus/creds/prod"),
            token_ttl=3600,
            clock=lambda: now[0],
        ) as client:
            client.call_service("shop", "echo", {})
            vault_server.secrets["opus/creds/prod"] = {"token": "vault-token-2"}  # rotated
            now[0] += 3600
            client.call_service("shop", "echo", {})
    finally:
        vault_server.stop()
    seen = [h["authorization"] for _, h, _ in app.calls]
    assert seen == ["Bearer vault-token-1", "Bearer vault-token-1", "Bearer vault-token-2"]


def test_signed_calls_pass_the_inbound_hmac_verify(mesh: Mesh, app: ScriptedApp) -> None:
    keys = mesh.workdir / "client-keys.json"
    keys.write_text(json.dumps({"k1": "s3cret"}))
    verify = {"name": "hmac_verify", "config": {"key_file": str(keys)}}
    secure = mesh.sidecar("secure", app.port, {"filters": {"inbound": [verify]}})
    with OpusClient(secure.outbound, signing_key=b"s3cret", signing_key_id="k1") as client:
        reply = client.call_service("secure", "echo?trace=1", {"amount": 100})
        assert reply.json()["path"] == "/echo?trace=1"
    with OpusClient(secure.outbound) as unsigned, pytest.raises(NonRetryableError) as info:
        unsigned.call_service("secure", "echo", {"amount": 100})
    assert info.value.status in (401, 403)
    assert app.paths() == ["/echo?trace=1"]  # only the signed call reached the app
