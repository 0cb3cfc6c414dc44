"""hmac_sign, hmac_verify and their keyring, driven with in-memory calls and a fake clock.

Also owns the cross-language test vectors: `python -m tests.unit.test_hmac --write-vectors`
regenerates tests/vectors/hmac_vectors.json from the seed's own snippet (inlined below).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from filters import hmac_sign, hmac_verify
from filters.hmac_replay import SHARED_DIR_ENV, SharedReplayCache, replay_cache
from filters.hmac_sign import HmacSignConfig
from filters.hmac_verify import HmacVerifyConfig, ReplayCache
from filters.keyring import KeyLoadError, KeyRing, KeySourceConfig, load_keys
from sidecar import signing
from sidecar.call import BufferBudget, Call
from sidecar.chain import Filter, FilterContext, compose
from sidecar.config import ConfigError, load_config
from sidecar.messages import Body, Headers, Request, Response, fixed_body
from sidecar.metrics import Metrics

VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "hmac_vectors.json"
NOW = 1_700_000_000.0
SECRET_1 = "k1-secret-do-not-log"
SECRET_2 = "k2-secret-do-not-log"


# --- The seed's snippet, inlined independently of sidecar.signing ----------------------


def seed_signature(secret_key: bytes, method: str, path: str, timestamp: int, body: bytes) -> str:
    body_md5 = hashlib.md5(body).hexdigest()
    sign_str = method + path + str(timestamp) + body_md5
    return hmac.new(key=secret_key, msg=sign_str.encode(), digestmod="sha256").hexdigest()


def _vector(name: str, method: str, path: str, ts: int, key: str, body: bytes) -> dict[str, Any]:
    md5 = hashlib.md5(body).hexdigest()
    return {
        "name": name,
        "method": method,
        "path": path,
        "timestamp": ts,
        "key": key,
        "body_base64": base64.b64encode(body).decode(),
        "body_md5": md5,
        "sign_string": f"{method}{path}{ts}{md5}",
        "signature": seed_signature(key.encode(), method, path, ts, body),
    }


def generate_vectors() -> dict[str, Any]:
    key = "opus-demo-key"
    unsigned_string = f"POST/upload1700000300{hmac_sign.UNSIGNED_PAYLOAD}"
    return {
        "description": (
            "Opus Mesh HMAC request signatures (docs/filters/hmac.md). "
            "sign_string = method + path + timestamp + body_md5; "
            "signature = hex(HMAC-SHA256(key as UTF-8, sign_string as UTF-8)). "
            "path is the request target as sent, with ?query; body_md5 is the lowercase "
            "hex MD5 of the raw body bytes (body_base64 decoded)."
        ),
        "vectors": [
            _vector("get-empty-body", "GET", "/health", 1700000000, key, b""),
            _vector("get-with-query", "GET", "/v1/items?sku=sku-1&limit=10", 1700000001, key, b""),
            _vector(
                "post-json",
                "POST",
                "/reserve",
                1700000002,
                key,
                b'{"item":"sku-1","quantity":2}',
            ),
            _vector("put-binary", "PUT", "/blob/7", 1700000003, key, bytes(range(256))),
            _vector(
                "delete-percent-encoded",
                "DELETE",
                "/orders/caf%C3%A9?reason=a%20b",
                1700000004,
                key,
                b"",
            ),
            _vector("utf8-key", "POST", "/pay", 1700000005, "ключ-🔑", b"amount=10"),
        ],
        "unsigned_payload": {
            "description": (
                "Opus Mesh extension for bodies too large or streamed (X-OPUS-Body: unsigned): "
                "the literal UNSIGNED-PAYLOAD replaces body_md5."
            ),
            "vectors": [
                {
                    "name": "post-unsigned-body",
                    "method": "POST",
                    "path": "/upload",
                    "timestamp": 1700000300,
                    "key": key,
                    "sign_string": unsigned_string,
                    "signature": hmac.new(
                        key.encode(), unsigned_string.encode(), "sha256"
                    ).hexdigest(),
                }
            ],
        },
    }


def write_vectors() -> None:
    VECTORS.parent.mkdir(parents=True, exist_ok=True)
    VECTORS.write_text(json.dumps(generate_vectors(), indent=2, ensure_ascii=False) + "\n")


# --- Helpers -------------------------------------------------------------------------------


class FakeClock:
    def __init__(self, t: float = NOW) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def write_keys(path: Path, keys: dict[str, str]) -> None:
    """Replace the key file atomically (as a config tool would) and move its mtime on."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(keys))
    os.replace(tmp, path)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def make_call(
    body: bytes | Body = b"",
    *,
    method: bytes = b"POST",
    path: bytes = b"/reserve?trace=1",
    request_path: bytes | None = None,
    headers: Headers | None = None,
    direction: str = "outbound",
    max_body_bytes: int = 1024 * 1024,
) -> Call:
    payload = body if isinstance(body, Body) else fixed_body(body)
    request = Request(method, request_path or path, b"inventory", list(headers or []), payload)
    return Call(request, direction, "inventory", b"inventory", path, max_body_bytes)


def inbound_copy(outbound: Call, body: bytes) -> Call:
    """The call as the peer's inbound listener sees it: the outbound call's path, its headers."""
    return make_call(
        body,
        method=outbound.request.method,
        path=outbound.path,
        headers=list(outbound.headers),
        direction="inbound",
    )


class App:
    """Stands in for the router: counts the calls that got through the chain."""

    def __init__(self) -> None:
        self.calls: list[Call] = []

    async def __call__(self, call: Call) -> Response:
        self.calls.append(call)
        return Response(200, [], fixed_body(b"ok"))


def run(flt: Filter, call: Call, app: App | None = None) -> Response:
    chain = compose([flt], app or App())

    async def go() -> Response:
        return await chain(call)

    return asyncio.run(go())


def body_of(response: Response) -> bytes:
    return response.body.read_nowait() or b""


def header(call: Call, name: str) -> str:
    value = call.header(name.lower().encode())
    assert value is not None, f"no {name} header"
    return value.decode()


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys.json"
    write_keys(path, {"k1": SECRET_1, "k2": SECRET_2})
    return path


def signer(
    key_file: Path, clock: FakeClock, metrics: Metrics | None = None, **config: Any
) -> Filter:
    cfg = HmacSignConfig(key_file=str(key_file), **{"key_id": "k1", **config})
    cfg.validate()
    return hmac_sign.factory.build(
        cfg,
        FilterContext("outbound", "payment", metrics.filters if metrics else None, {"now": clock}),
    )


def verifier(
    key_file: Path, clock: FakeClock, metrics: Metrics | None = None, **config: Any
) -> Filter:
    cfg = HmacVerifyConfig(key_file=str(key_file), **config)
    cfg.validate()
    ctx = FilterContext(
        "inbound", "inventory", metrics.filters if metrics else None, {"now": clock}
    )
    return hmac_verify.factory.build(cfg, ctx)


def signed_inbound(
    secret: str,
    *,
    body: bytes = b'{"qty":1}',
    ts: int = int(NOW),
    key_id: str | None = "k1",
    method: str = "POST",
    path: str = "/reserve",
    sign_body: bytes | None = None,
) -> Call:
    """An inbound call signed the seed's way (with the test's own snippet)."""
    sig = seed_signature(
        secret.encode(), method, path, ts, body if sign_body is None else sign_body
    )
    headers: Headers = [
        (b"x-opus-signature", sig.encode()),
        (b"x-opus-timestamp", str(ts).encode()),
    ]
    if key_id is not None:
        headers.append((b"x-opus-key-id", key_id.encode()))
    return make_call(
        body, method=method.encode(), path=path.encode(), headers=headers, direction="inbound"
    )


def assert_refused(response: Response, app: App, cause_text: str, status: int = 401) -> None:
    assert response.status == status
    assert (b"x-opus-error", b"AUTH") in response.headers
    payload = json.loads(body_of(response))
    assert cause_text in payload["error"]
    assert payload["status"] == status
    assert app.calls == []


# --- Vectors ---------------------------------------------------------------------------------


def test_vectors_file_is_what_the_seed_snippet_generates() -> None:
    assert json.loads(VECTORS.read_text()) == generate_vectors()


def test_signing_module_matches_vectors_and_the_seed_snippet() -> None:
    data = json.loads(VECTORS.read_text())
    assert len(data["vectors"]) >= 6
    for v in data["vectors"]:
        body = base64.b64decode(v["body_base64"])
        key = v["key"].encode()
        assert signing.body_md5(body) == v["body_md5"], v["name"]
        assert signing.sign_string(v["method"], v["path"], v["timestamp"], body) == v["sign_string"]
        assert signing.sign(key, v["method"], v["path"], v["timestamp"], body) == v["signature"]
        assert seed_signature(key, v["method"], v["path"], v["timestamp"], body) == v["signature"]
    assert data["vectors"][0]["body_md5"] == "d41d8cd98f00b204e9800998ecf8427e"  # MD5 of b""
    (unsigned,) = data["unsigned_payload"]["vectors"]
    assert (
        hmac_sign.signature_for(
            unsigned["key"].encode(),
            unsigned["method"],
            unsigned["path"],
            unsigned["timestamp"],
            None,
        )
        == unsigned["signature"]
    )


# --- Sign and verify -------------------------------------------------------------------------


def test_signer_signs_the_upstream_path_with_query_and_verifier_accepts(key_file: Path) -> None:
    clock = FakeClock()
    body = b'{"item":"sku-1"}'
    call = make_call(body, request_path=b"/v1/invoke/inventory/reserve?trace=1")
    assert run(signer(key_file, clock), call).status == 200
    # The path the upstream sees, not the /v1/invoke form the app sent.
    expected = seed_signature(SECRET_1.encode(), "POST", "/reserve?trace=1", int(NOW), body)
    assert header(call, "X-OPUS-Signature") == expected
    assert header(call, "X-OPUS-Timestamp") == str(int(NOW))
    assert header(call, "X-OPUS-Key-Id") == "k1"
    assert call.header(b"x-opus-body") is None
    app = App()
    assert run(verifier(key_file, clock), inbound_copy(call, body), app).status == 200
    assert len(app.calls) == 1


@pytest.mark.parametrize(
    ("change", "value"),
    [("body", b'{"item":"sku-2"}'), ("path", b"/reserve?trace=2"), ("method", b"PUT")],
)
def test_tampered_call_is_refused(key_file: Path, change: str, value: bytes) -> None:
    clock = FakeClock()
    body = b'{"item":"sku-1"}'
    call = make_call(body)
    run(signer(key_file, clock), call)
    tampered = make_call(
        value if change == "body" else body,
        method=value if change == "method" else b"POST",
        path=value if change == "path" else call.path,
        headers=list(call.headers),
        direction="inbound",
    )
    app = App()
    metrics = Metrics()
    response = run(verifier(key_file, clock, metrics), tampered, app)
    assert_refused(response, app, "signature does not match")
    assert (
        metrics.registry.get_sample_value("opus_hmac_failures_total", {"reason": "bad_signature"})
        == 1
    )


def test_tampered_timestamp_is_refused(key_file: Path) -> None:
    clock = FakeClock()
    call = signed_inbound(SECRET_1)
    call.set_header(b"x-opus-timestamp", str(int(NOW) - 1).encode())
    app = App()
    assert_refused(run(verifier(key_file, clock), call, app), app, "does not match")


@pytest.mark.parametrize(
    ("headers", "text", "reason"),
    [
        ([], "missing", "missing"),
        ([(b"x-opus-timestamp", b"1700000000")], "missing", "missing"),
        (
            [(b"x-opus-signature", b"zz"), (b"x-opus-timestamp", b"1700000000")],
            "malformed",
            "malformed",
        ),
        (
            [(b"x-opus-signature", b"a" * 64), (b"x-opus-timestamp", b"soon")],
            "malformed",
            "malformed",
        ),
        (
            [(b"x-opus-signature", b"A" * 64), (b"x-opus-timestamp", b"1700000000")],
            "malformed",
            "malformed",
        ),
        (
            [(b"x-opus-signature", b"a" * 64), (b"x-opus-timestamp", b"1700000000")],
            "does not match",
            "bad_signature",
        ),
    ],
)
def test_missing_malformed_or_wrong_signature(
    key_file: Path, headers: Headers, text: str, reason: str
) -> None:
    app = App()
    metrics = Metrics()
    call = make_call(b"x", path=b"/reserve", headers=headers, direction="inbound")
    assert_refused(run(verifier(key_file, FakeClock(), metrics), call, app), app, text)
    assert metrics.registry.get_sample_value("opus_hmac_failures_total", {"reason": reason}) == 1


@pytest.mark.parametrize(
    ("offset", "text", "reason"),
    [(-301, "old", "stale"), (301, "future", "future"), (-1000, "old", "stale")],
)
def test_timestamp_outside_skew_is_refused(
    key_file: Path, offset: int, text: str, reason: str
) -> None:
    app = App()
    metrics = Metrics()
    call = signed_inbound(SECRET_1, ts=int(NOW) + offset)  # correctly signed
    assert_refused(run(verifier(key_file, FakeClock(), metrics), call, app), app, text)
    assert metrics.registry.get_sample_value("opus_hmac_failures_total", {"reason": reason}) == 1


@pytest.mark.parametrize("offset", [-300, 300])
def test_timestamp_at_the_skew_edge_passes(key_file: Path, offset: int) -> None:
    app = App()
    assert (
        run(
            verifier(key_file, FakeClock()), signed_inbound(SECRET_1, ts=int(NOW) + offset), app
        ).status
        == 200
    )
    assert len(app.calls) == 1


def test_replay_inside_the_window_is_refused(key_file: Path) -> None:
    clock = FakeClock()
    metrics = Metrics()
    verify = verifier(key_file, clock, metrics)
    app = App()
    assert run(verify, signed_inbound(SECRET_1), app).status == 200
    clock.t += 10
    second_app = App()
    assert_refused(run(verify, signed_inbound(SECRET_1), second_app), second_app, "replay")
    assert metrics.registry.get_sample_value("opus_hmac_failures_total", {"reason": "replay"}) == 1
    # A different body is a different signature: not a replay.
    assert run(verify, signed_inbound(SECRET_1, body=b"other"), app).status == 200


def test_concurrent_copies_of_one_signed_call_admit_only_one(key_file: Path) -> None:
    verify = verifier(key_file, FakeClock())
    app = App()

    async def both() -> list[Response]:
        chain = compose([verify], app)
        return list(
            await asyncio.gather(chain(signed_inbound(SECRET_1)), chain(signed_inbound(SECRET_1)))
        )

    statuses = sorted(r.status for r in asyncio.run(both()))
    assert statuses == [200, 401]
    assert len(app.calls) == 1


def test_replay_cache_evicts_expired_first_and_refuses_when_full_of_live_entries() -> None:
    cache = ReplayCache(2)
    assert cache.admit(b"a", expiry=10, now=0) == "ok"
    assert cache.admit(b"b", expiry=20, now=0) == "ok"
    assert cache.admit(b"b", expiry=20, now=1) == "replay"
    assert cache.admit(b"c", expiry=30, now=5) == "full"  # unexpired: refuse, evict nothing
    assert cache.seen(b"a", 5) and cache.seen(b"b", 5)
    assert cache.admit(b"c", expiry=30, now=10) == "ok"  # "a" expired at 10: slot reused
    assert not cache.seen(b"a", 10)
    assert cache.seen(b"b", 10) and cache.seen(b"c", 10)
    assert len(cache) == 2


def test_full_replay_cache_refuses_with_503(key_file: Path) -> None:
    clock = FakeClock()
    metrics = Metrics()
    verify = verifier(key_file, clock, metrics, replay_cache_size=1)
    app = App()
    assert run(verify, signed_inbound(SECRET_1, body=b"1"), app).status == 200
    refused_app = App()
    response = run(verify, signed_inbound(SECRET_1, body=b"2"), refused_app)
    assert_refused(response, refused_app, "replay cache full", status=503)
    assert (
        metrics.registry.get_sample_value(
            "opus_hmac_failures_total", {"reason": "replay_cache_full"}
        )
        == 1
    )
    clock.t += 301  # the first entry has expired: room again
    assert run(verify, signed_inbound(SECRET_1, body=b"3", ts=int(clock.t)), app).status == 200


def test_unknown_key_id_is_refused(key_file: Path) -> None:
    app = App()
    metrics = Metrics()
    call = signed_inbound("some-other-secret", key_id="k9")
    assert_refused(
        run(verifier(key_file, FakeClock(), metrics), call, app), app, "unknown key id 'k9'"
    )
    assert (
        metrics.registry.get_sample_value("opus_hmac_failures_total", {"reason": "unknown_key"})
        == 1
    )


def test_named_key_id_is_the_only_key_tried(key_file: Path) -> None:
    app = App()
    # Signed with k2's secret but labelled k1: refused even though k2 is live.
    call = signed_inbound(SECRET_2, key_id="k1")
    assert_refused(run(verifier(key_file, FakeClock()), call, app), app, "does not match")


def test_two_live_keys_rotation(key_file: Path) -> None:
    clock = FakeClock()
    verify = verifier(key_file, clock)
    app = App()
    assert run(verify, signed_inbound(SECRET_1, key_id="k1"), app).status == 200
    assert run(verify, signed_inbound(SECRET_2, key_id="k2"), app).status == 200
    # Without a key id every live key is tried.
    assert run(verify, signed_inbound(SECRET_2, key_id=None, body=b"n"), app).status == 200
    assert len(app.calls) == 3
    call = make_call(b"x")
    run(signer(key_file, clock, key_id="k2"), call)
    assert header(call, "X-OPUS-Key-Id") == "k2"
    assert run(verify, inbound_copy(call, b"x"), app).status == 200


def test_changed_key_file_is_picked_up_after_reload_interval(key_file: Path) -> None:
    clock = FakeClock()
    verify = verifier(key_file, clock, reload_interval=1.0)
    app = App()
    assert run(verify, signed_inbound(SECRET_1, body=b"1"), app).status == 200
    write_keys(key_file, {"k2": SECRET_2, "k3": "k3-secret"})
    clock.t += 0.5  # not yet due for a check: the old keys still hold
    assert run(verify, signed_inbound(SECRET_1, body=b"2", ts=int(clock.t)), app).status == 200
    clock.t += 0.5
    refused = App()
    response = run(verify, signed_inbound(SECRET_1, body=b"3", ts=int(clock.t)), refused)
    assert_refused(response, refused, "unknown key id 'k1'")
    three = signed_inbound("k3-secret", key_id="k3", body=b"4", ts=int(clock.t))
    assert run(verify, three, app).status == 200


def test_broken_reload_keeps_the_last_good_keys(
    key_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    verify = verifier(key_file, clock)
    key_file.write_text('{"k1": 12345}')  # YAML reads a number: refused without echoing it
    os.utime(key_file, ns=(0, key_file.stat().st_mtime_ns + 2_000_000_000))
    clock.t += 2
    with caplog.at_level(logging.WARNING, logger="sidecar.filters.hmac"):
        app = App()
        assert run(verify, signed_inbound(SECRET_1, ts=int(clock.t)), app).status == 200
    assert "keeping the previous HMAC keys" in caplog.text
    assert "12345" not in caplog.text


def test_signer_keeps_its_key_when_a_reload_drops_it(key_file: Path) -> None:
    clock = FakeClock()
    sign = signer(key_file, clock, key_id="k1")
    write_keys(key_file, {"k2": SECRET_2})
    clock.t += 5
    call = make_call(b"x")
    run(sign, call)
    assert header(call, "X-OPUS-Key-Id") == "k1"  # the reload without k1 was refused


def test_signer_without_key_id_refuses_a_reload_that_makes_its_key_ambiguous(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    keys = tmp_path / "keys.json"
    write_keys(keys, {"only": SECRET_1})
    clock = FakeClock()
    sign = signer(keys, clock, key_id="")
    write_keys(keys, {"only": SECRET_1, "k2": SECRET_2})
    clock.t += 5
    call = make_call(b"x")
    with caplog.at_level(logging.WARNING, logger="sidecar.filters.hmac"):
        assert run(sign, call).status == 200
    assert header(call, "X-OPUS-Key-Id") == "only"
    assert "key_id must name the signing key" in caplog.text


def kubelet_secret(root: Path, keys: dict[str, str], generation: int) -> None:
    """Lay out `root` as kubelet mounts a Secret: key -> ..data/key -> ..<timestamp>/key."""
    stamp = f"..2024_01_0{generation}_00_00_00.{generation:09d}"
    (root / stamp).mkdir(parents=True)
    for key_id, secret in keys.items():
        (root / stamp / key_id).write_text(secret + "\n")  # a trailing newline is common
    tmp_link = root / "..data_tmp"
    tmp_link.symlink_to(stamp)
    os.replace(tmp_link, root / "..data")  # kubelet's atomic swap
    for entry in root.iterdir():
        if not entry.name.startswith(".") and entry.name not in keys:
            entry.unlink()
    for key_id in keys:
        link = root / key_id
        if not link.is_symlink():
            link.symlink_to(Path("..data") / key_id)


def test_kubernetes_secret_directory_and_its_update(tmp_path: Path) -> None:
    root = tmp_path / "secret"
    kubelet_secret(root, {"k1": SECRET_1}, 1)
    clock = FakeClock()
    cfg = HmacVerifyConfig(key_dir=str(root))
    cfg.validate()
    verify = hmac_verify.factory.build(
        cfg, FilterContext("inbound", "inventory", None, {"now": clock})
    )
    app = App()
    assert run(verify, signed_inbound(SECRET_1), app).status == 200
    kubelet_secret(root, {"k2": SECRET_2}, 2)
    clock.t += 1
    assert run(verify, signed_inbound(SECRET_2, key_id="k2", ts=int(clock.t)), app).status == 200
    refused = App()
    assert_refused(
        run(verify, signed_inbound(SECRET_1, body=b"z", ts=int(clock.t)), refused),
        refused,
        "unknown key id",
    )


def test_key_sources_file_bare_secret_and_environment(tmp_path: Path) -> None:
    bare = tmp_path / "secret.txt"
    bare.write_text("0123456789\n")  # YAML would read this as a number
    keys = load_keys(KeySourceConfig(key_file=str(bare), key_id="main"))
    assert keys["main"].secret == b"0123456789"
    yaml_file = tmp_path / "keys.yaml"
    yaml_file.write_text('k1: "alpha"\nk2: "beta"\n')
    assert {
        k: v.secret for k, v in load_keys(KeySourceConfig(key_file=str(yaml_file))).items()
    } == {
        "k1": b"alpha",
        "k2": b"beta",
    }
    env = {"OPUS_HMAC": "env-secret", "OPUS_HMAC_RING": '{"a": "x", "b": "y"}'}
    assert load_keys(KeySourceConfig(key_env="OPUS_HMAC"), env)[""].secret == b"env-secret"
    assert sorted(load_keys(KeySourceConfig(key_env="OPUS_HMAC_RING"), env)) == ["a", "b"]
    with pytest.raises(KeyLoadError, match=r"OPUS_MISSING.*not set"):
        load_keys(KeySourceConfig(key_env="OPUS_MISSING"), env)
    with pytest.raises(KeyLoadError, match="no key with id 'k3'"):
        load_keys(KeySourceConfig(key_file=str(yaml_file), key_id="k3"))


def test_bare_secret_without_id_signs_without_key_id_header(tmp_path: Path) -> None:
    bare = tmp_path / "secret.txt"
    bare.write_text("solo-secret")
    clock = FakeClock()
    cfg = HmacSignConfig(key_file=str(bare))
    cfg.validate()
    call = make_call(b"x")
    run(
        hmac_sign.factory.build(cfg, FilterContext("outbound", "payment", None, {"now": clock})),
        call,
    )
    assert call.header(b"x-opus-key-id") is None
    assert header(call, "X-OPUS-Signature") == seed_signature(
        b"solo-secret", "POST", "/reserve?trace=1", int(NOW), b"x"
    )


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({}, "exactly one of key_file, key_dir and key_env"),
        ({"key_file": "KEYS", "key_env": "X"}, "exactly one"),
        ({"key_file": "KEYS"}, "key_id must name the signing key"),
        ({"key_file": "KEYS", "key_id": "k3"}, "no key with id 'k3'"),
        ({"key_file": "KEYS", "key_id": "k1", "reload_interval": 0}, "reload_interval"),
        ({"key_file": "/nonexistent/keys.json", "key_id": "k1"}, "cannot read"),
    ],
)
def test_sign_config_errors(key_file: Path, config: dict[str, Any], message: str) -> None:
    raw: dict[str, Any] = {k: (str(key_file) if v == "KEYS" else v) for k, v in config.items()}
    with pytest.raises(ValueError, match=message):
        HmacSignConfig(**raw).validate()


def test_config_errors_name_the_key_through_the_loader(key_file: Path, tmp_path: Path) -> None:
    def load(filter_config: dict[str, Any]) -> None:
        path = tmp_path / "sidecar.yaml"
        path.write_text(
            json.dumps({"filters": {"inbound": [{"name": "hmac_verify", "config": filter_config}]}})
        )
        load_config(str(path), environ={})

    load({"key_file": str(key_file)})  # valid
    with pytest.raises(ConfigError) as inline:
        load({"key_file": str(key_file), "secret": SECRET_1})
    assert inline.value.key == "filters.inbound[0].config (hmac_verify).secret"
    assert SECRET_1 not in str(inline.value)
    with pytest.raises(ConfigError, match=r"filters.inbound\[0\].config \(hmac_verify\).*max_skew"):
        load({"key_file": str(key_file), "max_skew": 0})


# --- Oversize bodies and streams -----------------------------------------------------------


def chunked(data: bytes, size: int = 1000) -> Body:
    body = Body()
    for i in range(0, len(data), size):
        body.feed(data[i : i + size])
    body.finish()
    return body


def test_oversize_reject_answers_413(key_file: Path) -> None:
    app = App()
    call = make_call(chunked(b"x" * 5000), max_body_bytes=4096)
    response = run(signer(key_file, FakeClock()), call, app)
    assert response.status == 413
    assert app.calls == []
    declared = make_call(b"y" * 50, headers=[(b"content-length", b"50")])
    response = run(signer(key_file, FakeClock(), max_body_bytes=10), declared, app)
    assert response.status == 413 and b"50-byte body" in body_of(response)


def test_grpc_stream_is_rejected_or_sent_unsigned(key_file: Path) -> None:
    grpc = [(b"content-type", b"application/grpc+proto")]
    app = App()
    response = run(signer(key_file, FakeClock()), make_call(b"\0\0\0\0\0", headers=grpc), app)
    assert response.status == 200  # gRPC errors are trailers-only 200s
    assert (b"grpc-status", b"8") in response.headers and app.calls == []
    stream = Body()  # never finished: buffering it would hang
    stream.feed(b"\0\0\0\0\1a")
    call = make_call(stream, headers=grpc)
    assert run(signer(key_file, FakeClock(), oversize="unsigned_body"), call, app).status == 200
    assert header(call, "X-OPUS-Body") == "unsigned"
    expected = hmac_sign.signature_for(
        SECRET_1.encode(), "POST", "/reserve?trace=1", int(NOW), None
    )
    assert header(call, "X-OPUS-Signature") == expected


def test_unsigned_body_splices_the_whole_body_and_verifier_needs_opt_in(key_file: Path) -> None:
    data = bytes(range(256)) * 40  # 10 KiB, over the 4 KiB limit, no content-length
    clock = FakeClock()

    async def go() -> tuple[Call, bytes]:
        call = make_call(chunked(data), max_body_bytes=4096)
        reply = await compose([signer(key_file, clock, oversize="unsigned_body")], App())(call)
        assert reply.status == 200
        parts = []
        while chunk := await call.request.body.read():
            parts.append(chunk)
        return call, b"".join(parts)

    call, sent = asyncio.run(go())
    assert sent == data  # nothing lost at the splice
    assert header(call, "X-OPUS-Body") == "unsigned"
    refused = App()
    response = run(verifier(key_file, clock), inbound_copy(call, data), refused)
    assert_refused(response, refused, "unsigned bodies")
    app = App()
    assert (
        run(
            verifier(key_file, clock, allow_unsigned_body=True), inbound_copy(call, data), app
        ).status
        == 200
    )
    # The marker does not vouch for the body, but it does for method, path and time.
    moved = inbound_copy(call, data)
    moved.request.path = b"/elsewhere"
    assert_refused(
        run(verifier(key_file, clock, allow_unsigned_body=True), moved, refused),
        refused,
        "does not match",
    )


def test_small_body_is_signed_even_in_unsigned_mode(key_file: Path) -> None:
    call = make_call(chunked(b"a" * 3000), max_body_bytes=4096)
    run(signer(key_file, FakeClock(), oversize="unsigned_body"), call)
    assert call.header(b"x-opus-body") is None
    assert header(call, "X-OPUS-Signature") == seed_signature(
        SECRET_1.encode(), "POST", "/reserve?trace=1", int(NOW), b"a" * 3000
    )


# --- App-signed calls ----------------------------------------------------------------------


def app_signed(secret: str, ts: int, key_id: str = "k1", path: str = "/reserve?trace=1") -> Call:
    sig = signing.sign(secret.encode(), "POST", path, ts, b"body")
    headers: Headers = [
        (b"x-opus-signature", sig.encode()),
        (b"x-opus-timestamp", str(ts).encode()),
        (b"x-opus-key-id", key_id.encode()),
    ]
    return make_call(b"body", headers=headers)


def test_valid_app_signature_is_preserved_and_verified(key_file: Path) -> None:
    clock = FakeClock()
    ts = int(NOW) - 30
    call = app_signed(SECRET_2, ts, key_id="k2")
    original = header(call, "X-OPUS-Signature")
    run(signer(key_file, clock), call)
    assert header(call, "X-OPUS-Signature") == original
    assert header(call, "X-OPUS-Timestamp") == str(ts)
    assert header(call, "X-OPUS-Key-Id") == "k2"
    app = App()
    assert run(verifier(key_file, clock), inbound_copy(call, b"body"), app).status == 200


@pytest.mark.parametrize(("secret", "preserve"), [("not-our-key", True), (SECRET_1, False)])
def test_invalid_or_unpreserved_app_signature_is_replaced(
    key_file: Path, secret: str, preserve: bool
) -> None:
    clock = FakeClock()
    call = app_signed(secret, int(NOW) - 30)
    run(signer(key_file, clock, preserve_app_signature=preserve), call)
    assert header(call, "X-OPUS-Timestamp") == str(int(NOW))
    assert header(call, "X-OPUS-Signature") == seed_signature(
        SECRET_1.encode(), "POST", "/reserve?trace=1", int(NOW), b"body"
    )
    assert [n for n, _ in call.headers].count(b"x-opus-signature") == 1


# --- Secrets stay secret -------------------------------------------------------------------


def test_secrets_absent_from_reprs_errors_and_logs(
    key_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    sign_cfg = HmacSignConfig(key_file=str(key_file), key_id="k1")
    verify_cfg = HmacVerifyConfig(key_file=str(key_file))
    sign = signer(key_file, clock)
    verify = verifier(key_file, clock)
    keyring = KeyRing(verify_cfg, clock)
    texts = [
        repr(sign_cfg), str(sign_cfg), repr(verify_cfg), repr(sign), str(verify),
        repr(keyring), repr(dict(keyring.keys())), repr(list(keyring.keys().values())),
    ]  # fmt: skip
    with caplog.at_level(logging.DEBUG):
        app = App()
        response = run(verify, signed_inbound("wrong-secret"), app)
        texts.append(body_of(response).decode())
        write_keys(key_file, {"k1": SECRET_1, "k2": SECRET_2, "k3": "k3-secret-do-not-log"})
        clock.t += 2
        keyring.keys()
    texts.append(caplog.text)
    assert "reloaded HMAC keys" in caplog.text  # the reload was logged, by key id only
    for text in texts:
        for secret in (SECRET_1, SECRET_2, "k3-secret-do-not-log"):
            assert secret not in text


def test_failure_counter_is_registered_once_per_registry(key_file: Path) -> None:
    metrics = Metrics()
    first = verifier(key_file, FakeClock(), metrics)
    second = verifier(key_file, FakeClock(), metrics)  # a second chain on the same sidecar
    for verify in (first, second):
        run(verify, make_call(b"", direction="inbound"), App())
    assert metrics.registry.get_sample_value("opus_hmac_failures_total", {"reason": "missing"}) == 2


def test_filters_resolve_from_the_builtin_registry() -> None:
    from sidecar.chain import resolve_factory

    assert resolve_factory("hmac_sign") is hmac_sign.factory
    assert resolve_factory("hmac_verify") is hmac_verify.factory


if __name__ == "__main__":
    if sys.argv[1:] == ["--write-vectors"]:
        write_vectors()
        print(f"wrote {VECTORS}")
    else:
        sys.exit("usage: python -m tests.unit.test_hmac --write-vectors")


# --- Finding 5: nothing buffered before the header checks; the buffer budget ----------------


def endless_body(first: bytes = b"x" * 1000) -> Body:
    """A body that never ends: a check that buffers it would hang the test."""
    body = Body()
    body.feed(first)
    return body


def run_bounded(flt: Filter, call: Call, app: App) -> Response:
    async def go() -> Response:
        return await asyncio.wait_for(compose([flt], app)(call), 2)

    return asyncio.run(go())


def test_replayed_signature_is_refused_before_its_body_is_read(key_file: Path) -> None:
    verify = verifier(key_file, FakeClock())
    first = signed_inbound(SECRET_1)
    assert run(verify, first, App()).status == 200
    replay = signed_inbound(SECRET_1)
    replay.request.body = endless_body()
    app = App()
    assert_refused(run_bounded(verify, replay, app), app, "replay")
    assert replay.request.body.received == 1000 and replay.buffered == 0


def test_key_scoped_elsewhere_is_refused_before_its_body_is_read(tmp_path: Path) -> None:
    keys = scoped_keys(tmp_path, ["billing"])
    call = signed_inbound(SECRET_1)
    call.request.body = endless_body()
    app = App()
    response = run_bounded(verifier(keys, FakeClock()), call, app)
    assert_refused(response, app, "key 'k1' is not scoped to service 'inventory'")


def test_buffer_budget_refuses_past_capacity_and_gives_back_on_release() -> None:
    refused: list[int] = []
    budget = BufferBudget(100, lambda: refused.append(1))
    assert budget.take(60) and budget.take(40)
    assert not budget.take(1) and refused == [1]
    budget.give(40)
    assert budget.used == 60 and budget.take(40)


def test_read_body_over_the_budget_is_503_naming_the_key_and_is_counted() -> None:
    budget = BufferBudget(4000)
    holder = make_call(chunked(b"a" * 3000))
    holder._budget = budget  # as the proxy sets it
    assert asyncio.run(holder.read_body()) == b"a" * 3000
    assert budget.used == 3000
    over = make_call(chunked(b"b" * 3000))
    over._budget = budget  # as the proxy sets it
    with pytest.raises(Exception) as err:
        asyncio.run(over.read_body())
    assert getattr(err.value, "status", None) == 503
    assert "filters.max_buffered_request_bytes = 4000" in str(err.value)
    over.release()
    assert budget.used == 3000  # the refused call gave back what it took
    holder.release()
    assert budget.used == 0


def test_verifier_over_the_budget_answers_503_and_a_small_call_still_passes(
    key_file: Path,
) -> None:
    verify = verifier(key_file, FakeClock())
    budget = BufferBudget(5000)
    big = signed_inbound(SECRET_1, body=b"z" * 8000)
    big.request.body = chunked(b"z" * 8000)
    big._budget = budget  # as the proxy sets it
    app = App()
    response = run(verify, big, app)
    assert response.status == 503 and app.calls == []
    assert b"max_buffered_request_bytes" in body_of(response)
    big.release()
    small = signed_inbound(SECRET_1, body=b"small")
    small._budget = budget  # as the proxy sets it
    assert run(verify, small, app).status == 200 and len(app.calls) == 1


def test_signer_buffering_to_sign_holds_the_budget(key_file: Path) -> None:
    budget = BufferBudget(1500)
    app = App()
    for oversize in ("reject", "unsigned_body"):
        call = make_call(chunked(b"q" * 3000))
        call._budget = budget  # as the proxy sets it
        response = run(signer(key_file, FakeClock(), oversize=oversize), call, app)
        assert response.status == 503 and app.calls == []
        assert budget.used == 1000  # the first chunk; the second was refused
        call.release()
        assert budget.used == 0


# --- Finding 6: replays across workers, keys scoped to services ------------------------------


def test_shared_replay_table_is_one_cache_for_every_opener(tmp_path: Path) -> None:
    path = str(tmp_path / "replay.bin")
    worker_a, worker_b = SharedReplayCache(path, 8), SharedReplayCache(path, 8)
    sig = hashlib.sha256(b"one call").digest()
    assert worker_a.admit(sig, expiry=100, now=0) == "ok"
    assert worker_b.seen(sig, 1) and worker_b.admit(sig, expiry=100, now=1) == "replay"
    assert not worker_b.seen(sig, 100)  # expired
    assert worker_b.admit(sig, expiry=200, now=100) == "ok"  # its slot is reused
    assert worker_a.admit(sig, expiry=200, now=101) == "replay"
    worker_a.close()
    worker_b.close()


def test_shared_replay_table_refuses_when_full_of_live_entries(tmp_path: Path) -> None:
    table = SharedReplayCache(str(tmp_path / "replay.bin"), 2)  # 4 slots
    sigs = [hashlib.sha256(bytes([i])).digest() for i in range(5)]
    assert [table.admit(s, expiry=10, now=0) for s in sigs] == ["ok"] * 4 + ["full"]
    assert table.admit(sigs[4], expiry=20, now=10) == "ok"  # all expired: room again
    assert len(table) == 4
    table.close()


def test_verifier_uses_the_shared_table_when_the_supervisor_names_one(
    key_file: Path, tmp_path: Path
) -> None:
    environ = {SHARED_DIR_ENV: str(tmp_path)}
    assert isinstance(replay_cache("t", 10, environ), SharedReplayCache)
    assert isinstance(replay_cache("t", 10, {}), ReplayCache)
    cfg = HmacVerifyConfig(key_file=str(key_file))
    clock = FakeClock()
    workers = [
        hmac_verify.factory.build(
            cfg, FilterContext("inbound", "inventory", None, {"now": clock, "environ": environ})
        )
        for _ in range(2)
    ]
    app = App()
    assert run(workers[0], signed_inbound(SECRET_1), app).status == 200
    assert_refused(run(workers[1], signed_inbound(SECRET_1), App()), App(), "replay")
    assert len(app.calls) == 1


def test_shared_table_costs_little_per_call(tmp_path: Path) -> None:
    """Its cost per admit (lock, probe, write, unlock), measured: printed with -s."""
    import time

    table = SharedReplayCache(str(tmp_path / "replay.bin"), 100_000)
    local = ReplayCache(100_000)
    sigs = [hashlib.sha256(i.to_bytes(4, "little")).digest() for i in range(20_000)]
    costs = []
    for cache in (table, local):
        start = time.perf_counter()
        for sig in sigs:
            cache.seen(sig, 0)
            cache.admit(sig, 1e12, 0)
        costs.append((time.perf_counter() - start) / len(sigs))
    print(
        f"seen+admit per call: shared {costs[0] * 1e6:.2f} us, in-process {costs[1] * 1e6:.2f} us"
    )
    assert costs[0] < 100e-6
    table.close()


def scoped_keys(tmp_path: Path, services: list[str]) -> Path:
    path = tmp_path / "scoped.json"
    path.write_text(json.dumps({"k1": {"secret": SECRET_1, "services": services}}))
    return path


def test_key_scoped_to_service_a_is_refused_by_service_b(tmp_path: Path) -> None:
    keys = scoped_keys(tmp_path, ["inventory"])
    clock = FakeClock()
    cfg = HmacVerifyConfig(key_file=str(keys))
    inventory = hmac_verify.factory.build(
        cfg, FilterContext("inbound", "inventory", None, {"now": clock})
    )
    billing = hmac_verify.factory.build(
        cfg, FilterContext("inbound", "billing", None, {"now": clock})
    )
    app = App()
    assert run(inventory, signed_inbound(SECRET_1), app).status == 200
    refused = App()
    assert_refused(
        run(billing, signed_inbound(SECRET_1, body=b"2"), refused),
        refused,
        "not scoped to service 'billing'",
    )
    # Without a key id, only keys scoped to this service are tried.
    anonymous = signed_inbound(SECRET_1, body=b"3", key_id=None)
    assert_refused(run(billing, anonymous, refused), refused, "scoped to service 'billing'")


def test_signer_signs_only_for_services_its_key_is_scoped_to(tmp_path: Path) -> None:
    keys = scoped_keys(tmp_path, ["inventory"])
    sign = signer(keys, FakeClock())
    app = App()
    assert run(sign, make_call(b"x"), app).status == 200  # make_call's service: inventory
    call = make_call(b"x")
    call.service = "billing"
    response = run(sign, call, app)
    assert response.status == 403 and b"not scoped to service 'billing'" in body_of(response)
    assert len(app.calls) == 1


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"secret": "s"}, "'services' must be a non-empty list"),
        ({"secret": "s", "services": []}, "'services' must be a non-empty list"),
        ({"services": ["a"]}, "needs a string 'secret'"),
        ({"secret": "s", "services": ["a"], "sevrices": 1}, "unknown fields ['sevrices']"),
    ],
)
def test_scoped_key_entries_are_checked(
    tmp_path: Path, entry: dict[str, Any], message: str
) -> None:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"k1": entry}))
    with pytest.raises(KeyLoadError, match="k1") as err:
        load_keys(KeySourceConfig(key_file=str(path)))
    assert message in str(err.value) and "'s'" not in str(err.value)


def test_plain_and_scoped_keys_mix_in_one_file(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text("k1: plain\nk2:\n  secret: scoped\n  services: [inventory, billing]\n")
    keys = load_keys(KeySourceConfig(key_file=str(path)))
    assert keys["k1"].services is None and keys["k1"].valid_for("anything")
    assert keys["k2"].services == frozenset({"inventory", "billing"})
    assert keys["k2"].secret == b"scoped" and not keys["k2"].valid_for("payment")


# --- Finding 11: the nonce extension; what a gRPC refusal says -------------------------------


def test_nonce_extension_signs_the_nonce_after_a_newline() -> None:
    md5 = hashlib.md5(b"body").hexdigest()
    message = f"POST/x1700000000{md5}\nabcdefghijklmnop".encode()
    expected = hmac.new(b"key", message, hashlib.sha256).hexdigest()
    assert (
        signing.sign_digest(b"key", "POST", "/x", 1700000000, md5, "abcdefghijklmnop") == expected
    )
    # No nonce: the seed's string, byte for byte.
    seed = hmac.new(b"key", f"POST/x1700000000{md5}".encode(), hashlib.sha256).hexdigest()
    assert signing.sign_digest(b"key", "POST", "/x", 1700000000, md5) == seed


def test_grpc_calls_alike_in_one_second_all_pass_with_the_nonce(key_file: Path) -> None:
    grpc = [(b"content-type", b"application/grpc")]
    clock = FakeClock()
    sign = signer(key_file, clock, oversize="unsigned_body", nonce=True)
    verify = verifier(key_file, clock, allow_unsigned_body=True, require_nonce=True)
    app = App()
    signatures = set()
    for _ in range(8):
        out = make_call(b"\0\0\0\0\1a", headers=grpc)
        assert run(sign, out, App()).status == 200
        nonce = header(out, "X-OPUS-Nonce")
        assert 16 <= len(nonce) <= 64
        signatures.add(header(out, "X-OPUS-Signature"))
        assert run(verify, inbound_copy(out, b"\0\0\0\0\1a"), app).status == 200
    assert len(signatures) == 8 and len(app.calls) == 8


def test_without_the_nonce_a_second_alike_grpc_call_is_a_replay(key_file: Path) -> None:
    grpc = [(b"content-type", b"application/grpc")]
    clock = FakeClock()
    sign = signer(key_file, clock, oversize="unsigned_body")
    verify = verifier(key_file, clock, allow_unsigned_body=True)
    app = App()
    statuses = []
    for _ in range(2):
        out = make_call(b"\0\0\0\0\1a", headers=grpc)
        run(sign, out, App())
        assert out.header(b"x-opus-nonce") is None
        statuses.append(run(verify, inbound_copy(out, b"\0\0\0\0\1a"), app).headers)
    assert (b"grpc-status", b"16") in statuses[1] and len(app.calls) == 1


def test_nonce_is_checked_required_and_signed(key_file: Path) -> None:
    clock = FakeClock()
    app = App()
    plain = signed_inbound(SECRET_1)
    assert_refused(
        run(verifier(key_file, clock, require_nonce=True), plain, app), app, "missing X-OPUS-Nonce"
    )
    bad = signed_inbound(SECRET_1)
    bad.headers.append((b"x-opus-nonce", b"short"))
    assert_refused(run(verifier(key_file, clock), bad, app), app, "malformed X-OPUS-Nonce")
    # A nonce added to a call signed without one does not match: the nonce is signed.
    added = signed_inbound(SECRET_1)
    added.headers.append((b"x-opus-nonce", b"n" * 20))
    assert_refused(run(verifier(key_file, clock), added, app), app, "does not match")


def test_grpc_refusal_says_the_body_is_streamed_not_over_a_limit(key_file: Path) -> None:
    grpc = [(b"content-type", b"application/grpc")]
    response = run(signer(key_file, FakeClock()), make_call(b"\0\0\0\0\1a", headers=grpc), App())
    message = dict(response.headers)[b"grpc-message"].decode()
    assert "streamed" in message and "allow_unsigned_body" in message
    assert "1048576" not in message
