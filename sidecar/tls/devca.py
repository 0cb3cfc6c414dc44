"""The built-in CA for development and the embedded default (`tls.source: dev`).

`opus-sidecar ca init <dir> --trust-domain td` writes a root (`ca.crt`, `ca.key`) whose
URI SAN is the trust domain's own SPIFFE ID; a sidecar configured with the directory
issues itself a short-lived leaf from it at start and again before it expires. Every
certificate here is made with `cryptography` (ECDSA P-256).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sidecar.tls import spiffe
from sidecar.tls.material import MaterialError, uri_sans

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
CA_DAYS = 3650
BACKDATE = datetime.timedelta(seconds=60)  # a peer's clock a little behind still accepts it


@dataclass(frozen=True, slots=True)
class DevCa:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    trust_domain: str

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_ca(trust_domain: str, now: datetime.datetime | None = None, days: int = CA_DAYS) -> DevCa:
    spiffe.check_trust_domain(trust_domain)
    now = now or _now()
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "opus-mesh"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"opus-mesh dev CA {trust_domain}"),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"{spiffe.SCHEME}{trust_domain}")]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return DevCa(cert, key, trust_domain)


def init_ca(directory: Path, trust_domain: str) -> DevCa:
    """Write a new CA into `directory` (refusing to overwrite one)."""
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    for path in (cert_path, key_path):
        if path.exists():
            raise MaterialError("exists already; remove it to make a new CA", str(path))
    ca = make_ca(trust_domain)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(_key_pem(ca.key))
    cert_path.write_bytes(ca.cert_pem)
    return ca


def load_ca(directory: Path, trust_domain: str = "") -> DevCa:
    """The CA in `directory`; its trust domain is its URI SAN's (MaterialError if it is
    not `trust_domain`, when one is given)."""
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError) as exc:
        raise MaterialError(f"no CA certificate can be read: {exc}", str(cert_path)) from None
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise MaterialError(f"no CA key can be read: {exc}", str(key_path)) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise MaterialError(f"the key does not match {cert_path}", str(key_path))
    uris = uri_sans(cert)
    try:
        ident = spiffe.parse(uris[0]) if len(uris) == 1 else None
    except spiffe.SpiffeError:
        ident = None
    if ident is None or ident.path:
        raise MaterialError(
            "is not a dev CA: its one URI SAN must be spiffe://<trust-domain>", str(cert_path)
        )
    if trust_domain and ident.trust_domain != trust_domain:
        raise MaterialError(
            f"is the CA of trust domain {ident.trust_domain!r}, not {trust_domain!r}"
            " (tls.trust_domain)",
            str(cert_path),
        )
    return DevCa(cert, key, ident.trust_domain)


def issue(
    ca: DevCa,
    identity: str,
    ttl: float,
    now: datetime.datetime | None = None,
    dns_names: tuple[str, ...] = (),
) -> tuple[bytes, bytes]:
    """A leaf for `identity` valid for `ttl` seconds: (chain PEM, key PEM)."""
    now = now or _now()
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(identity)]
    sans += [x509.DNSName(name) for name in dns_names]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "opus-mesh")]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + datetime.timedelta(seconds=ttl))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(sans), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False
        )
        .sign(ca.key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)
