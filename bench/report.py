"""The results as one Markdown document: tables with ratios to nginx and to the direct
call, the targets met or not, profiles, the machine and the commands."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench import load
from bench.fleet import Fleet
from bench.suite import LATENCY_TARGETS, SATURATION_TARGETS, Plan, Results, Sample

MB = 1024 * 1024
PROTO_NAME = {"h1": "HTTP/1.1", "h2c": "h2c", "burst": "h2c burst"}


@dataclass
class Stat:
    median: float
    low: float
    high: float

    def fmt(self, digits: int = 0) -> str:
        if self.low == self.high:
            return f"{self.median:,.{digits}f}"
        return f"{self.median:,.{digits}f} [{self.low:,.{digits}f}..{self.high:,.{digits}f}]"


def stat(samples: list[Sample] | None, pick: Callable[[Sample], float]) -> Stat | None:
    if not samples:
        return None
    values = [pick(s) for s in samples]
    return Stat(statistics.median(values), min(values), max(values))


def _header(*columns: str) -> list[str]:
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def _ratio(a: Stat | None, b: Stat | None) -> str:
    return f"{a.median / b.median:.2f}x" if a and b and b.median else "-"


def _delta(a: Stat | None, b: Stat | None) -> str:
    return f"{(a.median - b.median) / 1000:+.3f}" if a and b else "-"


def saturation_table(fleet: Fleet, results: Results) -> list[str]:
    rows = [
        *_header(
            "target",
            "protocol",
            "req/s median [min..max]",
            "x nginx",
            "x direct",
            "proxy CPU µs/call",
            "RSS MB idle → loaded",
            "errors",
        ),
    ]
    for proto in ("h1", "h2c"):
        nginx = stat(results.saturation.get(("nginx", proto)), lambda s: s.rps)
        direct = stat(results.saturation.get(("direct", proto)), lambda s: s.rps)
        for name in SATURATION_TARGETS:
            target = fleet.targets.get(name)
            if target is None:
                continue
            if target.unavailable or not getattr(target, proto):
                why = target.unavailable or f"no {PROTO_NAME[proto]}"
                rows.append(f"| {name} | {PROTO_NAME[proto]} | not available ({why}) | | | | | |")
                continue
            samples = results.saturation.get((name, proto))
            rps = stat(samples, lambda s: s.rps)
            cpu = stat(samples, lambda s: s.cpu_us)
            rss = stat(samples, lambda s: s.rss / MB)
            idle = results.idle_rss.get((name, proto), 0) / MB
            errors = sum(s.errors for s in samples or [])
            rows.append(
                f"| {name} | {PROTO_NAME[proto]} | {rps.fmt() if rps else 'failed'} | "
                f"{_ratio(rps, nginx)} | {_ratio(rps, direct)} | {cpu.fmt(1) if cpu else '-'} | "
                f"{idle:.1f} → {rss.high if rss else 0:.1f} | {errors} |"
            )
    return rows


def scaling_table(fleet: Fleet, results: Results) -> list[str]:
    rows = _header(
        "workers", "req/s median [min..max]", "x 1 worker", "CPU µs/call (all processes)",
        "RSS MB loaded", "errors",
    )  # fmt: skip
    one = stat(results.scaling.get(1), lambda s: s.rps)
    for workers in fleet.scaling:
        samples = results.scaling.get(workers)
        rps = stat(samples, lambda s: s.rps)
        cpu = stat(samples, lambda s: s.cpu_us)
        rss = stat(samples, lambda s: s.rss / MB)
        rows.append(
            f"| {workers} | {rps.fmt() if rps else 'failed'} | {_ratio(rps, one)} | "
            f"{cpu.fmt(1) if cpu else '-'} | {rss.high if rss else 0:.1f} | "
            f"{sum(s.errors for s in samples or [])} |"
        )
    return rows


def latency_table(fleet: Fleet, results: Results, plan: Plan) -> list[str]:
    rows = [
        *_header(
            "target",
            "protocol",
            "p50 µs median [min..max]",
            "p99 µs median [min..max]",
            "+p50 ms vs direct",
            "+p99 ms vs direct",
            "+p50 ms vs nginx",
            "errors",
        ),
    ]
    for proto in ("h1", "h2c", "burst"):
        direct = results.latency.get(("direct", proto))
        nginx = results.latency.get(("nginx", proto))
        d50, d99 = stat(direct, lambda s: s.p50_us), stat(direct, lambda s: s.p99_us)
        n50 = stat(nginx, lambda s: s.p50_us)
        for name in LATENCY_TARGETS:
            target = fleet.targets.get(name)
            if target is None:
                continue
            if target.unavailable or not getattr(target, "h2c" if proto == "burst" else proto):
                why = target.unavailable or f"no {PROTO_NAME[proto]}"
                rows.append(f"| {name} | {PROTO_NAME[proto]} | not available ({why}) | | | | | |")
                continue
            samples = results.latency.get((name, proto))
            p50, p99 = stat(samples, lambda s: s.p50_us), stat(samples, lambda s: s.p99_us)
            errors = sum(s.errors for s in samples or [])
            rows.append(
                f"| {name} | {PROTO_NAME[proto]} | {p50.fmt() if p50 else 'failed'} | "
                f"{p99.fmt() if p99 else 'failed'} | {_delta(p50, d50)} | {_delta(p99, d99)} | "
                f"{_delta(p50, n50)} | {errors} |"
            )
    return rows


def connections_table(results: Results) -> list[str]:
    rows = [
        *_header(
            "sidecar pool (outbound → nginx)",
            "calls",
            "new upstream connections",
            "calls per connection",
            "opened since start",
        ),
    ]
    for pool, data in results.connections.items():
        opened = data["opened"]
        per = f"{data['calls'] / opened:,.0f}" if opened else "all on warm connections"
        rows.append(
            f"| {pool} | {data['calls']:,.0f} | {opened:.0f} | {per} | {data['opened_total']:.0f} |"
        )
    return rows


def handshakes_table(results: Results) -> list[str]:
    data = results.handshakes
    if not data:
        return ["not run"]
    count, seconds = data["count"], data["seconds"]
    calls, opened = data["caller_calls"], data["caller_connections"]
    rows = [*_header("mesh+mtls", "measured")]
    rows.append(
        f"| fresh mTLS connections to the callee (one call each) | {count:.0f} in "
        f"{seconds:.1f} s: {count / seconds if seconds else 0:.0f}/s |"
    )
    rows.append(f"| callee CPU per fresh connection | {data['callee_cpu_us'] / 1000:.2f} ms |")
    rows.append(
        f"| the caller's handshakes (upstream connections opened) over the run | {opened:.0f} "
        f"for {calls:,.0f} calls |"
    )
    return rows


def codec_table(codec: dict[str, dict[str, float]] | None) -> list[str]:
    if not codec:
        return ["not run"]
    rows = [
        *_header(
            "encoding",
            "calls",
            "reply bytes",
            "mean µs",
            "p50 µs",
            "p99 µs",
            "client CPU µs/call",
            "encode+decode µs",
        ),
    ]
    for kind, d in codec.items():
        rows.append(
            f"| {kind} | {d['calls']:.0f} | {d['bytes']:.0f} | {d['mean_us']:,.0f} | "
            f"{d['p50_us']:,.0f} | "
            f"{d['p99_us']:,.0f} | {d['client_cpu_us']:,.0f} | {d['codec_us']:.1f} |"
        )
    return rows


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("**met**" if ok else "**not met**")


def targets(fleet: Fleet, results: Results) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) rows."""
    out: list[tuple[str, str, str]] = []
    sat, lat = results.saturation, results.latency

    def med(
        table: dict[tuple[str, str], list[Sample]],
        key: tuple[str, str],
        pick: Callable[[Sample], float],
    ) -> float | None:
        s = stat(table.get(key), pick)
        return s.median if s else None

    for proto, floor in (("h1", 0.5), ("h2c", 0.35)):
        nginx = med(sat, ("nginx", proto), lambda s: s.rps)
        for name in ("sidecar-in", "sidecar-out"):
            mine = med(sat, (name, proto), lambda s: s.rps)
            ok = None if not (mine and nginx) else mine / nginx >= floor
            measured = f"{mine / nginx:.2f}x nginx" if mine and nginx else "-"
            out.append(
                (f"throughput {name} {PROTO_NAME[proto]} ≥ {floor}x nginx", measured, _verdict(ok))
            )
    for proto, limit in (("h1", 40.0), ("h2c", 100.0)):
        for name in ("sidecar-in", "sidecar-out"):
            cpu = med(sat, (name, proto), lambda s: s.cpu_us)
            ok = None if cpu is None else cpu <= limit
            out.append(
                (
                    f"CPU {name} {PROTO_NAME[proto]} ≤ {limit:.0f} µs/call",
                    f"{cpu:.1f} µs" if cpu else "-",
                    _verdict(ok),
                )
            )
    for proto, l50, l99 in (("h1", 250.0, 500.0), ("h2c", 400.0, 700.0)):
        d50 = med(lat, ("direct", proto), lambda s: s.p50_us)
        d99 = med(lat, ("direct", proto), lambda s: s.p99_us)
        for name in ("sidecar-in", "sidecar-out"):
            p50 = med(lat, (name, proto), lambda s: s.p50_us)
            p99 = med(lat, (name, proto), lambda s: s.p99_us)
            if None in (p50, p99, d50, d99):
                out.append((f"latency {name} {PROTO_NAME[proto]}", "-", "n/a"))
                continue
            assert p50 is not None and p99 is not None and d50 is not None and d99 is not None
            a50, a99 = p50 - d50, p99 - d99
            out.append((
                f"latency {name} {PROTO_NAME[proto]} "
                f"≤ +{l50 / 1000:g} ms p50 / +{l99 / 1000:g} ms p99",
                f"+{a50 / 1000:.3f} / +{a99 / 1000:.3f} ms",
                _verdict(a50 <= l50 and a99 <= l99),
            ))  # fmt: skip
    n50 = med(lat, ("nginx", "burst"), lambda s: s.p50_us)
    for name in ("sidecar-in", "sidecar-out"):
        p50 = med(lat, (name, "burst"), lambda s: s.p50_us)
        ok = None if p50 is None or n50 is None else p50 <= 2 * n50
        measured = f"{p50 / n50:.2f}x nginx's p50" if p50 is not None and n50 else "-"
        label = f"burst {name} h2c ({load.BURST_CALLS} calls together) p50 ≤ 2x nginx's"
        out.append((label, measured, _verdict(ok)))
    for proto in ("h1", "h2c"):
        for name in ("mesh", "mesh+hmac", "mesh+mtls"):
            p99 = med(lat, (name, proto), lambda s: s.p99_us)
            d99 = med(lat, ("direct", proto), lambda s: s.p99_us)
            ok = None if p99 is None or d99 is None else p99 - d99 <= 1000.0
            measured = (
                f"+{(p99 - d99) / 1000:.3f} ms" if p99 is not None and d99 is not None else "-"
            )
            out.append(
                (
                    f"full path {name} {PROTO_NAME[proto]} ≤ +1.0 ms p99 over direct",
                    measured,
                    _verdict(ok),
                )
            )
    for proto in ("h1", "h2c"):
        plain = med(sat, ("mesh", proto), lambda s: s.cpu_us)
        mtls = med(sat, ("mesh+mtls", proto), lambda s: s.cpu_us)
        ok = None if plain is None or mtls is None else mtls <= 1.25 * plain
        measured = (
            f"{mtls / plain - 1:+.1%} ({plain:.0f} → {mtls:.0f} µs)" if plain and mtls else "-"
        )
        out.append(
            (
                f"mTLS CPU per call ≤ +25% over the mesh ({PROTO_NAME[proto]} client)",
                measured,
                _verdict(ok),
            )
        )
        p_plain = med(lat, ("mesh", proto), lambda s: s.p50_us)
        p_mtls = med(lat, ("mesh+mtls", proto), lambda s: s.p50_us)
        ok = None if p_plain is None or p_mtls is None else p_mtls - p_plain <= 100.0
        measured = (
            f"{(p_mtls - p_plain) / 1000:+.3f} ms"
            if p_plain is not None and p_mtls is not None
            else "-"
        )
        out.append(
            (
                f"mTLS ≤ +0.1 ms p50 over the mesh at a fixed rate ({PROTO_NAME[proto]} client)",
                measured,
                _verdict(ok),
            )
        )
    shakes = results.handshakes
    if shakes:
        opened, calls = shakes["caller_connections"], shakes["caller_calls"]
        out.append((
            "mTLS: zero handshakes per call in steady state (the caller's pool)",
            f"{opened:.0f} handshakes for {calls:,.0f} calls",
            _verdict(opened <= 64 and calls > 1000),
        ))  # fmt: skip
    for proto in ("h1", "h2c"):
        idle = results.idle_rss.get(("sidecar-in", proto))
        samples = sat.get(("sidecar-in", proto)) or []
        if idle is None or not samples:
            continue
        out.append(
            (
                f"memory sidecar ({PROTO_NAME[proto]} process) ≤ 50 MB RSS idle",
                f"{idle / MB:.1f} MB",
                _verdict(idle <= 50 * MB),
            )
        )
        first, last = samples[0].rss, samples[-1].rss
        growth = (last - first) / MB
        out.append((
            f"memory sidecar ({PROTO_NAME[proto]} process) flat under load "
            "(last - first run ≤ 10% of idle)",
            f"{idle / MB:.1f} → {first / MB:.1f} → {last / MB:.1f} MB ({growth:+.1f})",
            _verdict(abs(last - first) <= 0.1 * idle),
        ))  # fmt: skip
    for pool, data in results.connections.items():
        opened, calls = data["opened"], data["calls"]
        out.append((
            f"no new upstream connection per call ({pool} pool, steady state)",
            f"{opened:.0f} opened in {calls:,.0f} calls",
            _verdict(opened <= 64 and calls > 0),
        ))  # fmt: skip
    wasm = fleet.targets.get("sidecar-in+wasm")
    if wasm is None or wasm.unavailable:
        why = wasm.unavailable if wasm else "not configured"
        out.append(("WASM ≤ 0.1 ms per header-rewriting filter", f"not available ({why})", "n/a"))
    else:
        with_wasm = med(sat, ("sidecar-in+wasm", "h1"), lambda s: s.cpu_us)
        without = med(sat, ("sidecar-in", "h1"), lambda s: s.cpu_us)
        ok = None if with_wasm is None or without is None else with_wasm - without <= 100.0
        measured = (
            f"+{with_wasm - without:.1f} µs CPU/call"
            if with_wasm is not None and without is not None
            else "-"
        )
        out.append(("WASM ≤ 0.1 ms per header-rewriting filter", measured, _verdict(ok)))
    return out


def profiles_section(profiles: dict[str, dict[str, list[tuple[str, float]]]]) -> list[str]:
    lines: list[str] = []
    for label, summary in profiles.items():
        lines += [f"#### {label}", "", "| % of busy samples (self) | function |", "|---|---|"]
        lines += [f"| {pct:.1f} | `{fn}` |" for fn, pct in summary.get("self", [])]
        lines.append("")
    return lines


def render(
    fleet: Fleet,
    results: Results,
    plan: Plan,
    machine: dict[str, str],
    codec: dict[str, dict[str, float]] | None,
    profiles: dict[str, dict[str, list[tuple[str, float]]]],
    mode: str,
    extra: dict[str, Any],
) -> str:
    lines = [
        f"## Results ({mode}: {plan.reps} repetition(s), "
        f"{plan.saturation_s:g} s per saturation run, "
        f"{plan.rate} calls/s for {plan.rate_s:g} s per latency run)",
        "",
        "### Saturation: POST 1 KiB in, 1 KiB out, 64 calls in flight",
        "",
        *saturation_table(fleet, results),
        "",
        f"### Latency at a fixed {plan.rate} calls/s (POST 1 KiB in and out)",
        "",
        *latency_table(fleet, results, plan),
        "",
        "### Scaling: `workers: N`, sidecar inbound HTTP/1.1 at saturation",
        "",
        "Every process of the sidecar may use every core, which the load generator and",
        "the upstream nginx share, so this shows what a second worker buys on this",
        "machine, not a per-core figure.",
        "",
        *scaling_table(fleet, results),
        "",
        f"### Connections: {plan.connection_calls:,} calls from 64 concurrent HTTP/1.1 callers",
        "",
        *connections_table(results),
        "",
        f"### mTLS handshakes (mesh+mtls; up to {plan.handshakes} fresh connections)",
        "",
        *handshakes_table(results),
        "",
        f"### JSON versus Protobuf through the mesh (opus_client, {plan.codec_calls} calls each)",
        "",
        *codec_table(codec),
        "",
        "### Targets",
        "",
        "| target | measured | verdict |",
        "|---|---|---|",
        *[f"| {a} | {b} | {c} |" for a, b, c in targets(fleet, results)],
        "",
    ]
    if profiles:
        lines += [
            "### Profiles (py-spy, sidecar at saturation, self time)",
            "",
            *profiles_section(profiles),
        ]
    if results.failures:
        lines += ["### Failures", "", *[f"- {f}" for f in results.failures], ""]
    lines += [
        "### Machine and versions",
        "",
        *[f"- {k}: {v}" for k, v in machine.items()],
        f"- fixed-rate runs under SCHED_FIFO: {'yes' if results.realtime else 'no'}",
        *[f"- {k}: {v}" for k, v in extra.items()],
        "",
    ]
    return "\n".join(lines)
