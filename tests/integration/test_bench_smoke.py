"""The benchmark harness in smoke mode: real nginx, HAProxy, sidecars, wrk and h2load on
127.0.0.1, every case briefly and once. Checks that it starts, measures and reports,
not how fast anything is."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
NEEDED = ("nginx", "wrk", "h2load", "taskset")


@pytest.mark.timeout(180)
def test_bench_smoke(tmp_path: Path) -> None:
    missing = [tool for tool in NEEDED if shutil.which(tool) is None]
    if missing:
        pytest.skip(
            f"bench needs {', '.join(missing)} (apt-get install nginx-light wrk nghttp2-client)"
        )
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=170,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "### Saturation" in done.stdout
    assert "| target | protocol | req/s" in done.stdout
    assert (tmp_path / "benchmarks.md").read_text().count("### Targets") == 1

    results = json.loads((tmp_path / "results.json").read_text())
    saturation = results["saturation"]
    expected = {"direct", "nginx", "sidecar-in", "sidecar-out"}
    if shutil.which("haproxy"):
        expected.add("haproxy")
    for name in expected:
        for proto in ("h1", "h2c"):
            samples = saturation.get(f"{name} {proto}")
            assert samples, f"no saturation sample for {name} {proto}: {results['failures']}"
            assert samples[0]["rps"] > 0, f"{name} {proto}"
    assert saturation["aiohttp h1"][0]["rps"] > 0
    for name in ("direct", "sidecar-in", "mesh", "mesh+hmac"):
        # Evenly paced HTTP/1.1 and h2c, and the h2c burst case (bench/paced.py).
        for case in ("h1",) if name == "mesh+hmac" else ("h1", "h2c", "burst"):
            samples = results["latency"].get(f"{name} {case}")
            assert samples and samples[0]["p50_us"] > 0, f"{name} {case}: {results['failures']}"
            assert samples[0]["errors"] == 0, f"latency {name} {case} had errors"
    assert "h2c burst" in done.stdout
    assert results["connections"]["h2c"]["calls"] > 0
    assert results["codec"]["protobuf"]["calls"] > 0
