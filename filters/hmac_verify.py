"""hmac_verify: checks the seed's HMAC signature on inbound calls before the app sees them.

Checks run cheapest first (headers, timestamp skew, key id and its scope, a replay of
an admitted signature), all before a byte of the body is buffered, then the body's MD5
(buffered under the sidecar's buffer budget, sidecar/call.py). Every refusal is a 401
with a JSON reason and the access-log flag AUTH, counted in opus_hmac_failures_total{reason}.
A valid signature is remembered until its timestamp leaves the skew window, so a replay
inside the window is refused too.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import Counter

from filters.hmac_replay import ReplayCache, Replays, replay_cache
from filters.hmac_sign import (
    BODY_MODE,
    KEY_ID,
    NONCE,
    SIGNATURE,
    TIMESTAMP,
    UNSIGNED,
    matching_key,
)
from filters.keyring import KeyRing, KeySourceConfig, load_keys
from sidecar.sdk import Call, Filter, FilterContext, FilterFactory, MeshError, Response

log = logging.getLogger("sidecar.filters.hmac")

_HEX_SIGNATURE = re.compile(rb"[0-9a-f]{64}")
_TIMESTAMP = re.compile(rb"[0-9]{1,12}")
_NONCE = re.compile(rb"[A-Za-z0-9_-]{16,64}")

__all__ = ["HmacVerify", "HmacVerifyConfig", "ReplayCache", "SignatureRejected"]


class SignatureRejected(MeshError):
    """The call's signature is missing, malformed, wrong, stale or replayed."""

    status = 401
    flag = "AUTH"

    def __init__(self, reason: str, *, cause: str, service: str = "", status: int | None = None):
        super().__init__(reason, service=service, status=status)
        self.cause = cause  # the metric label: missing, malformed, stale, replay, ...


@dataclass(frozen=True, slots=True)
class HmacVerifyConfig(KeySourceConfig):
    # How far (seconds) a timestamp may be from this sidecar's clock, past or future.
    max_skew: float = 300.0
    # Signatures remembered to refuse replays; full of unexpired ones: refuse (503).
    replay_cache_size: int = 100_000
    # Accept `X-OPUS-Body: unsigned` (the body's MD5 replaced by UNSIGNED-PAYLOAD).
    allow_unsigned_body: bool = False
    # The most body buffered to check it; None: the chain's filters.max_body_bytes.
    max_body_bytes: int | None = None
    # Refuse calls without X-OPUS-Nonce (the extension; calls with one are always accepted).
    require_nonce: bool = False

    def validate(self) -> None:
        self.validate_source()
        if not self.max_skew > 0:
            raise ValueError(f"max_skew must be > 0, got {self.max_skew}")
        if self.replay_cache_size < 1:
            raise ValueError(f"replay_cache_size must be >= 1, got {self.replay_cache_size}")
        if self.max_body_bytes is not None and self.max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be >= 1, got {self.max_body_bytes}")
        load_keys(self)


class HmacVerify(Filter):
    def __init__(
        self,
        config: HmacVerifyConfig,
        keyring: KeyRing,
        now: Callable[[], float],
        failures: Counter | None = None,
        service: str = "",
        replays: Replays | None = None,
    ) -> None:
        self.config = config
        self.keyring = keyring
        self._now = now
        self._failures = failures
        self.service = service  # keys scoped to other services are refused
        self.replays = ReplayCache(config.replay_cache_size) if replays is None else replays

    def __repr__(self) -> str:
        return f"HmacVerify({self.config!r}, {self.keyring!r})"

    def close(self) -> None:
        self.replays.close()  # a shared table: its map and file descriptor

    async def on_request(self, call: Call) -> Response | None:
        try:
            await self._verify(call)
        except SignatureRejected as exc:
            if self._failures is not None:
                self._failures.labels(exc.cause).inc()
            log.debug("refused a call to %s: %s", call.service, exc.reason)
            raise
        return None

    async def _verify(self, call: Call) -> None:
        def reject(reason: str, cause: str, status: int | None = None) -> SignatureRejected:
            return SignatureRejected(reason, cause=cause, service=call.service, status=status)

        sig = call.header(SIGNATURE)
        ts = call.header(TIMESTAMP)
        if sig is None or ts is None:
            raise reject("missing X-OPUS-Signature or X-OPUS-Timestamp", "missing")
        if not _HEX_SIGNATURE.fullmatch(sig):
            raise reject(
                "malformed X-OPUS-Signature: expected 64 lowercase hex digits", "malformed"
            )
        if not _TIMESTAMP.fullmatch(ts):
            raise reject("malformed X-OPUS-Timestamp: expected Unix seconds", "malformed")
        timestamp = int(ts)
        now = self._now()
        skew = self.config.max_skew
        if timestamp < now - skew:
            raise reject(f"X-OPUS-Timestamp is more than {skew:g}s old", "stale")
        if timestamp > now + skew:
            raise reject(f"X-OPUS-Timestamp is more than {skew:g}s in the future", "future")
        nonce_header = call.header(NONCE)
        if nonce_header is None:
            if self.config.require_nonce:
                raise reject("missing X-OPUS-Nonce (require_nonce is set)", "missing")
            nonce = ""
        elif not _NONCE.fullmatch(nonce_header):
            raise reject("malformed X-OPUS-Nonce: expected 16 to 64 of [A-Za-z0-9_-]", "malformed")
        else:
            nonce = nonce_header.decode("ascii")
        keys = self.keyring.keys()
        key_id_header = call.header(KEY_ID)
        key_id = None if key_id_header is None else key_id_header.decode("latin-1")
        if key_id is not None:
            named = keys.get(key_id)
            if named is None:
                raise reject(f"unknown key id {key_id!r}", "unknown_key")
            if not named.valid_for(self.service):
                raise reject(
                    f"key {key_id!r} is not scoped to service {self.service!r}", "key_scope"
                )
        unsigned = call.header(BODY_MODE) == UNSIGNED
        if unsigned and not self.config.allow_unsigned_body:
            raise reject("unsigned bodies (X-OPUS-Body: unsigned) are not accepted", "unsigned")
        given = sig.decode("ascii")
        digest = bytes.fromhex(given)
        # A signature already admitted needs no body to refuse: nothing is buffered for it.
        if self.replays.seen(digest, now):
            raise reject("signature already used (replay)", "replay")
        # Over the limit: 413 (the body cannot be checked, so the call cannot pass);
        # over the sidecar's buffer budget: 503.
        body = None if unsigned else await call.read_body(self.config.max_body_bytes)
        method = call.request.method.decode("latin-1")
        path = call.request.path.decode("latin-1")
        key = matching_key(keys, key_id, method, path, timestamp, body, given, nonce, self.service)
        if key is None:
            if key_id is None and any(not k.valid_for(self.service) for k in keys.values()):
                reason = "signature does not match any key scoped to service " + repr(self.service)
                raise reject(reason, "bad_signature")
            raise reject("signature does not match", "bad_signature")
        # Checked and recorded at once (under the shared table's lock with workers: N),
        # so two copies racing in, to one worker or two, cannot both pass.
        admitted = self.replays.admit(digest, timestamp + skew, self._now())
        if admitted == "replay":
            raise reject("signature already used (replay)", "replay")
        if admitted == "full":
            log.warning(
                "HMAC replay cache full (%d unexpired signatures): refusing calls; "
                "raise replay_cache_size",
                self.config.replay_cache_size,
            )
            raise reject("replay cache full; try again later", "replay_cache_full", 503)


def build(config: HmacVerifyConfig, ctx: FilterContext) -> Filter:
    now: Callable[[], float] = ctx.extra.get("now", time.time)
    failures = None
    if ctx.metrics is not None:
        failures = ctx.metrics.counter(
            "hmac_failures", "Inbound calls refused by hmac_verify, by reason.", ["reason"]
        )
    # Every worker builds the same config, so the same name: one table for all of them.
    table = hashlib.sha256(f"{ctx.service_name}|{config!r}".encode()).hexdigest()[:16]
    replays = replay_cache(table, config.replay_cache_size, ctx.extra.get("environ"))
    return HmacVerify(config, KeyRing(config, now), now, failures, ctx.service_name, replays)


factory = FilterFactory(HmacVerifyConfig, build)
