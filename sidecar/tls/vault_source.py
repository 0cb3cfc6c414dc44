"""The `vault` certificate source: leaves from Vault's PKI secrets engine through hvac.

`VaultPki.issue()` is `POST /v1/<mount>/issue/<role>` with `common_name`, `uri_sans`
(the sidecar's SPIFFE ID) and `ttl`; the reply's `data.certificate` and
`data.private_key` are the leaf and its key, `data.ca_chain` (else `data.issuing_ca`)
the chain above it and the trust bundle. It is blocking (hvac is `requests`), so
`VaultSource` runs it on a thread of its own and hands the result back to the event loop
with `call_soon_threadsafe`; every request is bounded by `tls.vault.timeout`, and a
request that overstays anyway is given up on (its late reply ignored).

Renewal is scheduled at 2/3 of the leaf's lifetime on the injected loop, as the dev
source does. A failing Vault never takes the sidecar down: the current material stays in
use, the issue is retried with a doubling back-off (capped at `tls.vault.retry_max`),
each failure logged and counted; a certificate that expires meanwhile is the sources'
alert-worthy log line and metric (`Source.check_expiry`).

When the issuing CA changes (a root rotated in Vault), the CA rotated out stays in the
bundle for one leaf lifetime, so peers' leaves still signed by it, which expire within
that, keep verifying.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime
import importlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from sidecar.tls import material
from sidecar.tls.contexts import TlsState
from sidecar.tls.material import Material, MaterialError
from sidecar.tls.sources import RENEW_AT, Scheduler, Source, _utcnow

log = logging.getLogger("sidecar.tls")

FIRST_RETRY = 1.0  # seconds before the first retry of a failed issue (less for short ttls)


class VaultError(MaterialError):
    """Vault refused or could not be reached; the message says which request and why."""


class ThreadScheduler(Scheduler, Protocol):
    def call_soon_threadsafe(self, callback: Callable[..., object], *args: Any) -> object: ...


class VaultPki:
    """One PKI role of one Vault mount; `issue()` blocks (call it off the event loop)."""

    def __init__(
        self,
        address: str,
        mount: str,
        role: str,
        identity: str,
        common_name: str,
        ttl: float,
        trust_domain: str,
        *,
        token: str = "",
        token_file: str = "",
        ca_file: str = "",
        timeout: float = 5.0,
    ) -> None:
        self.address = address.rstrip("/")
        self.mount = mount.strip("/")
        self.role = role
        self.identity = identity
        self.common_name = common_name
        self.ttl = ttl
        self.trust_domain = trust_domain
        self.token = token
        self.token_file = token_file
        self.verify: bool | str = ca_file or True
        self.timeout = timeout

    def _token(self) -> str:
        if not self.token_file:
            return self.token
        # Re-read each time: Vault Agent or a Kubernetes projected token renews the file.
        try:
            return Path(self.token_file).read_text().strip()
        except OSError as exc:
            raise VaultError(f"cannot be read: {exc.strerror or exc}", self.token_file) from None

    def _client(self) -> Any:
        hvac = importlib.import_module("hvac")
        return hvac.Client(
            url=self.address, token=self._token(), verify=self.verify, timeout=self.timeout
        )

    def issue(self) -> Material:
        what = f"vault {self.address}: POST /v1/{self.mount}/issue/{self.role}"
        requests_exc = importlib.import_module("requests.exceptions")
        hvac_exc = importlib.import_module("hvac.exceptions")
        try:
            reply = self._client().secrets.pki.generate_certificate(
                name=self.role,
                common_name=self.common_name,
                extra_params={
                    "uri_sans": self.identity,
                    "ttl": f"{round(self.ttl)}s",
                    "format": "pem",
                },
                mount_point=self.mount,
            )
        except hvac_exc.VaultError as exc:
            errors = "; ".join(str(e) for e in (exc.errors or [])) or str(exc) or "refused"
            raise VaultError(f"{what}: {type(exc).__name__}: {errors}") from None
        except requests_exc.RequestException as exc:
            raise VaultError(f"{what}: {exc}") from None
        return self.material(reply, what)

    def material(self, reply: Any, what: str = "vault") -> Material:
        """The checked material of an issue reply (`{"data": {...}}`)."""
        data = reply.get("data") if isinstance(reply, dict) else None
        if not isinstance(data, dict):
            raise VaultError(f"{what}: the reply has no data")
        cert, key = data.get("certificate"), data.get("private_key")
        if not isinstance(cert, str) or not isinstance(key, str):
            raise VaultError(f"{what}: the reply has no certificate and private_key")
        above = [c for c in data.get("ca_chain") or () if isinstance(c, str)]
        if not above and isinstance(data.get("issuing_ca"), str):
            above = [data["issuing_ca"]]
        if not above:
            raise VaultError(f"{what}: the reply has neither ca_chain nor issuing_ca")
        cas = [c for pem in above for c in x509.load_pem_x509_certificates(pem.encode())]
        # Presented: the leaf and the intermediates; trusted: the whole chain above the leaf.
        chain = cert.encode() + b"".join(_pem(c) for c in cas if c.issuer != c.subject)
        bundle = b"".join(_pem(c) for c in cas)
        return material.build(chain, key.encode(), bundle, self.trust_domain, (what, what, what))


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


class VaultSource(Source):
    name = "vault"

    def __init__(
        self,
        pki: VaultPki,
        retry_max: float = 30.0,
        now: Callable[[], datetime.datetime] = _utcnow,
        executor: concurrent.futures.Executor | None = None,
    ) -> None:
        super().__init__(now)
        self.pki = pki
        self.retry_max = retry_max
        self._executor = executor or concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="opus-vault"
        )
        self.renewals = 0
        self.failures = 0  # issues that failed (each logged)
        self._attempt = 0  # the issue in flight; a reply to an older one is ignored
        self._backoff = 0.0
        # Issuing CAs rotated out, kept trusted until then (PEM -> until).
        self._retired: dict[bytes, datetime.datetime] = {}

    def load(self) -> Material:
        """The first leaf, at start (blocking, bounded by the timeout)."""
        return self.pki.issue()

    def start(self, state: TlsState, loop: Scheduler) -> None:
        super().start(state, loop)
        self._schedule()

    def close(self) -> None:
        super().close()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _schedule(self) -> None:
        if self._closed or self.state is None:
            return
        # Vault back-dates not-before (30 s by default): 2/3 of the ttl asked for, not of
        # the validity, when a third of it remains.
        left = datetime.timedelta(seconds=self._lifetime() * (1 - RENEW_AT))
        due = self.state.material.not_after - left
        self.loop.call_later(max(0.0, (due - self.now()).total_seconds()), self.renew)

    def _lifetime(self) -> float:
        """The leaf's useful lifetime: the ttl asked for, or less if the role capped it."""
        assert self.state is not None
        return min(self.pki.ttl, self.state.material.lifetime())

    def renew(self) -> None:
        """Ask Vault for a new leaf on the worker thread; the reply comes back to the loop."""
        if self._closed or self.state is None:
            return
        self._attempt += 1
        attempt = self._attempt
        loop: ThreadScheduler = self.loop  # type: ignore[assignment]
        try:
            future = self._executor.submit(self.pki.issue)
        except RuntimeError:  # shut down by close()
            return
        future.add_done_callback(lambda f: self._hand_back(loop, attempt, f))
        # hvac's timeout bounds each socket wait; this bounds the whole request.
        self.loop.call_later(self.pki.timeout * 2 + 1, lambda: self._overdue(attempt))

    def _hand_back(
        self, loop: ThreadScheduler, attempt: int, future: concurrent.futures.Future[Material]
    ) -> None:
        # On the worker thread; a loop closed meanwhile (the sidecar stopping) wants nothing.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._done, attempt, future)

    def _overdue(self, attempt: int) -> None:
        if attempt == self._attempt and not self._closed:
            self._attempt += 1  # its reply, if it ever comes, is ignored
            self._failed(VaultError(f"vault {self.pki.address}: no reply in time"))

    def _done(self, attempt: int, future: concurrent.futures.Future[Material]) -> None:
        if attempt != self._attempt or self._closed or self.state is None:
            return
        self._attempt += 1
        if future.cancelled():
            return
        try:
            self.state.update(self._with_retired(future.result()))
        except Exception as exc:  # whatever went wrong, the retry must be scheduled
            self._failed(exc)
            return
        self.renewals += 1
        self._backoff = 0.0
        self._schedule()

    def _failed(self, exc: Exception) -> None:
        self.failures += 1
        assert self.state is not None
        first = min(FIRST_RETRY, max(0.05, self._lifetime() / 20))
        self._backoff = min(self.retry_max, self._backoff * 2 if self._backoff else first)
        log.error(
            "cannot renew the TLS certificate for %s from Vault (keeping the current one,"
            " valid until %s; retrying in %.1f s): %s",
            self.pki.identity,
            self.state.material.not_after.isoformat(),
            self._backoff,
            exc,
        )
        self.check_expiry()
        self.loop.call_later(self._backoff, self.renew)

    def _with_retired(self, new: Material) -> Material:
        """`new` with the issuing CAs rotated out in the last leaf lifetime added to its
        bundle (peers may still present leaves they signed)."""
        assert self.state is not None
        now = self.now()
        old = self.state.material
        new_roots = {_pem(c) for c in new.roots}
        for root in old.roots:
            pem = _pem(root)
            if pem not in new_roots and pem not in self._retired:
                until = self._retired[pem] = now + datetime.timedelta(seconds=new.lifetime())
                log.info(
                    "Vault's issuing CA changed: the one before, %s, stays trusted until %s",
                    root.subject.rfc4514_string(),
                    until.isoformat(),
                )
        self._retired = {
            pem: until
            for pem, until in self._retired.items()
            if until > now and pem not in new_roots
        }
        if not self._retired:
            return new
        bundle = new.bundle_pem + b"".join(self._retired)
        return material.build(new.chain_pem, new.key_pem, bundle, self.pki.trust_domain)
