"""Checks of the route rules (docs/traffic.md) across the config: every rule compiles,
names are unique, destinations and mirrors name services and defined subsets, weights,
percentages and statuses are in range. Errors name the rule's key and the field."""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING

from sidecar.chain import resolve_factory
from sidecar.traffic.match import compile_match
from sidecar.typedconfig import ConfigError, show, show_number

if TYPE_CHECKING:
    from sidecar.config.routerules import FaultConfig, MirrorConfig, RouteRule
    from sidecar.config.schema import SidecarConfig

_SERVICE_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?")
_RULE_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def check_route_rules(cfg: SidecarConfig) -> None:
    names: dict[str, str] = {}
    for name, override in cfg.services.items():
        for subset, selector in override.subsets.items():
            key = f"services.{name}.subsets.{subset}"
            if not _RULE_NAME.fullmatch(subset):
                raise ConfigError(key, "a subset's name must be letters, digits, '-', '_', '.'")
            if not selector:
                raise ConfigError(key, "must select on at least one metadata key (version: v2)")
    levels = [("route_rules", cfg.route_rules, "")]
    levels += [
        (f"services.{name}.route_rules", o.route_rules, name) for name, o in cfg.services.items()
    ]
    for level, rules, service in levels:
        for i, rule in enumerate(rules):
            key = f"{level}[{i}]"
            if not _RULE_NAME.fullmatch(rule.name):
                raise ConfigError(
                    f"{key}.name",
                    f"must be letters, digits, '-', '_' and '.', got {show(rule.name)}",
                )
            if rule.name in names:
                raise ConfigError(
                    f"{key}.name", f"{show(rule.name)} is already the name of {names[rule.name]}"
                )
            names[rule.name] = key
            _check_rule(cfg, key, rule, service)


def _check_rule(cfg: SidecarConfig, key: str, rule: RouteRule, service: str) -> None:
    compile_match(rule.match, f"{key}.match")
    destinations = rule.destinations
    for j, dest in enumerate(destinations):
        where = f"{key}.destinations[{j}]"
        if not dest.service and not service:
            raise ConfigError(f"{where}.service", "must name a service at the listener level")
        _check_target(cfg, where, dest.service or service, dest.subset)
        if dest.weight is not None and dest.weight < 0:
            raise ConfigError(f"{where}.weight", f"must be >= 0, got {dest.weight}")
        if len(destinations) > 1 and dest.weight is None:
            raise ConfigError(f"{where}.weight", "must be set when a rule has several destinations")
    if len(destinations) > 1 and not any(d.weight for d in destinations):
        raise ConfigError(f"{key}.destinations", "the weights must not all be 0")
    if rule.timeout is not None:
        _positive(f"{key}.timeout", rule.timeout)
    if rule.retry is not None:
        if rule.retry.attempts < 0:
            raise ConfigError(f"{key}.retry.attempts", f"must be >= 0, got {rule.retry.attempts}")
        if rule.retry.per_try_timeout is not None:
            _positive(f"{key}.retry.per_try_timeout", rule.retry.per_try_timeout)
    _check_policy_filters(key, rule)
    if rule.fault is not None:
        _check_fault(f"{key}.fault", rule.fault)
    if rule.mirror is not None:
        _check_mirror(cfg, f"{key}.mirror", rule.mirror)


def _check_target(cfg: SidecarConfig, key: str, service: str, subset: str) -> None:
    if not _SERVICE_NAME.fullmatch(service):
        raise ConfigError(f"{key}.service", f"is not a valid service name: {show(service)}")
    if not subset:
        return
    override = cfg.services.get(service)
    if override is None or subset not in override.subsets:
        known = sorted(override.subsets) if override is not None else []
        raise ConfigError(
            f"{key}.subset",
            f"{show(subset)} is not a subset of {service!r} (services.{service}.subsets"
            + (f" defines {', '.join(known)})" if known else " defines none)"),
        )


def _check_policy_filters(key: str, rule: RouteRule) -> None:
    # The route's timeout, retry and headers run as the built-in filters of those names:
    # their own checks apply, named by the rule's key.
    for field, spec in rule.policy_filters():
        where = f"{key}.{field}"
        config = resolve_factory(spec.name).parse(spec.config, where)
        check = getattr(config, "validate", None)
        if callable(check):
            try:
                check()
            except ValueError as exc:
                raise ConfigError(where, str(exc)) from None


def _percent(key: str, value: float) -> None:
    if not 0 <= value <= 100:
        raise ConfigError(key, f"must be in 0..100, got {show_number(value)}")


def _positive(key: str, value: float) -> None:
    if not (value > 0 and math.isfinite(value)):
        raise ConfigError(key, f"must be a number > 0, got {show_number(value)}")


def _check_fault(key: str, fault: FaultConfig) -> None:
    if fault.delay is None and fault.abort is None:
        raise ConfigError(key, "must set delay, abort or both")
    if fault.header and not _TOKEN.fullmatch(fault.header):
        raise ConfigError(f"{key}.header", f"is not a valid header name: {show(fault.header)}")
    if fault.delay is not None:
        _positive(f"{key}.delay.fixed", fault.delay.fixed)
        _percent(f"{key}.delay.percent", fault.delay.percent)
    abort = fault.abort
    if abort is not None:
        _percent(f"{key}.abort.percent", abort.percent)
        if abort.http_status is None and abort.grpc_status is None:
            raise ConfigError(f"{key}.abort", "must set http_status, grpc_status or both")
        if abort.http_status is not None and not 200 <= abort.http_status <= 599:
            raise ConfigError(
                f"{key}.abort.http_status", f"must be in 200..599, got {abort.http_status}"
            )
        if abort.grpc_status is not None and not 1 <= abort.grpc_status <= 16:
            raise ConfigError(
                f"{key}.abort.grpc_status",
                f"must be a gRPC error status, 1..16, got {abort.grpc_status}",
            )


def _check_mirror(cfg: SidecarConfig, key: str, mirror: MirrorConfig) -> None:
    _check_target(cfg, key, mirror.service, mirror.subset)
    _percent(f"{key}.percent", mirror.percent)
    _positive(f"{key}.timeout", mirror.timeout)
    for field in ("max_in_flight", "max_body_bytes", "max_buffered_bytes"):
        value = getattr(mirror, field)
        if value < 1:
            raise ConfigError(f"{key}.{field}", f"must be >= 1, got {value}")
    if mirror.max_buffered_bytes < mirror.max_body_bytes:
        raise ConfigError(
            f"{key}.max_buffered_bytes",
            f"must be >= max_body_bytes ({mirror.max_body_bytes}), got {mirror.max_buffered_bytes}",
        )
