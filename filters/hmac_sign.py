"""hmac_sign: signs outbound calls with the seed's HMAC scheme (sidecar.signing).

The signature covers method, the path the upstream will see (`call.path`, with its
query), the timestamp and the body's MD5, so the whole body is buffered first, up
to max_body_bytes. Larger bodies and gRPC streams (which may never end) follow
`oversize`: `reject` answers 413; `unsigned_body` signs the marker UNSIGNED-PAYLOAD in
place of the body's MD5 and says so in `X-OPUS-Body: unsigned`, which a verifier
accepts only when configured to. An app that signs its own calls keeps its
signature when it is valid for one of our keys (`preserve_app_signature`).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from filters.keyring import Key, KeyRing, Keys, KeySourceConfig, load_keys
from sidecar.sdk import (
    Body,
    BodyError,
    BodyTooLarge,
    Call,
    Filter,
    FilterContext,
    FilterFactory,
    MeshError,
    Response,
    fixed_body,
    signing,
)

log = logging.getLogger("sidecar.filters.hmac")

SIGNATURE = signing.SIGNATURE_HEADER.lower().encode()
TIMESTAMP = signing.TIMESTAMP_HEADER.lower().encode()
KEY_ID = signing.KEY_ID_HEADER.lower().encode()
NONCE = signing.NONCE_HEADER.lower().encode()
BODY_MODE = b"x-opus-body"
UNSIGNED = b"unsigned"
# Stands in for body_md5 when the body is not signed; cannot collide with a hex MD5.
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"

Oversize = Literal["reject", "unsigned_body"]


class KeyNotScoped(MeshError):
    """The signing key's key file entry does not name the service called."""

    status = 403
    flag = "AUTH"


@dataclass(frozen=True, slots=True)
class HmacSignConfig(KeySourceConfig):
    # Keep an app's own X-OPUS-Signature when it is valid for one of our keys.
    preserve_app_signature: bool = True
    # The most body buffered to sign it; None: the chain's filters.max_body_bytes.
    max_body_bytes: int | None = None
    # Bodies over max_body_bytes and gRPC streams: answer 413, or sign UNSIGNED-PAYLOAD.
    oversize: Oversize = "reject"
    # Send a random X-OPUS-Nonce on every call and sign it (the extension in
    # sidecar/signing.py): calls alike in method, path, second and body still differ.
    nonce: bool = False

    def validate(self) -> None:
        self.validate_source()
        if self.max_body_bytes is not None and self.max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be >= 1, got {self.max_body_bytes}")
        keys = load_keys(self)
        signing_key(keys, self.key_id)


def signing_key(keys: Keys, key_id: str) -> Key:
    """The key that signs: the one key_id names, or the only one there is."""
    if key_id:
        return keys[key_id]  # load_keys already refused a source without it
    if len(keys) != 1:
        raise ValueError(f"key_id must name the signing key; the source holds {sorted(keys)}")
    return next(iter(keys.values()))


def signature_for(
    key: bytes, method: str, path: str, timestamp: int, body: bytes | None, nonce: str = ""
) -> str:
    """The seed's signature; body None signs the UNSIGNED-PAYLOAD marker instead of its MD5."""
    digest = signing.body_md5(body) if body is not None else UNSIGNED_PAYLOAD
    return signing.sign_digest(key, method, path, timestamp, digest, nonce)


def matching_key(
    keys: Keys,
    key_id: str | None,
    method: str,
    path: str,
    ts: int,
    body: bytes | None,
    sig: str,
    nonce: str = "",
    service: str | None = None,
) -> Key | None:
    """The key that made `sig`: only the named one when a key id is given, else any
    (of those valid for `service`, when given)."""
    if key_id is not None:
        named = keys.get(key_id)
        candidates = [named] if named is not None else []
    else:
        candidates = list(keys.values())
    if service is not None:
        candidates = [key for key in candidates if key.valid_for(service)]
    found = None
    for key in candidates:
        # Every candidate is tried, so the time taken does not say which key matched.
        expected = signature_for(key.secret, method, path, ts, body, nonce)
        if signing.signature_matches(expected, sig):
            found = key
    return found


def is_streaming(call: Call) -> bool:
    return call.request.is_grpc


def declared_length(call: Call) -> int | None:
    value = call.header(b"content-length")
    if value is None or not value.isdigit():
        return None
    return int(value)


class HmacSign(Filter):
    def __init__(self, config: HmacSignConfig, keyring: KeyRing, now: Callable[[], float]):
        self.config = config
        self.keyring = keyring
        self._now = now
        self._pumps: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return f"HmacSign({self.config!r}, {self.keyring!r})"

    async def on_request(self, call: Call) -> Response | None:
        keys = self.keyring.keys()
        method = call.request.method.decode("latin-1")
        path = call.path.decode("latin-1")
        preserve = self.config.preserve_app_signature and call.header(SIGNATURE) is not None
        app_unsigned = call.header(BODY_MODE) == UNSIGNED
        # An app's unsigned-body signature is checked before buffering: it needs no body.
        if preserve and app_unsigned and self._app_signed(call, keys, method, path, None):
            return None
        body = await self._signable_body(call)
        signed_by_app = preserve and not app_unsigned and body is not None
        if signed_by_app and self._app_signed(call, keys, method, path, body):
            return None
        for name in (SIGNATURE, TIMESTAMP, KEY_ID, BODY_MODE, NONCE):
            call.remove_header(name)
        key = signing_key(keys, self.config.key_id)
        if not key.valid_for(call.service):
            raise KeyNotScoped(
                f"hmac_sign: key {key.key_id!r} is not scoped to service {call.service!r} "
                f"(its key file entry names {sorted(key.services or ())})",
                service=call.service,
            )
        timestamp = int(self._now())
        nonce = secrets.token_urlsafe(16) if self.config.nonce else ""
        signature = signature_for(key.secret, method, path, timestamp, body, nonce)
        if nonce:
            call.set_header(NONCE, nonce.encode())
        call.set_header(SIGNATURE, signature.encode())
        call.set_header(TIMESTAMP, str(timestamp).encode())
        if key.key_id:
            call.set_header(KEY_ID, key.key_id.encode())
        if body is None:
            call.set_header(BODY_MODE, UNSIGNED)
        return None

    def _app_signed(
        self, call: Call, keys: Keys, method: str, path: str, body: bytes | None
    ) -> bool:
        """Whether the app's own signature headers are valid for one of our keys."""
        sig = call.header(SIGNATURE)
        ts = call.header(TIMESTAMP)
        if sig is None or ts is None or not ts.isdigit():
            return False
        key_id = call.header(KEY_ID)
        nonce = call.header(NONCE)
        valid = matching_key(
            keys,
            None if key_id is None else key_id.decode("latin-1"),
            method,
            path,
            int(ts),
            body,
            sig.decode("latin-1"),
            "" if nonce is None else nonce.decode("latin-1"),
            call.service,
        )
        if valid is None:
            log.debug("replacing an invalid app signature on a call to %s", call.service)
        return valid is not None

    async def _signable_body(self, call: Call) -> bytes | None:
        """The whole body to sign, or None when it is too large or a stream (unsigned mode)."""
        limit = self.config.max_body_bytes or call.max_body_bytes
        length = declared_length(call)
        if is_streaming(call) or (length is not None and length > limit):
            if self.config.oversize == "reject":
                if is_streaming(call):
                    what = "a gRPC call: its body is streamed (it may never end), so it is not"
                    what += " buffered to sign"
                else:
                    what = f"a {length}-byte body: over the {limit}-byte buffering limit"
                raise BodyTooLarge(
                    f"hmac_sign cannot sign {what}; set oversize: unsigned_body to send it "
                    f"with an unsigned body (and allow_unsigned_body on the verifier)",
                    service=call.service,
                    status=413,
                )
            return None
        if self.config.oversize == "reject":
            return await call.read_body(limit)  # over the limit: 413
        return await self._read_or_splice(call, limit)

    async def _read_or_splice(self, call: Call, limit: int) -> bytes | None:
        """Buffer up to `limit`; past it, send what was read and the rest unsigned."""
        original = call.request.body
        parts: list[bytes] = []
        size = 0
        while True:
            chunk = await original.read()
            if not chunk:
                data = b"".join(parts)
                call.request.body = fixed_body(data, original.trailers)
                return data
            size += len(chunk)
            if size > limit:
                parts.append(chunk)
                call.request.body = self._spliced(b"".join(parts), original)
                return None
            call.hold(len(chunk))  # over the budget: 503
            parts.append(chunk)

    def _spliced(self, prefix: bytes, rest: Body) -> Body:
        """A body that replays `prefix`, then streams `rest` with backpressure."""
        out = Body()
        out.feed(prefix, 0)  # already acknowledged to the sender when it was read
        room = asyncio.Event()
        room.set()

        def consumed(_: int) -> None:
            if out.buffered <= _PUMP_HIGH_WATER:
                room.set()

        async def pump() -> None:
            try:
                while True:
                    await room.wait()
                    chunk = await rest.read()
                    if not chunk:
                        out.finish(rest.trailers)
                        return
                    out.feed(chunk)
                    if out.buffered > _PUMP_HIGH_WATER:
                        room.clear()
            except BodyError as exc:
                out.fail(exc)

        task = asyncio.get_running_loop().create_task(pump())
        self._pumps.add(task)
        task.add_done_callback(self._pumps.discard)

        def cancel() -> None:
            task.cancel()
            rest.cancel()

        out.on_consumed = consumed
        out.on_cancel = cancel
        return out

    def close(self) -> None:
        for task in list(self._pumps):
            task.cancel()


# How much of a spliced body may wait unread before the pump stops reading the sender.
_PUMP_HIGH_WATER = 64 * 1024


def build(config: HmacSignConfig, ctx: FilterContext) -> Filter:
    now: Callable[[], float] = ctx.extra.get("now", time.time)
    keyring = KeyRing(config, now, check=lambda keys: signing_key(keys, config.key_id))
    return HmacSign(config, keyring, now)


factory = FilterFactory(HmacSignConfig, build)
