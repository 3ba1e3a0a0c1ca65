"""The autoscaler's part of a recorded window: what it did to each pool, how long cold starts took, and what became
of the requests the scheduler held while a pool scaled from zero.

Every change to a pool is one ``ScalingDecisionV1`` (``Topics.SCALING_DECISIONS``); a pool's desired size over
time is the ``executors_after`` of its decisions in order (before the first, that one's ``executors_before``).
A request the scheduler held (an ``awaiting_executor`` scheduling decision) counts once, by its final outcome
(``outcomes.final_outcomes``): placed and answered after the cold start, or refused at its deadline.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from din.replay.outcomes import Outcome, is_awaiting
from din.shared.contracts.events import SchedulingDecisionV1
from din.shared.contracts.scaling import ScalingAction, ScalingDecisionV1

ACTIONS = [a.value for a in ScalingAction]


def spread(values: list[float]) -> dict[str, float | int | None]:
    """Count, median and max of ``values`` (ms), for summaries."""
    if not values:
        return {"count": 0, "median_ms": None, "max_ms": None}
    return {"count": len(values), "median_ms": round(statistics.median(values), 3), "max_ms": round(max(values), 3)}


@dataclass
class PoolHistory:
    """One pool's decisions in the window, in time order."""

    site: str
    pool: str
    decisions: list[ScalingDecisionV1] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.site}/{self.pool}"

    @property
    def burst(self) -> bool:
        return any(d.burst for d in self.decisions)

    def actions(self) -> Counter:
        """Decisions by action."""
        return Counter(d.action.value for d in self.decisions)

    def cold_starts(self) -> list[float]:
        """Cold starts of its executors (``started`` records), ms."""
        return [d.cold_start_ms for d in self.decisions
                if d.action is ScalingAction.STARTED and d.cold_start_ms is not None]

    def desired(self, start_ms: float | None = None, end_ms: float | None = None) -> list[tuple[float, float]]:
        """Its desired size as steps ``(epoch ms, executors)``, held from ``start_ms`` to ``end_ms`` when given."""
        if not self.decisions:
            return []
        first = self.decisions[0]
        since = first.at_ms if start_ms is None else min(start_ms, first.at_ms)
        points = [(since, float(first.executors_before))]
        points += [(d.at_ms, float(d.executors_after)) for d in self.decisions]
        if end_ms is not None and end_ms > points[-1][0]:
            points.append((end_ms, points[-1][1]))
        return points

    def summary(self) -> dict[str, object]:
        sizes = [d.executors_after for d in self.decisions]
        return {
            "site": self.site, "pool": self.pool, "burst": self.burst,
            "models": sorted({m for d in self.decisions for m in d.models}),
            "decisions": len(self.decisions), "actions": dict(sorted(self.actions().items())),
            "cold_starts": spread(self.cold_starts()),
            "desired": {"first": self.decisions[0].executors_before, "last": sizes[-1], "max": max(sizes)},
        }


def held_outcome(outcome: Outcome) -> str:
    """How a held request ended, in words: answered, ``<stage>: <reason>``, or no outcome recorded."""
    if outcome.ok:
        return "answered"
    return f"{outcome.stage}: {outcome.code}" if outcome.stage else outcome.code


@dataclass
class ElasticCapacity:
    """The autoscaler's decisions per pool, and the requests held while a pool scaled from zero."""

    pools: dict[str, PoolHistory]
    held: Counter = field(default_factory=Counter)
    """Live requests held awaiting an executor, by final outcome (``held_outcome``)."""
    held_replayed: int = 0
    """Replayed requests held awaiting an executor (left out of ``held``)."""
    held_wait_ms: list[float] = field(default_factory=list)
    """For each held request later placed: from its first ``awaiting_executor`` record to its placement, ms."""

    @property
    def decisions(self) -> list[ScalingDecisionV1]:
        """Every decision, by time."""
        return sorted((d for p in self.pools.values() for d in p.decisions), key=lambda d: d.at_ms)

    def actions(self) -> Counter:
        return sum((p.actions() for p in self.pools.values()), Counter())

    def cold_starts(self) -> list[float]:
        return [ms for p in self.pools.values() for ms in p.cold_starts()]

    def cost_per_hour(self) -> tuple[float, float]:
        """The network's executor cost per hour after the last decision, and the most it reached."""
        decisions = self.decisions
        return decisions[-1].cost_per_hour, max(d.cost_per_hour for d in decisions)

    def desired(self, start_ms: float | None = None, end_ms: float | None = None) -> dict[str, list]:
        """Each pool's desired size over time (``PoolHistory.desired``), by ``site/pool``."""
        return {key: p.desired(start_ms, end_ms) for key, p in sorted(self.pools.items())}

    def summary(self) -> dict[str, object]:
        """The section's figures, for ``din report --json``."""
        last, most = self.cost_per_hour()
        return {
            "pools": {key: p.summary() for key, p in sorted(self.pools.items())},
            "actions": dict(sorted(self.actions().items())),
            "cold_starts": spread(self.cold_starts()),
            "cost_per_hour": {"last": last, "max": most},
            "held_for_executor": {"requests": sum(self.held.values()), "outcomes": dict(sorted(self.held.items())),
                                  "replayed": self.held_replayed, "wait_until_placed": spread(self.held_wait_ms)},
            "decisions": [
                {"at_ms": d.at_ms, "site": d.site, "pool": d.pool, "action": d.action.value, "executor": d.executor,
                 "executors_before": d.executors_before, "executors_after": d.executors_after, "burst": d.burst,
                 "reason": d.reason, "cold_start_ms": d.cold_start_ms, "cost_per_hour": d.cost_per_hour}
                for d in self.decisions],
        }


def held_waits(schedulings: Iterable[SchedulingDecisionV1]) -> list[float]:
    """For each request held awaiting an executor and placed later, the time from its first hold to its first
    placement after it, ms."""
    held: dict[str, float] = {}
    waits: dict[str, float] = {}
    for d in sorted(schedulings, key=lambda d: d.at_ms):
        if is_awaiting(d):
            held.setdefault(d.request_id, d.at_ms)
        elif d.chosen_site is not None and d.request_id in held and d.request_id not in waits:
            waits[d.request_id] = d.at_ms - held[d.request_id]
    return list(waits.values())


def elastic_capacity(scalings: Iterable[ScalingDecisionV1], outcomes: Iterable[Outcome] = (),
                     schedulings: Iterable[SchedulingDecisionV1] = ()) -> ElasticCapacity | None:
    """The window's elastic capacity, or None when the autoscaler recorded nothing in it."""
    pools: dict[str, PoolHistory] = {}
    for d in sorted(scalings, key=lambda d: d.at_ms):
        history = pools.setdefault(f"{d.site}/{d.pool}", PoolHistory(d.site, d.pool))
        history.decisions.append(d)
    if not pools:
        return None
    capacity = ElasticCapacity(pools, held_wait_ms=held_waits(schedulings))
    for o in outcomes:
        if not o.awaited_executor:
            continue
        if o.run is None:
            capacity.held[held_outcome(o)] += o.count
        else:
            capacity.held_replayed += o.count
    return capacity
