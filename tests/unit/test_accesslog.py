"""Access log: JSON lines, disabled target, append to a file."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from sidecar.accesslog import AccessLog, record

KEYS = [
    "time", "trace_id", "direction", "service", "route", "method", "path", "authority",
    "protocol", "status", "grpc_status", "duration_ms", "upstream", "tries", "bytes_in",
    "bytes_out", "flags",
]  # fmt: skip


def sample(status: int = 200) -> dict[str, object]:
    return record(
        start=1_700_000_000.1234,
        direction="outbound",
        service="reviews",
        method="GET",
        path="/reviews/1",
        authority="reviews:9080",
        protocol="HTTP/2",
        status=status,
        duration_s=0.0012345678,
        upstream="10.0.0.7:9080",
        bytes_in=12,
        bytes_out=345,
        flags="-",
    )


def test_record_fields() -> None:
    rec = sample()
    assert list(rec) == KEYS
    assert rec["time"] == "2023-11-14T22:13:20.123Z"
    assert rec["duration_ms"] == 1.235
    assert rec["status"] == 200


def test_stdout_lines_are_compact_json(capsys: pytest.CaptureFixture[str]) -> None:
    log = AccessLog("-")
    assert log.enabled
    log.write(sample(200))
    log.write(sample(503))
    log.close()  # must not close stdout
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert ", " not in lines[0] and '": ' not in lines[0]
    parsed = [json.loads(line) for line in lines]
    assert [p["status"] for p in parsed] == [200, 503]
    assert all(list(p) == KEYS for p in parsed)


def test_disabled_writes_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    log = AccessLog("")
    assert not log.enabled
    log.write(sample())
    log.close()
    assert capsys.readouterr().out == ""


def test_file_target_appends(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    path.write_text('{"earlier":true}\n')
    log = AccessLog(str(path))
    log.write(sample())
    # Line-buffered: the line is on disk before close.
    assert len(path.read_text().splitlines()) == 2
    log.close()
    log = AccessLog(str(path))
    log.write(sample(404))
    log.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0] == {"earlier": True}
    assert [line["status"] for line in lines[1:]] == [200, 404]


def test_write_failure_logs_once_and_does_not_raise(caplog: pytest.LogCaptureFixture) -> None:
    class Broken:
        def write(self, _: str) -> int:
            raise OSError(28, "No space left on device")

        def flush(self) -> None:
            pass

    log = AccessLog("")
    log._stream = Broken()  # type: ignore[assignment]
    with caplog.at_level(logging.ERROR, logger="sidecar.access"):
        for _ in range(3):
            log.write(sample())
    assert len([r for r in caplog.records if r.name == "sidecar.access"]) == 1


def test_write_after_close_is_noop(tmp_path: Path) -> None:
    log = AccessLog(str(tmp_path / "a.log"))
    log.close()
    assert not log.enabled
    log.write(sample())
