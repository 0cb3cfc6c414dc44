"""hmac_verify: checks the seed's HMAC signature on inbound calls before the app sees them.

Checks run cheapest first (headers, timestamp skew, key id, then the body's MD5) and
every refusal is a 401 with a JSON reason and the access-log flag AUTH, counted in
opus_hmac_failures_total{reason}. A valid signature is remembered until its timestamp
leaves the skew window, so a replay inside the window is refused too.
"""

from __future__ import annotations

import heapq
import logging
import re
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import Counter

from filters.hmac_sign import (
    BODY_MODE,
    KEY_ID,
    SIGNATURE,
    TIMESTAMP,
    UNSIGNED,
    matching_key,
)
from filters.keyring import KeyRing, KeySourceConfig, load_keys
from sidecar.chain import Call, Filter, FilterContext, FilterFactory
from sidecar.errors import MeshError
from sidecar.proto.messages import Response

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

log = logging.getLogger("sidecar.filters.hmac")

_HEX_SIGNATURE = re.compile(rb"[0-9a-f]{64}")
_TIMESTAMP = re.compile(rb"[0-9]{1,12}")


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

    def validate(self) -> None:
        self.validate_source()
        if not self.max_skew > 0:
            raise ValueError(f"max_skew must be > 0, got {self.max_skew}")
        if self.replay_cache_size < 1:
            raise ValueError(f"replay_cache_size must be >= 1, got {self.replay_cache_size}")
        if self.max_body_bytes is not None and self.max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be >= 1, got {self.max_body_bytes}")
        load_keys(self)


class ReplayCache:
    """Signatures seen, each until its expiry; bounded, dropping expired entries first.

    When every slot holds an unexpired signature, `admit` refuses: evicting one would
    let that signature be replayed, and a full cache means calls are arriving faster
    than the cache was sized for, which the operator must fix, not the attacker exploit.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._expiry: dict[bytes, float] = {}
        self._by_expiry: list[tuple[float, bytes]] = []

    def __len__(self) -> int:
        return len(self._expiry)

    def seen(self, signature: bytes, now: float) -> bool:
        expiry = self._expiry.get(signature)
        return expiry is not None and expiry > now

    def admit(self, signature: bytes, expiry: float, now: float) -> bool:
        """Remember `signature` until `expiry`; False when full of unexpired signatures."""
        self._drop_expired(now)
        if len(self._expiry) >= self.capacity:
            return False
        self._expiry[signature] = expiry
        heapq.heappush(self._by_expiry, (expiry, signature))
        return True

    def _drop_expired(self, now: float) -> None:
        heap = self._by_expiry
        while heap and heap[0][0] <= now:
            expiry, signature = heapq.heappop(heap)
            if self._expiry.get(signature) == expiry:
                del self._expiry[signature]


# One counter per metrics registry, however many chains build this filter.
_FAILURES: weakref.WeakKeyDictionary[CollectorRegistry, Counter] = weakref.WeakKeyDictionary()


def failures_counter(registry: CollectorRegistry) -> Counter:
    counter = _FAILURES.get(registry)
    if counter is None:
        counter = Counter(
            "opus_hmac_failures",
            "Inbound calls refused by hmac_verify, by reason.",
            ["reason"],
            registry=registry,
        )
        _FAILURES[registry] = counter
    return counter


class HmacVerify(Filter):
    def __init__(
        self,
        config: HmacVerifyConfig,
        keyring: KeyRing,
        now: Callable[[], float],
        failures: Counter | None = None,
    ) -> None:
        self.config = config
        self.keyring = keyring
        self._now = now
        self._failures = failures
        self.replays = ReplayCache(config.replay_cache_size)

    def __repr__(self) -> str:
        return f"HmacVerify({self.config!r}, {self.keyring!r})"

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
        keys = self.keyring.keys()
        key_id_header = call.header(KEY_ID)
        key_id = None if key_id_header is None else key_id_header.decode("latin-1")
        if key_id is not None and key_id not in keys:
            raise reject(f"unknown key id {key_id!r}", "unknown_key")
        unsigned = call.header(BODY_MODE) == UNSIGNED
        if unsigned and not self.config.allow_unsigned_body:
            raise reject("unsigned bodies (X-OPUS-Body: unsigned) are not accepted", "unsigned")
        # Over the limit: 413 (the body cannot be checked, so the call cannot pass).
        body = None if unsigned else await call.read_body(self.config.max_body_bytes)
        method = call.request.method.decode("latin-1")
        path = call.request.path.decode("latin-1")
        given = sig.decode("ascii")
        if matching_key(keys, key_id, method, path, timestamp, body, given) is None:
            raise reject("signature does not match", "bad_signature")
        # Checked and recorded with no await between, so two copies racing in cannot both pass.
        now = self._now()
        digest = bytes.fromhex(given)
        if self.replays.seen(digest, now):
            raise reject("signature already used (replay)", "replay")
        if not self.replays.admit(digest, timestamp + skew, now):
            log.warning(
                "HMAC replay cache full (%d unexpired signatures): refusing calls; "
                "raise replay_cache_size",
                len(self.replays),
            )
            raise reject("replay cache full; try again later", "replay_cache_full", 503)


def build(config: HmacVerifyConfig, ctx: FilterContext) -> Filter:
    now: Callable[[], float] = ctx.extra.get("now", time.time)
    failures = failures_counter(ctx.metrics.registry) if ctx.metrics is not None else None
    return HmacVerify(config, KeyRing(config, now), now, failures)


factory = FilterFactory(HmacVerifyConfig, build)
