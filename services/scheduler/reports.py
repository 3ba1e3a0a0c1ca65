"""What the scheduler reports: the decision record of each placement, and the network's load for admission.

Pure builders of ``SchedulingDecisionV1`` and ``PressureV1``; no NATS, no Kafka.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from din.services.scheduler.links import LinkTable
from din.services.scheduler.placement import Placement
from din.services.scheduler.registry import ExecutorState
from din.shared.contracts.events import AlternativeV1, PressureV1, SchedulingDecisionV1
from din.shared.contracts.job import JobV1


def decision_record(job: JobV1, placement: Placement | None, reason: str, *, mode: str, centralized: bool,
                    now_ms: float, alternatives: Iterable[AlternativeV1] = (), scheduler_site: str | None = None,
                    links: LinkTable | None = None, forwarded_to: str | None = None) -> SchedulingDecisionV1:
    """Where ``job`` went and why, or (``placement`` None) the reason it was refused or the site it was forwarded
    to; with the facts the scheduler at ``scheduler_site`` decided on (the round trips ``links`` priced), so an
    offline what-if can decide as it did."""
    return SchedulingDecisionV1(
        request_id=job.request_id,
        tenant=job.tenant,
        mode=mode,
        sla_class=job.sla_class,
        model=job.model,
        chosen_executor=placement.executor.id if placement and centralized else None,
        chosen_site=placement.executor.site if placement else None,
        chosen_model=placement.model if placement else None,
        degraded=placement.degraded if placement else False,
        predicted_ms=round(placement.predicted_ms, 3) if placement else None,
        reason=reason,
        alternatives=list(placement.alternatives if placement else alternatives),
        counts=placement.counts if placement else None,
        attempt=job.attempt,
        at_ms=now_ms,
        plan=job.plan,
        scheduler_site=scheduler_site,
        link_rtt_ms=links.priced_rtts() if links is not None else {},
        forwarded_to=forwarded_to,
    )


WAITING_TIMINGS = ("admission", "classify", "schedule", "queue")
"""The parts of a completion's ``timings_ms`` spent before compute."""


class ServiceMeter:
    """The rate jobs complete at and how long they waited before compute, over a sliding ``window_ms``."""

    def __init__(self, window_ms: float = 1_000.0, most: int = 100_000) -> None:
        self.window_ms = window_ms
        self._done: deque[tuple[float, float]] = deque(maxlen=most)

    def note(self, now_ms: float, timings_ms: dict[str, float]) -> None:
        """A job closed at ``now_ms`` with its completion's latency breakdown."""
        self._done.append((now_ms, max(0.0, sum(timings_ms.get(part, 0.0) for part in WAITING_TIMINGS))))

    def read(self, now_ms: float) -> tuple[float, float]:
        """(completions per second, mean wait before compute, ms) over the window ending at ``now_ms``."""
        while self._done and self._done[0][0] < now_ms - self.window_ms:
            self._done.popleft()
        if not self._done:
            return 0.0, 0.0
        return len(self._done) * 1000.0 / self.window_ms, sum(s for _, s in self._done) / len(self._done)


def pressure_report(live: list[ExecutorState], links: LinkTable, inflight: int, now_ms: float, *,
                    queued: int = 0, meter: ServiceMeter | None = None) -> PressureV1:
    """The load admission sheds on: jobs in flight and waiting at the scheduler, the live executors' capacity,
    the rate jobs complete at and how long they waited, and the fastest predicted answer (link round trip plus the
    quickest model's compute) any of them could give."""
    fastest = min(
        (links.rtt_ms(s.site) + min(m.compute_ms_per_item for m in s.heartbeat.models) for s in live
         if s.heartbeat.models),
        default=0.0,
    )
    rate, waited = meter.read(now_ms) if meter is not None else (0.0, 0.0)
    return PressureV1(
        inflight=inflight,
        capacity=sum(s.heartbeat.capacity for s in live),
        fastest_ms=round(fastest, 3),
        executors=len(live),
        at_ms=now_ms,
        queued=queued,
        completed_per_s=round(rate, 3),
        waited_ms=round(waited, 3),
    )
