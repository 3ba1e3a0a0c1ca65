"""Per-tenant rate limits: a token bucket per tenant, configured from the topology."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from din.shared.topology import Topology


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


DAY_S = 86_400.0


def daily_budgets(topology: Topology, site: str) -> dict[str, int]:
    """Each tenant's ``queries_per_day`` per model at one admission instance of ``site`` (split like the rate)."""
    instances = max(1, topology.replicas_at(site))
    return {t.name: max(1, t.queries_per_day // instances) for t in topology.tenants if t.queries_per_day}


class QuotaLedger:
    """Token buckets of every known tenant, and per (tenant, model) daily query budgets where the topology sets
    them (made on a model's first request: at most tenants times the catalog's models)."""

    def __init__(self, limits: dict[str, tuple[float, int]], clock: Callable[[], float] = time.monotonic,
                 daily: dict[str, int] | None = None) -> None:
        self._clock = clock
        now = clock()
        self._buckets = {
            tenant: TokenBucket(rate=rate, burst=burst, tokens=float(burst), updated=now)
            for tenant, (rate, burst) in limits.items()
        }
        self._daily = dict(daily or {})
        self._budgets: dict[tuple[str, str], TokenBucket] = {}

    def admit(self, tenant: str) -> float:
        """0 when ``tenant`` may send now, else the wait in seconds. Unknown tenants are refused elsewhere."""
        return self._buckets[tenant].take(self._clock())

    def admit_model(self, tenant: str, model: str) -> float:
        """0 when ``tenant``'s daily budget of ``model`` has a query left (or it has none), else the wait in
        seconds until one is."""
        budget = self._daily.get(tenant)
        if budget is None:
            return 0.0
        now = self._clock()
        bucket = self._budgets.get((tenant, model))
        if bucket is None:
            bucket = self._budgets[(tenant, model)] = TokenBucket(rate=budget / DAY_S, burst=float(budget),
                                                                  tokens=float(budget), updated=now)
        return bucket.take(now)
