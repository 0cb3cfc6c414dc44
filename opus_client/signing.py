"""Request signing with the seed's HMAC scheme, so the target's inbound sidecar
(`hmac_verify`) accepts the call.

The scheme and its header names live in `sidecar.signing`, shared with the mesh's
filters. What the client must get right is the signed path: the inbound sidecar
checks the path the target app sees, and the caller's sidecar forwards
`/v1/invoke/{service}/{method}?q` as `/{method}?q` (sidecar.routing), so that is the
path signed, not the one this client sends. Each attempt is signed afresh, with its
own timestamp, so that a resend is not refused as a replay.
"""

from __future__ import annotations

from sidecar import signing

INVOKE_PREFIX = b"/v1/invoke/"


def forwarded_path(raw_path: bytes) -> bytes:
    """The path (and query) the target app sees for an invoke-route request target,
    split exactly as `sidecar.routing.Router._invoke` splits it."""
    start = raw_path.find(INVOKE_PREFIX)
    if start < 0:
        raise ValueError(f"not an invoke-route path: {raw_path!r}")
    rest = raw_path[start + len(INVOKE_PREFIX) :]
    path, has_query, query = rest.partition(b"?")
    _service, _, method = path.partition(b"/")
    return b"/" + method + (b"?" + query if has_query else b"")


class Signer:
    def __init__(self, key: bytes | str, key_id: str | None = None) -> None:
        self.key = key.encode() if isinstance(key, str) else bytes(key)
        if not self.key:
            raise ValueError("signing_key is empty")
        self.key_id = key_id

    def headers(
        self, method: str, path: bytes, body: bytes, timestamp: int
    ) -> list[tuple[str, str]]:
        """The signature headers for one attempt; `path` is the target app's path."""
        signature = signing.sign(self.key, method, path.decode("latin-1"), timestamp, body)
        out = [(signing.SIGNATURE_HEADER, signature), (signing.TIMESTAMP_HEADER, str(timestamp))]
        if self.key_id:
            out.append((signing.KEY_ID_HEADER, self.key_id))
        return out
