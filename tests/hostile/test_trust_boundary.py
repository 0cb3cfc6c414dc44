"""Trust boundaries on real sidecars: what callers from outside the mesh (and apps behind
it) may not forge, admin writes from off the host, and secrets kept out of every output.

Headers only the mesh may set: `x-opus-error` on a 503 (a peer sidecar's claim that its
app never saw the call, which lets the caller resend even a POST), `x-opus-upstream`
(which endpoint served a call) and `x-forwarded-for` (who the caller was): the sidecar
strips, overwrites or appends to them.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from sidecar import signing
from tests.hostile.wire import raw_app
from tests.integration.conftest import Mesh, Sidecar

pytestmark = pytest.mark.integration


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines())


def test_an_app_cannot_forge_never_saw_to_get_a_post_resent(mesh: Mesh) -> None:
    """An app answering `503` + `x-opus-error: UF` has seen the call; the mesh must not
    resend a POST it saw. Promised: each POST reaches exactly one app."""
    liar, liar_calls = raw_app(
        mesh, b"HTTP/1.1 503 Service Unavailable\r\nx-opus-error: UF\r\ncontent-length: 0\r\n\r\n"
    )
    mesh.sidecar("inventory", liar.ports["port"])
    honest, _ = mesh.service("inventory")
    _, payment = mesh.service("payment")
    mesh.wait_endpoints(payment, "inventory", 2)
    honest_before = httpx.get(f"http://127.0.0.1:{honest.ports['port']}/calls", timeout=5).json()[
        "calls"
    ]
    liar_before = _lines(liar_calls)
    posts = 20
    with httpx.Client(timeout=10) as client:
        for i in range(posts):
            client.post(f"{payment.outbound}/v1/invoke/inventory/pay/{i}", content=b"once")
    honest_after = httpx.get(f"http://127.0.0.1:{honest.ports['port']}/calls", timeout=5).json()[
        "calls"
    ]
    seen = (honest_after - honest_before) + (_lines(liar_calls) - liar_before)
    assert seen == posts, f"{posts} POSTs were seen {seen} times by the apps"


def test_an_upstream_app_cannot_forge_x_opus_upstream(mesh: Mesh) -> None:
    forger, _ = raw_app(
        mesh, b"HTTP/1.1 200 OK\r\nx-opus-upstream: 6.6.6.6:1\r\ncontent-length: 2\r\n\r\nok"
    )
    inventory = mesh.sidecar("inventory", forger.ports["port"])
    _, payment = mesh.service("payment")
    resp = httpx.get(f"{payment.outbound}/v1/invoke/inventory/x", timeout=10)
    assert resp.status_code == 200
    assert resp.headers.get_list("x-opus-upstream") == [f"127.0.0.1:{inventory.ports['inbound']}"]


def test_forwarded_for_from_outside_is_not_trusted(mesh: Mesh) -> None:
    """Promised: the app sees the real peer as the last x-forwarded-for hop (Envoy's
    use_remote_address), whatever the caller claimed."""
    _, inventory = mesh.service("inventory")
    resp = httpx.get(f"{inventory.inbound}/who", headers={"x-forwarded-for": "6.6.6.6"}, timeout=10)
    forwarded = resp.json()["headers"].get("x-forwarded-for", "")
    assert forwarded.split(",")[-1].strip() == "127.0.0.1", forwarded


def test_mesh_reply_headers_from_outside_do_not_change_routing(mesh: Mesh) -> None:
    """A caller cannot mark its call retryable past the outbound (the retry filter strips
    x-opus-retryable before it leaves) nor choose a deadline longer than its own."""
    _, inventory = mesh.service("inventory")
    _, payment = mesh.service(
        "payment", {"filters": {"outbound": [{"name": "retry", "config": {"retry_delay": 0.01}}]}}
    )
    resp = httpx.post(
        f"{payment.outbound}/v1/invoke/inventory/x",
        headers={"x-opus-retryable": "true"},
        content=b"a",
        timeout=10,
    )
    assert resp.status_code == 200
    assert "x-opus-retryable" not in resp.json()["headers"]
    assert inventory.metric("opus_requests_total", direction="inbound") >= 1


# --- admin endpoints from off the host -------------------------------------------------


def _netns_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create a network namespace (a real non-loopback caller)"
    probe = f"opus-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


@pytest.fixture
def outside() -> Iterator[tuple[str, str]]:
    """A network namespace joined to this one by a veth pair: (namespace, our address)."""
    reason = _netns_unavailable()
    if reason:
        pytest.skip(reason)
    ns = f"opus-ext-{os.getpid()}"
    host_if, ns_if = f"oh{os.getpid() % 100000}", f"on{os.getpid() % 100000}"
    net = f"10.{os.getpid() % 200 + 20}.77"
    steps = [
        ["ip", "netns", "add", ns],
        ["ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if, "netns", ns],
        ["ip", "addr", "add", f"{net}.1/30", "dev", host_if],
        ["ip", "link", "set", host_if, "up"],
        ["ip", "-n", ns, "addr", "add", f"{net}.2/30", "dev", ns_if],
        ["ip", "-n", ns, "link", "set", ns_if, "up"],
        ["ip", "-n", ns, "link", "set", "lo", "up"],
    ]
    try:
        for step in steps:
            done = subprocess.run(step, capture_output=True, text=True)
            if done.returncode != 0:
                pytest.skip(f"{' '.join(step)} failed: {done.stderr.strip()}")
        yield ns, f"{net}.1"
    finally:
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _curl_from(ns: str, *args: str) -> tuple[int, str]:
    done = subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            ns,
            "curl",
            "-s",
            "-m",
            "5",
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=15,
    )
    body, _, code = done.stdout.rpartition("\n")
    return int(code or 0), body


def test_admin_writes_refuse_non_loopback_callers(mesh: Mesh, outside: tuple[str, str]) -> None:
    ns, address = outside
    _, sidecar = mesh.service("inventory", {"listeners": {"admin": {"host": "0.0.0.0"}}})
    url = f"http://{address}:{sidecar.ports['admin']}"
    assert _curl_from(ns, f"{url}/ready")[0] == 200  # reads answer the pod network (probes)
    for path in ("/drain", "/quitquitquit", "/logging?level=DEBUG"):
        code, body = _curl_from(ns, "-X", "POST", f"{url}{path}")
        assert code == 403, (path, body)
    assert httpx.get(f"{sidecar.admin}/ready", timeout=5).status_code == 200  # not draining
    assert sidecar.proc.poll() is None
    assert "refused POST /drain from non-loopback" in sidecar.output()


# --- secrets ---------------------------------------------------------------------------

HMAC_SECRET = "hmac-secret-must-not-leak-7f3a"
CONSUL_TOKEN = "consul-token-must-not-leak-91c2"


def test_secrets_never_appear_in_logs_errors_metrics_or_config_dump(mesh: Mesh) -> None:
    keys = mesh.workdir / "keys.json"
    keys.write_text(json.dumps({"k1": HMAC_SECRET}))
    source = {"key_file": str(keys), "reload_interval": 0.1}
    secret_config = {
        "log": {"level": "DEBUG"},
        # Configured but unused (the file registry serves): it must still be redacted.
        "discovery": {"consul": {"token": CONSUL_TOKEN}},
    }
    _, inventory = mesh.service(
        "inventory",
        {**secret_config, "filters": {"inbound": [{"name": "hmac_verify", "config": source}]}},
    )
    _, payment = mesh.service(
        "payment",
        {
            **secret_config,
            "filters": {"outbound": [{"name": "hmac_sign", "config": {**source, "key_id": "k1"}}]},
        },
    )
    outputs: list[str] = []
    with httpx.Client(timeout=10) as client:
        ok = client.post(f"{payment.outbound}/v1/invoke/inventory/pay", content=b"x")
        assert ok.status_code == 200
        outputs.append(ok.text)
        ts = int(time.time())
        for headers in (
            {},
            {signing.SIGNATURE_HEADER: "0" * 64, signing.TIMESTAMP_HEADER: str(ts)},
            {signing.SIGNATURE_HEADER: "zz", signing.TIMESTAMP_HEADER: str(ts)},
            {
                signing.SIGNATURE_HEADER: "0" * 64,
                signing.TIMESTAMP_HEADER: str(ts),
                signing.KEY_ID_HEADER: "nope",
            },
        ):
            refused = client.post(f"{inventory.inbound}/pay", content=b"x", headers=headers)
            assert refused.status_code == 401
            outputs.append(refused.text + json.dumps(dict(refused.headers)))
        for sidecar in (inventory, payment):
            dump = client.get(f"{sidecar.admin}/config_dump").text
            assert "[redacted]" in dump
            outputs += [dump, sidecar.metrics(), client.get(f"{sidecar.admin}/clusters").text]
            outputs.append(client.get(f"{sidecar.admin}/stats").text)
    for sidecar in (inventory, payment):
        outputs.append(sidecar.output())
        outputs.append(_access_log(sidecar))
    for text in outputs:
        assert HMAC_SECRET not in text
        assert CONSUL_TOKEN not in text


def _access_log(sidecar: Sidecar) -> str:
    path = sidecar.log_path.parent / f"{sidecar.name}.access.log"
    return path.read_text() if path.exists() else ""
