"""Property tests for the config loader: any YAML document (random shapes over the real
key names, and random text) gives a SidecarConfig or a ConfigError, nothing else."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.chain import validate_filters
from sidecar.config import ConfigError, SidecarConfig, load_config

KEYS = ["service", "app", "listeners", "discovery", "upstream", "services", "routes", "filters",
        "http2", "limits", "log", "drain_timeout", "capture", "name", "port", "host", "backend",
        "file", "static", "consul", "outbound", "inbound", "config", "timeout", "max_retries",
        "request_headers_to_set", "max_body_bytes", "level", "protocol", "prefix", "bogus"]  # fmt: skip
FILTER_NAMES = [
    "retry",
    "timeout",
    "headers",
    "rate_limit",
    "circuit_breaker",
    "hmac_verify",
    "nope",
]

scalars = (
    st.none() | st.booleans() | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
    | st.sampled_from(FILTER_NAMES)
)  # fmt: skip
documents = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(KEYS), inner, max_size=5)
    ),
    max_leaves=25,
)
BOUNDED = settings(
    max_examples=100, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _load(path: Path) -> None:
    try:
        cfg = load_config(str(path), environ={})
        validate_filters(cfg)
    except ConfigError as exc:
        assert str(exc)  # a message that names something
        return
    assert isinstance(cfg, SidecarConfig)


@BOUNDED
@given(doc=documents)
def test_random_documents_load_or_raise_config_error(tmp_path: Path, doc: object) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(doc))
    _load(path)


@BOUNDED
@given(text=st.text(max_size=200) | st.binary(max_size=200).map(lambda b: b.decode("latin-1")))
def test_random_text_loads_or_raises_config_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text, errors="surrogateescape")
    _load(path)


@pytest.mark.parametrize(
    ("doc", "key"),
    [
        (
            {
                "filters": {
                    "outbound": [
                        {
                            "name": "headers",
                            "config": {"request_headers_to_set": {"x-a": "a\r\nx-b: c"}},
                        }
                    ]
                }
            },
            "filters.outbound",
        ),
        (
            {
                "filters": {
                    "inbound": [
                        {
                            "name": "headers",
                            "config": {"response_headers_to_add": {"bad name": "v"}},
                        }
                    ]
                }
            },
            "filters.inbound",
        ),
        ({"filters": {"outbound": [{"name": "no_such_filter"}]}}, "filters.outbound"),
        (
            {"filters": {"outbound": [{"name": "retry", "config": {"max_retries": "many"}}]}},
            "max_retries",
        ),
        ({"limits": {"header_read_timeout": -1}}, "limits.header_read_timeout"),
        ({"listeners": {"inbound": {"port": 70000}}}, "listeners.inbound.port"),
        ({"filters": {"inbound": [{"name": "hmac_verify", "config": {}}]}}, "filters.inbound"),
    ],
)
def test_malformed_shapes_name_the_key(tmp_path: Path, doc: object, key: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError) as info:
        validate_filters(load_config(str(path), environ={}))
    assert key in str(info.value)


def test_a_config_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_bytes(b"a: \xff\xfe\n")
    with pytest.raises(ConfigError):
        load_config(str(path), environ={})
