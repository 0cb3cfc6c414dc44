"""SPIFFE IDs (the SPIFFE-ID spec, section 2): `spiffe://<trust-domain>/<path>`.

The trust domain is lower-case letters, digits, '.', '-' and '_'; the path is segments of
letters, digits, '.', '-' and '_', none empty, '.' or '..'; no port, user, query or
fragment. Three path shapes name a workload the mesh knows how to read:

- `ns/<namespace>/sa/<service-account>`: Istio's, filled by the Kubernetes injector;
- `svc/<service>`: outside Kubernetes, the default identity of a service;
- `ns/<ns>/dc/<dc>/svc/<service>` in a `<td>.consul` trust domain: what Consul issues.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SCHEME = "spiffe://"
MAX_LENGTH = 2048  # the spec's recommended bound on a SPIFFE ID's length
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]+")
_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")


class SpiffeError(ValueError):
    """Not a valid SPIFFE ID; the message says why."""


@dataclass(frozen=True, slots=True)
class SpiffeId:
    trust_domain: str
    path: str  # with its leading '/', or "" for the trust domain's own ID

    def __str__(self) -> str:
        return f"{SCHEME}{self.trust_domain}{self.path}"

    @property
    def segments(self) -> tuple[str, ...]:
        return tuple(self.path.split("/")[1:]) if self.path else ()

    @property
    def kind(self) -> str:
        """`k8s` (ns/sa), `svc`, `consul`, or `other` for any other valid path."""
        seg = self.segments
        if len(seg) == 4 and seg[0] == "ns" and seg[2] == "sa":
            return "k8s"
        if len(seg) == 2 and seg[0] == "svc":
            return "svc"
        if (
            len(seg) == 6
            and (seg[0], seg[2], seg[4]) == ("ns", "dc", "svc")
            and self.trust_domain.endswith(".consul")
        ):
            return "consul"
        return "other"

    @property
    def service(self) -> str:
        """The service the ID names (`svc` and `consul` forms), else ""."""
        kind = self.kind
        if kind == "svc":
            return self.segments[1]
        if kind == "consul":
            return self.segments[5]
        return ""

    @property
    def namespace(self) -> str:
        return self.segments[1] if self.kind in ("k8s", "consul") else ""


def parse(text: str) -> SpiffeId:
    """The SPIFFE ID in `text`; SpiffeError saying what is wrong otherwise."""
    if len(text) > MAX_LENGTH:
        raise SpiffeError(f"longer than {MAX_LENGTH} characters")
    if not text.startswith(SCHEME):
        if text.lower().startswith(SCHEME):
            raise SpiffeError(f"the scheme must be lower-case 'spiffe://': {text!r}")
        raise SpiffeError(f"must start with 'spiffe://': {text!r}")
    rest = text[len(SCHEME) :]
    for char, what in (("?", "a query"), ("#", "a fragment")):
        if char in rest:
            raise SpiffeError(f"must not have {what}: {text!r}")
    trust_domain, slash, path = rest.partition("/")
    if not trust_domain:
        raise SpiffeError(f"has no trust domain: {text!r}")
    if "@" in trust_domain:
        raise SpiffeError(f"must not have user info: {text!r}")
    if ":" in trust_domain:
        raise SpiffeError(f"must not have a port: {text!r}")
    if not _TRUST_DOMAIN.fullmatch(trust_domain):
        raise SpiffeError(
            f"trust domain {trust_domain!r} may hold only lower-case letters, digits,"
            " '.', '-' and '_'"
        )
    if not slash:
        return SpiffeId(trust_domain, "")
    if not path:
        raise SpiffeError(f"must not end with '/': {text!r}")
    for segment in path.split("/"):
        if not segment:
            raise SpiffeError(f"has an empty path segment: {text!r}")
        if segment in (".", ".."):
            raise SpiffeError(f"has a '{segment}' path segment: {text!r}")
        if not _SEGMENT.fullmatch(segment):
            raise SpiffeError(
                f"path segment {segment!r} may hold only letters, digits, '.', '-' and '_'"
            )
    return SpiffeId(trust_domain, "/" + path)


def check_trust_domain(text: str) -> str:
    """`text` if it is a valid trust domain name, else SpiffeError."""
    if not text or not _TRUST_DOMAIN.fullmatch(text):
        raise SpiffeError(
            f"trust domain {text!r} must be non-empty lower-case letters, digits, '.', '-' and '_'"
        )
    return text


def service_id(trust_domain: str, service: str) -> str:
    """The default identity of `service`: `spiffe://<td>/svc/<service>`."""
    return f"{SCHEME}{trust_domain}/svc/{service}"


def workload_id(trust_domain: str, namespace: str, service_account: str) -> str:
    return f"{SCHEME}{trust_domain}/ns/{namespace}/sa/{service_account}"
