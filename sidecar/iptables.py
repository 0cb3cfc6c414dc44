"""`opus-sidecar iptables`: the nat rules that send a pod's TCP through the sidecar.

Shaped after istio-iptables (tools/istio-iptables/pkg/capture/run.go):
  OUTPUT     -> OPUS_OUTPUT  -> OPUS_REDIRECT    (REDIRECT to the capture port, 15001)
  PREROUTING -> OPUS_INBOUND -> OPUS_IN_REDIRECT (REDIRECT to the inbound port, 15006)
`nat_rules()` is pure (a spec in, iptables-restore lines out); `apply()` and `clean()`
are the only parts that run anything.
"""

from __future__ import annotations

import argparse
import ipaddress
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

PROG = "opus-sidecar iptables"
OUTPUT_CHAIN = "OPUS_OUTPUT"
REDIRECT_CHAIN = "OPUS_REDIRECT"
INBOUND_CHAIN = "OPUS_INBOUND"
IN_REDIRECT_CHAIN = "OPUS_IN_REDIRECT"
CHAINS = (INBOUND_CHAIN, IN_REDIRECT_CHAIN, OUTPUT_CHAIN, REDIRECT_CHAIN)
# The jumps from the built-in chains, as `-D` takes them back.
JUMPS = (("OUTPUT", OUTPUT_CHAIN), ("PREROUTING", INBOUND_CHAIN))


class RulesError(ValueError):
    """A spec the rules cannot be written for (names the option)."""


@dataclass(frozen=True, slots=True)
class InterceptSpec:
    capture_port: int = 15001
    inbound_port: int = 15006
    outbound_port: int = 8080  # the explicit outbound listener
    admin_port: int = 9090
    proxy_uid: int = 1337  # the sidecar runs as this uid; its own traffic is never captured
    exclude_outbound_ports: tuple[int, ...] = ()
    exclude_outbound_cidrs: tuple[str, ...] = ()
    exclude_inbound_ports: tuple[int, ...] = ()
    inbound: bool = True  # also capture inbound TCP for the inbound listener


def nat_rules(spec: InterceptSpec) -> list[str]:
    """The nat table's rules, in order, as iptables-restore `-A` lines."""
    _check(spec)
    tcp = "-p tcp"
    rules = [
        f"-A {REDIRECT_CHAIN} {tcp} -j REDIRECT --to-ports {spec.capture_port}",
        f"-A {IN_REDIRECT_CHAIN} {tcp} -j REDIRECT --to-ports {spec.inbound_port}",
    ]
    if spec.inbound:
        # The sidecar's own ports are reached directly: capturing them would loop.
        own = {spec.inbound_port, spec.capture_port, spec.outbound_port, spec.admin_port}
        for port in sorted(own | set(spec.exclude_inbound_ports)):
            rules.append(f"-A {INBOUND_CHAIN} {tcp} --dport {port} -j RETURN")
        rules.append(f"-A {INBOUND_CHAIN} {tcp} -j {IN_REDIRECT_CHAIN}")
        rules.append(f"-A PREROUTING {tcp} -j {INBOUND_CHAIN}")
    # Order matters: the first RETURN wins.
    rules += [
        # The sidecar's own upstream and passthrough connections: redirecting them
        # would send them back into the capture listener forever.
        f"-A {OUTPUT_CHAIN} -m owner --uid-owner {spec.proxy_uid} -j RETURN",
        # Loopback: what never leaves the pod (127.0.0.0/8, the pod's own addresses, the
        # app's explicit calls to the sidecar's ports) stays as it is. REDIRECT itself
        # rewrites to 127.0.0.1, but nat sees only a connection's first packet, so a
        # redirected connection is never matched again.
        f"-A {OUTPUT_CHAIN} -o lo -j RETURN",
    ]
    for port in sorted(set(spec.exclude_outbound_ports)):
        rules.append(f"-A {OUTPUT_CHAIN} {tcp} --dport {port} -j RETURN")
    for cidr in spec.exclude_outbound_cidrs:
        rules.append(f"-A {OUTPUT_CHAIN} -d {ipaddress.IPv4Network(cidr, strict=False)} -j RETURN")
    rules.append(f"-A {OUTPUT_CHAIN} -j {REDIRECT_CHAIN}")
    rules.append(f"-A OUTPUT {tcp} -j {OUTPUT_CHAIN}")
    return rules


def restore_text(spec: InterceptSpec) -> str:
    """The rules in iptables-restore format (to load with `--noflush`)."""
    lines = ["*nat", *(f":{chain} - [0:0]" for chain in CHAINS), *nat_rules(spec), "COMMIT"]
    return "\n".join(lines) + "\n"


def clean_commands(iptables: str = "iptables") -> list[list[str]]:
    """Undo `restore_text`: unhook the chains, then flush and delete them."""
    commands = [
        [iptables, "-t", "nat", "-D", hook, "-p", "tcp", "-j", chain] for hook, chain in JUMPS
    ]
    commands += [[iptables, "-t", "nat", "-F", chain] for chain in CHAINS]
    commands += [[iptables, "-t", "nat", "-X", chain] for chain in CHAINS]
    return commands


def _check(spec: InterceptSpec) -> None:
    ports = {
        "--capture-port": (spec.capture_port,),
        "--inbound-port": (spec.inbound_port,),
        "--outbound-port": (spec.outbound_port,),
        "--admin-port": (spec.admin_port,),
        "--exclude-outbound-ports": spec.exclude_outbound_ports,
        "--exclude-inbound-ports": spec.exclude_inbound_ports,
    }
    for option, values in ports.items():
        for port in values:
            if not 1 <= port <= 65535:
                raise RulesError(f"{option}: {port} is not a port (1..65535)")
    if spec.proxy_uid < 0:
        raise RulesError(f"--proxy-uid: {spec.proxy_uid} is not a uid")
    for cidr in spec.exclude_outbound_cidrs:
        try:
            ipaddress.IPv4Network(cidr, strict=False)
        except ValueError as exc:
            raise RulesError(f"--exclude-outbound-cidrs: {cidr!r} is not an IPv4 CIDR") from exc


# --- Running them --------------------------------------------------------------------

Runner = Callable[..., "subprocess.CompletedProcess[str]"]


def clean(run: Runner = subprocess.run) -> None:
    """Remove the rules; absent ones are fine (cleaning twice is not an error)."""
    for command in clean_commands():
        # An applied-twice jump would leave a copy behind: delete until none is left.
        for _ in range(16 if command[3] == "-D" else 1):
            if run(command, capture_output=True, text=True, check=False).returncode != 0:
                break


def apply(spec: InterceptSpec, run: Runner = subprocess.run) -> None:
    """Replace any earlier rules with these, in one iptables-restore transaction."""
    text = restore_text(spec)  # raises RulesError before anything changes
    clean(run)
    done = run(
        ["iptables-restore", "--noflush"], input=text, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"iptables-restore failed: {done.stderr.strip()}")


def _ports(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated port list: {text!r}") from None


def _cidrs(text: str) -> tuple[str, ...]:
    return tuple(c.strip() for c in text.split(",") if c.strip())


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Print (default) or apply the transparent-interception rules."
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print iptables-restore input")
    mode.add_argument("--apply", action="store_true", help="install the rules (needs root)")
    mode.add_argument("--clean", action="store_true", help="remove the rules (needs root)")
    parser.add_argument("--config", metavar="FILE", help="take the ports from a sidecar config")
    defaults = InterceptSpec()
    for name in ("capture", "inbound", "outbound", "admin"):
        parser.add_argument(f"--{name}-port", type=int, help=f"default: {name} listener's port")
    parser.add_argument("--proxy-uid", type=int, default=defaults.proxy_uid)
    parser.add_argument("--exclude-outbound-ports", type=_ports, default=(), metavar="P,P")
    parser.add_argument("--exclude-outbound-cidrs", type=_cidrs, default=(), metavar="CIDR,CIDR")
    parser.add_argument("--exclude-inbound-ports", type=_ports, default=(), metavar="P,P")
    parser.add_argument("--no-inbound", action="store_true", help="capture outbound only")
    return parser


def spec_from_args(args: argparse.Namespace) -> InterceptSpec:
    spec = InterceptSpec()
    if args.config:
        from sidecar.config import load_config

        listeners = load_config(args.config).listeners
        spec = InterceptSpec(
            capture_port=listeners.capture.port,
            inbound_port=listeners.inbound.port,
            outbound_port=listeners.outbound.port,
            admin_port=listeners.admin.port,
        )
    return InterceptSpec(
        capture_port=args.capture_port or spec.capture_port,
        inbound_port=args.inbound_port or spec.inbound_port,
        outbound_port=args.outbound_port or spec.outbound_port,
        admin_port=args.admin_port or spec.admin_port,
        proxy_uid=args.proxy_uid,
        exclude_outbound_ports=args.exclude_outbound_ports,
        exclude_outbound_cidrs=args.exclude_outbound_cidrs,
        exclude_inbound_ports=args.exclude_inbound_ports,
        inbound=not args.no_inbound,
    )


def main(argv: Sequence[str]) -> int:
    parser = _parser()
    args = parser.parse_args(list(argv))
    from sidecar.config import ConfigError

    try:
        spec = spec_from_args(args)
        text = restore_text(spec)
    except (ConfigError, RulesError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    if not (args.apply or args.clean):
        sys.stdout.write(text)
        return 0
    if shutil.which("iptables-restore") is None:
        print(f"{PROG}: error: iptables-restore not found (install iptables)", file=sys.stderr)
        return 1
    try:
        if args.clean:
            clean()
        else:
            apply(spec)
    except RuntimeError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    return 0
