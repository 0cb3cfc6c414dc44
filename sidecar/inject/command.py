"""The `injector` and `inject` subcommands: flags, and the glue to the modules that work.

Only argparse is imported here; aiohttp, cryptography and jsonpatch load inside the
handlers, so the other subcommands never pay for them.
"""

from __future__ import annotations

import argparse
import logging
import ssl
import sys
from pathlib import Path
from typing import Any

from sidecar.inject.patch import InjectOptions

log = logging.getLogger("sidecar.inject")

DEFAULT_SERVICE = "opus-sidecar-injector"
DEFAULT_NAMESPACE = "opus-system"


def _add_injection_options(parser: argparse.ArgumentParser) -> None:
    defaults = InjectOptions()
    group = parser.add_argument_group("what gets injected")
    group.add_argument("--sidecar-image", default=defaults.image, help="(default: %(default)s)")
    group.add_argument("--image-pull-policy", default=defaults.image_pull_policy)
    group.add_argument(
        "--config-map", default=defaults.config_map, help="sidecar ConfigMap in the pod's namespace"
    )
    group.add_argument(
        "--hmac-secret", default=defaults.hmac_secret, help="Secret with HMAC keys (optional)"
    )
    group.add_argument("--drain-timeout", type=float, default=defaults.drain_timeout)
    group.add_argument(
        "--no-native-sidecar",
        action="store_true",
        help="inject a plain container by default (clusters older than 1.29)",
    )


def add_commands(commands: Any) -> None:
    """Add `injector` and `inject` to the CLI's subparsers."""
    injector = commands.add_parser(
        "injector", help="serve the Kubernetes mutating admission webhook (HTTPS)"
    )
    injector.add_argument("--host", default="0.0.0.0")
    injector.add_argument("--port", type=int, default=8443, help="0: pick a free port")
    injector.add_argument("--cert", type=Path, help="serving certificate (PEM)")
    injector.add_argument("--key", type=Path, help="its private key (PEM)")
    injector.add_argument(
        "--ca-out", type=Path, help="with a generated certificate: write its CA here (caBundle)"
    )
    injector.add_argument(
        "--gen-certs",
        type=Path,
        metavar="DIR",
        help="write ca.crt, tls.crt and tls.key for the Service to DIR and exit",
    )
    injector.add_argument("--service", default=DEFAULT_SERVICE, help="for the certificate's names")
    injector.add_argument("--namespace", default=DEFAULT_NAMESPACE)
    injector.add_argument("--ports-file", type=Path, help='write {"port": N} once listening')
    injector.add_argument("--log-level", default="INFO")
    _add_injection_options(injector)

    inject = commands.add_parser(
        "inject", help="add sidecars to workloads in YAML files (prints to stdout)"
    )
    inject.add_argument("-f", "--filename", required=True, help="YAML file, or - for stdin")
    inject.add_argument(
        "--force", action="store_true", help='inject templates unless opus.io/inject: "false"'
    )
    _add_injection_options(inject)


def _options(args: argparse.Namespace) -> InjectOptions:
    return InjectOptions(
        image=args.sidecar_image,
        image_pull_policy=args.image_pull_policy,
        config_map=args.config_map,
        hmac_secret=args.hmac_secret,
        drain_timeout=args.drain_timeout,
        native_sidecar=not args.no_native_sidecar,
        force=getattr(args, "force", False),
    )


def run_command(args: argparse.Namespace) -> int:
    if args.command == "inject":
        return _inject(args)
    return _injector(args)


def _inject(args: argparse.Namespace) -> int:
    from sidecar.inject.offline import OfflineError, inject_yaml

    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="%(message)s")
    try:
        if args.filename == "-":
            text = sys.stdin.read()
        else:
            text = Path(args.filename).read_text(encoding="utf-8")
        out, outcomes = inject_yaml(text, _options(args))
    except OSError as exc:
        print(f"opus-sidecar inject: error: cannot read {args.filename}: {exc}", file=sys.stderr)
        return 2
    except OfflineError as exc:
        print(f"opus-sidecar inject: error: {exc}", file=sys.stderr)
        return 2
    for o in outcomes:
        verdict = "injected" if o.injected else f"skipped ({o.reason})"
        print(f"# document {o.document} {o.name}: {verdict}", file=sys.stderr)
        for warning in o.warnings:
            print(f"#   warning: {warning}", file=sys.stderr)
    sys.stdout.write(out)
    return 0


def _injector(args: argparse.Namespace) -> int:
    logging.basicConfig(
        stream=sys.stderr,
        level=str(args.log_level).upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    from sidecar.inject import cert

    try:
        if args.gen_certs:
            names = cert.service_dns_names(args.service, args.namespace)
            cert.self_signed(names).write(args.gen_certs)
            print(f"wrote {cert.CA_FILE}, {cert.CERT_FILE}, {cert.KEY_FILE} to {args.gen_certs}")
            return 0
        if bool(args.cert) != bool(args.key):
            print("opus-sidecar injector: error: give both --cert and --key", file=sys.stderr)
            return 2
        ctx = cert.server_context(args.cert, args.key) if args.cert else _generated_context(args)
    except cert.CertError as exc:
        print(f"opus-sidecar injector: error: {exc}", file=sys.stderr)
        return 2

    import asyncio

    from sidecar.inject.webhook import serve

    try:
        return asyncio.run(serve(_options(args), args.host, args.port, ctx, args.ports_file))
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return 1


def _generated_context(args: argparse.Namespace) -> ssl.SSLContext:
    import tempfile

    from sidecar.inject import cert

    names = [*cert.service_dns_names(args.service, args.namespace), "localhost"]
    bundle = cert.self_signed(names, ip_addresses=["127.0.0.1", "::1"])
    if args.ca_out:
        args.ca_out.write_bytes(bundle.ca_pem)
    else:
        log.warning("generated a certificate but no --ca-out: nothing can trust it")
    # ssl loads a chain from files only; the key lives there just long enough to load.
    with tempfile.TemporaryDirectory() as tmp:
        bundle.write(Path(tmp))
        return cert.server_context(Path(tmp) / cert.CERT_FILE, Path(tmp) / cert.KEY_FILE)
