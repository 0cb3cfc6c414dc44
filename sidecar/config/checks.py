"""Checks across fields of a built config, run before anything binds a port."""

from __future__ import annotations

import ipaddress
import re

from sidecar.authz import compile_policy
from sidecar.chain import validate_filters
from sidecar.config.rulechecks import check_route_rules
from sidecar.config.schema import CaptureConfig, HealthCheckConfig, RouteConfig, SidecarConfig
from sidecar.config.tlscheck import check_intentions, check_tls
from sidecar.typedconfig import ConfigError, show, show_number

_SERVICE_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?")


def validate(cfg: SidecarConfig) -> None:
    if not _SERVICE_NAME.fullmatch(cfg.service.name):
        raise ConfigError(
            "service.name",
            f"must be lower-case letters, digits, '-' and '.', "
            f"starting and ending with a letter or digit, got {show(cfg.service.name)}",
        )
    if not cfg.app.health_path.startswith("/"):
        raise ConfigError(
            "app.health_path", f"must start with '/', got {show(cfg.app.health_path)}"
        )
    for key, host in (
        ("app.host", cfg.app.host),
        ("listeners.outbound.host", cfg.listeners.outbound.host),
        ("listeners.inbound.host", cfg.listeners.inbound.host),
        ("listeners.admin.host", cfg.listeners.admin.host),
        ("listeners.capture.host", cfg.listeners.capture.host),
    ):
        if not host:
            raise ConfigError(key, "must not be empty")
    file = cfg.discovery.file
    if file.ttl <= file.heartbeat_interval:
        raise ConfigError(
            "discovery.file.ttl",
            f"must be greater than discovery.file.heartbeat_interval "
            f"({show_number(file.heartbeat_interval)}), got {show_number(file.ttl)}",
        )
    _check_pool("upstream", cfg.upstream.max_connections, cfg.upstream.max_per_route)
    _check_balancing("upstream", cfg.upstream.lb_policy, cfg.upstream.hash_header)
    _check_health_path("upstream.health_check", cfg.upstream.health_check)
    for name, override in cfg.services.items():
        _check_service_name(f"services.{name}", name)
        _check_balancing(
            f"services.{name}",
            override.lb_policy or cfg.upstream.lb_policy,
            cfg.upstream.hash_header if override.hash_header is None else override.hash_header,
        )
        if override.health_check is not None:
            _check_health_path(f"services.{name}.health_check", override.health_check)
        _check_pool(
            f"services.{name}",
            override.max_connections or cfg.upstream.max_connections,
            override.max_per_route or cfg.upstream.max_per_route,
        )
    for name in cfg.discovery.static.services:
        _check_service_name(f"discovery.static.services.{name}", name)
    for i, route in enumerate(cfg.routes):
        _check_route(f"routes[{i}]", route)
    check_route_rules(cfg)
    _check_capture(cfg.capture)
    check_tls(cfg)
    check_intentions(cfg)
    compile_policy(cfg)  # the authorization rules compile, or name the key that does not
    # Each filter validates its own config now, before anything binds.
    validate_filters(cfg)


def _check_pool(key: str, max_connections: int, max_per_route: int) -> None:
    if max_connections < max_per_route:
        raise ConfigError(
            f"{key}.max_connections",
            f"must be >= max_per_route ({max_per_route}), got {max_connections}",
        )


def _check_balancing(key: str, policy: str, hash_header: str) -> None:
    if policy == "ring_hash" and not hash_header:
        raise ConfigError(f"{key}.hash_header", "must name a header when lb_policy is ring_hash")


def _check_health_path(key: str, check: HealthCheckConfig) -> None:
    if not check.path.startswith("/"):
        raise ConfigError(f"{key}.path", f"must start with '/', got {show(check.path)}")


def _check_capture(capture: CaptureConfig) -> None:
    for i, port in enumerate(capture.opaque_ports):
        if not 1 <= port <= 65535:
            raise ConfigError(f"capture.opaque_ports[{i}]", f"must be in 1..65535, got {port}")
    for address, service in capture.service_ips.items():
        key = f"capture.service_ips.{address}"
        if parse_ip_port(address) is None:
            raise ConfigError(key, "the key must be 'ip', 'ip:port' or '[ipv6]:port'")
        _check_service_name(key, service)


def parse_ip_port(text: str) -> tuple[str, int | None] | None:
    """`10.0.0.1` -> (ip, None); `10.0.0.1:80`, `[::1]:80` -> (ip, 80); None if neither."""
    host, port = text, None
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            return None
        rest = rest[1:]
    elif text.count(":") == 1:
        host, _, rest = text.partition(":")
    else:
        rest = ""
    if rest or text.endswith(":"):
        if not rest.isdigit() or not 1 <= int(rest) <= 65535:
            return None
        port = int(rest)
    try:
        return str(ipaddress.ip_address(host)), port
    except ValueError:
        return None


def _check_service_name(key: str, name: str) -> None:
    if not _SERVICE_NAME.fullmatch(name):
        raise ConfigError(key, f"is not a valid service name: {show(name)}")


def _check_route(key: str, route: RouteConfig) -> None:
    _check_service_name(f"{key}.service", route.service)
    if bool(route.prefix) == bool(route.grpc_service):
        raise ConfigError(key, "must set exactly one of prefix and grpc_service")
    if route.prefix and not route.prefix.startswith("/"):
        raise ConfigError(f"{key}.prefix", f"must start with '/', got {show(route.prefix)}")
