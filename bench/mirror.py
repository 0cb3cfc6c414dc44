"""`python -m bench.mirror`: does mirroring cost the real calls latency? Side by side.

Two caller sidecars call the same nginx (`svc`, static discovery) over HTTP/1.1 from an
evenly paced client: `plain` without a route rule, `mirrored` with a rule mirroring
every call to `shadow`, which is a socket that accepts connections and never answers
(`--shadow hang`, the worst a mirror target can do) or an nginx answering 500 (`--shadow
500`). The two are called in alternating blocks, so a noisy neighbour hurts both alike;
the issue-18 target: p99 of the mirrored calls within 5% of the plain ones'. Each sidecar
has core 0 (its own turn), the client, nginx and the shadow core 1, as `python -m bench`
places them.

    python -m bench.mirror --rate 500 --blocks 10 --block-seconds 2 --shadow hang
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
from pathlib import Path

from bench import configs, load
from bench.fleet import PROXY_CORE, UPSTREAM_CORE, Fleet
from bench.procs import free_port


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def _hanging_socket() -> socket.socket:
    """Accepts (the kernel completes the handshake into the backlog) and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(4096)
    return sock


def _shadow_500(fleet: Fleet, workdir: Path) -> int:
    port = free_port()
    conf = workdir / "shadow.conf"
    conf.write_text(
        f"daemon off; worker_processes 1; pid {workdir}/shadow.pid;\n"
        f"error_log {workdir}/shadow.err;\nevents {{ worker_connections 1024; }}\n"
        f"http {{ access_log off; server {{ listen 127.0.0.1:{port};\n"
        "  location / { return 500; } } }\n"
    )
    server = fleet._start("shadow", ["nginx", "-c", str(conf)], UPSTREAM_CORE)
    server.wait_ports({"h1": port})
    return port


def run(rate: int, blocks: int, block_seconds: float, shadow: str) -> dict[str, object]:
    workdir = Path(tempfile.mkdtemp(prefix="opus-mirror-"))
    fleet = Fleet(workdir)
    hang = None
    try:
        up = fleet._nginx(
            "upstream",
            UPSTREAM_CORE,
            lambda a, b: configs.nginx_upstream(workdir, "upstream", a, b, fleet.docroot),
        )
        if shadow == "hang":
            hang = _hanging_socket()
            shadow_port = int(hang.getsockname()[1])
        else:
            shadow_port = _shadow_500(fleet, workdir)
        services = {"svc": up.ports["h1"], "shadow": shadow_port}
        mirror = {"service": "shadow", "percent": 100, "timeout": 5.0}
        rules = {"svc": {"route_rules": [{"name": "mirror", "mirror": mirror}]}}
        common = {"app_port": up.ports["h1"], "services": services, "upstream_protocol": "http1"}
        plain = fleet._sidecar("mirror-plain", PROXY_CORE, **common)
        mirrored = fleet._sidecar("mirror-on", PROXY_CORE, overrides=rules, **common)
        urls = {
            name: sc.url("outbound", "/v1/invoke/svc/bench")
            for name, sc in (("plain", plain), ("mirrored", mirrored))
        }
        for url in urls.values():  # warm-up: pools filled, code paths imported
            load.paced(url, rate, 1.0, 1024)
        latencies: dict[str, list[float]] = {"plain": [], "mirrored": []}
        errors = {"plain": 0, "mirrored": 0}
        for block in range(blocks):
            order = ("plain", "mirrored") if block % 2 == 0 else ("mirrored", "plain")
            for name in order:
                res = load.paced(urls[name], rate, block_seconds, 1024)
                steady = res.latencies_us[len(res.latencies_us) // 20 :]  # set-up left out
                latencies[name] += steady
                errors[name] += res.errors
        out: dict[str, object] = {"rate": rate, "shadow": shadow, "blocks": blocks}
        for name, values in latencies.items():
            out[name] = {
                "calls": len(values),
                "errors": errors[name],
                "p50_us": round(_percentile(values, 0.50), 1),
                "p99_us": round(_percentile(values, 0.99), 1),
            }
        p99 = {name: _percentile(values, 0.99) for name, values in latencies.items()}
        out["p99_ratio"] = round(p99["mirrored"] / p99["plain"], 3) if p99["plain"] else None
        out["mirror_metric"] = _metric(mirrored.ports["admin"])
        return out
    finally:
        fleet.stop()
        if hang is not None:
            hang.close()


def _metric(admin_port: int) -> dict[str, float]:
    import urllib.request

    url = f"http://127.0.0.1:{admin_port}/stats?filter=opus_mirror_requests"
    with urllib.request.urlopen(url, timeout=5) as reply:
        data = json.load(reply)
    return {
        sample["labels"]["result"]: sample["value"]
        for sample in data.get("opus_mirror_requests_total", [])
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.mirror", description=__doc__)
    p.add_argument("--rate", type=int, default=500, help="calls per second while a block runs")
    p.add_argument("--blocks", type=int, default=10, help="blocks per caller, alternating")
    p.add_argument("--block-seconds", type=float, default=2.0)
    p.add_argument("--shadow", choices=("hang", "500"), default="hang")
    args = p.parse_args(argv)
    result = run(args.rate, args.blocks, args.block_seconds, args.shadow)
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
