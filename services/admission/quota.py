"""Per-tenant rate limits: a token bucket per tenant, configured from the topology."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class TokenBucket:
    """Refills ``rate`` tokens per second up to ``burst``; each request takes one."""

    rate: float
    burst: float
    tokens: float
    updated: float

    def take(self, now: float) -> float:
        """Take a token; return 0 when granted, else seconds until one is available."""
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


class QuotaLedger:
    """Token buckets of every known tenant."""

    def __init__(self, limits: dict[str, tuple[float, int]], clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        now = clock()
        self._buckets = {
            tenant: TokenBucket(rate=rate, burst=burst, tokens=float(burst), updated=now)
            for tenant, (rate, burst) in limits.items()
        }

    def admit(self, tenant: str) -> float:
        """0 when ``tenant`` may send now, else the wait in seconds. Unknown tenants are refused elsewhere."""
        return self._buckets[tenant].take(self._clock())
