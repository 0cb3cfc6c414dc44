"""scripts/soak for about 10 s: two slices of steady wrk load through two sidecars,
with zero errors and no RSS/fd drift beyond the script's 10% target."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from tests.integration.conftest import REPO

pytestmark = pytest.mark.integration


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk not installed (apt-get install wrk)")
def test_soak_smoke() -> None:
    run = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "soak"),
            "--duration",
            "10",
            "--interval",
            "5",
            "--connections",
            "8",
        ],
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.rstrip().endswith("PASS")
