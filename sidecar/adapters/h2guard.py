"""What an h2c client may make the server do without sending calls, and the token bucket
that keeps count: stream resets (CVE-2023-44487, rapid reset; CVE-2025-8671, resets it
makes us send), SETTINGS and PING (each makes us queue an ACK), and replies it does not
read. Past a limit, H2ServerProtocol closes the connection with ENHANCE_YOUR_CALM.
"""

from __future__ import annotations

# Legitimate clients stay far below: a cancel now and then, a keepalive PING every few
# seconds, SETTINGS once or twice.
RESETS_PER_SECOND, RESET_BURST = 100.0, 500.0
CONTROL_PER_SECOND, CONTROL_BURST = 50.0, 200.0
MAX_WRITE_BUFFER = 16 * 1024 * 1024  # far above what flow control lets replies queue


class Budget:
    """A token bucket: `spend()` is False once the rate has been outrun by the burst."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = now

    def spend(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        self.tokens -= 1.0
        return self.tokens >= 0.0
