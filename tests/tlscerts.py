"""Certificates for the TLS tests, made with `cryptography` (never hand-written ASN.1):
a CA per trust domain and leaves with whatever a test needs wrong with them."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sidecar.tls import devca

NOW = datetime.datetime.now(datetime.UTC)


@dataclass
class Leaf:
    cert_pem: bytes
    key_pem: bytes

    def write(self, directory: Path, stem: str) -> tuple[str, str]:
        directory.mkdir(parents=True, exist_ok=True)
        cert, key = directory / f"{stem}.crt", directory / f"{stem}.key"
        cert.write_bytes(self.cert_pem)
        key.write_bytes(self.key_pem)
        return str(cert), str(key)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def ca(trust_domain: str = "mesh.test") -> devca.DevCa:
    return devca.make_ca(trust_domain)


def write_ca(ca_: devca.DevCa, directory: Path) -> str:
    """The CA as a dev CA directory (ca.crt, ca.key); returns the bundle's path."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / devca.CA_CERT).write_bytes(ca_.cert_pem)
    (directory / devca.CA_KEY).write_bytes(key_pem(ca_.key))
    return str(directory / devca.CA_CERT)


def leaf(
    issuer: devca.DevCa | None,
    uris: tuple[str, ...] = ("spiffe://mesh.test/svc/a",),
    *,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
    dns: tuple[str, ...] = (),
) -> Leaf:
    """A leaf signed by `issuer` (None: self-signed) with these URI SANs."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test leaf")])
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
    sans += [x509.DNSName(d) for d in dns]
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or NOW - datetime.timedelta(minutes=5))
        .not_valid_after(not_after or NOW + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(issuer.key if issuer else key, hashes.SHA256())
    return Leaf(cert.public_bytes(serialization.Encoding.PEM), key_pem(key))


def file_source_dir(
    directory: Path, issuer: devca.DevCa, identity: str, bundle: bytes | None = None
) -> dict[str, str]:
    """cert, key and bundle files for a `file` source; returns the tls.file config."""
    directory.mkdir(parents=True, exist_ok=True)
    made = leaf(issuer, (identity,))
    cert, key = made.write(directory, "tls")
    (directory / "bundle.crt").write_bytes(bundle if bundle is not None else issuer.cert_pem)
    return {"cert": cert, "key": key, "bundle": str(directory / "bundle.crt")}
