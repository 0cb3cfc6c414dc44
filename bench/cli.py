"""`python -m bench`: start the fleet, run the cases, print and write the report.

The report replaces everything after MARKER in the output file and keeps what is above
it (the hand-written method and analysis in docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench import codec, fleet, load, machine, report, suite
from bench.procs import REPO, StartError
from bench.profile import profile, py_spy

MARKER = "<!-- Everything below is written by `python -m bench`. -->"
FULL = suite.Plan(
    reps=3, saturation_s=5, warmup_s=1, rate=1000, rate_s=4,
    connection_calls=10_000, codec_calls=1000, profile_s=5,
)  # fmt: skip
SMOKE = suite.Plan(
    reps=1, saturation_s=0.3, warmup_s=0.1, rate=200, rate_s=0.3,
    connection_calls=200, codec_calls=20, profile_s=0, handshakes=10,
)  # fmt: skip
PROFILED = (
    ("sidecar-in", "h1"),
    ("sidecar-out", "h1"),
    ("sidecar-in", "h2c"),
    ("sidecar-out", "h2c"),
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--smoke", action="store_true", help="every case briefly, once (CI)")
    p.add_argument(
        "--out",
        help="Markdown file to write, or a directory (then benchmarks.md and results.json "
        "in it); default docs/benchmarks.md for a full run, nothing for --smoke",
    )
    p.add_argument("--json", help="also write the raw results here")
    p.add_argument("--reps", type=int, help="repetitions per case")
    p.add_argument("--duration", type=float, help="seconds per saturation and latency run")
    p.add_argument("--no-profile", action="store_true", help="skip the py-spy profiles")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs)")
    return p


def _plan(args: argparse.Namespace) -> suite.Plan:
    plan = SMOKE if args.smoke else FULL
    changes: dict[str, Any] = {}
    if args.reps:
        changes["reps"] = args.reps
    if args.duration:
        changes["saturation_s"] = changes["rate_s"] = args.duration
    if args.no_profile:
        changes["profile_s"] = 0
    return suite.Plan(**{**asdict(plan), **changes})


def _outputs(args: argparse.Namespace) -> tuple[Path | None, Path | None]:
    md = Path(args.out) if args.out else (None if args.smoke else REPO / "docs" / "benchmarks.md")
    js = Path(args.json) if args.json else None
    if md is not None and md.is_dir():
        md, js = md / "benchmarks.md", js or md / "results.json"
    return md, js


def _write_markdown(path: Path, body: str) -> None:
    head = path.read_text().split(MARKER, 1)[0] if path.exists() else "# Benchmarks\n\n"
    path.write_text(head.rstrip("\n") + "\n\n" + MARKER + "\n\n" + body.rstrip("\n") + "\n")


def _place_cores() -> None:
    """Two cores or more: the plan in fleet.py. One: everything shares core 0."""
    if (os.cpu_count() or 1) < 2:
        fleet.PROXY_CORE = fleet.UPSTREAM_CORE = load.LOAD_CORE = 0
    # The harness itself (and the opus_client calls it makes) runs on the load core.
    os.sched_setaffinity(0, {load.LOAD_CORE})


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    missing = fleet.missing_tools()
    if missing:
        print(
            f"bench: missing {', '.join(missing)} "
            "(apt-get install nginx-light wrk nghttp2-client util-linux)",
            file=sys.stderr,
        )
        return 3
    plan = _plan(args)
    md_path, json_path = _outputs(args)
    _place_cores()
    workdir = Path(tempfile.mkdtemp(prefix="opus-bench-"))
    load.write_wrk_script(workdir, 1024)
    load.write_body(workdir, 1024)
    fl = fleet.Fleet(workdir)
    results = suite.Results()
    codec_results: dict[str, dict[str, float]] | None = None
    profiles: dict[str, dict[str, list[tuple[str, float]]]] = {}
    started = time.monotonic()
    try:
        sizes = codec.write_files(fl.docroot)
        try:
            fl.start(with_haproxy=shutil.which("haproxy") is not None)
        except StartError as e:
            print(f"bench: could not start the servers: {e}", file=sys.stderr)
            return 4
        _step("saturation", suite.run_saturation, fl, plan, results)
        _step("latency", suite.run_latency, fl, plan, results)
        _step("connections", suite.run_connections, fl, plan, results)
        _step("scaling", suite.run_scaling, fl, plan, results)
        _step("handshakes", suite.run_handshakes, fl, plan, results)
        print("bench: json vs protobuf", file=sys.stderr)
        try:
            mesh = fl.targets["mesh"].servers["h1"][0]
            codec_results = codec.run(mesh.url("outbound", ""), "svc", plan.codec_calls)
        except Exception as e:  # a failed case is reported, the others still are
            results.failures.append(f"json vs protobuf: {e!r}")
        if plan.profile_s and py_spy():
            print("bench: profiles", file=sys.stderr)
            for name, proto in PROFILED:
                target = fl.targets[name]
                url = getattr(target, proto)
                label = f"{name} {report.PROTO_NAME[proto]}"
                try:
                    profiles[label] = profile(
                        target.servers[proto][0].pid,
                        proto,
                        url,
                        plan.profile_s,
                        workdir,
                        label.replace(" ", "-").replace("/", ""),
                    )
                except load.LoadError as e:
                    results.failures.append(f"profile {label}: {e}")
        extra = {
            "payload sizes (JSON / Protobuf Struct)": f"{sizes[0]} / {sizes[1]} bytes",
            "wall time of this run": f"{time.monotonic() - started:.0f} s",
        }
        text = report.render(
            fl,
            results,
            plan,
            machine.describe(),
            codec_results,
            profiles,
            "smoke" if args.smoke else "full",
            extra,
        )
    finally:
        fl.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"bench: kept {workdir}", file=sys.stderr)
    print(text)
    if md_path is not None:
        _write_markdown(md_path, text)
    if json_path is not None:
        json_path.write_text(json.dumps(_raw(results, codec_results, profiles), indent=1))
    return 0


def _step(name: str, fn: Any, fl: fleet.Fleet, plan: suite.Plan, results: suite.Results) -> None:
    print(f"bench: {name}", file=sys.stderr)
    fn(fl, plan, results)


def _raw(results: suite.Results, codec_results: Any, profiles: Any) -> dict[str, Any]:
    def table(t: dict[tuple[str, str], list[suite.Sample]]) -> dict[str, list[dict[str, float]]]:
        return {
            f"{name} {proto}": [asdict(s) for s in samples] for (name, proto), samples in t.items()
        }

    return {
        "saturation": table(results.saturation),
        "latency": table(results.latency),
        "idle_rss": {f"{n} {p}": v for (n, p), v in results.idle_rss.items()},
        "connections": results.connections,
        "scaling": {str(w): [asdict(s) for s in v] for w, v in results.scaling.items()},
        "codec": codec_results,
        "profiles": profiles,
        "failures": results.failures,
    }
