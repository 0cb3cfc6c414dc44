"""A sidecar's certificate material: its chain, the chain's key and the trust bundle,
read and checked together so that only a consistent set is ever put in use.

Checks (each error names the file): the PEM parses; the key is the leaf's (its public
key matches the certificate's); the leaf carries exactly one URI SAN, a SPIFFE ID in
the configured trust domain; the bundle holds at least one certificate.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from sidecar.tls import spiffe

_SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


class MaterialError(ValueError):
    """Material that cannot be used; `path` names the file at fault ("" if none)."""

    def __init__(self, message: str, path: str = "") -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path


@dataclass(frozen=True, slots=True)
class Material:
    chain_pem: bytes
    key_pem: bytes
    bundle_pem: bytes
    leaf: x509.Certificate
    roots: tuple[x509.Certificate, ...]
    identity: str  # the leaf's SPIFFE ID

    @property
    def not_after(self) -> datetime.datetime:
        return self.leaf.not_valid_after_utc

    @property
    def not_before(self) -> datetime.datetime:
        return self.leaf.not_valid_before_utc

    def lifetime(self) -> float:
        return (self.not_after - self.not_before).total_seconds()

    def describe(self) -> dict[str, object]:
        """What admin /certs shows: the sidecar's certificate and the bundle's roots."""
        return {
            "identity": self.identity,
            "certificate": describe_cert(self.leaf),
            "roots": [describe_cert(root) for root in self.roots],
        }


def describe_cert(cert: x509.Certificate) -> dict[str, object]:
    return {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "serial": format(cert.serial_number, "x"),
        "sans": subject_alt_names(cert),
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
    }


def subject_alt_names(cert: x509.Certificate) -> list[str]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    names: list[str] = [f"URI:{v}" for v in ext.get_values_for_type(x509.UniformResourceIdentifier)]
    names += [f"DNS:{v}" for v in ext.get_values_for_type(x509.DNSName)]
    names += [f"IP:{v}" for v in ext.get_values_for_type(x509.IPAddress)]
    return names


def uri_sans(cert: x509.Certificate) -> list[str]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return list(ext.get_values_for_type(x509.UniformResourceIdentifier))


def leaf_identity(cert: x509.Certificate, trust_domain: str, path: str = "") -> str:
    """The leaf's SPIFFE ID: exactly one URI SAN, valid, in `trust_domain`."""
    uris = uri_sans(cert)
    if len(uris) != 1:
        raise MaterialError(
            f"the certificate must carry exactly one URI SAN (its SPIFFE ID), it has {len(uris)}",
            path,
        )
    try:
        ident = spiffe.parse(uris[0])
    except spiffe.SpiffeError as exc:
        raise MaterialError(f"the certificate's URI SAN is not a SPIFFE ID: {exc}", path) from None
    if trust_domain and ident.trust_domain != trust_domain:
        raise MaterialError(
            f"the certificate's SPIFFE ID {uris[0]} is not in trust domain {trust_domain!r}"
            " (tls.trust_domain)",
            path,
        )
    return uris[0]


def _certs(pem: bytes, path: str, what: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise MaterialError(f"no PEM {what} can be read: {exc}", path) from None
    if not certs:
        raise MaterialError(f"holds no PEM {what}", path)
    return certs


def build(
    chain_pem: bytes,
    key_pem: bytes,
    bundle_pem: bytes,
    trust_domain: str,
    paths: tuple[str, str, str] = ("", "", ""),
) -> Material:
    """Check the three together; MaterialError naming the file at fault."""
    chain_path, key_path, bundle_path = paths
    chain = _certs(chain_pem, chain_path, "certificate")
    roots = _certs(bundle_pem, bundle_path, "CA certificate")
    try:
        key: PrivateKeyTypes = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise MaterialError(
            f"no unencrypted PEM private key can be read: {exc}", key_path
        ) from None
    leaf = chain[0]
    if key.public_key().public_bytes(*_SPKI) != leaf.public_key().public_bytes(*_SPKI):
        raise MaterialError(
            f"the private key does not match the certificate in {chain_path or 'the chain'}",
            key_path,
        )
    identity = leaf_identity(leaf, trust_domain, chain_path)
    return Material(chain_pem, key_pem, bundle_pem, leaf, tuple(roots), identity)


def read(cert: str, key: str, bundle: str, trust_domain: str) -> Material:
    """Read and check the three files (the `file` source's)."""
    blobs = []
    for path in (cert, key, bundle):
        try:
            blobs.append(Path(path).read_bytes())
        except OSError as exc:
            raise MaterialError(f"cannot be read: {exc.strerror or exc}", path) from None
    return build(blobs[0], blobs[1], blobs[2], trust_domain, (cert, key, bundle))
