"""TLS for the injector: a self-signed CA and a serving certificate it signs.

The API server calls webhooks over HTTPS only and checks the serving certificate
against the webhook's `caBundle`, so the CA is written out for whoever sets that
(a step of the deploy, or cert-manager in the other mode, which needs none of this).
Needs the optional `cryptography` package: `pip install 'opus-mesh[injector]'`.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

CA_FILE = "ca.crt"
CERT_FILE = "tls.crt"  # the names `kubectl create secret tls` gives a Secret's keys
KEY_FILE = "tls.key"


class CertError(Exception):
    """Certificates cannot be made or loaded; the message says what to do."""


@dataclass(frozen=True, slots=True)
class CertBundle:
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes

    def write(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CA_FILE).write_bytes(self.ca_pem)
        (directory / CERT_FILE).write_bytes(self.cert_pem)
        key = directory / KEY_FILE
        key.touch(mode=0o600)
        key.write_bytes(self.key_pem)


def service_dns_names(service: str, namespace: str) -> list[str]:
    """The names the API server may use for a webhook Service."""
    return [
        service,
        f"{service}.{namespace}",
        f"{service}.{namespace}.svc",
        f"{service}.{namespace}.svc.cluster.local",
    ]


def self_signed(
    dns_names: Sequence[str],
    ip_addresses: Sequence[str] = (),
    days: int = 365,
    now: datetime.datetime | None = None,
) -> CertBundle:
    """A fresh CA (ECDSA P-256) and a serving certificate for the given names."""
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError:
        raise CertError(
            "generating certificates needs the 'cryptography' package: "
            "pip install 'opus-mesh[injector]' (or pass --cert and --key)"
        ) from None
    start = (now or datetime.datetime.now(datetime.UTC)) - datetime.timedelta(minutes=5)
    end = start + datetime.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "opus-sidecar-injector CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )

    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
    subject = dns_names[0] if dns_names else "opus-sidecar-injector"
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    return CertBundle(
        ca_pem=ca.public_bytes(pem),
        cert_pem=cert.public_bytes(pem),
        key_pem=key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )


def server_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as exc:
        raise CertError(f"cannot load {cert_file} / {key_file}: {exc}") from None
    return ctx
