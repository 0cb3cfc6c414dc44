"""Config loading: YAML, `OPUS_*` overrides and validation, all in-process."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import yaml

from sidecar.config import (
    ConfigError,
    ListenerConfig,
    RouteConfig,
    SidecarConfig,
    StaticEndpoint,
    advertise_host,
    config_to_dict,
    env_override_names,
    load_config,
    registry_directory,
    resolve_instance_id,
    unknown_env_overrides,
)

FULL = """
service:
  name: inventory
  instance_id: inv-1
  zone: a
  tags: [blue, v2]
  meta: {team: stock}
app:
  host: 127.0.0.1
  port: 9000
  protocol: h2c
  health_path: /healthz
  max_connections: 32
listeners:
  outbound: {host: 127.0.0.1, port: 0}
  inbound: {host: 0.0.0.0, port: 0}
  admin: {host: 127.0.0.1, port: 0}
  advertise_host: 10.0.0.7
discovery:
  backend: static
  register: false
  file: {directory: /tmp/reg, heartbeat_interval: 0.5, ttl: 2, poll_interval: 0.1}
  static:
    services:
      inventory: ["127.0.0.1:15007", {host: 127.0.0.1, port: 15008, zone: a, weight: 3}]
upstream:
  protocol: http1
  max_connections: 10
  max_per_route: 2
  idle_timeout: 5
  connect_timeout: 0.5
  pending_timeout: 0.25
  lb_policy: least_request
services:
  inventory: {lb_policy: round_robin, max_per_route: 4}
routes:
  - {prefix: /inventory/, service: inventory}
  - {grpc_service: shop.Inventory, service: inventory}
http2: {max_concurrent_streams: 50, initial_window_size: 1048576, max_frame_size: 32768}
limits: {max_request_line: 4096, max_header_bytes: 32768, header_read_timeout: 3}
log: {level: warning, access_log: ""}
drain_timeout: 0
"""


def write(tmp_path: Path, text: str, name: str = "sidecar.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def error_for(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), environ or {})
    return info.value


# --- Files ---------------------------------------------------------------------


def test_defaults_without_a_file() -> None:
    assert load_config(None, {}) == SidecarConfig()


def test_empty_file_and_empty_sections_mean_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, ""), {}) == SidecarConfig()
    assert load_config(write(tmp_path, "log:\nupstream:\n"), {}) == SidecarConfig()


def test_full_example_loads_and_round_trips(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, FULL), {})
    assert cfg.service.tags == ("blue", "v2")
    assert cfg.service.meta == {"team": "stock"}
    assert cfg.app.protocol == "h2c"
    assert cfg.discovery.file.ttl == 2.0
    assert isinstance(cfg.discovery.file.ttl, float)
    assert cfg.services["inventory"].max_per_route == 4
    assert cfg.services["inventory"].max_connections is None
    assert cfg.routes[1] == RouteConfig(service="inventory", grpc_service="shop.Inventory")
    assert cfg.log.level == "WARNING"
    assert cfg.drain_timeout == 0.0

    dumped = yaml.safe_dump(config_to_dict(cfg))
    assert load_config(write(tmp_path, dumped, "again.yaml"), {}) == cfg


def test_static_endpoints_accept_strings_and_mappings(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, FULL), {})
    assert cfg.discovery.static.services["inventory"] == (
        StaticEndpoint("127.0.0.1", 15007),
        StaticEndpoint("127.0.0.1", 15008, zone="a", weight=3),
    )
    ipv6 = "discovery: {static: {services: {db: ['[::1]:5432']}}}"
    assert load_config(write(tmp_path, ipv6), {}).discovery.static.services["db"] == (
        StaticEndpoint("::1", 5432),
    )


@pytest.mark.parametrize(
    ("entry", "key"),
    [
        ("'127.0.0.1'", "discovery.static.services.db[0]"),
        ("'127.0.0.1:http'", "discovery.static.services.db[0]"),
        ("'127.0.0.1:0'", "discovery.static.services.db[0].port"),
        ("{host: 127.0.0.1}", "discovery.static.services.db[0].port"),
        ("{host: 127.0.0.1, port: 1, wieght: 2}", "discovery.static.services.db[0].wieght"),
    ],
)
def test_bad_static_endpoints(tmp_path: Path, entry: str, key: str) -> None:
    err = error_for(tmp_path, f"discovery: {{static: {{services: {{db: [{entry}]}}}}}}")
    assert err.key == key


def test_missing_file_names_it(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=r"nope\.yaml: cannot read config file"):
        load_config(missing, {})


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    err = error_for(tmp_path, "log:\n  level: INFO\n  access_log: [unclosed\n")
    assert str(err).startswith(f"{tmp_path / 'sidecar.yaml'}: line ")
    assert "invalid YAML" in str(err)


def test_duplicate_keys_are_an_error(tmp_path: Path) -> None:
    err = error_for(tmp_path, "upstream:\n  max_per_route: 2\n  max_per_route: 3\n")
    assert "line 3" in str(err)
    assert "duplicate key 'max_per_route'" in str(err)


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    assert "mapping" in str(error_for(tmp_path, "- a\n- b\n"))


# --- Unknown keys and types -------------------------------------------------------


def test_unknown_key_is_named_with_a_suggestion(tmp_path: Path) -> None:
    err = error_for(tmp_path, "upstream:\n  max_per_rout: 3\n")
    assert err.key == "upstream.max_per_rout"
    assert "did you mean 'max_per_route'" in str(err)


def test_unknown_key_without_a_close_match_lists_known_keys(tmp_path: Path) -> None:
    err = error_for(tmp_path, "log: {zzz: 1}")
    assert err.key == "log.zzz"
    assert "known keys: level, access_log" in str(err)


def test_unknown_top_level_key(tmp_path: Path) -> None:
    err = error_for(tmp_path, "listener: {}")
    assert err.key == "listener"
    assert "did you mean 'listeners'" in str(err)


def test_error_message_format(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, {"OPUS_UPSTREAM_MAX_PER_ROUTE": "0"})
    assert str(info.value) == (
        "config key 'upstream.max_per_route' (from OPUS_UPSTREAM_MAX_PER_ROUTE): "
        "must be an integer >= 1, got 0"
    )
    path = write(tmp_path, "upstream: {max_per_route: abc}")
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    assert str(info.value) == (
        f"{path}: config key 'upstream.max_per_route': must be an integer >= 1, got 'abc'"
    )


@pytest.mark.parametrize(
    ("text", "key", "expected"),
    [
        ("app: {port: '8000'}", "app.port", "an integer in 0..65535"),
        ("app: {port: 8000.5}", "app.port", "an integer"),
        ("app: {port: true}", "app.port", "an integer"),  # bool is not an int
        ("app: {port: 70000}", "app.port", "in 0..65535"),
        ("app: {port: -1}", "app.port", "in 0..65535"),
        ("listeners: {admin: {host: 127.0.0.1, port: x}}", "listeners.admin.port", "an integer"),
        ("discovery: {register: 1}", "discovery.register", "a boolean"),
        ("discovery: {register: 'true'}", "discovery.register", "a boolean"),
        ("discovery: {backend: zookeeper}", "discovery.backend", "one of 'file', 'static'"),
        ("upstream: {idle_timeout: fast}", "upstream.idle_timeout", "a number > 0"),
        ("upstream: {idle_timeout: true}", "upstream.idle_timeout", "a number"),
        ("upstream: {connect_timeout: 0}", "upstream.connect_timeout", "> 0"),
        ("upstream: {pending_timeout: .nan}", "upstream.pending_timeout", "> 0"),
        ("service: {name: 42}", "service.name", "a string"),
        ("service: {tags: blue}", "service.tags", "a list"),
        ("service: {tags: [1]}", "service.tags[0]", "a string"),
        ("service: {meta: {team: 7}}", "service.meta.team", "a string"),
        ("services: {db: {max_per_route: 0}}", "services.db.max_per_route", ">= 1"),
        ("services: {db: {lb_policy: random}}", "services.db.lb_policy", "one of"),
        ("routes: {prefix: /}", "routes", "a list"),
        ("routes: [{prefix: /}]", "routes[0].service", "is required"),
        ("log: {level: verbose}", "log.level", "one of 'DEBUG'"),
        ("log: []", "log", "a mapping"),
        ("http2: {max_frame_size: 1024}", "http2.max_frame_size", "in 16384..16777215"),
        ("drain_timeout: -1", "drain_timeout", ">= 0"),
    ],
)
def test_wrong_types_name_key_and_expectation(
    tmp_path: Path, text: str, key: str, expected: str
) -> None:
    err = error_for(tmp_path, text)
    assert err.key == key
    assert expected in str(err)


def test_float_fields_accept_ints(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "drain_timeout: 3"), {})
    assert cfg.drain_timeout == 3.0
    assert isinstance(cfg.drain_timeout, float)


def test_port_zero_is_allowed(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "listeners: {outbound: {host: 127.0.0.1, port: 0}}"), {})
    assert cfg.listeners.outbound.port == 0


def test_partial_listener_keeps_that_listeners_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "listeners: {inbound: {port: 0}, admin: {port: 0}}"), {})
    assert cfg.listeners.inbound == ListenerConfig("0.0.0.0", 0)
    assert cfg.listeners.admin == ListenerConfig("0.0.0.0", 0)
    assert cfg.listeners.outbound == ListenerConfig("127.0.0.1", 8080)
    env = load_config(None, {"OPUS_LISTENERS_INBOUND_PORT": "0"})
    assert env.listeners.inbound == ListenerConfig("0.0.0.0", 0)


def test_log_level_is_case_insensitive(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "log: {level: debug}"), {}).log.level == "DEBUG"


# --- Semantic checks -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("service: {name: Inventory}", "service.name"),
        ("service: {name: -inv}", "service.name"),
        ("service: {name: ''}", "service.name"),
        ("app: {health_path: health}", "app.health_path"),
        ("app: {host: ''}", "app.host"),
        ("upstream: {max_connections: 2, max_per_route: 3}", "upstream.max_connections"),
        ("services: {db: {max_connections: 2}}", "services.db.max_connections"),
        ("services: {Bad_Name: {}}", "services.Bad_Name"),
        ("discovery: {file: {heartbeat_interval: 1, ttl: 1}}", "discovery.file.ttl"),
        ("discovery: {static: {services: {'a b': []}}}", "discovery.static.services.a b"),
    ],
)
def test_semantic_errors_name_the_key(tmp_path: Path, text: str, key: str) -> None:
    assert error_for(tmp_path, text).key == key


def test_service_names_may_hold_dots_and_dashes(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "service: {name: inventory-v2.shop}"), {})
    assert cfg.service.name == "inventory-v2.shop"


@pytest.mark.parametrize(
    ("route", "key"),
    [
        ("{service: a, prefix: /a, grpc_service: x.A}", "routes[1]"),
        ("{service: a}", "routes[1]"),
        ("{service: a, prefix: a/}", "routes[1].prefix"),
        ("{service: A, prefix: /a}", "routes[1].service"),
        ("{service: a, prefix: /a, timeout: 1}", "routes[1].timeout"),
    ],
)
def test_route_validation(tmp_path: Path, route: str, key: str) -> None:
    err = error_for(tmp_path, f"routes: [{{service: ok, prefix: /ok}}, {route}]")
    assert err.key == key


# --- Environment overrides -------------------------------------------------------------


def test_env_overrides_apply_over_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, FULL)
    cfg = load_config(
        path,
        {
            "OPUS_LOG_LEVEL": "debug",
            "OPUS_APP_PORT": "8080",
            "OPUS_LISTENERS_OUTBOUND_HOST": "127.0.0.2",
            "OPUS_UPSTREAM_MAX_PER_ROUTE": "3",
            "OPUS_DISCOVERY_FILE_DIRECTORY": "/var/run/reg",
            "OPUS_DISCOVERY_REGISTER": "true",
            "OPUS_SERVICE_NAME": "orders",
            "OPUS_SERVICE_TAGS": "a, b,,c",
            "OPUS_DRAIN_TIMEOUT": "2.5",
            "OPUS_LOG_ACCESS_LOG": "",
        },
    )
    assert cfg.log.level == "DEBUG"
    assert cfg.app.port == 8080
    assert cfg.listeners.outbound.host == "127.0.0.2"
    assert cfg.listeners.outbound.port == 0  # the file's sibling value survives
    assert cfg.upstream.max_per_route == 3
    assert cfg.discovery.file.directory == "/var/run/reg"
    assert cfg.discovery.register is True
    assert cfg.service.name == "orders"
    assert cfg.service.tags == ("a", "b", "c")
    assert cfg.drain_timeout == 2.5
    assert cfg.log.access_log == ""


def test_env_overrides_without_a_file() -> None:
    cfg = load_config(None, {"OPUS_UPSTREAM_MAX_PER_ROUTE": "4", "OPUS_SERVICE_NAME": "123"})
    assert cfg.upstream.max_per_route == 4
    assert cfg.service.name == "123"  # str fields take the text verbatim


@pytest.mark.parametrize(
    ("var", "value", "key"),
    [
        ("OPUS_UPSTREAM_MAX_PER_ROUTE", "abc", "upstream.max_per_route"),
        ("OPUS_APP_PORT", "99999", "app.port"),
        ("OPUS_DISCOVERY_REGISTER", "1", "discovery.register"),
        ("OPUS_LOG_LEVEL", "loud", "log.level"),
        ("OPUS_SERVICE_NAME", "Bad Name", "service.name"),
        ("OPUS_LISTENERS_ADMIN_PORT", "[1, 2]", "listeners.admin.port"),
    ],
)
def test_bad_env_value_names_the_variable(var: str, value: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, {var: value})
    assert info.value.key == key
    assert info.value.env_var == var
    assert var in str(info.value)


def test_load_config_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPUS_APP_PORT", "8123")
    assert load_config(None).app.port == 8123


def test_env_names_cover_every_leaf_and_resolve_uniquely() -> None:
    names = env_override_names()
    assert names["OPUS_UPSTREAM_MAX_PER_ROUTE"] == "upstream.max_per_route"
    assert names["OPUS_LISTENERS_ADVERTISE_HOST"] == "listeners.advertise_host"
    assert names["OPUS_DISCOVERY_FILE_HEARTBEAT_INTERVAL"] == "discovery.file.heartbeat_interval"
    assert names["OPUS_DRAIN_TIMEOUT"] == "drain_timeout"
    assert len(set(names.values())) == len(names)
    # Keyed collections have no fixed names and are left to the file.
    assert not any(
        key.startswith(("services", "routes", "discovery.static")) for key in names.values()
    )
    assert "service.meta" not in names.values()


def test_unknown_env_overrides() -> None:
    environ = {
        "OPUS_LOG_LEVL": "debug",
        "OPUS_ROUTES": "x",
        "OPUS_LOG_LEVEL": "debug",
        "OPUS_SIDECAR_URL": "http://127.0.0.1:8080",  # the client library's
        "PATH": "/bin",
    }
    assert unknown_env_overrides(environ) == ["OPUS_LOG_LEVL", "OPUS_ROUTES"]
    cfg = load_config(None, environ)  # ignored by loading
    assert cfg.log.level == "DEBUG"


# --- Derived values -------------------------------------------------------------------


def test_resolve_instance_id(tmp_path: Path) -> None:
    assert resolve_instance_id(load_config(write(tmp_path, FULL), {})) == "inv-1"
    generated = resolve_instance_id(SidecarConfig())
    assert generated.startswith("app-")
    assert generated.endswith(f"-{os.getpid()}")


def test_advertise_host(tmp_path: Path) -> None:
    assert advertise_host(load_config(write(tmp_path, FULL), {})) == "10.0.0.7"
    assert advertise_host(SidecarConfig()) == "127.0.0.1"  # inbound binds 0.0.0.0
    for host, expected in [("::", "127.0.0.1"), ("10.1.2.3", "10.1.2.3")]:
        cfg = load_config(None, {"OPUS_LISTENERS_INBOUND_HOST": host})
        assert advertise_host(cfg) == expected


def test_registry_directory(tmp_path: Path) -> None:
    assert registry_directory(load_config(write(tmp_path, FULL), {})) == "/tmp/reg"
    assert registry_directory(SidecarConfig()) == os.path.join(
        tempfile.gettempdir(), "opus-mesh", "registry"
    )


def test_config_to_dict_is_plain_data() -> None:
    out = config_to_dict(SidecarConfig())
    assert out["listeners"]["inbound"] == {"host": "0.0.0.0", "port": 15006}
    assert out["service"]["tags"] == []
    assert yaml.safe_load(yaml.safe_dump(out)) == out
