"""The demo mesh: two apps, each with its own sidecar, sharing a file registry.

    demo client -> payment sidecar (outbound) -h2c-> payment sidecar (inbound) -> payment app
    payment app -> payment sidecar (outbound) -h2c-> inventory sidecar (inbound) -> inventory app

Start order follows who must know whose port: an app binds port 0 first and its
sidecar is configured with that port; payment's app is told its sidecar's outbound
port up front, so that one port is chosen before the sidecar binds it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from sidecar.demo.procs import Children, DemoError, free_port, port_is_free, wait_for_http
from sidecar.demo.procs import wait_for_ports_file as _wait_ports

SEED_PORTS = {"outbound": 8080, "inbound": 15006, "admin": 9090}
START_TIMEOUT = 20.0
# The file registry is re-read every 0.2 s; a few rounds is plenty.
DISCOVERY_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class Stack:
    """One service's app and sidecar, as bound."""

    service: str
    app_port: int
    outbound: int
    inbound: int
    admin: int
    sidecar_log: Path
    access_log: Path

    @property
    def outbound_url(self) -> str:
        return f"http://127.0.0.1:{self.outbound}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin}"


@dataclass(frozen=True, slots=True)
class Mesh:
    payment: Stack
    inventory: Stack
    workdir: Path
    # The ports payment's sidecar asked for (the seed's 8080, 15006, 9090, unless told
    # otherwise), and those that were busy: name -> the port used instead.
    wanted: dict[str, int]
    displaced: dict[str, int]


def sidecar_config(
    service: str, app_port: int, ports: dict[str, int], workdir: Path
) -> dict[str, object]:
    """The sidecar.yaml for one service, in the schema of `sidecar.config`."""
    return {
        "service": {"name": service},
        "app": {"host": "127.0.0.1", "port": app_port},
        "listeners": {
            name: {"host": "127.0.0.1", "port": ports[name]}
            for name in ("outbound", "inbound", "admin")
        },
        "discovery": {"backend": "file", "file": {"directory": str(workdir / "registry")}},
        "log": {"level": "INFO", "access_log": str(workdir / f"{service}-access.log")},
        # The demo's calls are short; Ctrl-C should not wait the default 10 s.
        "drain_timeout": 2.0,
    }


def _start_stack(
    children: Children, workdir: Path, service: str, ports: dict[str, int], **app_env: str
) -> Stack:
    app_ports_file = workdir / f"{service}-app.ports.json"
    app = children.spawn(
        f"{service} app",
        ["-m", "sidecar.demo.apps", service, "--port", "0", "--ports-file", str(app_ports_file)],
        workdir / f"{service}-app.log",
        **app_env,
    )
    app_port = _wait_ports(app, app_ports_file, START_TIMEOUT)["port"]
    wait_for_http(app, f"http://127.0.0.1:{app_port}/health", START_TIMEOUT)

    config_path = workdir / f"{service}-sidecar.yaml"
    config = sidecar_config(service, app_port, ports, workdir)
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    sidecar_ports_file = workdir / f"{service}-sidecar.ports.json"
    sidecar_log = workdir / f"{service}-sidecar.log"
    run_args = ["-m", "sidecar", "run", "--config", str(config_path)]
    sidecar = children.spawn(
        f"{service} sidecar", [*run_args, "--ports-file", str(sidecar_ports_file)], sidecar_log
    )
    bound = _wait_ports(sidecar, sidecar_ports_file, START_TIMEOUT)
    for name, port in ports.items():
        if port and bound.get(name) != port:
            raise DemoError(f"{service} sidecar bound {name} {bound.get(name)}, configured {port}")
    wait_for_http(sidecar, f"http://127.0.0.1:{bound['admin']}/ready", START_TIMEOUT)
    return Stack(
        service,
        app_port,
        bound["outbound"],
        bound["inbound"],
        bound["admin"],
        sidecar_log,
        workdir / f"{service}-access.log",
    )


def start_mesh(children: Children, workdir: Path, outbound_port: int = 0) -> Mesh:
    """Start inventory's stack, then payment's; return once calls can flow.
    `outbound_port`: payment's outbound port to ask for (0: the seed's 8080)."""
    (workdir / "registry").mkdir(exist_ok=True)
    # Inventory first: when payment's sidecar does its first registry sync, inventory
    # is already there.
    inventory = _start_stack(
        children, workdir, "inventory", {"outbound": 0, "inbound": 0, "admin": 0}
    )

    wanted = dict(SEED_PORTS)
    if outbound_port:
        wanted["outbound"] = outbound_port
    displaced: dict[str, int] = {}
    ports: dict[str, int] = {}
    for name, seed in wanted.items():
        ports[name] = seed if port_is_free(seed) else 0
    if ports["outbound"] == 0:
        # Payment's app needs this port before its sidecar starts.
        ports["outbound"] = free_port()
    payment = _start_stack(
        children,
        workdir,
        "payment",
        ports,
        OPUS_SIDECAR_URL=f"http://127.0.0.1:{ports['outbound']}",
    )
    for name, seed in wanted.items():
        used = getattr(payment, name)
        if used != seed:
            displaced[name] = used

    # Ready does not promise that payment's sidecar has re-read the registry since
    # the last registration (its own): wait until it routes to both apps' /health.
    payment_sidecar = children.started[-1]
    for service in ("inventory", "payment"):
        probe = f"{payment.outbound_url}/v1/invoke/{service}/health"
        wait_for_http(payment_sidecar, probe, DISCOVERY_TIMEOUT)
    return Mesh(payment, inventory, workdir, wanted, displaced)
