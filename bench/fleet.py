"""Starting the servers under test and naming the targets the cases call.

Placement on this 2-core machine: the load generator and the upstream nginx share
core 1, and every proxy gets core 0 to itself, so a proxy's throughput is bounded by its
own core. The direct call goes to a second, identical nginx on core 0: the same cores
as a proxied call, with the proxy's cost at zero.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench import configs
from bench.procs import REPO, Server, StartError, free_port

PROXY_CORE, UPSTREAM_CORE = 0, 1
PY = sys.executable
HMAC_KEYS = {"bench": "bench-secret-0123456789"}
SCALING_WORKERS = (1, 2)
WASM_EXAMPLE = REPO / "wasm_examples" / "build" / "add_header.wasm"
MTLS_TRUST_DOMAIN = "bench.local"


@dataclass
class Target:
    """One thing to load: URLs per protocol (None: not available) and the processes whose
    CPU and memory count as its cost."""

    name: str
    description: str
    h1: str | None = None
    h2c: str | None = None
    # Whose CPU and memory count, per protocol ("h1", "h2c").
    servers: dict[str, list[Server]] = field(default_factory=dict)
    unavailable: str = ""  # why, when it could not be started


class Fleet:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.servers: list[Server] = []
        self.targets: dict[str, Target] = {}
        self.scaling: dict[int, Target] = {}  # workers: N -> the inbound hop
        self.docroot = workdir / "files"
        self.docroot.mkdir()
        self.ca_dir: Path | None = None  # the mesh+mtls target's dev CA
        self.mtls: tuple[Server, Server] | None = None  # its caller and callee sidecars

    # --- processes ---------------------------------------------------------------

    def _start(self, name: str, argv: list[str], core: int | str) -> Server:
        server = Server(name, argv, core, self.workdir)
        self.servers.append(server)
        return server

    def _nginx(self, name: str, core: int, conf: Callable[[int, int], Path]) -> Server:
        h1, h2c = free_port(), free_port()
        server = self._start(name, ["nginx", "-c", str(conf(h1, h2c))], core)
        server.wait_ports({"h1": h1, "h2c": h2c})
        return server

    def _sidecar(self, name: str, core: int | str = PROXY_CORE, **kw: object) -> Server:
        name = name.replace("+", "-")  # service names: letters, digits, "-" and "."
        path = configs.sidecar(self.workdir, name, **kw)  # type: ignore[arg-type]
        ports = self.workdir / f"{name}.ports.json"
        argv = [PY, "-m", "sidecar", "run", "--config", str(path), "--ports-file", str(ports)]
        server = self._start(name, argv, core)
        server.wait_ports_file(ports)
        return server

    def stop(self) -> None:
        for server in reversed(self.servers):
            server.stop()

    # --- targets -----------------------------------------------------------------

    def start(self, with_haproxy: bool) -> None:
        wd = self.workdir
        up = self._nginx(
            "upstream",
            UPSTREAM_CORE,
            lambda a, b: configs.nginx_upstream(wd, "upstream", a, b, self.docroot),
        )
        self.upstream = up
        uh1, uh2 = up.ports["h1"], up.ports["h2c"]
        direct = self._nginx(
            "direct",
            PROXY_CORE,
            lambda a, b: configs.nginx_upstream(wd, "direct", a, b, self.docroot),
        )
        self._add("direct", "client -> nginx (no proxy)", direct, "/bench", "/bench")
        ngx = self._nginx(
            "nginx-proxy",
            PROXY_CORE,
            lambda a, b: configs.nginx_proxy(wd, "nginx-proxy", a, b, uh1),
        )
        self._add(
            "nginx", "nginx proxy_pass, HTTP/1.1 keep-alive upstream", ngx, "/bench", "/bench"
        )
        if with_haproxy:
            hp_h1, hp_h2 = free_port(), free_port()
            cfg = configs.haproxy(wd, "haproxy", hp_h1, hp_h2, uh1, uh2)
            hp = self._start("haproxy", ["haproxy", "-f", str(cfg), "-db"], PROXY_CORE)
            hp.wait_ports({"h1": hp_h1, "h2c": hp_h2})
            self._add(
                "haproxy", "HAProxy, h1->h1 and h2c->h2c, http-reuse always", hp, "/bench", "/bench"
            )
        else:
            self.targets["haproxy"] = Target(
                "haproxy", "HAProxy", unavailable="haproxy not installed"
            )

        # One sidecar per upstream protocol; each serves the inbound and the outbound hop.
        sc1 = self._sidecar(
            "sidecar-h1", app_port=uh1, services={"nginx": uh1}, upstream_protocol="http1"
        )
        sc2 = self._sidecar(
            "sidecar-h2c",
            app_port=uh2,
            app_protocol="h2c",
            services={"nginx": uh2},
            upstream_protocol="h2c",
        )
        self.sidecar_h1, self.sidecar_h2c = sc1, sc2
        self.targets["sidecar-in"] = Target(
            "sidecar-in",
            "sidecar inbound -> nginx as its app (app.protocol = client's protocol)",
            sc1.url("inbound", "/bench"),
            sc2.url("inbound", "/bench"),
            {"h1": [sc1], "h2c": [sc2]},
        )
        invoke = "/v1/invoke/nginx/bench"
        self.targets["sidecar-out"] = Target(
            "sidecar-out",
            "sidecar outbound, static discovery -> nginx (upstream.protocol = client's protocol)",
            sc1.url("outbound", invoke),
            sc2.url("outbound", invoke),
            {"h1": [sc1], "h2c": [sc2]},
        )

        aio_port = free_port()
        argv = [
            PY,
            "-m",
            "bench.naive_proxy",
            "--port",
            str(aio_port),
            "--upstream",
            f"http://127.0.0.1:{uh1}",
        ]
        aio = self._start("aiohttp", argv, PROXY_CORE)
        aio.wait_ports({"h1": aio_port})
        self.targets["aiohttp"] = Target(
            "aiohttp",
            "naive aiohttp reverse proxy (HTTP/1.1 only)",
            aio.url("h1", "/bench"),
            None,
            {"h1": [aio]},
        )

        self._mesh("mesh", "client -> outbound sidecar -h2c-> inbound sidecar -> nginx", uh1, None)
        keys = wd / "hmac-keys.json"
        keys.write_text(json.dumps(HMAC_KEYS))
        hmac: dict[str, list[dict[str, object]]] = {
            "outbound": [
                {"name": "hmac_sign", "config": {"key_file": str(keys), "key_id": "bench"}}
            ],
            "inbound": [{"name": "hmac_verify", "config": {"key_file": str(keys)}}],
        }
        self._mesh("mesh+hmac", "the mesh with hmac_sign outbound, hmac_verify inbound", uh1, hmac)
        # h2load repeats one request, and identical calls signed in the same second are
        # replays to hmac_verify (docs/filters/hmac.md); the paced client varies the query.
        self.targets["mesh+hmac"].h2c = None
        self._mtls_mesh(uh1)
        self._wasm(uh1)
        self._scaling(uh1)

    def _mtls_mesh(self, app_port: int) -> None:
        """The mesh in strict mTLS: both sidecars issue themselves certificates from a
        dev CA made here (tls.source dev), and the caller checks the callee's identity."""
        from sidecar.tls import devca  # cryptography: only for this target

        self.ca_dir = self.workdir / "devca"
        devca.init_ca(self.ca_dir, MTLS_TRUST_DOMAIN)
        tls = {
            "mode": "strict",
            "trust_domain": MTLS_TRUST_DOMAIN,
            "source": "dev",
            "dev": {"ca_dir": str(self.ca_dir)},
        }
        b = self._sidecar("mesh+mtls-b", app_port=app_port, tls=tls)
        identity = f"spiffe://{MTLS_TRUST_DOMAIN}/svc/{b.name}"
        a = self._sidecar(
            "mesh+mtls-a",
            app_port=app_port,
            services={"svc": b.ports["inbound"]},
            tls=tls,
            overrides={"svc": {"identity": identity}},
        )
        invoke = "/v1/invoke/svc/bench"
        self.targets["mesh+mtls"] = Target(
            "mesh+mtls",
            "the mesh in strict mTLS between the sidecars (dev CA, TLS 1.3, ALPN h2)",
            a.url("outbound", invoke),
            a.url("outbound", invoke),
            {"h1": [a, b], "h2c": [a, b]},
        )
        self.mtls = (a, b)

    def _scaling(self, app_port: int) -> None:
        """`workers: N`: the inbound hop with 1 and with 2 worker processes, free to use
        every core (which the load generator and the upstream share)."""
        cores = ",".join(str(c) for c in range(os.cpu_count() or 1))
        for workers in SCALING_WORKERS:
            name = f"sidecar-in-w{workers}"
            sc = self._sidecar(name, core=cores, app_port=app_port, workers=workers)
            self.scaling[workers] = Target(
                name,
                f"sidecar inbound, workers: {workers}, cores {cores}",
                sc.url("inbound", "/bench"),
                None,
                {"h1": [sc]},
            )

    def _add(self, name: str, description: str, server: Server, h1: str, h2c: str) -> None:
        self.targets[name] = Target(
            name,
            description,
            server.url("h1", h1),
            server.url("h2c", h2c),
            {"h1": [server], "h2c": [server]},
        )

    def _mesh(
        self,
        name: str,
        description: str,
        app_port: int,
        filters: dict[str, list[dict[str, object]]] | None,
    ) -> None:
        inbound = {"inbound": filters["inbound"]} if filters else None
        outbound = {"outbound": filters["outbound"]} if filters else None
        b = self._sidecar(f"{name}-b", app_port=app_port, filters=inbound)
        a = self._sidecar(
            f"{name}-a", app_port=app_port, services={"svc": b.ports["inbound"]}, filters=outbound
        )
        invoke = "/v1/invoke/svc/bench"
        self.targets[name] = Target(
            name,
            description,
            a.url("outbound", invoke),
            a.url("outbound", invoke),
            {"h1": [a, b], "h2c": [a, b]},
        )

    def _wasm(self, app_port: int) -> None:
        """The `wasm` filter with the header-adding example, when both exist."""
        name = "sidecar-in+wasm"
        has_filter = (REPO / "filters" / "wasm.py").exists() or (REPO / "filters" / "wasm").is_dir()
        if not has_filter or not WASM_EXAMPLE.exists():
            why = (
                "filters/wasm not in this tree"
                if not has_filter
                else f"{WASM_EXAMPLE.name} not built"
            )
            self.targets[name] = Target(name, "sidecar inbound + wasm add_header", unavailable=why)
            return
        spec = {
            "inbound": [
                {"name": "wasm", "config": {"path": str(WASM_EXAMPLE), "root_id": "add_header"}}
            ]
        }
        try:
            sc = self._sidecar("sidecar-wasm", app_port=app_port, filters=spec)
        except StartError as e:
            self.targets[name] = Target(
                name,
                "sidecar inbound + wasm add_header",
                unavailable=f"failed to start: {str(e)[:200]}",
            )
            return
        self.targets[name] = Target(
            name,
            "sidecar inbound + wasm add_header",
            sc.url("inbound", "/bench"),
            None,
            {"h1": [sc]},
        )


def missing_tools() -> list[str]:
    return [tool for tool in ("nginx", "wrk", "h2load", "taskset") if shutil.which(tool) is None]
