"""Replay caches for hmac_verify: signatures seen, each until its expiry, bounded.

`ReplayCache` lives in one process. `SharedReplayCache` is what `workers: N` uses: a
fixed-size open-addressing table in a file the supervisor creates (sidecar/workers.py),
mmapped by every worker, checked and inserted under one `fcntl.lockf` lock, so a signed
call replayed to another worker is refused as it is on the same one. Either refuses
when full of unexpired entries: evicting one would let it be replayed.
"""

from __future__ import annotations

import fcntl
import heapq
import mmap
import os
import struct
from typing import Literal, Protocol

Admission = Literal["ok", "replay", "full"]
# Set by the supervisor of `workers: N`: the directory of the shared tables.
SHARED_DIR_ENV = "OPUS_HMAC_REPLAY_DIR"


class Replays(Protocol):
    def seen(self, digest: bytes, now: float) -> bool: ...

    def admit(self, digest: bytes, expiry: float, now: float) -> Admission: ...

    def __len__(self) -> int: ...

    def close(self) -> None: ...


class ReplayCache:
    """The in-process cache: a dict and a heap of expiries (expired entries go first)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._expiry: dict[bytes, float] = {}
        self._by_expiry: list[tuple[float, bytes]] = []

    def __len__(self) -> int:
        return len(self._expiry)

    def seen(self, digest: bytes, now: float) -> bool:
        expiry = self._expiry.get(digest)
        return expiry is not None and expiry > now

    def admit(self, digest: bytes, expiry: float, now: float) -> Admission:
        """Remember `digest` until `expiry` unless it is live already (a replay) or full."""
        if self.seen(digest, now):
            return "replay"
        self._drop_expired(now)
        if len(self._expiry) >= self.capacity:
            return "full"
        self._expiry[digest] = expiry
        heapq.heappush(self._by_expiry, (expiry, digest))
        return "ok"

    def close(self) -> None:
        """Nothing to release: the cache is plain memory."""

    def _drop_expired(self, now: float) -> None:
        heap = self._by_expiry
        while heap and heap[0][0] <= now:
            expiry, digest = heapq.heappop(heap)
            if self._expiry.get(digest) == expiry:
                del self._expiry[digest]


# A slot: the first 16 bytes of the signature (an HMAC output, so uniform) and its expiry.
_SLOT = struct.Struct("<16sd")
_EMPTY_KEY = bytes(16)
# A signature lives within this many slots of its home slot: a lookup reads no more.
PROBES = 64


class SharedReplayCache:
    """An open-addressing table of (digest, expiry) in a shared file, 2 slots per entry.

    Insertion takes the first empty or expired slot within PROBES of the home slot, so a
    lookup need never look further; expired slots are reused, never emptied, which keeps
    every probe sequence intact without tombstones.
    """

    def __init__(self, path: str, capacity: int) -> None:
        slots = 1
        while slots < 2 * capacity:
            slots *= 2
        self.capacity = capacity
        self._mask = slots - 1
        size = slots * _SLOT.size
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.lockf(self._fd, fcntl.LOCK_EX)
        try:
            if os.fstat(self._fd).st_size != size:
                os.ftruncate(self._fd, size)  # zeros: every slot empty
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN)
        self._map = mmap.mmap(self._fd, size)

    def __len__(self) -> int:
        """Slots ever used (live or expired): a scan, for diagnostics only."""
        view = self._map
        return sum(
            1
            for i in range(self._mask + 1)
            if view[i * _SLOT.size : i * _SLOT.size + 16] != _EMPTY_KEY
        )

    def _home(self, key: bytes) -> int:
        return int.from_bytes(key[:8], "little") & self._mask

    def seen(self, digest: bytes, now: float) -> bool:
        """A lock-free look (a hint before buffering; admit() decides under the lock)."""
        key = digest[:16]
        view, mask, slot = self._map, self._mask, self._home(key)
        for _ in range(PROBES):
            stored, expiry = _SLOT.unpack_from(view, slot * _SLOT.size)
            if stored == _EMPTY_KEY:
                return False
            if stored == key and expiry > now:
                return True
            slot = (slot + 1) & mask
        return False

    def admit(self, digest: bytes, expiry: float, now: float) -> Admission:
        key = digest[:16]
        view, mask = self._map, self._mask
        fcntl.lockf(self._fd, fcntl.LOCK_EX)
        try:
            slot = self._home(key)
            free = -1
            for _ in range(PROBES):
                stored, stored_expiry = _SLOT.unpack_from(view, slot * _SLOT.size)
                if stored == _EMPTY_KEY:
                    if free < 0:
                        free = slot
                    break
                if stored_expiry <= now:
                    if free < 0:
                        free = slot
                elif stored == key:
                    return "replay"
                slot = (slot + 1) & mask
            if free < 0:
                return "full"
            _SLOT.pack_into(view, free * _SLOT.size, key, expiry)
            return "ok"
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        self._map.close()
        os.close(self._fd)


def replay_cache(table: str, capacity: int, environ: dict[str, str] | None = None) -> Replays:
    """The shared table named `table` when a supervisor set one up, else an in-process cache."""
    shared_dir = (os.environ if environ is None else environ).get(SHARED_DIR_ENV)
    if not shared_dir:
        return ReplayCache(capacity)
    return SharedReplayCache(os.path.join(shared_dir, f"hmac-replay-{table}.bin"), capacity)
