"""TLS material, config and contexts: what is checked at load, the contexts built from it
(handshakes over memory BIOs, no sockets), and a file source's reload."""

from __future__ import annotations

import datetime
import os
import ssl
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.config import ConfigError, load_config
from sidecar.tls import contexts, devca, material, sources
from sidecar.tls.contexts import PeerRefused, TlsState
from tests import tlscerts

TD = "mesh.test"


def _material(issuer: devca.DevCa, identity: str = f"spiffe://{TD}/svc/a") -> material.Material:
    made = tlscerts.leaf(issuer, (identity,))
    return material.build(made.cert_pem, made.key_pem, issuer.cert_pem, TD)


def _handshake(client: ssl.SSLContext, server: ssl.SSLContext) -> tuple[Any, Any]:
    """A full handshake between the two contexts over memory BIOs."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    c = client.wrap_bio(c_in, c_out, server_side=False)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    done = [False, False]
    for _ in range(10):
        for i, (obj, out, peer_in) in enumerate(((c, c_out, s_in), (s, s_out, c_in))):
            if not done[i]:
                try:
                    obj.do_handshake()
                    done[i] = True
                except ssl.SSLWantReadError:
                    pass
            peer_in.write(out.read())
        if all(done):
            break
    return c, s


# -- config --


def _load(tmp_path: Path, tls: dict[str, Any], **extra: Any) -> Any:
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump({"tls": tls, **extra}))
    return load_config(str(path), environ={})


def test_default_is_disable(tmp_path: Path) -> None:
    cfg = load_config(None, environ={})
    assert cfg.tls.mode == "disable"


def test_file_source_loads(tmp_path: Path) -> None:
    files = tlscerts.file_source_dir(tmp_path / "certs", tlscerts.ca(TD), f"spiffe://{TD}/svc/a")
    cfg = _load(tmp_path, {"mode": "strict", "trust_domain": TD, "file": files})
    assert (cfg.tls.mode, cfg.tls.source, cfg.tls.min_version) == ("strict", "file", "1.3")


def test_key_not_matching_cert_names_the_file(tmp_path: Path) -> None:
    issuer = tlscerts.ca(TD)
    files = tlscerts.file_source_dir(tmp_path / "certs", issuer, f"spiffe://{TD}/svc/a")
    other = tlscerts.leaf(issuer)
    Path(files["key"]).write_bytes(other.key_pem)
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, {"mode": "strict", "trust_domain": TD, "file": files})
    assert err.value.key == "tls.file.key"
    assert files["key"] in str(err.value) and "does not match" in str(err.value)


@pytest.mark.parametrize(
    ("tls", "key", "why"),
    [
        ({"mode": "strict"}, "tls.trust_domain", "must be set"),
        ({"mode": "strict", "trust_domain": "Bad"}, "tls.trust_domain", "lower-case"),
        ({"mode": "permissive", "trust_domain": TD}, "tls.file.cert", "must name a PEM file"),
        ({"mode": "strict", "trust_domain": TD, "source": "dev"}, "tls.dev.ca_dir", "ca init"),
        ({"mode": "maybe"}, "tls.mode", ""),
        ({"mode": "strict", "trust_domain": TD, "min_version": "1.1"}, "tls.min_version", ""),
        (
            {"mode": "strict", "trust_domain": TD, "handshake_timeout": 0},
            "tls.handshake_timeout",
            "",
        ),
        (
            {"mode": "strict", "trust_domain": TD, "identity": "spiffe://other/svc/a"},
            "tls.identity",
            "not in tls.trust_domain",
        ),
        ({"mode": "strict", "trust_domain": TD, "tls_mode": 1}, "tls.tls_mode", ""),
    ],
)
def test_config_errors(tmp_path: Path, tls: dict[str, Any], key: str, why: str) -> None:
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, tls)
    assert err.value.key == key
    assert why in str(err.value)


def test_disable_ignores_unused_keys(tmp_path: Path) -> None:
    # Nothing is read while TLS is off: a config naming files not yet there still loads.
    cfg = _load(tmp_path, {"trust_domain": TD, "file": {"cert": "/nonexistent"}})
    assert cfg.tls.mode == "disable"


def test_service_identity_must_be_spiffe(tmp_path: Path) -> None:
    files = tlscerts.file_source_dir(tmp_path / "certs", tlscerts.ca(TD), f"spiffe://{TD}/svc/a")
    with pytest.raises(ConfigError) as err:
        _load(
            tmp_path,
            {"mode": "strict", "trust_domain": TD, "file": files},
            services={"inventory": {"identity": "inventory"}},
        )
    assert err.value.key == "services.inventory.identity"


def test_dev_ca_of_another_trust_domain(tmp_path: Path) -> None:
    devca.init_ca(tmp_path / "ca", "other.test")
    with pytest.raises(ConfigError) as err:
        _load(
            tmp_path,
            {
                "mode": "strict",
                "trust_domain": TD,
                "source": "dev",
                "dev": {"ca_dir": str(tmp_path / "ca")},
            },
        )
    assert err.value.key == "tls.dev.ca_dir" and "other.test" in str(err.value)


# -- material --


def test_leaf_without_uri_san_is_refused() -> None:
    issuer = tlscerts.ca(TD)
    made = tlscerts.leaf(issuer, (), dns=("a.example",))
    with pytest.raises(material.MaterialError, match="exactly one URI SAN"):
        material.build(
            made.cert_pem, made.key_pem, issuer.cert_pem, TD, ("c.pem", "k.pem", "b.pem")
        )


def test_leaf_of_other_trust_domain_is_refused() -> None:
    issuer = tlscerts.ca(TD)
    made = tlscerts.leaf(issuer, ("spiffe://other.test/svc/a",))
    with pytest.raises(material.MaterialError, match="not in trust domain"):
        material.build(made.cert_pem, made.key_pem, issuer.cert_pem, TD)


def test_garbage_names_the_file() -> None:
    with pytest.raises(material.MaterialError) as err:
        material.build(b"nope", b"", b"", TD, ("chain.pem", "key.pem", "bundle.pem"))
    assert err.value.path == "chain.pem"


def test_describe_for_admin() -> None:
    issuer = tlscerts.ca(TD)
    info = _material(issuer).describe()
    assert info["identity"] == f"spiffe://{TD}/svc/a"
    cert = info["certificate"]
    assert isinstance(cert, dict) and cert["sans"] == [f"URI:spiffe://{TD}/svc/a"]
    assert "opus-mesh dev CA" in str(cert["issuer"])
    roots = info["roots"]
    assert isinstance(roots, list) and roots[0]["sans"] == [f"URI:spiffe://{TD}"]


# -- contexts --


def test_mutual_handshake_and_identities() -> None:
    issuer = tlscerts.ca(TD)
    server = TlsState(TD, "1.3", _material(issuer, f"spiffe://{TD}/svc/inventory"))
    client = TlsState(TD, "1.3", _material(issuer, f"spiffe://{TD}/svc/payment"))
    c, s = _handshake(client.client(contexts.ALPN_H2), server.server)
    assert c.version() == "TLSv1.3" and c.selected_alpn_protocol() == "h2"
    assert contexts.peer_identity(c, TD) == f"spiffe://{TD}/svc/inventory"
    assert contexts.peer_identity(s, TD) == f"spiffe://{TD}/svc/payment"


def test_http1_alpn() -> None:
    issuer = tlscerts.ca(TD)
    state = TlsState(TD, "1.3", _material(issuer))
    c, _ = _handshake(state.client(contexts.ALPN_HTTP1), state.server)
    assert c.selected_alpn_protocol() == "http/1.1"


def test_tls12_only_when_configured() -> None:
    issuer = tlscerts.ca(TD)
    server13 = TlsState(TD, "1.3", _material(issuer))
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname = False
    old.verify_mode = ssl.CERT_NONE
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises(ssl.SSLError):
        _handshake(old, server13.server)
    server12 = TlsState(TD, "1.2", _material(issuer))
    old12 = server12.client(contexts.ALPN_H2)
    old12.maximum_version = ssl.TLSVersion.TLSv1_2
    c, _ = _handshake(old12, server12.server)
    assert c.version() == "TLSv1.2"


def test_chain_to_another_ca_fails_handshake() -> None:
    server = TlsState(TD, "1.3", _material(tlscerts.ca(TD)))
    stranger = TlsState(TD, "1.3", _material(tlscerts.ca(TD)))  # same name, other key
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(stranger.client(contexts.ALPN_H2), server.server)


def test_peer_identity_refusals() -> None:
    class Fake:
        def __init__(self, cert: dict[str, Any]) -> None:
            self.cert = cert

        def getpeercert(self) -> dict[str, Any]:
            return self.cert

    with pytest.raises(PeerRefused, match="no client certificate"):
        contexts.peer_identity(Fake({}), TD)
    with pytest.raises(PeerRefused, match="0 URI SANs"):
        contexts.peer_identity(Fake({"subjectAltName": (("DNS", "a"),)}), TD)
    with pytest.raises(PeerRefused, match="not a SPIFFE ID"):
        contexts.peer_identity(Fake({"subjectAltName": (("URI", "https://a"),)}), TD)
    with pytest.raises(PeerRefused, match="not in trust domain"):
        contexts.peer_identity(Fake({"subjectAltName": (("URI", "spiffe://x/svc/a"),)}), TD)


def test_update_swaps_contexts_and_tells_listeners() -> None:
    issuer = tlscerts.ca(TD)
    state = TlsState(TD, "1.3", _material(issuer))
    old_server, seen = state.server, list[material.Material]()
    state.listeners.append(seen.append)
    new = _material(issuer, f"spiffe://{TD}/svc/b")
    state.update(new)
    assert state.server is not old_server and state.material is new and seen == [new]
    assert state.generation == 2


# -- sources --


class Later:
    def __init__(self) -> None:
        self.calls: list[tuple[float, Any]] = []

    def call_later(self, delay: float, callback: Any, /) -> None:
        self.calls.append((delay, callback))


def _write_set(directory: Path, issuer: devca.DevCa, identity: str) -> None:
    made = tlscerts.leaf(issuer, (identity,))
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tls.crt").write_bytes(made.cert_pem)
    (directory / "tls.key").write_bytes(made.key_pem)
    (directory / "ca.crt").write_bytes(issuer.cert_pem)


def test_file_reload_atomic_rename(tmp_path: Path) -> None:
    issuer = tlscerts.ca(TD)
    live = tmp_path / "live"
    _write_set(live, issuer, f"spiffe://{TD}/svc/a")
    src = sources.FileSource(
        str(live / "tls.crt"), str(live / "tls.key"), str(live / "ca.crt"), TD, 1.0
    )
    state = TlsState(TD, "1.3", src.load())
    src.start(state, Later())
    assert not src.poll()  # nothing changed
    staged = tmp_path / "staged"
    _write_set(staged, issuer, f"spiffe://{TD}/svc/b")
    for name in ("tls.key", "tls.crt"):  # each file renamed over its old self
        os.replace(staged / name, live / name)
    assert src.poll()
    assert state.material.identity == f"spiffe://{TD}/svc/b" and src.reloads == 1


def test_file_reload_half_written_keeps_old(tmp_path: Path) -> None:
    issuer = tlscerts.ca(TD)
    live = tmp_path / "live"
    _write_set(live, issuer, f"spiffe://{TD}/svc/a")
    src = sources.FileSource(
        str(live / "tls.crt"), str(live / "tls.key"), str(live / "ca.crt"), TD, 1.0
    )
    state = TlsState(TD, "1.3", src.load())
    src.start(state, Later())
    new = tlscerts.leaf(issuer, (f"spiffe://{TD}/svc/b",))
    (live / "tls.crt").write_bytes(new.cert_pem)  # the key is not there yet
    assert not src.poll()
    assert state.material.identity == f"spiffe://{TD}/svc/a" and src.failures == 1
    (live / "tls.key").write_bytes(new.key_pem)
    assert src.poll()
    assert state.material.identity == f"spiffe://{TD}/svc/b"


def test_file_reload_kubernetes_data_symlink_swap(tmp_path: Path) -> None:
    """A Secret volume: tls.crt -> ..data/tls.crt, ..data -> ..<timestamp>, swapped by a
    rename of a new ..data_tmp symlink over ..data."""
    issuer = tlscerts.ca(TD)
    vol = tmp_path / "vol"
    vol.mkdir()
    _write_set(vol / "..2026_12_04_1", issuer, f"spiffe://{TD}/svc/a")
    os.symlink("..2026_12_04_1", vol / "..data")
    for name in ("tls.crt", "tls.key", "ca.crt"):
        os.symlink(f"..data/{name}", vol / name)
    src = sources.FileSource(
        str(vol / "tls.crt"), str(vol / "tls.key"), str(vol / "ca.crt"), TD, 1.0
    )
    state = TlsState(TD, "1.3", src.load())
    src.start(state, Later())
    _write_set(vol / "..2026_12_04_2", issuer, f"spiffe://{TD}/svc/b")
    os.symlink("..2026_12_04_2", vol / "..data_tmp")
    os.replace(vol / "..data_tmp", vol / "..data")
    assert src.poll()
    assert state.material.identity == f"spiffe://{TD}/svc/b"


def test_file_source_schedules_its_polls(tmp_path: Path) -> None:
    issuer = tlscerts.ca(TD)
    _write_set(tmp_path, issuer, f"spiffe://{TD}/svc/a")
    src = sources.FileSource(
        str(tmp_path / "tls.crt"), str(tmp_path / "tls.key"), str(tmp_path / "ca.crt"), TD, 0.5
    )
    later = Later()
    src.start(TlsState(TD, "1.3", src.load()), later)
    assert later.calls[0][0] == 0.5
    later.calls.pop()[1]()
    assert len(later.calls) == 1  # polled, and the next poll is scheduled
    src.close()
    later.calls.pop()[1]()
    assert later.calls == []


def test_dev_source_issues_and_renews_at_two_thirds(tmp_path: Path) -> None:
    devca.init_ca(tmp_path / "ca", TD)
    now = [datetime.datetime(2026, 12, 4, 20, 0, tzinfo=datetime.UTC)]
    src = sources.DevSource(
        str(tmp_path / "ca"), TD, f"spiffe://{TD}/svc/a", 300.0, now=lambda: now[0]
    )
    first = src.load()
    assert first.identity == f"spiffe://{TD}/svc/a"
    assert first.not_after == now[0] + datetime.timedelta(seconds=300)
    state = TlsState(TD, "1.3", first)
    later = Later()
    src.start(state, later)
    assert later.calls[0][0] == pytest.approx(200.0)
    now[0] += datetime.timedelta(seconds=200)
    later.calls.pop()[1]()
    assert src.renewals == 1 and state.material is not first
    assert state.material.leaf.serial_number != first.leaf.serial_number
    assert later.calls[0][0] == pytest.approx(200.0)


def test_expired_certificate_is_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    devca.init_ca(tmp_path / "ca", TD)
    now = [datetime.datetime(2026, 12, 4, 20, 0, tzinfo=datetime.UTC)]
    src = sources.DevSource(
        str(tmp_path / "ca"), TD, f"spiffe://{TD}/svc/a", 60.0, now=lambda: now[0]
    )
    src.start(TlsState(TD, "1.3", src.load()), Later())
    counted: list[int] = []
    src.on_expired = lambda: counted.append(1)
    assert not src.check_expiry()
    now[0] += datetime.timedelta(seconds=61)
    assert src.check_expiry() and src.check_expiry()
    assert counted == [1]
    assert "expired" in caplog.text


def test_ca_init_refuses_to_overwrite(tmp_path: Path) -> None:
    devca.init_ca(tmp_path, TD)
    assert oct((tmp_path / "ca.key").stat().st_mode & 0o777) == "0o600"
    with pytest.raises(material.MaterialError, match="exists already"):
        devca.init_ca(tmp_path, TD)
    assert devca.load_ca(tmp_path).trust_domain == TD


def test_cli_ca_init(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from sidecar.cli import main

    assert main(["ca", "init", str(tmp_path / "ca"), "--trust-domain", TD]) == 0
    assert "spiffe://mesh.test" in capsys.readouterr().out
    assert main(["ca", "init", str(tmp_path / "ca"), "--trust-domain", TD]) == 2
    assert "exists already" in capsys.readouterr().err
