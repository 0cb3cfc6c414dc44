"""Config files for the servers under test, generated into the run's temp directory.

Every server gets one worker / one thread, keep-alive both ways, no access log.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

BODY_SIZE = 1024
RESPONSE_BODY = "x" * BODY_SIZE
KEEPALIVE = "keepalive_requests 10000000; keepalive_timeout 300s;"


def _nginx_common(workdir: Path, name: str) -> str:
    tmp = workdir / f"{name}.tmp"
    tmp.mkdir(exist_ok=True)
    # As root the worker would drop to nobody, which cannot read our 0700 temp dir.
    user = "user root;" if os.geteuid() == 0 else ""
    temps = " ".join(
        f"{kind}_temp_path {tmp}/{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""
{user}
daemon off;
worker_processes 1;
pid {workdir}/{name}.pid;
error_log {workdir}/{name}.error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  default_type application/octet-stream;
  {KEEPALIVE}
  client_body_buffer_size 64k;
  {temps}
"""


def nginx_upstream(workdir: Path, name: str, h1: int, h2c: int, docroot: Path) -> Path:
    """The fast upstream: a fixed 1 KiB body for any path and method, and files under
    /files/ for POST too (a POST to a static file is a 405 that error_page turns into a GET)."""
    locations = f"""
    location / {{ return 200 "{RESPONSE_BODY}"; }}
    location /files/ {{ alias {docroot}/; error_page 405 =200 $uri; }}
"""
    text = (
        _nginx_common(workdir, name)
        + f"""
  server {{ listen 127.0.0.1:{h1}; {locations} }}
  server {{ listen 127.0.0.1:{h2c} http2; {locations} }}
}}
"""
    )
    path = workdir / f"{name}.conf"
    path.write_text(text)
    return path


def nginx_proxy(workdir: Path, name: str, h1: int, h2c: int, upstream_h1: int) -> Path:
    """nginx as a reverse proxy; it can only speak HTTP/1.1 upstream, so its h2c
    front end also goes to the upstream over HTTP/1.1."""
    location = """
    location / {
      proxy_pass http://app;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
"""
    text = (
        _nginx_common(workdir, name)
        + f"""
  upstream app {{
    server 127.0.0.1:{upstream_h1};
    keepalive 128;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
  }}
  server {{ listen 127.0.0.1:{h1}; {location} }}
  server {{ listen 127.0.0.1:{h2c} http2; {location} }}
}}
"""
    )
    path = workdir / f"{name}.conf"
    path.write_text(text)
    return path


def haproxy(
    workdir: Path, name: str, h1: int, h2c: int, upstream_h1: int, upstream_h2c: int
) -> Path:
    """HAProxy, one thread, reusing server connections; h2c in front and behind."""
    text = f"""
global
  nbthread 1
  maxconn 4000
defaults
  mode http
  http-reuse always
  timeout connect 5s
  timeout client 300s
  timeout server 300s
frontend fe_h1
  bind 127.0.0.1:{h1}
  default_backend be_h1
frontend fe_h2c
  bind 127.0.0.1:{h2c} proto h2
  default_backend be_h2c
backend be_h1
  server s1 127.0.0.1:{upstream_h1}
backend be_h2c
  server s1 127.0.0.1:{upstream_h2c} proto h2
"""
    path = workdir / f"{name}.cfg"
    path.write_text(text)
    return path


def sidecar(
    workdir: Path,
    name: str,
    *,
    app_port: int,
    app_protocol: str = "http1",
    services: dict[str, int] | None = None,
    upstream_protocol: str = "h2c",
    filters: dict[str, Any] | None = None,
    workers: int = 1,
    tls: dict[str, Any] | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> Path:
    """One sidecar: inbound hands calls to `app_port`; outbound reaches `services` (name to
    port on 127.0.0.1) through static discovery."""
    config: dict[str, Any] = {
        "service": {"name": name, "instance_id": name},
        "app": {"host": "127.0.0.1", "port": app_port, "protocol": app_protocol},
        "listeners": {
            kind: {"host": "127.0.0.1", "port": 0} for kind in ("outbound", "inbound", "admin")
        },
        "discovery": {
            "backend": "static",
            "register": False,
            "static": {
                "services": {
                    svc: [{"host": "127.0.0.1", "port": port}]
                    for svc, port in (services or {}).items()
                }
            },
        },
        "upstream": {"protocol": upstream_protocol},
        "log": {"level": "WARNING", "access_log": ""},
        "drain_timeout": 1.0,
    }
    if filters:
        config["filters"] = filters
    if workers > 1:
        config["workers"] = workers
    if tls:
        config["tls"] = tls
    if overrides:
        config["services"] = overrides  # services.<name>: per-service settings
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path
