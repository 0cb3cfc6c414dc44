"""Transparent interception for real: iptables REDIRECT inside network namespaces the test makes.

Two namespaces joined by a veth pair: "pod" (10.77.0.2) holds the client, the
sidecars (as uid 1337, which the rules exclude) and the inventory app; "ext"
(10.77.0.1) holds servers outside the mesh: HTTP, client-first echoes and
server-first banners. 10.77.0.100:80 is a virtual IP that only capture.service_ips
gives meaning (inventory). The client runs as root in "pod", so it is captured.

Skipped where namespaces cannot be made (not root, no `ip`/iptables/setpriv, or
no CAP_SYS_ADMIN in a container).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
PROXY_UID = 1337
CAPTURE_PORT = 15001
POD_IP, EXT_IP, VIP = "10.77.0.2", "10.77.0.1", "10.77.0.100"
DETECT_TIMEOUT = 0.2  # the default
START_TIMEOUT = 20.0

# Servers outside the mesh, in the "ext" namespace.
EXT_SERVERS = textwrap.dedent(
    """
    import asyncio, json, os, sys

    async def http(reader, writer):
        head = await reader.readuntil(b"\\r\\n\\r\\n")
        path = head.split(b" ")[1]
        body = b"external " + path
        writer.write(b"HTTP/1.1 200 OK\\r\\ncontent-length: %d\\r\\nconnection: close\\r\\n\\r\\n%s"
                     % (len(body), body))
        await writer.drain()
        writer.close()

    async def echo(reader, writer):  # client-first; answers EOF with "bye" and EOF
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.write(b"bye")
        writer.close()

    async def banner(reader, writer):  # server-first, like SMTP or MySQL
        writer.write(b"220 opus-ext ready\\r\\n")
        await writer.drain()
        await echo(reader, writer)

    async def main(host, ready):
        for handler, port in ((http, 8088), (echo, 7000), (echo, 6379), (banner, 2525),
                              (banner, 3306)):
            await asyncio.start_server(handler, host, port)
        with open(ready + ".tmp", "w") as fh:
            fh.write("ok")
        os.replace(ready + ".tmp", ready)
        await asyncio.Event().wait()

    asyncio.run(main(sys.argv[1], sys.argv[2]))
    """
)

# Probes, run as root inside "pod" (so iptables captures them); prints one JSON result.
PROBES = textwrap.dedent(
    """
    import json, socket, sys, time
    import httpx

    VIP, EXT = sys.argv[1], sys.argv[2]
    out = {}

    r = httpx.get(f"http://{VIP}/reserve?x=1", timeout=10)
    out["meshed_h1"] = {"status": r.status_code, "body": r.json(), "headers": dict(r.headers)}
    with httpx.Client(http1=False, http2=True, timeout=10) as client:  # h2c prior knowledge
        r = client.get(f"http://{VIP}/h2")
        out["meshed_h2"] = {"status": r.status_code, "body": r.json(),
                            "version": r.http_version, "headers": dict(r.headers)}

    r = httpx.get(f"http://{EXT}:8088/hello", timeout=10)
    out["passthrough_http"] = {"status": r.status_code, "text": r.text,
                               "headers": dict(r.headers)}

    def first_bytes(port, send=b""):
        t0 = time.monotonic()
        s = socket.create_connection((EXT, port), timeout=5)
        if send:
            s.sendall(send)
        data = s.recv(100)
        delay = time.monotonic() - t0
        s.shutdown(socket.SHUT_WR)  # half-close: the echo answers "bye" and closes
        rest = b""
        while chunk := s.recv(100):
            rest += chunk
        s.close()
        return {"data": data.decode(), "delay": delay, "rest": rest.decode()}

    out["opaque_echo"] = first_bytes(6379, b"PING\\r\\n")
    out["opaque_banner"] = first_bytes(3306)
    out["sniffed_echo"] = first_bytes(7000, b"hello, not http\\n")
    out["sniffed_banner"] = first_bytes(2525)
    banners = [first_bytes(2525)["delay"] for _ in range(5)]
    out["sniffed_banner_delays"] = banners
    print(json.dumps(out))
    """
)


def _can_make_namespaces() -> str | None:
    """Why namespaces cannot be used here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    for tool in ("ip", "iptables", "iptables-restore", "setpriv"):
        if shutil.which(tool) is None:
            return f"{tool} not found (apt-get install iproute2 iptables util-linux)"
    name = f"opus-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` failed (no CAP_SYS_ADMIN?): {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


def _open_path_for_others(*targets: Path) -> list[tuple[Path, int]]:
    changed: list[tuple[Path, int]] = []
    for target in targets:
        for directory in [target, *target.parents]:
            if not directory.is_dir():
                continue
            mode = directory.stat().st_mode & 0o7777
            if not mode & 0o001 and all(d != directory for d, _ in changed):
                directory.chmod(mode | 0o001)
                changed.append((directory, mode))
    return changed


def _sh(*argv: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")


@dataclass
class Topology:
    pod: str
    ext: str
    workdir: Path
    procs: list[tuple[subprocess.Popen[bytes], Path]]

    def spawn(self, name: str, ns: str, argv: list[str], as_proxy: bool = False) -> Path:
        """Start a process in a namespace (as the proxy uid if asked); returns its log path."""
        prefix = ["ip", "netns", "exec", ns]
        if as_proxy:
            prefix += ["setpriv", f"--reuid={PROXY_UID}", f"--regid={PROXY_UID}", "--clear-groups"]
        log = self.workdir / f"{name}.log"
        with log.open("wb") as fh:
            proc = subprocess.Popen(
                [*prefix, *argv],
                stdout=fh,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env=dict(os.environ, PYTHONUNBUFFERED="1"),
            )
        self.procs.append((proc, log))
        return log

    def wait_file(self, path: Path, log: Path) -> str:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if path.exists():
                return path.read_text()
            if any(p.poll() is not None for p, _ in self.procs):
                break
            time.sleep(0.02)
        raise RuntimeError(f"{path.name} never appeared:\n{log.read_text()[-3000:]}")

    def in_pod(self, code: str, *args: str, timeout: float = 60) -> Any:
        done = subprocess.run(
            ["ip", "netns", "exec", self.pod, sys.executable, "-c", code, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=REPO,
        )
        if done.returncode != 0:
            logs = "\n".join(f"--- {log.name}\n{log.read_text()[-2000:]}" for _, log in self.procs)
            raise AssertionError(f"probe failed:\n{done.stderr[-3000:]}\n{logs}")
        return json.loads(done.stdout)


def _sidecar_config(workdir: Path, service: str, app_port: int, **extra: Any) -> Path:
    config: dict[str, Any] = {
        "service": {"name": service, "instance_id": f"{service}-1"},
        "app": {"host": "127.0.0.1", "port": app_port},
        "listeners": {
            "outbound": {"host": "127.0.0.1", "port": 0},
            "inbound": {"host": "127.0.0.1", "port": 0},
            "admin": {"host": "127.0.0.1", "port": 0},
        },
        "discovery": {"backend": "file", "file": {"directory": str(workdir / "registry")}},
        "log": {"level": "INFO", "access_log": str(workdir / f"{service}.access.log")},
        "drain_timeout": 2.0,
    }
    for key, value in extra.items():
        config[key] = {**config.get(key, {}), **value}
    path = workdir / f"{service}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def topology() -> Iterator[Topology]:
    reason = _can_make_namespaces()
    if reason:
        pytest.skip(reason)
    tag = os.getpid()
    pod, ext = f"opus-pod-{tag}", f"opus-ext-{tag}"
    # Readable and writable by the proxy uid (pytest's tmp_path is private to root).
    workdir = Path(tempfile.mkdtemp(prefix="opus-netns-"))
    workdir.chmod(0o777)
    (workdir / "registry").mkdir(mode=0o777)
    (workdir / "registry").chmod(0o777)
    topo = Topology(pod, ext, workdir, [])
    # The sidecars run as the proxy uid and import this checkout (and its venv): every
    # directory above it must be traversable by others. A clone under a private temp
    # dir (mkdtemp is 0700) is not, so open it for the test and restore it after.
    opened = _open_path_for_others(REPO, Path(sys.executable).resolve())
    try:
        _sh("ip", "netns", "add", pod)
        _sh("ip", "netns", "add", ext)
        _sh("ip", "-n", pod, "link", "add", "veth-pod", "type", "veth", "peer", "veth-ext", "netns", ext)  # fmt: skip
        for ns, dev, ip in ((pod, "veth-pod", POD_IP), (ext, "veth-ext", EXT_IP)):
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
            _sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            _sh("ip", "-n", ns, "link", "set", dev, "up")
        ready = workdir / "ext.ready"
        script = workdir / "ext_servers.py"
        script.write_text(EXT_SERVERS)
        log = topo.spawn("ext", ext, [sys.executable, str(script), EXT_IP, str(ready)])
        topo.wait_file(ready, log)
        # The mesh: inventory's app and sidecar, then the caller's sidecar with capture on.
        app_ports = workdir / "inventory-app.ports.json"
        log = topo.spawn(
            "inventory-app",
            pod,
            [sys.executable, "-m", "tests.integration.echo_app", "--name", "inventory",
             "--ports-file", str(app_ports)],
        )  # fmt: skip
        app_port = json.loads(topo.wait_file(app_ports, log))["port"]
        for service, port, extra in (
            ("inventory", app_port, {}),
            (
                "client",
                1,  # nothing calls the client's app here
                {
                    "listeners": {
                        "capture": {"host": "0.0.0.0", "port": CAPTURE_PORT, "enabled": True}
                    },
                    "capture": {"service_ips": {f"{VIP}:80": "inventory"}},
                },
            ),
        ):
            config = _sidecar_config(workdir, service, port, **extra)
            ports = workdir / f"{service}.ports.json"
            log = topo.spawn(
                service,
                pod,
                [sys.executable, "-m", "sidecar", "run", "--config", str(config),
                 "--ports-file", str(ports)],
                as_proxy=True,
            )  # fmt: skip
            topo.wait_file(ports, log)
        # The rules, from the real command, inside the pod namespace.
        _sh("ip", "netns", "exec", pod, sys.executable, "-m", "sidecar", "iptables", "--apply",
            "--capture-port", str(CAPTURE_PORT), "--proxy-uid", str(PROXY_UID))  # fmt: skip
        yield topo
    finally:
        for proc, _ in topo.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc, _ in topo.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        for ns in (pod, ext):  # deleting a namespace takes its veth end and rules with it
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        shutil.rmtree(workdir, ignore_errors=True)
        for path, mode in opened:
            path.chmod(mode)


@pytest.fixture(scope="module")
def probes(topology: Topology) -> dict[str, Any]:
    result: dict[str, Any] = topology.in_pod(PROBES, VIP, EXT_IP)
    return result


def test_rules_are_installed_in_the_namespace_only(topology: Topology) -> None:
    saved = subprocess.run(
        ["ip", "netns", "exec", topology.pod, "iptables-save", "-t", "nat"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert f"-A OPUS_REDIRECT -p tcp -j REDIRECT --to-ports {CAPTURE_PORT}" in saved
    assert f"--uid-owner {PROXY_UID} -j RETURN" in saved


def test_known_service_vip_is_meshed(probes: dict[str, Any]) -> None:
    h1 = probes["meshed_h1"]
    assert h1["status"] == 200, h1
    assert h1["body"]["app"] == "inventory" and h1["body"]["path"] == "/reserve?x=1"
    assert h1["headers"]["x-opus-upstream-protocol"] == "h2c"  # crossed the sidecars
    h2 = probes["meshed_h2"]
    assert h2["status"] == 200 and h2["version"] == "HTTP/2", h2
    assert h2["body"]["app"] == "inventory" and h2["body"]["path"] == "/h2"
    assert "x-opus-upstream" in h2["headers"]


def test_unknown_http_destination_passes_through(probes: dict[str, Any]) -> None:
    http = probes["passthrough_http"]
    assert http["status"] == 200 and http["text"] == "external /hello"
    assert "x-opus-upstream" not in http["headers"]  # relayed as bytes, not meshed


def test_opaque_ports_are_relayed_at_once(probes: dict[str, Any]) -> None:
    echo, banner = probes["opaque_echo"], probes["opaque_banner"]
    assert echo["data"] == "PING\r\n" and echo["rest"] == "bye"  # half-close relayed
    assert banner["data"] == "220 opus-ext ready\r\n" and banner["rest"] == "bye"
    # Server-first on an opaque port: no detection wait at all.
    assert banner["delay"] < DETECT_TIMEOUT * 0.75, banner


def test_non_http_is_relayed_after_a_bounded_detection_wait(probes: dict[str, Any]) -> None:
    echo = probes["sniffed_echo"]
    # Client-first non-HTTP is recognised from its first bytes: no wait.
    assert echo["data"] == "hello, not http\n" and echo["rest"] == "bye"
    assert echo["delay"] < DETECT_TIMEOUT * 0.75, echo
    # Server-first on a sniffed port waits out detect_timeout, then is relayed.
    banner = probes["sniffed_banner"]
    assert banner["data"] == "220 opus-ext ready\r\n" and banner["rest"] == "bye"
    delays = probes["sniffed_banner_delays"]
    print(f"server-first banner delay on a sniffed port: {sorted(delays)}")
    assert all(DETECT_TIMEOUT * 0.95 <= d < DETECT_TIMEOUT + 0.3 for d in delays), delays


def test_capture_metrics(topology: Topology, probes: dict[str, Any]) -> None:
    ports = json.loads((topology.workdir / "client.ports.json").read_text())
    code = textwrap.dedent(
        """
        import json, sys, httpx
        from prometheus_client.parser import text_string_to_metric_families
        text = httpx.get(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=5).text
        out = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name.startswith("opus_capture_") and s.name.endswith("_total"):
                    out[s.name + "/" + ",".join(s.labels.values())] = s.value
        print(json.dumps(out))
        """
    )
    metrics = topology.in_pod(code, str(ports["admin"]))
    assert metrics["opus_capture_connections_total/meshed"] == 2
    assert metrics["opus_capture_connections_total/opaque"] == 2
    assert metrics["opus_capture_connections_total/passthrough"] == 8  # 1 HTTP + 7 sniffed
    assert metrics["opus_capture_bytes_total/upstream"] > 0
    assert metrics["opus_capture_bytes_total/downstream"] > 0


def test_capture_listener_on_loopback_without_iptables() -> None:
    """The asyncio adapters without root: the original destination is injected, keyed by
    the client's source port, so relaying, the detection wait and half-close run for real
    on 127.0.0.1 even where namespaces cannot be made."""
    import asyncio
    import dataclasses
    import socket

    from sidecar.capture import CaptureListener
    from sidecar.config import load_config
    from sidecar.metrics import Metrics

    async def banner(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 ready\r\n")
        while data := await reader.read(65536):
            writer.write(data)
        writer.write(b"bye")
        writer.close()

    async def main() -> dict[str, Any]:
        server = await asyncio.start_server(banner, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        cfg = load_config(None, {})
        cfg = dataclasses.replace(
            cfg,
            listeners=dataclasses.replace(
                cfg.listeners,
                capture=dataclasses.replace(cfg.listeners.capture, host="127.0.0.1", port=0),
            ),
        )
        destinations: dict[int, tuple[str, int]] = {}

        async def no_mesh(request: Any, sink: Any) -> None:
            raise AssertionError("nothing here is meshed")

        capture = CaptureListener(
            cfg,
            no_mesh,
            None,
            Metrics(),
            original_dst=lambda s: destinations.get(s.getpeername()[1]),
        )
        capture_port = await capture.start()
        loop = asyncio.get_running_loop()
        out: dict[str, Any] = {}
        for name, send in (("server_first", b""), ("client_first", b"hello\n")):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            destinations[sock.getsockname()[1]] = ("127.0.0.1", port)
            sock.setblocking(False)
            started = loop.time()
            await loop.sock_connect(sock, ("127.0.0.1", capture_port))
            reader, writer = await asyncio.open_connection(sock=sock)
            writer.write(send)
            first = await asyncio.wait_for(reader.readuntil(b"\n"), 5)
            delay = loop.time() - started
            writer.write(b"x")
            writer.write_eof()
            rest = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            out[name] = (first, delay, rest)
        await capture.close()
        server.close()
        return out

    out = asyncio.run(main())
    first, delay, rest = out["server_first"]
    assert first == b"220 ready\r\n" and rest == b"xbye"
    assert DETECT_TIMEOUT * 0.95 <= delay < DETECT_TIMEOUT + 0.3, delay
    first, delay, rest = out["client_first"]
    assert first == b"220 ready\r\n" and rest.endswith(b"xbye") and b"hello" in rest
    assert delay < DETECT_TIMEOUT * 0.75, delay


# Run last in the module: it stops the client sidecar the tests above share.
DRAIN_PROBE = textwrap.dedent(
    """
    import json, os, signal, sys, threading, time
    import httpx

    VIP, ADMIN, PID = sys.argv[1], sys.argv[2], int(sys.argv[3])

    def meshed():
        text = httpx.get(f"http://127.0.0.1:{ADMIN}/metrics", timeout=5).text
        for line in text.splitlines():
            if line.startswith('opus_capture_connections_total{kind="meshed"}'):
                return float(line.split()[-1])
        return 0.0

    before = meshed()
    out = {}

    def call():
        try:
            r = httpx.get(f"http://{VIP}/slow?ms=1500", timeout=10)
            out["status"], out["body"] = r.status_code, r.json()
        except httpx.HTTPError as exc:
            out["error"] = repr(exc)
        out["done"] = time.monotonic()

    caller = threading.Thread(target=call)
    caller.start()
    deadline = time.monotonic() + 5
    while meshed() == before and time.monotonic() < deadline:  # the call is in the sidecar
        time.sleep(0.01)
    out["in_flight_seen"] = meshed() > before
    os.kill(PID, signal.SIGTERM)
    out["term"] = time.monotonic()
    caller.join(15)
    print(json.dumps(out))
    """
)


def test_sigterm_drains_a_captured_call_in_flight(topology: Topology) -> None:
    """A captured call (the app takes 1.5 s) in flight at SIGTERM finishes with 200 within
    drain_timeout (2 s), and the sidecar exits 0 (issue 15, finding 10)."""
    client = next(proc for proc, log in topology.procs if log.name == "client.log")
    ports = json.loads((topology.workdir / "client.ports.json").read_text())
    out = topology.in_pod(DRAIN_PROBE, VIP, str(ports["admin"]), str(client.pid))
    assert out["in_flight_seen"], out
    assert out.get("status") == 200, out
    assert out["body"] == {"app": "inventory", "slept_ms": 1500}
    assert out["done"] - out["term"] > 0.5  # still running when SIGTERM came
    assert client.wait(10) == 0
