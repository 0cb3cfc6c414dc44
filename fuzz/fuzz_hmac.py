"""atheris: hmac_verify on arbitrary headers and body passes only an exact signature."""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

with atheris.instrument_imports():
    from filters import hmac_verify
    from filters.hmac_verify import HmacVerifyConfig, SignatureRejected
    from sidecar import signing
    from sidecar.call import BodyTooLarge
    from sidecar.chain import FilterContext
    from tests.unit.chain_helpers import make_call

NOW = 1_700_000_000
SECRET = b"fuzz-secret"
KEYS = Path(tempfile.mkdtemp(prefix="opus-fuzz-")) / "keys.json"
KEYS.write_text(json.dumps({"k1": SECRET.decode()}))
CONFIG = HmacVerifyConfig(key_file=str(KEYS), max_body_bytes=4096)
CTX = FilterContext("inbound", "inventory", None, {"now": lambda: NOW})


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    names = (b"x-opus-signature", b"x-opus-timestamp", b"x-opus-key-id", b"x-opus-body")
    headers = [
        (n, fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 80))) for n in names if fdp.ConsumeBool()
    ]
    body = fdp.ConsumeBytes(256)
    call = make_call(body, headers=headers, max_body_bytes=4096)
    try:
        asyncio.run(hmac_verify.factory.build(CONFIG, CTX).on_request(call))
    except (SignatureRejected, BodyTooLarge):
        return
    given = dict(headers)
    ts = int(given[b"x-opus-timestamp"])
    assert given[b"x-opus-signature"].decode() == signing.sign(SECRET, "POST", "/echo", ts, body)


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
