"""The cases: saturation, fixed-rate latency, connection reuse, memory. Targets are
interleaved (the order rotates each repetition) so that a noisy neighbour hurts every
target alike, and each case is repeated `reps` times.
"""

from __future__ import annotations

import os
import socket
import ssl
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

from bench import load
from bench.fleet import Fleet, Target
from bench.procs import Server

PROTOCOLS = ("h1", "h2c")
SATURATION_TARGETS = (
    "direct",
    "nginx",
    "haproxy",
    "sidecar-in",
    "sidecar-out",
    "aiohttp",
    "sidecar-in+wasm",
    "mesh",
    "mesh+mtls",
)
LATENCY_TARGETS = (*SATURATION_TARGETS, "mesh+hmac")
CONNECTION_CALLS, CONNECTION_CALLERS = 10_000, 64
CONNECTIONS_METRIC = "opus_upstream_connections_opened_total"


@dataclass(frozen=True)
class Plan:
    reps: int
    saturation_s: float
    warmup_s: float
    rate: int
    rate_s: float
    connection_calls: int
    codec_calls: int
    profile_s: float  # 0: no profiles
    handshakes: int = 300  # fresh mTLS connections to the mesh+mtls callee (bounded in time too)


@dataclass
class Sample:
    rps: float = 0.0
    cpu_us: float = 0.0  # proxy CPU per successful call
    rss: int = 0
    errors: int = 0
    p50_us: float = 0.0
    p99_us: float = 0.0


@dataclass
class Results:
    saturation: dict[tuple[str, str], list[Sample]] = field(default_factory=dict)
    latency: dict[tuple[str, str], list[Sample]] = field(default_factory=dict)
    idle_rss: dict[tuple[str, str], int] = field(default_factory=dict)
    connections: dict[str, dict[str, float]] = field(default_factory=dict)
    scaling: dict[int, list[Sample]] = field(default_factory=dict)  # workers -> samples
    # mesh+mtls: fresh handshakes (count, seconds, callee CPU µs each) and, over the whole
    # run, the caller's calls and the upstream connections (handshakes) it opened for them.
    handshakes: dict[str, float] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    realtime: bool = False


def _pairs(fleet: Fleet, names: tuple[str, ...]) -> list[tuple[str, Target]]:
    out = []
    for name in names:
        target = fleet.targets.get(name)
        if target is None or target.unavailable:
            continue
        for proto in PROTOCOLS:
            if getattr(target, proto):
                out.append((proto, target))
    return out


def _rotated(items: list[tuple[str, Target]], rep: int) -> list[tuple[str, Target]]:
    k = rep % len(items) if items else 0
    return items[k:] + items[:k]


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def _saturate(proto: str, url: str, seconds: float, workdir: Path) -> load.LoadResult:
    if proto == "h1":
        return load.wrk(url, seconds, workdir / "post.lua")
    return load.h2load(url, seconds, workdir / "body.bin")


def run_saturation(fleet: Fleet, plan: Plan, results: Results) -> None:
    pairs = _pairs(fleet, SATURATION_TARGETS)
    for proto, target in pairs:
        servers = target.servers[proto]
        results.idle_rss[(target.name, proto)] = sum(s.rss() for s in servers)
        try:  # warm-up: pools filled, code paths imported
            body = fleet.workdir / "body.bin"
            load.h2load(_url(target, proto), plan.warmup_s, body, h1=proto == "h1")
        except load.LoadError as e:
            results.failures.append(f"warm-up {target.name} {proto}: {e}")
    for rep in range(plan.reps):
        for proto, target in _rotated(pairs, rep):
            servers = target.servers[proto]
            before = sum(s.cpu() for s in servers)
            try:
                res = _saturate(proto, _url(target, proto), plan.saturation_s, fleet.workdir)
            except load.LoadError as e:
                results.failures.append(f"saturation {target.name} {proto}: {e}")
                continue
            cpu = sum(s.cpu() for s in servers) - before
            sample = Sample(
                rps=res.rps,
                cpu_us=cpu / res.requests * 1e6 if res.requests else 0.0,
                rss=sum(s.rss() for s in servers),
                errors=res.errors,
            )
            results.saturation.setdefault((target.name, proto), []).append(sample)


def run_scaling(fleet: Fleet, plan: Plan, results: Results) -> None:
    """The inbound hop at saturation (HTTP/1.1) with each `workers: N`, interleaved."""
    items = list(fleet.scaling.items())
    for _, target in items:
        try:
            load.h2load(_url(target, "h1"), plan.warmup_s, fleet.workdir / "body.bin", h1=True)
        except load.LoadError as e:
            results.failures.append(f"warm-up {target.name}: {e}")
    for rep in range(plan.reps):
        k = rep % len(items) if items else 0
        for workers, target in items[k:] + items[:k]:
            servers = target.servers["h1"]
            before = sum(s.cpu() for s in servers)
            try:
                res = _saturate("h1", _url(target, "h1"), plan.saturation_s, fleet.workdir)
            except load.LoadError as e:
                results.failures.append(f"scaling {target.name}: {e}")
                continue
            cpu = sum(s.cpu() for s in servers) - before
            results.scaling.setdefault(workers, []).append(
                Sample(
                    rps=res.rps,
                    cpu_us=cpu / res.requests * 1e6 if res.requests else 0.0,
                    rss=sum(s.rss() for s in servers),
                    errors=res.errors,
                )
            )


def _url(target: Target, proto: str) -> str:
    url = getattr(target, proto)
    assert url is not None
    return str(url)


@contextmanager
def realtime(servers: list[Server], results: Results) -> Iterator[None]:
    """SCHED_FIFO for every thread of the servers while the light fixed-rate cases run."""
    tids = [
        int(tid) for s in servers for pid in s.pids() for tid in _tasks(pid)
    ]  # fmt: skip
    try:
        for tid in tids:
            os.sched_setscheduler(tid, os.SCHED_FIFO, os.sched_param(1))
        results.realtime = load.realtime_available()
    except OSError:
        results.realtime = False
    try:
        yield
    finally:
        for tid in tids:
            with suppress(OSError):
                os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))


def _tasks(pid: int) -> list[str]:
    try:
        return os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []


def run_latency(fleet: Fleet, plan: Plan, results: Results) -> None:
    pairs = _pairs(fleet, LATENCY_TARGETS)
    with realtime(fleet.servers, results):
        for rep in range(plan.reps):
            for proto, target in _rotated(pairs, rep):
                url = _url(target, proto)
                # Evenly paced, then (h2c) the burst case: BURST_CALLS calls together.
                shapes = [(proto, 1)] + ([("burst", load.BURST_CALLS)] if proto == "h2c" else [])
                for case, burst in shapes:
                    try:
                        res = load.paced(
                            url, plan.rate, plan.rate_s, 1024, proto=proto, burst=burst
                        )
                    except load.LoadError as e:
                        results.failures.append(f"latency {target.name} {case}: {e}")
                        continue
                    # The first 5% includes connection set-up; it is not the steady state.
                    steady = sorted(res.latencies_us[len(res.latencies_us) // 20 :])
                    sample = Sample(
                        rps=res.rps,
                        errors=res.errors,
                        p50_us=_percentile(steady, 0.50),
                        p99_us=_percentile(steady, 0.99),
                    )
                    results.latency.setdefault((target.name, case), []).append(sample)


def _metric(admin_port: int, name: str) -> float:
    url = f"http://127.0.0.1:{admin_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as reply:
        text = reply.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and not line.startswith("#")
    )


def run_connections(fleet: Fleet, plan: Plan, results: Results) -> None:
    """HTTP/1.1 callers into the outbound listener; the pool behind it is h2c or http1."""
    for pool, sidecar in (("h2c", fleet.sidecar_h2c), ("http1", fleet.sidecar_h1)):
        admin = sidecar.ports["admin"]
        url = sidecar.url("outbound", "/v1/invoke/nginx/bench")
        before = _metric(admin, CONNECTIONS_METRIC)
        try:
            res = load.h2load_count(
                url, plan.connection_calls, CONNECTION_CALLERS, fleet.workdir / "body.bin", h1=True
            )
        except load.LoadError as e:
            results.failures.append(f"connections {pool}: {e}")
            continue
        after = _metric(admin, CONNECTIONS_METRIC)
        results.connections[pool] = {
            "calls": float(res.requests),
            "opened": after - before,
            "opened_total": after,
            "errors": float(res.errors),
        }


HANDSHAKE_SECONDS = 30.0  # the fresh-handshake loop's bound in time


def run_handshakes(fleet: Fleet, plan: Plan, results: Results) -> None:
    """mesh+mtls: `plan.handshakes` fresh mTLS connections to the callee's inbound port,
    each one HTTP/1.1 call then closed (a client certificate from the run's dev CA);
    then the caller's reuse over the whole run (handshakes per call in steady state)."""
    if fleet.mtls is None or fleet.ca_dir is None:
        return
    from sidecar.tls import devca  # cryptography: only for this case

    caller, callee = fleet.mtls
    ca = devca.load_ca(fleet.ca_dir)
    chain, key = devca.issue(ca, f"spiffe://{ca.trust_domain}/svc/bench-client", 3600)
    cert_file, key_file = fleet.workdir / "bench-client.crt", fleet.workdir / "bench-client.key"
    cert_file.write_bytes(chain)
    key_file.write_bytes(key)
    ctx = ssl.create_default_context(cadata=ca.cert_pem.decode())
    ctx.check_hostname = False
    ctx.load_cert_chain(str(cert_file), str(key_file))
    ctx.set_alpn_protocols(["http/1.1"])
    port = callee.ports["inbound"]
    request = b"GET /bench HTTP/1.1\r\nhost: bench\r\nconnection: close\r\n\r\n"
    done = 0
    before = callee.cpu()
    started = time.monotonic()
    while done < plan.handshakes and time.monotonic() - started < HANDSHAKE_SECONDS:
        try:
            with (
                socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
                ctx.wrap_socket(raw) as conn,
            ):
                conn.sendall(request)
                while conn.recv(65536):
                    pass
        except OSError as e:
            results.failures.append(f"handshakes mesh+mtls: {e}")
            break
        done += 1
    seconds = time.monotonic() - started
    cpu = callee.cpu() - before
    admin = caller.ports["admin"]
    results.handshakes = {
        "count": float(done),
        "seconds": seconds,
        "callee_cpu_us": cpu / done * 1e6 if done else 0.0,
        "caller_calls": _metric(admin, "opus_requests_total"),
        "caller_connections": _metric(admin, CONNECTIONS_METRIC),
    }
