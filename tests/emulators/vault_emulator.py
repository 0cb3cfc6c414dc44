"""A Vault emulator: the parts of Vault's HTTP API the sidecar and opus_client use, as a
real HTTP server in a thread of the test process (the real Vault cannot run here).

Follows Vault's API docs (developer.hashicorp.com/vault/api-docs):
- secret/kv (version 1): `GET /v1/<path>` -> `{"data": {...}}`;
- secret/pki: `POST /v1/<mount>/issue/<role>` with `common_name`, `uri_sans` (a
  comma-separated string or a list), `ttl` (a duration: "60s", "5m", or seconds) ->
  `{"data": {"certificate", "private_key", "private_key_type", "issuing_ca",
  "ca_chain", "serial_number", "expiration"}}`, REAL certificates signed by the CA the
  test gave (tests/tlscerts.py); the role's `allowed_uri_sans` (globs) and `max_ttl`
  are enforced; `GET /v1/<mount>/ca/pem` (unauthenticated, as in Vault).
Every authenticated request needs `X-Vault-Token`; errors are Vault's
`{"errors": [...]}` with its statuses (403 permission denied, 400 bad request, 503 sealed).

Test controls: `sealed = True` answers 503 `Vault is sealed`; `stop()` then `start()`
closes the port and opens it again on the same number (Vault down and back);
`rotate_ca(ca)` issues from another CA from then on; `issued` counts leaves.
"""

from __future__ import annotations

import datetime
import fnmatch
import json
import re
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sidecar.tls import devca

_DURATION = re.compile(r"(\d+)([smhd]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_ttl(value: Any) -> int:
    if isinstance(value, int | float):
        return int(value)
    match = _DURATION.fullmatch(str(value).strip())
    if not match:
        raise ValueError(f"invalid ttl {value!r}")
    return int(match.group(1)) * _UNITS[match.group(2)]


@dataclass
class Role:
    allowed_uri_sans: tuple[str, ...] = ("spiffe://*",)
    max_ttl: int = 86400


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _reply(self, status: int, body: Any, content_type: str = "application/json") -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, *errors: str) -> None:
        self._reply(status, {"errors": list(errors)})

    def _authorized(self) -> bool:
        vault = self.server.vault
        if vault.sealed:
            self._error(503, "Vault is sealed")
            return False
        if self.headers.get("x-vault-token") not in vault.tokens:
            self._error(403, "permission denied")
            return False
        return True

    def do_GET(self) -> None:
        vault = self.server.vault
        path = self.path.removeprefix("/v1/")
        if path == f"{vault.mount}/ca/pem":
            if vault.sealed:
                return self._error(503, "Vault is sealed")
            return self._reply(200, vault.ca.cert_pem, "application/pem-certificate-chain")
        if not self._authorized():
            return
        secret = vault.secrets.get(path)
        if secret is None:
            return self._error(404)
        self._reply(200, {"data": dict(secret), "lease_duration": 3600, "renewable": False})

    def do_POST(self) -> None:  # also PUT, as Vault takes both
        vault = self.server.vault
        prefix = f"/v1/{vault.mount}/issue/"
        if not self.path.startswith(prefix):
            return self._error(404)
        if not self._authorized():
            return
        role = vault.roles.get(self.path.removeprefix(prefix))
        if role is None:
            return self._error(400, f"unknown role: {self.path.removeprefix(prefix)}")
        try:
            body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
            vault.requests.append(body)
            self._reply(200, {"data": vault.issue(body, role), "lease_id": "", "renewable": False})
        except ValueError as exc:
            self._error(400, str(exc))

    do_PUT = do_POST


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    vault: VaultEmulator


class VaultEmulator:
    def __init__(self, ca: devca.DevCa, mount: str = "pki", token: str = "root") -> None:
        self.ca = ca
        self.mount = mount
        self.tokens = {token}
        self.roles: dict[str, Role] = {"mesh": Role()}
        self.secrets: dict[str, dict[str, Any]] = {}
        self.sealed = False
        self.issued = 0
        self.requests: list[dict[str, Any]] = []
        self.port = 0
        self._server: _Server | None = None

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> VaultEmulator:
        server = _Server(("127.0.0.1", self.port), _Handler)
        server.vault = self
        self.port = server.server_address[1]
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self._server = server
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def rotate_ca(self, ca: devca.DevCa) -> None:
        self.ca = ca

    def issue(self, body: dict[str, Any], role: Role) -> dict[str, Any]:
        common_name = body.get("common_name")
        if not isinstance(common_name, str) or not common_name:
            raise ValueError("the common_name field is required")
        uris = body.get("uri_sans", "")
        uris = [u.strip() for u in (uris.split(",") if isinstance(uris, str) else uris) if u]
        for uri in uris:
            if not any(fnmatch.fnmatchcase(uri, glob) for glob in role.allowed_uri_sans):
                raise ValueError(f"URI Subject Alternative Names {uri} not allowed by this role")
        ttl = min(parse_ttl(body.get("ttl", role.max_ttl)), role.max_ttl)
        ca = self.ca
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(ca.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(seconds=30))  # Vault back-dates 30 s
            .not_valid_after(now + datetime.timedelta(seconds=ttl))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
        )
        if uris:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
                critical=False,
            )
        cert = builder.sign(ca.key, hashes.SHA256())
        self.issued += 1
        serial = format(cert.serial_number, "x").zfill(2)
        ca_pem = ca.cert_pem.decode()
        return {
            "certificate": cert.public_bytes(serialization.Encoding.PEM).decode(),
            "private_key": key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.TraditionalOpenSSL,  # Vault's default: SEC1
                serialization.NoEncryption(),
            ).decode(),
            "private_key_type": "ec",
            "issuing_ca": ca_pem,
            "ca_chain": [ca_pem],
            "serial_number": ":".join(serial[i : i + 2] for i in range(0, len(serial), 2)),
            "expiration": int(cert.not_valid_after_utc.timestamp()),
        }
