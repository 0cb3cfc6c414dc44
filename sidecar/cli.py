"""The `opus-sidecar` command line: argument parsing and process setup.

Owns the one place that configures logging handlers. Config is loaded and
validated here, before the server module is even imported, so a bad config
stops the process before any port is bound.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import logging
import os
import sys

from sidecar import __version__
from sidecar.config import (
    ENV_PREFIX,
    ConfigError,
    SidecarConfig,
    env_override_names,
    load_config,
    unknown_env_overrides,
)
from sidecar.config.live import plan_reload
from sidecar.inject.command import add_commands as add_inject_commands

PROG = "opus-sidecar"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"

log = logging.getLogger("sidecar.cli")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Opus Mesh sidecar proxy.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run the sidecar")
    run.add_argument("--config", metavar="FILE", help="YAML config file (default: built-ins)")
    run.add_argument(
        "--ports-file",
        metavar="FILE",
        help="write the bound ports here as JSON once listening (for port-0 configs)",
    )
    run.add_argument("--workers", type=int, metavar="N", help="worker processes (config: workers)")
    run.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)  # set by the supervisor

    check = commands.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("file", metavar="FILE")
    check.add_argument(
        "--running",
        metavar="FILE",
        help="the config running now: also say what reloading FILE over it would change "
        "(exit 3 if the reload would be refused)",
    )

    stat = commands.add_parser("stat", help="live table of a sidecar's traffic per service")
    stat.add_argument("--admin", default="http://127.0.0.1:9090", help="the sidecar's admin URL")
    stat.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    stat.add_argument("--once", action="store_true", help="print one table and exit")

    ca = commands.add_parser("ca", help="the built-in dev CA for mTLS (tls.source: dev)")
    ca_commands = ca.add_subparsers(dest="ca_command", required=True, metavar="CA_COMMAND")
    ca_init = ca_commands.add_parser("init", help="make a trust domain's root CA in DIR")
    ca_init.add_argument("dir", metavar="DIR")
    ca_init.add_argument("--trust-domain", required=True, help="e.g. mesh.local")

    # These parse their own flags; add_help=False lets `demo -h` reach the demo too.
    commands.add_parser(
        "iptables", help="print or apply the transparent-interception rules", add_help=False
    )
    commands.add_parser(
        "demo", help="run the local demo (arguments go to the demo)", add_help=False
    )
    commands.add_parser("wasm", help="run or inspect a proxy-wasm filter", add_help=False)
    add_inject_commands(commands)  # `injector` and `inject` (sidecar/inject/)
    return parser


def main(argv: list[str] | None = None) -> int:
    args, rest = _parser().parse_known_args(sys.argv[1:] if argv is None else argv)
    if args.command == "demo":
        from sidecar.demo import main as demo_main

        return demo_main(rest)
    if args.command == "wasm":
        from filters.wasm.cli import main as wasm_main

        return wasm_main(rest)
    if args.command == "iptables":
        from sidecar.iptables import main as iptables_main

        return iptables_main(rest)
    if rest:
        _parser().error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "check-config":
        return _check_config(args.file, args.running)
    if args.command == "ca":
        return _ca_init(args.dir, args.trust_domain)
    if args.command == "stat":
        from sidecar.stat import run as stat_run

        return stat_run(args.admin, args.interval, args.once)
    if args.command in ("injector", "inject"):
        from sidecar.inject.command import run_command

        return run_command(args)
    return _run(args.config, args.ports_file, args.workers, args.worker_index)


def _load(path: str | None) -> SidecarConfig | None:
    try:
        return load_config(path)
    except ConfigError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return None


def _warn_unknown_env() -> None:
    known = list(env_override_names())
    for name in unknown_env_overrides():
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        log.warning("ignoring unknown environment variable %s%s", name, hint)


def _run(
    config_path: str | None, ports_file: str | None, workers: int | None, worker: int | None
) -> int:
    cfg = _load(config_path)
    if cfg is None:
        return 2
    if workers is not None:
        if not 1 <= workers <= 64:
            print(f"{PROG}: error: --workers must be 1 to 64, got {workers}", file=sys.stderr)
            return 2
        cfg = dataclasses.replace(cfg, workers=workers)
        # A reload re-reads the file and the environment: this keeps the flag's value.
        os.environ[f"{ENV_PREFIX}WORKERS"] = str(workers)
    logging.basicConfig(stream=sys.stderr, level=cfg.log.level, format=LOG_FORMAT)
    # OPUS_LOG_LEVEL=DEBUG is about the sidecar: the HPACK codec's per-header debug
    # lines would drown it and cost real time on every call.
    for noisy in ("hpack", "h2", "asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.INFO, logging.getLogger().level))
    _warn_unknown_env()
    # Imported only now: nothing that can bind a socket is loaded before the config is good.
    from sidecar.server import run_sidecar

    return run_sidecar(cfg, ports_file=ports_file, config_path=config_path, worker=worker)


def _ca_init(directory: str, trust_domain: str) -> int:
    from pathlib import Path

    from sidecar.tls import devca, spiffe
    from sidecar.tls.material import MaterialError

    try:
        ca = devca.init_ca(Path(directory), trust_domain)
    except (MaterialError, spiffe.SpiffeError, OSError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    print(f"dev CA for spiffe://{ca.trust_domain} written to {directory}")
    td = ca.trust_domain
    print(f"sidecars use it with: tls: {{mode: strict, trust_domain: {td}, source: dev,")
    print(f"                             dev: {{ca_dir: {directory}}}}}")
    return 0


def _check_config(path: str, running_path: str | None = None) -> int:
    # Environment overrides apply here too: the check answers "would `run` accept this?"
    # (and, with --running, "would a reload?": the same validator, then the reload's plan).
    cfg = _load(path)
    if cfg is None:
        return 2
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format=LOG_FORMAT)
    _warn_unknown_env()
    print(f"OK: {path}")
    print(_summary(cfg))
    if running_path is None:
        return 0
    running = _load(running_path)
    if running is None:
        return 2
    plan = plan_reload(running, cfg, workers=running.workers > 1)
    if plan.refused:
        for refusal in plan.refused:
            print(f"{PROG}: reload refused: {refusal}", file=sys.stderr)
        return 3
    print(f"reload over {running_path}: changes {', '.join(plan.changed) or 'nothing'}")
    if plan.rebind:
        print(f"rebinds: {', '.join(plan.rebind)}")
    return 0


def _summary(cfg: SidecarConfig) -> str:
    listeners = cfg.listeners
    rules = len(cfg.route_rules) + sum(len(o.route_rules) for o in cfg.services.values())
    return (
        f"service={cfg.service.name} app={cfg.app.host}:{cfg.app.port} ({cfg.app.protocol}) "
        f"outbound={listeners.outbound.host}:{listeners.outbound.port} "
        f"inbound={listeners.inbound.host}:{listeners.inbound.port} "
        f"admin={listeners.admin.host}:{listeners.admin.port} "
        f"discovery={cfg.discovery.backend} upstream={cfg.upstream.protocol} "
        f"routes={len(cfg.routes)} services={len(cfg.services)} "
        f"route_rules={rules}"
    )
