"""Choosing where a job runs: the lowest predicted completion time under hard constraints.

Predicted completion = network (round trip to the executor's site)
+ queueing (jobs ahead of this SLA class times compute per item, which the
executor reports per model from its recent batches) + compute. Hard constraints:
the data's allowed sites (sovereignty), the deadline, the tenant's cost limit,
executor capacity. The requested model is
preferred; a listed smaller variant answers only when no executor of the
requested one can meet the deadline or all are full (graceful degradation).
Pure logic: usable offline for what-if analysis.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from services.scheduler.links import LinkTable
from services.scheduler.registry import ExecutorState
from shared.contracts.events import AlternativeV1
from shared.contracts.job import JobV1
from shared.errors import DinError, ErrorCode
from shared.topology import Topology

NEAR_TIE = 0.1
NEAR_TIE_MS = 0.05
_RNG = random.Random()


@dataclass
class Placement:
    """A chosen executor and model, with its prediction and the alternatives considered."""

    executor: ExecutorState
    model: str
    predicted_ms: float
    degraded: bool
    reason: str
    alternatives: list[AlternativeV1]


def predict_ms(state: ExecutorState, model: str, job: JobV1, links: LinkTable) -> float:
    loaded = next(m for m in state.heartbeat.models if m.name == model)
    per_item = max(loaded.compute_ms_per_item, 0.01)
    ahead = state.queued(job.sla_class) + state.heartbeat.inflight
    return links.rtt_ms(state.site) + ahead * per_item + per_item


def spread(feasible: list[tuple[float, ExecutorState]], rng: random.Random) -> tuple[float, ExecutorState]:
    """The best prediction, spreading load among near-ties: within ``NEAR_TIE`` of the best, the least loaded
    executor wins, and equally loaded ones are picked at random, so a new executor gets work at once."""
    fastest = min(predicted for predicted, _ in feasible)
    near = [(p, s) for p, s in feasible if p <= fastest * (1 + NEAR_TIE) + NEAR_TIE_MS]
    lightest = min(s.load() for _, s in near)
    return rng.choice([(p, s) for p, s in near if s.load() == lightest])


def pick_executor(
    job: JobV1,
    executors: list[ExecutorState],
    links: LinkTable,
    topology: Topology,
    now_ms: float,
    cost_limits: dict[str, float | None],
    *,
    queue_at_site: bool = False,
    rng: random.Random | None = None,
) -> Placement:
    """Choose an executor and model variant for ``job`` or raise ``DinError`` saying why none fits.

    With ``queue_at_site`` (distributed mode) a job waits in its site's work queue until an executor has
    room, so a full executor is not excluded; its backlog only lengthens the predicted completion.
    """
    workload = job.workload
    candidates = workload.candidates if workload else [job.model]
    allowed = set(workload.allowed_sites) if workload and workload.allowed_sites else None
    cost_limit = cost_limits.get(job.tenant)
    budget_ms = job.deadline_ms - now_ms
    alternatives: list[AlternativeV1] = []
    refusals: set[str] = set()

    for rank, model in enumerate(candidates):
        feasible: list[tuple[float, ExecutorState]] = []
        for state in executors:
            if not any(m.name == model and (job.model_version in (None, m.version)) for m in state.heartbeat.models):
                continue
            excluded = None
            predicted = None
            if state.id in job.avoid:
                excluded = "gave_back"
            elif allowed is not None and state.site not in allowed:
                excluded = "sovereignty"
            elif cost_limit is not None and topology.site(state.site).cost_per_1k > cost_limit:
                excluded = "cost"
            elif not queue_at_site and state.load() >= state.capacity_for(job.sla_class):
                excluded = "capacity"
            else:
                predicted = predict_ms(state, model, job, links)
                if predicted > budget_ms:
                    excluded = "deadline"
            alternatives.append(
                AlternativeV1(
                    executor=state.id,
                    site=state.site,
                    model=model,
                    predicted_ms=None if predicted is None else round(predicted, 3),
                    excluded_by=excluded,
                )
            )
            if excluded:
                refusals.add(excluded)
                continue
            feasible.append((predicted, state))
        if feasible:
            best = spread(feasible, rng or _RNG)
            reason = "lowest predicted completion"
            if rank > 0:
                reason = f"degraded: {candidates[0]} cannot meet the deadline or is saturated"
            return Placement(best[1], model, best[0], rank > 0, reason, alternatives)

    if not alternatives:
        raise DinError(ErrorCode.NO_ELIGIBLE_EXECUTOR, f"no live executor serves {job.model}", retry_after_ms=1000)
    if refusals <= {"sovereignty", "cost"}:
        raise DinError(
            ErrorCode.NO_ELIGIBLE_EXECUTOR,
            f"no executor of {job.model} at a site this request may use ({', '.join(sorted(refusals))})",
        )
    if refusals & {"capacity", "gave_back"} and "deadline" not in refusals:
        raise DinError(ErrorCode.OVERLOADED, f"every executor of {job.model} is full", retry_after_ms=50)
    raise DinError(
        ErrorCode.DEADLINE_EXCEEDED,
        f"no executor can answer within the {budget_ms:.0f} ms left before the deadline",
    )


def assign(job: JobV1, placement: Placement, *, centralized: bool, now_ms: float) -> None:
    """Write ``placement`` into ``job``: its model and site, its executor in centralized mode (a site's queue
    otherwise), and the time it was scheduled."""
    job.model_chosen = placement.model
    job.site_chosen = placement.executor.site
    job.executor_chosen = placement.executor.id if centralized else None
    job.stamps_ms["scheduled"] = now_ms
