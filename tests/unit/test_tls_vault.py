"""The `vault` certificate source: hvac's request and the reply's handling against the
Vault emulator (tests/emulators/vault_emulator.py, in-process on 127.0.0.1), config
checks naming the key, renewal at 2/3 on an injected clock, and a failing Vault keeping
the current material."""

from __future__ import annotations

import concurrent.futures
import datetime
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.config import ConfigError, load_config
from sidecar.tls import material
from sidecar.tls.contexts import TlsState
from sidecar.tls.vault_source import VaultError, VaultPki, VaultSource
from tests import tlscerts
from tests.emulators.vault_emulator import VaultEmulator

TD = "mesh.test"
ID = f"spiffe://{TD}/svc/a"


@pytest.fixture
def vault() -> Iterator[VaultEmulator]:
    emulator = VaultEmulator(tlscerts.ca(TD)).start()
    yield emulator
    emulator.stop()


def _pki(vault: VaultEmulator, **extra: Any) -> VaultPki:
    args: dict[str, Any] = {"token": "root", "timeout": 2.0, **extra}
    return VaultPki(vault.address, "pki", "mesh", ID, "a", 300.0, TD, **args)


class Inline(concurrent.futures.Executor):
    """Runs what is submitted at once, on the caller's thread."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as exc:
            future.set_exception(exc)
        return future


class Loop:
    """call_later recorded (the test runs them), call_soon_threadsafe run at once."""

    def __init__(self) -> None:
        self.later: list[tuple[float, Callable[[], object]]] = []

    def call_later(self, delay: float, callback: Callable[[], object]) -> None:
        self.later.append((delay, callback))

    def call_soon_threadsafe(self, callback: Callable[..., object], *args: Any) -> None:
        callback(*args)

    def take_renewal(self) -> tuple[float, Callable[[], object]]:
        """The scheduled renew (not the overdue watchdogs)."""
        for i, (_delay, cb) in enumerate(self.later):
            if getattr(cb, "__name__", "") == "renew":
                return self.later.pop(i)
        raise AssertionError(f"no renewal scheduled: {self.later}")


# -- the request and the reply --


def test_issue_sends_the_documented_request(vault: VaultEmulator) -> None:
    got = _pki(vault).issue()
    assert vault.requests == [{"common_name": "a", "uri_sans": ID, "ttl": "300s", "format": "pem"}]
    assert got.identity == ID
    assert list(got.roots) == [vault.ca.cert]
    assert 299 <= got.not_after.timestamp() - datetime.datetime.now(datetime.UTC).timestamp() <= 301


def test_bad_token_is_vaults_error_named(vault: VaultEmulator) -> None:
    with pytest.raises(VaultError, match=r"POST /v1/pki/issue/mesh: Forbidden: permission denied"):
        _pki(vault, token="wrong").issue()


def test_unknown_role_and_refused_san(vault: VaultEmulator) -> None:
    pki = VaultPki(vault.address, "pki", "nope", ID, "a", 60, TD, token="root")
    with pytest.raises(VaultError, match="unknown role: nope"):
        pki.issue()
    vault.roles["mesh"].allowed_uri_sans = ("spiffe://other/*",)
    with pytest.raises(VaultError, match="not allowed by this role"):
        _pki(vault).issue()


def test_sealed_and_down(vault: VaultEmulator) -> None:
    vault.sealed = True
    with pytest.raises(VaultError, match="Vault is sealed"):
        _pki(vault).issue()
    vault.sealed = False
    vault.stop()
    with pytest.raises(VaultError, match=r"Connection refused|Max retries"):
        _pki(vault).issue()


def test_token_file_is_read_each_time(vault: VaultEmulator, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("root\n")
    pki = _pki(vault, token="", token_file=str(token))
    pki.issue()
    token.write_text("stale")
    with pytest.raises(VaultError, match="permission denied"):
        pki.issue()


def test_reply_without_certificate_or_with_a_foreign_identity(vault: VaultEmulator) -> None:
    pki = _pki(vault)
    with pytest.raises(VaultError, match="no certificate"):
        pki.material({"data": {}})
    with pytest.raises(VaultError, match="neither ca_chain nor issuing_ca"):
        pki.material({"data": {"certificate": "x", "private_key": "y"}})
    other = tlscerts.leaf(vault.ca, ("spiffe://elsewhere/svc/a",))
    reply = {
        "data": {
            "certificate": other.cert_pem.decode(),
            "private_key": other.key_pem.decode(),
            "issuing_ca": vault.ca.cert_pem.decode(),
        }
    }
    with pytest.raises(material.MaterialError, match="not in trust domain"):
        pki.material(reply)


# -- config --


def _load(tmp_path: Path, vault: dict[str, Any]) -> Any:
    path = tmp_path / "sidecar.yaml"
    tls = {"mode": "strict", "trust_domain": TD, "source": "vault", "vault": vault}
    path.write_text(yaml.safe_dump({"tls": tls}))
    return load_config(str(path), environ={})


GOOD = {"address": "http://127.0.0.1:8200", "role": "mesh", "token": "t"}


def test_config_loads_with_defaults(tmp_path: Path) -> None:
    cfg = _load(tmp_path, GOOD)
    v = cfg.tls.vault
    assert (v.mount, v.ttl, v.timeout, v.retry_max) == ("pki", 3600.0, 5.0, 30.0)


@pytest.mark.parametrize(
    ("change", "key", "why"),
    [
        ({"address": ""}, "tls.vault.address", "http:// or https://"),
        ({"address": "127.0.0.1:8200"}, "tls.vault.address", "http:// or https://"),
        ({"role": ""}, "tls.vault.role", "must be set"),
        ({"mount": "/"}, "tls.vault.mount", "must be set"),
        ({"token": ""}, "tls.vault.token", "exactly one"),
        ({"token_file": "/x"}, "tls.vault.token", "exactly one"),
        ({"token": "", "token_file": "/nonexistent/t"}, "tls.vault.token_file", "cannot be read"),
        ({"ca_file": "/nonexistent/ca"}, "tls.vault.ca_file", "cannot be read"),
        ({"ttl": 0}, "tls.vault.ttl", ""),
        ({"timeout": 0}, "tls.vault.timeout", ""),
        ({"colour": 1}, "tls.vault.colour", ""),
    ],
)
def test_config_errors_name_the_key(
    tmp_path: Path, change: dict[str, Any], key: str, why: str
) -> None:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, {**GOOD, **change})
    assert key in str(info.value) and why in str(info.value)


def test_ca_file_needs_https(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_bytes(tlscerts.ca(TD).cert_pem)
    with pytest.raises(ConfigError, match=r"tls.vault.ca_file.*https"):
        _load(tmp_path, {**GOOD, "ca_file": str(ca)})
    cfg = _load(tmp_path, {**GOOD, "ca_file": str(ca), "address": "https://vault:8200"})
    assert cfg.tls.vault.ca_file == str(ca)


# -- renewal, on the injected clock --


def _started(vault: VaultEmulator) -> tuple[VaultSource, TlsState, Loop, list[datetime.datetime]]:
    now = [datetime.datetime.now(datetime.UTC)]
    src = VaultSource(_pki(vault), retry_max=8.0, now=lambda: now[0], executor=Inline())
    first = src.load()
    now[0] = first.not_after - datetime.timedelta(seconds=300)  # when it was issued
    state = TlsState(TD, "1.3", first)
    loop = Loop()
    src.start(state, loop)
    return src, state, loop, now


def test_renews_at_two_thirds_of_the_lifetime(vault: VaultEmulator) -> None:
    src, state, loop, now = _started(vault)
    first = state.material
    delay, renew = loop.take_renewal()
    assert delay == pytest.approx(200.0)  # 2/3 of the ttl (not-before is back-dated 30 s)
    now[0] += datetime.timedelta(seconds=delay)
    renew()
    assert src.renewals == 1 and vault.issued == 2
    assert state.material.leaf.serial_number != first.leaf.serial_number
    assert state.generation == 2
    loop.take_renewal()  # the next one is scheduled (from the new leaf's dates)
    src.close()


def test_failing_vault_keeps_the_material_and_backs_off(
    vault: VaultEmulator, caplog: pytest.LogCaptureFixture
) -> None:
    src, state, loop, now = _started(vault)
    first = state.material
    expired: list[int] = []
    src.on_expired = lambda: expired.append(1)
    _, renew = loop.take_renewal()
    vault.sealed = True
    delays = []
    for _ in range(5):
        renew()
        delay, renew = loop.take_renewal()
        delays.append(delay)
    assert state.material is first and src.failures == 5
    assert delays == [1.0, 2.0, 4.0, 8.0, 8.0]  # doubling, capped at retry_max
    assert "Vault is sealed" in caplog.text and "keeping the current one" in caplog.text
    assert expired == []
    now[0] = first.not_after + datetime.timedelta(seconds=1)
    renew()
    assert expired == [1]  # the alert-worthy expiry, once
    _, renew = loop.take_renewal()
    vault.sealed = False
    renew()
    assert state.material is not first and src.renewals == 1
    now[0] = state.material.not_before  # (the emulator issues on the real clock)
    assert src.check_expiry() is False


def test_a_late_reply_after_the_watchdog_is_ignored(vault: VaultEmulator) -> None:
    now = [datetime.datetime.now(datetime.UTC)]
    held: list[concurrent.futures.Future[Any]] = []

    class Held(concurrent.futures.Executor):
        def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
            future: concurrent.futures.Future[Any] = concurrent.futures.Future()
            future.set_running_or_notify_cancel()
            held.append(future)
            self.fn = fn
            return future

    executor = Held()
    src = VaultSource(_pki(vault), now=lambda: now[0], executor=executor)
    state = TlsState(TD, "1.3", src.load())
    loop = Loop()
    src.start(state, loop)
    loop.take_renewal()[1]()
    ((delay, overdue),) = loop.later
    loop.later.clear()
    assert delay == pytest.approx(2 * 2.0 + 1)
    overdue()
    assert src.failures == 1
    held[0].set_result(executor.fn())  # the reply comes after all
    assert state.generation == 1  # ignored: the retry is what counts
    src.close()


def test_issuing_ca_rotated_out_stays_trusted_one_lifetime(vault: VaultEmulator) -> None:
    src, state, loop, now = _started(vault)
    old_ca = vault.ca
    vault.rotate_ca(tlscerts.ca(TD))
    delay, renew = loop.take_renewal()
    now[0] += datetime.timedelta(seconds=delay)
    renew()
    assert list(state.material.roots) == [vault.ca.cert, old_ca.cert]
    state.material.leaf.verify_directly_issued_by(vault.ca.cert)
    now[0] += datetime.timedelta(seconds=400)  # past one lifetime
    loop.take_renewal()[1]()
    assert list(state.material.roots) == [vault.ca.cert]
    src.close()


def test_an_unexpected_error_is_retried_too(vault: VaultEmulator) -> None:
    src, state, loop, _ = _started(vault)
    first = state.material

    def broken() -> Any:
        raise TypeError("a reply hvac did not expect")

    src.pki.issue = broken  # type: ignore[method-assign]
    loop.take_renewal()[1]()
    assert src.failures == 1 and state.material is first
    loop.take_renewal()  # the retry is scheduled
    src.close()
