"""`python -m bench.quick`: the saturation case for a few targets, for working on the data
path. Starts the upstream nginx, nginx as a proxy (the yardstick) and the sidecar targets
asked for, runs interleaved saturation loads and prints req/s, the ratio to nginx and the
proxy's CPU per call; `--profile` adds a py-spy self-time profile of each sidecar target.

Numbers from here are for before/after comparison within one run; the report of record is
the full `python -m bench`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from bench import configs, load
from bench.fleet import PROXY_CORE, UPSTREAM_CORE, WASM_EXAMPLE, Fleet
from bench.procs import Server
from bench.profile import profile, py_spy


def _targets(fl: Fleet, names: list[str], proto: str) -> dict[str, tuple[str, list[Server]]]:
    wd = fl.workdir
    up = fl._nginx(
        "upstream",
        UPSTREAM_CORE,
        lambda a, b: configs.nginx_upstream(wd, "upstream", a, b, fl.docroot),
    )
    uport = up.ports[proto]
    ngx = fl._nginx(
        "nginx-proxy",
        PROXY_CORE,
        lambda a, b: configs.nginx_proxy(wd, "nginx-proxy", a, b, up.ports["h1"]),
    )
    out: dict[str, tuple[str, list[Server]]] = {"nginx": (ngx.url(proto, "/bench"), [ngx])}
    upstream_protocol = "h2c" if proto == "h2c" else "http1"
    shared: Server | None = None  # one sidecar serves both the inbound and outbound hop
    for name in names:
        if name in ("sidecar-in", "sidecar-out"):
            if shared is None:
                shared = fl._sidecar(
                    "sidecar",
                    app_port=uport,
                    app_protocol=upstream_protocol,
                    services={"nginx": uport},
                    upstream_protocol=upstream_protocol,
                )
            sc = shared
            path = "/bench" if name == "sidecar-in" else "/v1/invoke/nginx/bench"
            out[name] = (sc.url("inbound" if name == "sidecar-in" else "outbound", path), [sc])
        elif name == "sidecar-in+wasm":
            # The inbound hop with the header-adding wasm filter, as bench/fleet.py runs it.
            if not WASM_EXAMPLE.exists():
                raise SystemExit(f"{WASM_EXAMPLE} is missing (run wasm_examples/build.sh)")
            wasm = {"name": "wasm", "config": {"path": str(WASM_EXAMPLE), "root_id": "add_header"}}
            sc = fl._sidecar(
                "sidecar-wasm",
                app_port=uport,
                app_protocol=upstream_protocol,
                filters={"inbound": [wasm]},
            )
            out[name] = (sc.url("inbound", "/bench"), [sc])
        elif name == "mesh":
            b = fl._sidecar("mesh-b", app_port=up.ports["h1"])
            a = fl._sidecar("mesh-a", app_port=up.ports["h1"], services={"svc": b.ports["inbound"]})
            out[name] = (a.url("outbound", "/v1/invoke/svc/bench"), [a, b])
        else:
            raise SystemExit(f"unknown target {name!r}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.quick", description=__doc__)
    p.add_argument("targets", nargs="*", default=["sidecar-in", "sidecar-out"])
    p.add_argument("--proto", choices=("h1", "h2c"), default="h1")
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--profile", action="store_true")
    args = p.parse_args(argv)
    if (os.cpu_count() or 1) >= 2:
        os.sched_setaffinity(0, {load.LOAD_CORE})
    workdir = Path(tempfile.mkdtemp(prefix="opus-quick-"))
    script, body = load.write_wrk_script(workdir, 1024), load.write_body(workdir, 1024)
    fl = Fleet(workdir)
    try:
        targets = _targets(fl, args.targets, args.proto)
        for url, _ in targets.values():
            load.h2load(url, 0.5, body, h1=args.proto == "h1")
        rows: dict[str, list[tuple[float, float]]] = {name: [] for name in targets}
        for _ in range(args.reps):
            for name, (url, servers) in targets.items():
                before = sum(s.cpu() for s in servers)
                if args.proto == "h1":
                    res = load.wrk(url, args.seconds, script)
                else:
                    res = load.h2load(url, args.seconds, body)
                cpu = sum(s.cpu() for s in servers) - before
                rows[name].append((res.rps, cpu / max(res.requests, 1) * 1e6))
        base = statistics.median(r for r, _ in rows["nginx"])
        for name, samples in rows.items():
            rps = statistics.median(r for r, _ in samples)
            cpu = statistics.median(c for _, c in samples)
            print(
                f"{name:12} {args.proto:4} {rps:9,.0f} req/s  {rps / base:5.2f}x nginx  "
                f"{cpu:7.1f} us/call"
            )
        if args.profile and py_spy():
            for name, (url, servers) in targets.items():
                if name == "nginx":
                    continue
                prof = profile(servers[0].pid, args.proto, url, 4, workdir, name)
                print(f"\n{name} self time:")
                for fn, pct in prof["self"][:25]:
                    print(f"  {pct:5.1f}  {fn}")
                print(f"{name} inclusive:")
                for fn, pct in prof["inclusive"][:40]:
                    print(f"  {pct:5.1f}  {fn}")
    finally:
        fl.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
