"""A sidecar's mTLS, built from its config: the source, the state it keeps current, and
what the inbound listener and the upstream pools are handed."""

from __future__ import annotations

from sidecar.config import SidecarConfig
from sidecar.tls import spiffe
from sidecar.tls.consul_source import DEFAULT_NAMESPACE, ConsulSource, consul_identity
from sidecar.tls.contexts import TlsState
from sidecar.tls.inbound import InboundTls
from sidecar.tls.sources import DevSource, FileSource, Scheduler, Source
from sidecar.tls.upstream import UpstreamTls
from sidecar.tls.vault_source import VaultPki, VaultSource


class MeshTls:
    def __init__(self, cfg: SidecarConfig, source: Source) -> None:
        tls = cfg.tls
        self.mode = tls.mode
        self.trust_domain = tls.trust_domain
        self.handshake_timeout = tls.handshake_timeout
        self.source = source
        self.state = TlsState(tls.trust_domain, tls.min_version, source.load())
        self._identities: dict[str, str] = {}
        self.reconfigure(cfg)
        self.inbound_tls: InboundTls | None = None

    def reconfigure(self, cfg: SidecarConfig) -> None:
        """Take a reloaded config's `services.<name>.identity` (the rest of `tls` is
        fixed until a restart: sidecar/config/live.py refuses a change to it)."""
        self._identities = {
            name: override.identity
            for name, override in cfg.services.items()
            if override.identity is not None
        }

    @classmethod
    def from_config(cls, cfg: SidecarConfig) -> MeshTls:
        tls = cfg.tls
        source: Source
        if tls.source == "dev":
            identity = tls.identity or spiffe.service_id(tls.trust_domain, cfg.service.name)
            source = DevSource(tls.dev.ca_dir, tls.trust_domain, identity, tls.dev.ttl)
        elif tls.source == "consul":
            c = tls.consul
            source = ConsulSource(
                address=c.address,
                token=c.token,
                service=c.service or cfg.service.name,
                trust_domain=tls.trust_domain,
                namespace=c.namespace,
                datacenter=c.datacenter,
                wait=c.wait,
                request_timeout=c.request_timeout,
                retry_max=c.retry_max,
                max_queries_per_second=c.max_queries_per_second,
                start_timeout=c.start_timeout,
            )
        elif tls.source == "vault":
            source = vault_source(cfg)
        else:
            f = tls.file
            source = FileSource(f.cert, f.key, f.bundle, tls.trust_domain, f.poll_interval)
        return cls(cfg, source)

    def start(self, loop: Scheduler) -> None:
        self.source.start(self.state, loop)

    def inbound(self, listener: str) -> InboundTls:
        self.inbound_tls = InboundTls(self.mode, self.state, self.handshake_timeout, listener)
        return self.inbound_tls

    def upstream(self) -> UpstreamTls:
        return UpstreamTls(self.state, self.expected_identity, self.handshake_timeout)

    def expected_identity(self, service: str, registered: str = "") -> str:
        """Secure naming: the SPIFFE ID `service`'s sidecars must present. The config's
        `services.<name>.identity`, else what the registry entry names, else the default."""
        return self._identities.get(service) or registered or self._default_identity(service)

    def _default_identity(self, service: str) -> str:
        source = self.source
        if isinstance(source, ConsulSource):
            # What Consul issues `service` in this sidecar's namespace and datacenter.
            namespace = source.namespace or DEFAULT_NAMESPACE
            return consul_identity(self.trust_domain, namespace, source.datacenter, service)
        return spiffe.service_id(self.trust_domain, service)

    def snapshot(self) -> dict[str, object]:
        """What admin /certs shows."""
        material = self.state.material
        return {
            "mode": self.mode,
            "trust_domain": self.trust_domain,
            "source": self.source.name,
            "generation": self.state.generation,  # 1: the material loaded at start
            "expired": self.source.now() >= material.not_after,
            **material.describe(),
        }

    def close(self) -> None:
        self.source.close()


def vault_source(cfg: SidecarConfig) -> VaultSource:
    tls, v = cfg.tls, cfg.tls.vault
    identity = tls.identity or spiffe.service_id(tls.trust_domain, cfg.service.name)
    pki = VaultPki(
        v.address,
        v.mount,
        v.role,
        identity,
        v.common_name or cfg.service.name,
        v.ttl,
        tls.trust_domain,
        token=v.token,
        token_file=v.token_file,
        ca_file=v.ca_file,
        timeout=v.timeout,
    )
    return VaultSource(pki, v.retry_max)
