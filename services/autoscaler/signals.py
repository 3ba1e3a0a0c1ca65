"""What the autoscaler sees of the traffic: a sliding window over the completions and refusals Kafka holds.

``TrafficWindow`` is fed one event at a time (pure, no Kafka here) and answers, for the models of a pool at a
site, the figures its policy acts on (``PoolSignalsV1``): completions per second, how many executors' worth of
compute they took, the mean wait in the executors' queues, and refusals for want of capacity.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from din.shared.contracts.events import AdmissionDecisionV1, CompletionV1, SchedulingDecisionV1
from din.shared.contracts.scaling import AWAITING_EXECUTOR, PoolSignalsV1
from din.shared.errors import ErrorCode

CAPACITY_REFUSALS = frozenset({ErrorCode.OVERLOADED.value, ErrorCode.NO_ELIGIBLE_EXECUTOR.value, AWAITING_EXECUTOR})
"""Refusals that say the network lacked capacity for a request (not that the request was wrong), and the
scheduler holding a job while a pool scales from zero."""


@dataclass(frozen=True)
class _Done:
    at_s: float
    busy_ms: float
    queue_ms: float


class TrafficWindow:
    """The last ``window_s`` seconds of completions per (site, model) and refusals per model."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._done: dict[tuple[str, str], deque[_Done]] = {}
        self._refused: dict[str, deque[tuple[float, int]]] = {}
        self._last: dict[tuple[str, str] | str, float] = {}

    def completion(self, event: CompletionV1, at_s: float) -> None:
        """Count one completion (its share of its batch's compute, by rows, is its busy time)."""
        compute = event.timings_ms.get("compute", 0.0)
        share = (event.items or 1) / max(1, event.batch_size)
        done = _Done(at_s, compute * min(1.0, share), event.timings_ms.get("queue", 0.0))
        key = (event.site, event.model)
        self._done.setdefault(key, deque()).append(done)
        self._last[key] = max(self._last.get(key, at_s), at_s)

    def admission(self, decision: AdmissionDecisionV1, at_s: float) -> None:
        """Count admission's refusals for want of capacity (a shed record stands for ``count`` requests)."""
        if not decision.admitted and decision.reason in CAPACITY_REFUSALS:
            self._refuse(decision.model, decision.count, at_s)

    def scheduling(self, decision: SchedulingDecisionV1, at_s: float) -> None:
        """Count a placement refused for want of capacity (no eligible executor, all full)."""
        if decision.chosen_site is None and decision.forwarded_to is None and decision.reason in CAPACITY_REFUSALS:
            self._refuse(decision.model, 1, at_s)

    def _refuse(self, model: str | None, count: int, at_s: float) -> None:
        if not model:
            return
        self._refused.setdefault(model, deque()).append((at_s, count))
        self._last[model] = max(self._last.get(model, at_s), at_s)

    def _trim(self, now_s: float) -> None:
        start = now_s - self.window_s
        for done in self._done.values():
            while done and done[0].at_s < start:
                done.popleft()
        for refused in self._refused.values():
            while refused and refused[0][0] < start:
                refused.popleft()

    def signals(self, site: str, models: Iterable[str], executors: int, now_s: float) -> PoolSignalsV1:
        """The figures of ``models`` at ``site`` over the window (``executors``: how many serve them there)."""
        self._trim(now_s)
        models = list(models)
        done = [d for m in models for d in self._done.get((site, m), ())]
        refused = sum(count for m in models for _, count in self._refused.get(m, ()))
        seen = [self._last[k] for k in [*((site, m) for m in models), *models] if k in self._last]
        span = self.window_s
        return PoolSignalsV1(
            completions_per_s=round(len(done) / span, 3),
            busy=round(sum(d.busy_ms for d in done) / (span * 1000.0), 4),
            executors=executors,
            queue_wait_ms=round(sum(d.queue_ms for d in done) / len(done), 3) if done else 0.0,
            refused_per_s=round(refused / span, 3),
            idle_s=round(max(0.0, now_s - max(seen)), 3) if seen else None,
        )
