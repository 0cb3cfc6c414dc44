"""Resource baselines for fault tests: after a fault, a sidecar's open file descriptors
(/proc/<pid>/fd) and pooled upstream connections (opus_upstream_connections) must come
back to what they were before it, within a small fixed slack, polled for a bounded time.

Asyncio task counts are not exposed by the sidecar; fds stand in for them (every call
that leaks holds a socket), and the report asks for an admin endpoint for tasks.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from tests.integration.conftest import Sidecar

FD_SLACK = 6
CONN_SLACK = 1
SETTLE_S = 15.0


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@dataclass
class Baseline:
    sidecar: Sidecar
    fds: int
    connections: float

    @classmethod
    def take(cls, sidecar: Sidecar) -> Baseline:
        return cls(sidecar, fd_count(sidecar.proc.pid), sidecar.metric("opus_upstream_connections"))

    def now(self) -> tuple[int, float]:
        return fd_count(self.sidecar.proc.pid), self.sidecar.metric("opus_upstream_connections")

    def settled(self) -> bool:
        fds, connections = self.now()
        return fds <= self.fds + FD_SLACK and connections <= self.connections + CONN_SLACK


def assert_settles(*baselines: Baseline) -> None:
    """Poll until every sidecar is back to its baseline; fail naming what did not."""
    deadline = time.monotonic() + SETTLE_S
    while time.monotonic() < deadline:
        if all(b.settled() for b in baselines):
            return
        time.sleep(0.1)
    report = {
        b.sidecar.name: {"baseline": (b.fds, b.connections), "now": b.now()}
        for b in baselines
        if not b.settled()
    }
    raise AssertionError(f"resources did not return to baseline in {SETTLE_S}s: {report}")
