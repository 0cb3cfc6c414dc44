"""Resource baselines for fault tests: after a fault, a sidecar's open file descriptors
(/proc/<pid>/fd), pooled upstream connections (opus_upstream_connections) and asyncio
tasks (GET /debug/tasks) must come back to what they were before it, within a small
fixed slack, polled for a bounded time.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import httpx

from tests.integration.conftest import Sidecar

FD_SLACK = 6
CONN_SLACK = 1
TASK_SLACK = 3
SETTLE_S = 15.0


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def task_count(sidecar: Sidecar) -> int:
    count: int = httpx.get(f"{sidecar.admin}/debug/tasks", timeout=5).json()["tasks"]
    return count


@dataclass
class Baseline:
    sidecar: Sidecar
    fds: int
    connections: float
    tasks: int

    @classmethod
    def take(cls, sidecar: Sidecar) -> Baseline:
        return cls(
            sidecar,
            fd_count(sidecar.proc.pid),
            sidecar.metric("opus_upstream_connections"),
            task_count(sidecar),
        )

    def now(self) -> tuple[int, float, int]:
        sidecar = self.sidecar
        return (
            fd_count(sidecar.proc.pid),
            sidecar.metric("opus_upstream_connections"),
            task_count(sidecar),
        )

    def settled(self) -> bool:
        fds, connections, tasks = self.now()
        return (
            fds <= self.fds + FD_SLACK
            and connections <= self.connections + CONN_SLACK
            and tasks <= self.tasks + TASK_SLACK
        )


def assert_settles(*baselines: Baseline) -> None:
    """Poll until every sidecar is back to its baseline; fail naming what did not."""
    deadline = time.monotonic() + SETTLE_S
    while time.monotonic() < deadline:
        if all(b.settled() for b in baselines):
            return
        time.sleep(0.1)
    report = {
        b.sidecar.name: {"baseline": (b.fds, b.connections, b.tasks), "now": b.now()}
        for b in baselines
        if not b.settled()
    }
    raise AssertionError(f"resources did not return to baseline in {SETTLE_S}s: {report}")
