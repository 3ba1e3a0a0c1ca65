"""Per-tenant rate limits: a token bucket per tenant, configured from the topology."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from shared.topology import Topology


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


def quota_shares(topology: Topology, site: str) -> dict[str, tuple[float, int]]:
    """Each tenant's (rate, burst) at one admission instance of ``site``: the tenant's quota split evenly among
    the site's instances (the queue group spreads requests evenly), so the site as a whole grants the quota."""
    instances = max(1, topology.replicas_at(site))
    return {t.name: (t.rate_per_s / instances, max(1, round(t.burst / instances))) for t in topology.tenants}


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
