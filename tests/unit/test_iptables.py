"""Rule generation for transparent interception: a spec in, iptables-restore lines out."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from sidecar import iptables
from sidecar.iptables import InterceptSpec, RulesError, clean_commands, nat_rules, restore_text


def _index(rules: list[str], fragment: str) -> int:
    matches = [i for i, rule in enumerate(rules) if fragment in rule]
    assert len(matches) == 1, (fragment, rules)
    return matches[0]


def test_default_rules_redirect_outbound_to_capture_and_inbound_to_inbound() -> None:
    rules = nat_rules(InterceptSpec())
    assert "-A OPUS_REDIRECT -p tcp -j REDIRECT --to-ports 15001" in rules
    assert "-A OPUS_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006" in rules
    assert "-A OUTPUT -p tcp -j OPUS_OUTPUT" in rules
    assert "-A PREROUTING -p tcp -j OPUS_INBOUND" in rules


def test_outbound_exclusions_come_before_the_redirect() -> None:
    rules = nat_rules(
        InterceptSpec(
            proxy_uid=2102,
            exclude_outbound_ports=(5432, 22, 22),
            exclude_outbound_cidrs=("10.96.0.1/12", "169.254.169.254/32"),
        )
    )
    redirect = _index(rules, "-A OPUS_OUTPUT -j OPUS_REDIRECT")
    uid = _index(rules, "-m owner --uid-owner 2102 -j RETURN")
    loopback = _index(rules, "-A OPUS_OUTPUT -o lo -j RETURN")
    assert uid < loopback < redirect  # the proxy's own traffic first, whatever its route
    for fragment in (
        "-A OPUS_OUTPUT -p tcp --dport 22 -j RETURN",
        "-A OPUS_OUTPUT -p tcp --dport 5432 -j RETURN",
        "-A OPUS_OUTPUT -d 10.96.0.0/12 -j RETURN",  # normalised to the network
        "-A OPUS_OUTPUT -d 169.254.169.254/32 -j RETURN",
    ):
        assert _index(rules, fragment) < redirect


def test_inbound_never_redirects_the_sidecars_own_ports() -> None:
    spec = InterceptSpec(
        capture_port=15001,
        inbound_port=15006,
        outbound_port=8080,
        admin_port=9090,
        exclude_inbound_ports=(22,),
    )
    rules = nat_rules(spec)
    jump = _index(rules, "-A OPUS_INBOUND -p tcp -j OPUS_IN_REDIRECT")
    for port in (22, 8080, 9090, 15001, 15006):
        assert _index(rules, f"-A OPUS_INBOUND -p tcp --dport {port} -j RETURN") < jump


def test_no_inbound_leaves_prerouting_alone() -> None:
    rules = nat_rules(InterceptSpec(inbound=False))
    assert not any("PREROUTING" in rule or "-A OPUS_INBOUND" in rule for rule in rules)
    assert "-A OUTPUT -p tcp -j OPUS_OUTPUT" in rules


def test_restore_text_declares_every_chain_and_commits() -> None:
    lines = restore_text(InterceptSpec(capture_port=16001)).splitlines()
    assert lines[0] == "*nat" and lines[-1] == "COMMIT"
    for chain in ("OPUS_INBOUND", "OPUS_IN_REDIRECT", "OPUS_OUTPUT", "OPUS_REDIRECT"):
        assert f":{chain} - [0:0]" in lines
    assert "-A OPUS_REDIRECT -p tcp -j REDIRECT --to-ports 16001" in lines


@pytest.mark.parametrize(
    ("spec", "option"),
    [
        (InterceptSpec(capture_port=0), "--capture-port"),
        (InterceptSpec(exclude_outbound_ports=(70000,)), "--exclude-outbound-ports"),
        (InterceptSpec(exclude_inbound_ports=(-1,)), "--exclude-inbound-ports"),
        (InterceptSpec(exclude_outbound_cidrs=("10.0.0.0/33",)), "--exclude-outbound-cidrs"),
        (InterceptSpec(exclude_outbound_cidrs=("fd00::/8",)), "--exclude-outbound-cidrs"),
        (InterceptSpec(proxy_uid=-1), "--proxy-uid"),
    ],
)
def test_bad_specs_name_the_option(spec: InterceptSpec, option: str) -> None:
    with pytest.raises(RulesError, match=option):
        nat_rules(spec)


def test_clean_unhooks_then_flushes_then_deletes() -> None:
    commands = [" ".join(c[3:5]) for c in clean_commands()]
    assert commands[:2] == ["-D OUTPUT", "-D PREROUTING"]
    flushes = [i for i, c in enumerate(commands) if c.startswith("-F")]
    deletes = [i for i, c in enumerate(commands) if c.startswith("-X")]
    assert len(flushes) == len(deletes) == 4 and max(flushes) < min(deletes)


class _Recorder:
    """Stands in for subprocess.run: records argv and stdin, answers with set return codes."""

    def __init__(self, failing: frozenset[str] = frozenset()) -> None:
        self.calls: list[tuple[list[str], str | None]] = []
        self.failing = failing
        self.deletes = 0

    def __call__(self, argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        self.calls.append((argv, kwargs.get("input")))
        code = 1 if argv[0] in self.failing else 0
        if "-D" in argv:  # one jump to delete, then "no such rule"
            self.deletes += 1
            code = 0 if self.deletes <= 1 else 1
        return subprocess.CompletedProcess(argv, code, "", "boom" if code else "")


def test_apply_cleans_first_then_restores_without_flushing_other_rules() -> None:
    run = _Recorder()
    iptables.apply(InterceptSpec(), run)
    restore = [c for c in run.calls if c[0][0] == "iptables-restore"]
    assert restore == [(["iptables-restore", "--noflush"], restore_text(InterceptSpec()))]
    assert run.calls.index(restore[0]) == len(run.calls) - 1


def test_apply_reports_a_failed_restore() -> None:
    with pytest.raises(RuntimeError, match="iptables-restore failed: boom"):
        iptables.apply(InterceptSpec(), _Recorder(failing=frozenset({"iptables-restore"})))


def test_cli_prints_restore_text_by_default(capsys: pytest.CaptureFixture[str]) -> None:
    code = iptables.main(["--capture-port", "15111", "--exclude-outbound-ports", "22,25"])
    out = capsys.readouterr().out
    assert code == 0
    assert out == restore_text(InterceptSpec(capture_port=15111, exclude_outbound_ports=(22, 25)))


def test_cli_takes_ports_from_a_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "sidecar.yaml"
    config.write_text(
        "listeners:\n  capture: {port: 16001}\n  inbound: {host: 0.0.0.0, port: 16006}\n"
    )
    assert iptables.main(["--config", str(config), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "--to-ports 16001" in out and "--to-ports 16006" in out


def test_cli_rejects_a_bad_cidr(capsys: pytest.CaptureFixture[str]) -> None:
    assert iptables.main(["--exclude-outbound-cidrs", "nonsense"]) == 2
    assert "--exclude-outbound-cidrs" in capsys.readouterr().err
