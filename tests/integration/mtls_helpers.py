"""Shared by the mTLS integration tests: certificate files for sidecars and callers, and
a raw TLS caller that reports what happened instead of raising."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path
from typing import Any

from sidecar.tls import devca
from tests import tlscerts

TD = "mesh.test"


def spiffe_id(service: str, td: str = TD) -> str:
    return f"spiffe://{td}/svc/{service}"


def file_tls(
    directory: Path, ca: devca.DevCa, service: str, mode: str = "strict", **extra: Any
) -> dict[str, Any]:
    """A sidecar's `tls` section with file certs for `service` (DNS:localhost too, for curl)."""
    directory.mkdir(parents=True, exist_ok=True)
    leaf = tlscerts.leaf(ca, (spiffe_id(service),), dns=("localhost",))
    cert, key = leaf.write(directory, service)
    bundle = directory / "bundle.crt"
    bundle.write_bytes(ca.cert_pem)
    return {
        "mode": mode,
        "trust_domain": TD,
        "source": "file",
        "file": {"cert": cert, "key": key, "bundle": str(bundle), "poll_interval": 0.1},
        **extra,
    }


def tls_call(
    port: int,
    ca_file: str,
    cert: tuple[str, str] | None,
    path: str = "/echo",
    headers: str = "",
    max_version: ssl.TLSVersion | None = None,
) -> bytes | Exception:
    """One HTTP/1.1 GET over TLS to 127.0.0.1:port; the raw reply, or what went wrong."""
    ctx = ssl.create_default_context(cafile=ca_file)
    ctx.check_hostname = False
    if cert is not None:
        ctx.load_cert_chain(*cert)
    if max_version is not None:
        ctx.maximum_version = max_version
    ctx.set_alpn_protocols(["http/1.1"])
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost") as s,
        ):
            s.sendall(
                f"GET {path} HTTP/1.1\r\nhost: x\r\n{headers}connection: close\r\n\r\n".encode()
            )
            data = b""
            while chunk := s.recv(65536):
                data += chunk
            return data
    except (OSError, ssl.SSLError) as exc:
        return exc
