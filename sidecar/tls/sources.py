"""Where a sidecar's certificate material comes from, and how it is kept current.

- `FileSource` (`tls.source: file`): PEM files written by cert-manager, a Kubernetes
  Secret volume, SPIRE's helper or Vault Agent. They are polled (`tls.file.poll_interval`)
  by what `stat()` says of the files a path leads to, so both an atomic rename and a
  Secret volume's `..data` symlink swap are seen. A change is read and checked whole; a
  set caught half-written (the key not yet the new certificate's) is logged and tried
  again at the next change, the old material staying in use meanwhile.
- `DevSource` (`tls.source: dev`): a leaf issued from the `opus-sidecar ca init` CA at
  start, and a new one at 2/3 of its lifetime.

Either way a certificate that expires anyway is logged as an error (and counted), the
sidecar keeps running: new handshakes fail at the peers until material arrives.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from sidecar.tls import devca, material
from sidecar.tls.contexts import TlsState
from sidecar.tls.material import Material, MaterialError

log = logging.getLogger("sidecar.tls")

RENEW_AT = 2 / 3  # of a leaf's lifetime
_Signature = tuple[tuple[int, int, int, int], ...]


class Scheduler(Protocol):
    def call_later(self, delay: float, callback: Callable[[], object], /) -> object: ...


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class Source:
    """Loads the first material (`load()`), then keeps `state` current once started."""

    name = ""

    def __init__(self, now: Callable[[], datetime.datetime] = _utcnow) -> None:
        self.now = now
        self.state: TlsState | None = None
        self.expired_logged = 0  # serial of the certificate last reported expired
        self.on_expired: Callable[[], None] | None = None  # counts expiries (metric)
        self.on_failure: Callable[[], None] | None = None  # counts a source's errors (metric)
        self._closed = False

    def load(self) -> Material:
        raise NotImplementedError

    def start(self, state: TlsState, loop: Scheduler) -> None:
        self.state = state
        self.loop = loop

    def close(self) -> None:
        self._closed = True

    def check_expiry(self) -> bool:
        """Log (once per certificate) and count a certificate in use past its not-after."""
        state = self.state
        if state is None:
            return False
        leaf = state.material.leaf
        if self.now() < state.material.not_after:
            return False
        if self.expired_logged != leaf.serial_number:
            self.expired_logged = leaf.serial_number
            log.error(
                "TLS certificate %s (serial %x) expired at %s and no new one has arrived:"
                " peers will refuse new connections (tls.source: %s)",
                state.material.identity,
                leaf.serial_number,
                state.material.not_after.isoformat(),
                self.name,
            )
            if self.on_expired is not None:
                self.on_expired()
        return True


class FileSource(Source):
    name = "file"

    def __init__(
        self,
        cert: str,
        key: str,
        bundle: str,
        trust_domain: str,
        poll_interval: float,
        now: Callable[[], datetime.datetime] = _utcnow,
    ) -> None:
        super().__init__(now)
        self.paths = (cert, key, bundle)
        self.trust_domain = trust_domain
        self.poll_interval = poll_interval
        self._seen: _Signature | None = None
        self.reloads = 0  # material put in use after the first
        self.failures = 0  # changes that could not be used

    def _signature(self) -> _Signature | None:
        sig = []
        for path in self.paths:
            try:
                st = os.stat(path)  # follows symlinks: a `..data` swap changes the inode
            except OSError:
                return None
            sig.append((st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size))
        return tuple(sig)

    def load(self) -> Material:
        self._seen = self._signature()
        return material.read(*self.paths, self.trust_domain)

    def start(self, state: TlsState, loop: Scheduler) -> None:
        super().start(state, loop)
        self._schedule()

    def _schedule(self) -> None:
        if not self._closed:
            self.loop.call_later(self.poll_interval, self._tick)

    def _tick(self) -> None:
        self.poll()
        self.check_expiry()
        self._schedule()

    def poll(self) -> bool:
        """Put changed files in use; True if they were."""
        sig = self._signature()
        if sig is None or sig == self._seen or self.state is None:
            return False
        self._seen = sig
        try:
            new = material.read(*self.paths, self.trust_domain)
            self.state.update(new)
        except (MaterialError, OSError, ValueError) as exc:
            self.failures += 1
            log.warning("TLS files changed but cannot be used yet (keeping the old): %s", exc)
            return False
        self.reloads += 1
        return True


class DevSource(Source):
    name = "dev"

    def __init__(
        self,
        ca_dir: str,
        trust_domain: str,
        identity: str,
        ttl: float,
        now: Callable[[], datetime.datetime] = _utcnow,
    ) -> None:
        super().__init__(now)
        self.ca = devca.load_ca(Path(ca_dir), trust_domain)
        self.identity = identity
        self.ttl = ttl
        self.renewals = 0

    def load(self) -> Material:
        chain, key = devca.issue(self.ca, self.identity, self.ttl, now=self.now())
        return material.build(chain, key, self.ca.cert_pem, self.ca.trust_domain)

    def start(self, state: TlsState, loop: Scheduler) -> None:
        super().start(state, loop)
        self._schedule()

    def _schedule(self) -> None:
        if self._closed or self.state is None:
            return
        # At 2/3 of the lifetime asked for (the not-before is back-dated a little).
        lifetime_left = datetime.timedelta(seconds=self.ttl * (1 - RENEW_AT))
        due = self.state.material.not_after - lifetime_left
        self.loop.call_later(max(0.0, (due - self.now()).total_seconds()), self.renew)

    def renew(self) -> None:
        if self._closed or self.state is None:
            return
        try:
            self.state.update(self.load())
            self.renewals += 1
        except (MaterialError, OSError, ValueError) as exc:
            log.error("cannot renew the dev CA's certificate for %s: %s", self.identity, exc)
            self.check_expiry()
            self.loop.call_later(min(5.0, self.ttl / 10), self.renew)
            return
        self._schedule()
