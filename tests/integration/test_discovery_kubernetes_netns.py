"""The Kubernetes path for real: sidecars resolve a headless Service's name through the
system resolver. A network namespace made by the test gets its own /etc/hosts (`ip netns
exec` mounts /etc/netns/NAME/hosts over it), standing in for cluster DNS: the name
`inventory.shop.svc.cluster.local` resolves to the inventory pod's address, every
sidecar's inbound listens on the same port (15006), as in a cluster. Skipped where the
test cannot create a namespace (not root, no `ip`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
FQDN = "inventory.shop.svc.cluster.local"


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create a network namespace"
    if shutil.which("ip") is None:
        return "ip not found (apt-get install iproute2)"
    probe = f"opus-k8s-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


@pytest.fixture
def netns(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    name = f"opus-k8s-{os.getpid()}"
    etc = Path("/etc/netns") / name
    etc.mkdir(parents=True, exist_ok=True)
    # The "pod" address: a second loopback address, so the name really is resolved.
    (etc / "hosts").write_text(f"127.0.0.1 localhost\n127.0.0.7 {FQDN}\n")
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
    try:
        yield name, tmp_path
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
        shutil.rmtree(etc, ignore_errors=True)


def _spawn(ns: str, argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            ["ip", "netns", "exec", ns, *argv],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )


def _wait_file(path: Path, proc: subprocess.Popen[bytes], log: Path) -> dict[str, int]:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if path.exists():
            data: dict[str, int] = json.loads(path.read_text())
            return data
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    raise AssertionError(f"{path.name} never appeared:\n{log.read_text()[-2000:]}")


def test_sidecars_discover_through_headless_service_dns(netns: tuple[str, Path]) -> None:
    ns, work = netns
    procs: list[subprocess.Popen[bytes]] = []
    try:
        app_ports = work / "app.json"
        app = _spawn(ns, [sys.executable, "-m", "tests.integration.echo_app", "--name", "inventory",
                          "--ports-file", str(app_ports)], work / "app.log")  # fmt: skip
        procs.append(app)
        app_port = _wait_file(app_ports, app, work / "app.log")["port"]
        common = {
            "discovery": {"backend": "kubernetes", "kubernetes": {
                "namespace": "shop", "port": 15006, "watch": ["inventory"], "resolve_interval": 0.2}},
            "log": {"access_log": ""},
        }  # fmt: skip
        configs = {
            "inventory": {"service": {"name": "inventory"}, "app": {"port": app_port},
                          "listeners": {"inbound": {"host": "127.0.0.7", "port": 15006},
                                        "outbound": {"host": "127.0.0.1", "port": 0},
                                        "admin": {"host": "127.0.0.1", "port": 0}}},
            "payment": {"service": {"name": "payment"}, "app": {"port": 1},
                        "listeners": {"inbound": {"host": "127.0.0.1", "port": 15006},
                                      "outbound": {"host": "127.0.0.1", "port": 0},
                                      "admin": {"host": "127.0.0.1", "port": 0}}},
        }  # fmt: skip
        ports: dict[str, dict[str, int]] = {}
        for name, config in configs.items():
            path = work / f"{name}.yaml"
            path.write_text(yaml.safe_dump({**common, **config}))
            ports_file = work / f"{name}.ports.json"
            proc = _spawn(ns, [sys.executable, "-m", "sidecar", "run", "--config", str(path),
                               "--ports-file", str(ports_file)], work / f"{name}.log")  # fmt: skip
            procs.append(proc)
            ports[name] = _wait_file(ports_file, proc, work / f"{name}.log")
        # The call, from a client inside the namespace: payment's sidecar resolves the
        # Service name, sends over HTTP/2 to 127.0.0.7:15006, the inventory sidecar.
        client = (
            "import httpx, json, sys;"
            f"r = httpx.post('http://127.0.0.1:{ports['payment']['outbound']}/v1/invoke/inventory/reserve', content=b'k8s', timeout=10);"
            "print(json.dumps({'status': r.status_code, 'upstream': r.headers.get('x-opus-upstream'), 'body': r.json()}))"
        )
        out = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", client],
                             capture_output=True, timeout=30, cwd=REPO)  # fmt: skip
        assert out.returncode == 0, out.stderr.decode()
        result = json.loads(out.stdout)
        assert result["status"] == 200
        assert result["upstream"] == "127.0.0.7:15006"
        assert result["body"]["app"] == "inventory" and result["body"]["body_len"] == 3
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
