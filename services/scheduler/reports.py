"""What the scheduler reports: the decision record of each placement, and the network's load for admission.

Pure builders of ``SchedulingDecisionV1`` and ``PressureV1``; no NATS, no Kafka.
"""

from __future__ import annotations

from collections.abc import Iterable

from services.scheduler.links import LinkTable
from services.scheduler.placement import Placement
from services.scheduler.registry import ExecutorState
from shared.contracts.events import AlternativeV1, PressureV1, SchedulingDecisionV1
from shared.contracts.job import JobV1


def decision_record(job: JobV1, placement: Placement | None, reason: str, *, mode: str, centralized: bool,
                    now_ms: float, alternatives: Iterable[AlternativeV1] = ()) -> SchedulingDecisionV1:
    """Where ``job`` went and why, or (``placement`` None) the reason it was refused."""
    return SchedulingDecisionV1(
        request_id=job.request_id,
        tenant=job.tenant,
        mode=mode,
        sla_class=job.sla_class,
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
    )


def pressure_report(live: list[ExecutorState], links: LinkTable, inflight: int, now_ms: float) -> PressureV1:
    """The load admission sheds on: jobs in flight, the live executors' capacity, and the fastest predicted
    answer (link round trip plus the quickest model's compute) any of them could give."""
    fastest = min(
        (links.rtt_ms(s.site) + min(m.compute_ms_per_item for m in s.heartbeat.models) for s in live
         if s.heartbeat.models),
        default=0.0,
    )
    return PressureV1(
        inflight=inflight,
        capacity=sum(s.heartbeat.capacity for s in live),
        fastest_ms=round(fastest, 3),
        executors=len(live),
        at_ms=now_ms,
    )
