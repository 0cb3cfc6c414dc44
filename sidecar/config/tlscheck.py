"""The `tls` section's checks: names, and the material itself, read and checked at load
so that a key that is not its certificate's stops the process naming the file."""

from __future__ import annotations

import os
from pathlib import Path

from sidecar.config.schema import SidecarConfig, TlsVaultConfig
from sidecar.typedconfig import ConfigError, show


def check_tls(cfg: SidecarConfig) -> None:
    tls = cfg.tls
    if tls.mode == "disable":
        return
    # Imported here: `cryptography` is only needed once TLS is on.
    from sidecar.tls import devca, material, spiffe

    if not tls.trust_domain:
        raise ConfigError("tls.trust_domain", f"must be set when tls.mode is {tls.mode}")
    try:
        spiffe.check_trust_domain(tls.trust_domain)
    except spiffe.SpiffeError as exc:
        raise ConfigError("tls.trust_domain", str(exc)) from None
    _check_identity("tls.identity", tls.identity, tls.trust_domain)
    for name, override in cfg.services.items():
        if override.identity is not None:
            _check_identity(f"services.{name}.identity", override.identity, "")
    if tls.source == "file":
        keys = ("tls.file.cert", "tls.file.key", "tls.file.bundle")
        paths = (tls.file.cert, tls.file.key, tls.file.bundle)
        for key, path in zip(keys, paths, strict=True):
            if not path:
                raise ConfigError(key, "must name a PEM file when tls.source is file")
        try:
            material.read(*paths, tls.trust_domain)
        except material.MaterialError as exc:
            key = keys[paths.index(exc.path)] if exc.path in paths else "tls.file"
            raise ConfigError(key, str(exc)) from None
    elif tls.source == "consul":
        _check_consul(cfg)
    elif tls.source == "vault":
        _check_vault(tls.vault)
    else:
        if not tls.dev.ca_dir:
            raise ConfigError(
                "tls.dev.ca_dir", "must name the directory `opus-sidecar ca init` made"
            )
        try:
            devca.load_ca(Path(tls.dev.ca_dir), tls.trust_domain)
        except material.MaterialError as exc:
            raise ConfigError("tls.dev.ca_dir", str(exc)) from None


def _check_vault(vault: TlsVaultConfig) -> None:
    scheme, _, rest = vault.address.partition("://")
    if scheme not in ("http", "https") or not rest.strip("/"):
        raise ConfigError(
            "tls.vault.address",
            f"must be an http:// or https:// URL of Vault, got {show(vault.address)}",
        )
    for key, value in (("tls.vault.mount", vault.mount), ("tls.vault.role", vault.role)):
        if not value.strip("/"):
            raise ConfigError(key, "must be set when tls.source is vault")
    if bool(vault.token) == bool(vault.token_file):
        raise ConfigError(
            "tls.vault.token", "set exactly one of tls.vault.token and tls.vault.token_file"
        )
    for key, path in (
        ("tls.vault.token_file", vault.token_file),
        ("tls.vault.ca_file", vault.ca_file),
    ):
        if path and not os.access(path, os.R_OK):
            raise ConfigError(key, f"{show(path)} cannot be read")
    if vault.ca_file and scheme != "https":
        raise ConfigError("tls.vault.ca_file", "verifies an https Vault: tls.vault.address is http")


def _check_identity(key: str, identity: str, trust_domain: str) -> None:
    if not identity:
        return
    from sidecar.tls import spiffe

    try:
        ident = spiffe.parse(identity)
    except spiffe.SpiffeError as exc:
        raise ConfigError(key, f"is not a SPIFFE ID: {exc}") from None
    if trust_domain and ident.trust_domain != trust_domain:
        raise ConfigError(key, f"{show(identity)} is not in tls.trust_domain {show(trust_domain)}")


def _check_consul(cfg: SidecarConfig) -> None:
    from sidecar.tls import consul_source

    tls = cfg.tls
    if not tls.trust_domain.endswith(".consul"):
        raise ConfigError(
            "tls.trust_domain",
            f"must be Consul's trust domain ('<cluster id>.consul', as /v1/agent/connect/ca/roots"
            f" names it) when tls.source is consul, got {show(tls.trust_domain)}",
        )
    try:
        consul_source.split_address(tls.consul.address)
    except ValueError as exc:
        raise ConfigError("tls.consul.address", str(exc)) from None
    for key, value in (
        ("tls.consul.service", tls.consul.service),
        ("tls.consul.datacenter", tls.consul.datacenter),
        ("tls.consul.namespace", tls.consul.namespace),
    ):
        if value and not consul_source.NAME.fullmatch(value):
            raise ConfigError(
                key,
                f"{show(value)} may hold only letters, digits, '.', '-' and '_'"
                " (it is a segment of the SPIFFE ID Consul issues)",
            )


def check_intentions(cfg: SidecarConfig) -> None:
    """authorization.intentions: Consul decides by the caller's certificate, so it needs
    mTLS, and the agent is the one tls.consul names."""
    intentions = cfg.authorization.intentions
    if not intentions.source:
        return
    key = "authorization.intentions"
    if cfg.tls.mode == "disable":
        raise ConfigError(
            f"{key}.source",
            "consul needs tls.mode permissive or strict: intentions decide by the caller's "
            "certificate, which a plaintext mesh has none of",
        )
    for name, value in (("cache_ttl", intentions.cache_ttl), ("stale_for", intentions.stale_for)):
        if value < 0:
            raise ConfigError(f"{key}.{name}", f"must be >= 0 seconds, got {value}")
    if intentions.timeout <= 0:
        raise ConfigError(f"{key}.timeout", f"must be > 0 seconds, got {intentions.timeout}")
    if intentions.max_cached < 1:
        raise ConfigError(f"{key}.max_cached", f"must be >= 1, got {intentions.max_cached}")
    from sidecar.tls import consul_source

    try:
        consul_source.split_address(cfg.tls.consul.address)
    except ValueError as exc:
        raise ConfigError("tls.consul.address", str(exc)) from None
