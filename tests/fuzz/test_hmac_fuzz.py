"""Property tests for hmac_verify: for any signature, timestamp, key id, body mode and
body, a call passes only when the signature is exactly the one the key makes for that
method, path, timestamp and body, within the skew, and only once."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from filters import hmac_verify
from filters.hmac_verify import HmacVerifyConfig, SignatureRejected
from sidecar import signing
from sidecar.call import BodyTooLarge
from sidecar.chain import FilterContext
from tests.unit.chain_helpers import make_call

NOW = 1_700_000_000
SECRET = b"fuzz-secret"


@pytest.fixture(scope="module")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "keys.json"
    path.write_text(json.dumps({"k1": SECRET.decode()}))
    return path


def _verifier(key_file: Path) -> hmac_verify.HmacVerify:
    cfg = HmacVerifyConfig(key_file=str(key_file), max_skew=300.0, max_body_bytes=4096)
    cfg.validate()
    flt = hmac_verify.factory.build(
        cfg, FilterContext("inbound", "inventory", None, {"now": lambda: NOW})
    )
    assert isinstance(flt, hmac_verify.HmacVerify)
    return flt


header_bytes = st.binary(max_size=80) | st.sampled_from([b"", b"k1", b"unsigned", b"0" * 64])


@settings(
    max_examples=150, deadline=1000, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    sig=st.none()
    | header_bytes
    | st.text("0123456789abcdef", min_size=64, max_size=64).map(str.encode),
    ts=st.none()
    | header_bytes
    | st.integers(NOW - 1000, NOW + 1000).map(lambda t: str(t).encode()),
    key_id=st.none() | header_bytes,
    mode=st.none() | header_bytes,
    body=st.binary(max_size=64),
)
def test_only_the_exact_signature_passes(
    key_file: Path,
    sig: bytes | None,
    ts: bytes | None,
    key_id: bytes | None,
    mode: bytes | None,
    body: bytes,
) -> None:
    headers = [
        (name, value)
        for name, value in (
            (b"x-opus-signature", sig),
            (b"x-opus-timestamp", ts),
            (b"x-opus-key-id", key_id),
            (b"x-opus-body", mode),
        )
        if value is not None
    ]
    call = make_call(body, headers=headers, max_body_bytes=4096)
    try:
        asyncio.run(_verifier(key_file).on_request(call))
    except (SignatureRejected, BodyTooLarge):
        return
    # It passed: it must be exactly right.
    assert sig is not None and ts is not None and ts.isdigit()
    assert abs(int(ts) - NOW) <= 300
    assert key_id in (None, b"k1") and mode != b"unsigned"
    assert sig.decode() == signing.sign(SECRET, "POST", call.request.path.decode(), int(ts), body)


@settings(
    max_examples=100, deadline=1000, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(body=st.binary(max_size=64), flip=st.integers(0, 63), ts=st.integers(NOW - 299, NOW + 299))
def test_signed_call_passes_once_and_a_changed_body_never(
    key_file: Path, body: bytes, flip: int, ts: int
) -> None:
    verifier = _verifier(key_file)
    sig = signing.sign(SECRET, "POST", "/echo", ts, body).encode()
    headers = [(b"x-opus-signature", sig), (b"x-opus-timestamp", str(ts).encode())]
    if body:
        changed = bytearray(body)
        changed[flip % len(body)] ^= 0x01
        with pytest.raises(SignatureRejected):
            asyncio.run(verifier.on_request(make_call(bytes(changed), headers=list(headers))))
    asyncio.run(verifier.on_request(make_call(body, headers=list(headers))))
    with pytest.raises(SignatureRejected, match="replay"):
        asyncio.run(verifier.on_request(make_call(body, headers=list(headers))))
