"""The Consul emulator's service mesh CA: the agent/connect endpoints, issuing real
certificates from a CA the test made (a dev CA directory: ca.crt, ca.key).

Follows developer.hashicorp.com/consul/api-docs/agent/connect:
- `GET /v1/agent/connect/ca/roots` -> `{ActiveRootID, TrustDomain, Roots: [{ID, Name,
  SerialNumber, SigningKeyID, NotBefore, NotAfter, RootCert, IntermediateCerts, Active,
  CreateIndex, ModifyIndex}]}`;
- `GET /v1/agent/connect/ca/leaf/:service` -> `{SerialNumber, CertPEM, PrivateKeyPEM,
  Service, ServiceURI, ValidAfter, ValidBefore, CreateIndex, ModifyIndex}`, the URI SAN
  `spiffe://<td>/ns/default/dc/<dc>/svc/<service>`; issued at the first ask and again when asked past 2/3 of its life;
- `PUT /v1/agent/connect/authorize` `{Target, ClientCertURI, ClientCertSerial}` ->
  `{Authorized, Reason}` by the intentions set through the test route below (default
  allow, as Consul with ACLs off);
both reads blocking (`?index=&wait=`, `X-Consul-Index`).

Test-only routes: `PUT /_emulator/connect/rotate-leaf` (`{"service": s}`, or every
leaf), `PUT /_emulator/connect/rotate-roots` (`{"ca_dir": d, "grace": seconds}`: the new
root becomes active beside the old one at once, the leaves are re-signed by it after
`grace`, as Consul's agents spread their re-signing), `PUT /_emulator/connect/intentions`
(`{"default": "allow"|"deny", "rules": [{"source": svc, "destination": svc, "action":
"allow"|"deny"}]}`).
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from sidecar.tls import devca, spiffe


def _colon_hex(data: bytes) -> str:
    return ":".join(f"{b:02x}" for b in data)


def _time(moment: datetime.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Root:
    ca: devca.DevCa
    index: int
    active: bool = True

    @property
    def root_id(self) -> str:
        return _colon_hex(
            hashlib.sha1(self.ca.cert.public_bytes(serialization.Encoding.DER)).digest()
        )

    def describe(self) -> dict[str, Any]:
        cert = self.ca.cert
        return {
            "ID": self.root_id,
            "Name": "Consul CA Primary Cert",
            "SerialNumber": cert.serial_number,
            "SigningKeyID": _colon_hex(
                cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
            ),
            "NotBefore": _time(cert.not_valid_before_utc),
            "NotAfter": _time(cert.not_valid_after_utc),
            "RootCert": self.ca.cert_pem.decode(),
            "IntermediateCerts": None,
            "Active": self.active,
            "PrivateKeyType": "ec",
            "PrivateKeyBits": 256,
            "CreateIndex": self.index,
            "ModifyIndex": self.index,
        }


@dataclass
class ConnectCa:
    trust_domain: str
    dc: str
    leaf_ttl: float
    roots: list[Root] = field(default_factory=list)
    roots_index: int = 1
    leaves: dict[str, dict[str, Any]] = field(default_factory=dict)
    renew_at: dict[str, datetime.datetime] = field(default_factory=dict)
    intentions: dict[str, Any] = field(default_factory=lambda: {"default": "allow", "rules": []})

    @property
    def active(self) -> Root:
        return next(r for r in self.roots if r.active)

    def roots_body(self) -> dict[str, Any]:
        return {
            "ActiveRootID": self.active.root_id,
            "TrustDomain": self.trust_domain,
            "Roots": [r.describe() for r in self.roots],
        }

    def issue(self, service: str, index: int) -> dict[str, Any]:
        uri = f"spiffe://{self.trust_domain}/ns/default/dc/{self.dc}/svc/{service}"
        now = datetime.datetime.now(datetime.UTC)
        chain, key = devca.issue(self.active.ca, uri, self.leaf_ttl, now=now)
        cert = x509.load_pem_x509_certificate(chain)
        leaf = {
            "SerialNumber": _colon_hex(cert.serial_number.to_bytes(20, "big").lstrip(b"\0")),
            "CertPEM": chain.decode(),
            "PrivateKeyPEM": key.decode(),
            "Service": service,
            "ServiceURI": uri,
            "ValidAfter": _time(cert.not_valid_before_utc),
            "ValidBefore": _time(cert.not_valid_after_utc),
            "CreateIndex": index,
            "ModifyIndex": index,
        }
        self.leaves[service] = leaf
        # The agent renews a leaf it is asked for past ~2/3 of its life (its cache's way).
        self.renew_at[service] = now + datetime.timedelta(seconds=self.leaf_ttl * 2 / 3)
        return leaf

    def due(self, service: str) -> bool:
        at = self.renew_at.get(service)
        return at is None or datetime.datetime.now(datetime.UTC) >= at

    def authorize(self, target: str, client_uri: str) -> tuple[bool, str]:
        try:
            source = spiffe.parse(client_uri).service
        except spiffe.SpiffeError as exc:
            return False, f"ClientCertURI is not a SPIFFE ID: {exc}"
        for rule in self.intentions.get("rules", ()):
            if rule.get("source") in (source, "*") and rule.get("destination") in (target, "*"):
                action = rule.get("action", "deny")
                return action == "allow", f"Matched L4 intention: {source} => {target} ({action})"
        default = self.intentions.get("default", "allow")
        return default == "allow", f"Default behavior configured by ACLs ({default})"


def load(ca_dir: str, trust_domain: str) -> devca.DevCa:
    return devca.load_ca(Path(ca_dir), trust_domain)


async def later(delay: float, action: Any) -> None:
    await asyncio.sleep(delay)
    await action()
