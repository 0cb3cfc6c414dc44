"""The seed's HMAC request signature (its document, section 5.2), in one place.

    timestamp = int(time.time())
    sign_str  = method + path + str(timestamp) + body_md5
    signature = hmac.new(secret_key, sign_str.encode(), "sha256").hexdigest()

`path` is the request target as sent on the wire, with `?query` when there is one;
`body_md5` is the lowercase hex MD5 of the raw body bytes (MD5 of b"" when empty).
Headers: `X-OPUS-Signature: {signature}`, `X-OPUS-Timestamp: {timestamp}`, and
optionally `X-OPUS-Key-Id` naming which of several active keys signed.

Extension (opt-in, not the seed's): with an `X-OPUS-Nonce` header (16 to 64 characters
of [A-Za-z0-9_-], random per call) the signed string is
`method + path + timestamp + body_md5 + "\n" + nonce`, so two calls alike in every
signed part but the nonce carry different signatures. Without the header the string
is the seed's, byte for byte.
Pure standard library: the sidecar's filters and the client library share it.
"""

from __future__ import annotations

import hashlib
import hmac

SIGNATURE_HEADER = "X-OPUS-Signature"
TIMESTAMP_HEADER = "X-OPUS-Timestamp"
KEY_ID_HEADER = "X-OPUS-Key-Id"
NONCE_HEADER = "X-OPUS-Nonce"


def body_md5(body: bytes) -> str:
    return hashlib.md5(body).hexdigest()


def sign_string(method: str, path: str, timestamp: int, body: bytes) -> str:
    return f"{method}{path}{timestamp}{body_md5(body)}"


def sign(secret_key: bytes, method: str, path: str, timestamp: int, body: bytes) -> str:
    """The hex HMAC-SHA256 signature of one request."""
    return sign_digest(secret_key, method, path, timestamp, body_md5(body))


def sign_digest(
    secret_key: bytes, method: str, path: str, timestamp: int, digest: str, nonce: str = ""
) -> str:
    """The signature with the body's part given directly: its MD5, or an agreed marker
    (the sidecar's UNSIGNED-PAYLOAD mode for streams too large to buffer); a nonce
    (the extension above) is appended after a newline, which no header value holds."""
    text = f"{method}{path}{timestamp}{digest}"
    message = (f"{text}\n{nonce}" if nonce else text).encode()
    return hmac.new(secret_key, message, hashlib.sha256).hexdigest()


def signature_matches(expected: str, given: str) -> bool:
    """Constant-time comparison of two hex signatures."""
    return hmac.compare_digest(expected.encode(), given.encode())
