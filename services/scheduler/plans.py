"""Multi-stage plans: a job as stages, each placed before the first runs. Pure logic, no NATS.

Two kinds of plan:

* **generation** (``max_tokens``): ``prefill`` runs the model's prefill part over
  the whole prompt and hands the recurrent state on; ``decode`` streams the tokens.
  Decode stays on the prefill executor when that executor serves the decode model
  too (co-located, nothing crosses a link); otherwise it goes to the best decode
  executor (disaggregated), and the state is sealed to that executor's site.
  Both stages keep to the data's allowed sites: the state encodes the prompt.
* **split** (``split``): ``split-head`` runs the head at the data's site and hands
  the intermediate tensor on; ``split-tail`` finishes at the tail's site and
  answers. The tail may run at any site that serves the tenant (only those
  hold the tenant's key, which the intermediate is sealed with). With ``auto`` the split point is chosen per request by
  ``choose_split_point`` from the measured link round trip, each part's measured
  compute and the tail's queue (Neurosurgeon), honouring sovereignty: the raw
  input stays at its allowed sites, only an intermediate leaves, and, when the
  tenant sets ``max_leakage``, only one whose measured leakage (``zoo.inversion``,
  recorded per split point by the zoo) is within it. The choice may be
  ``local`` or ``no-split``: the job then runs whole, at the site chosen.

The scheduler dispatches the first stage; each stage's executor sends its output
to the next stage as the plan says.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from din.services.scheduler.links import LinkTable
from din.services.scheduler.placement import Placement, pick_executor
from din.services.scheduler.registry import ExecutorState
from din.services.scheduler.split_point import (
    LOCAL,
    NO_SPLIT,
    LinkEstimate,
    SplitCandidate,
    SplitContext,
    choose_split_point,
)
from din.shared.catalog import ModelCatalog
from din.shared.contracts.job import JobV1, StageKind, StageV1
from din.shared.errors import DinError, ErrorCode
from din.shared.security import serving_sites
from din.shared.topology import PathType, Topology

SPLIT_AUTO = "auto"
SPLIT_NONE = "none"
BANDWIDTH_MBPS = {PathType.DEDICATED: 1000.0, PathType.VPN: 200.0, PathType.INTERNET: 50.0}
DEFAULT_BANDWIDTH_MBPS = 1000.0
OUTPUT_BYTES_PER_ITEM = 48.0

Placer = Callable[[str, list[str] | None], Placement]
"""Places one stage: (model, allowed sites or None) -> the best executor, or raises ``DinError``."""


@dataclass
class Plan:
    """Where a job's stages run: the stages (empty when the job runs whole), the first stage's placement, why."""

    stages: list[StageV1]
    first: Placement
    reason: str
    split_point: str | None = None


def is_multi_stage(job: JobV1) -> bool:
    """Whether the job needs a plan: generation, or split inference not switched off."""
    return job.max_tokens is not None or (job.split is not None and job.split != SPLIT_NONE)


def _allowed(job: JobV1) -> list[str] | None:
    workload = job.workload
    return list(workload.allowed_sites) if workload and workload.allowed_sites else None


def _stage(kind: StageKind, placement: Placement, sites: list[str] | None, output: str, *,
           queue_at_site: bool) -> StageV1:
    return StageV1(
        kind=kind, model=placement.model, sites=sites, site=placement.executor.site,
        executor=None if queue_at_site else placement.executor.id, output=output,
        predicted_ms=round(placement.predicted_ms, 3),
    )


def plan_generation(job: JobV1, catalog: ModelCatalog, place: Placer, *, queue_at_site: bool) -> Plan:
    """Prefill then decode, both at the data's allowed sites; decode co-located when the prefill executor can."""
    entry = catalog.get(job.model)
    if entry is None or entry.prefill_model is None:
        raise DinError(ErrorCode.BAD_REQUEST, f"model {job.model!r} has no prefill part")
    sites = _allowed(job)
    prefill = place(entry.prefill_model, sites)
    serves_decode = any(m.name == job.model for m in prefill.executor.heartbeat.models)
    if serves_decode:
        decode = Placement(prefill.executor, job.model, prefill.predicted_ms, False,
                           "co-located with prefill", [])
        how = f"co-located on {prefill.executor.id}"
    else:
        decode = place(job.model, sites)
        how = f"disaggregated: prefill on {prefill.executor.id}, decode on {decode.executor.id}"
    stages = [
        _stage(StageKind.PREFILL, prefill, sites, "state", queue_at_site=queue_at_site),
        _stage(StageKind.DECODE, decode, sites, "stream", queue_at_site=queue_at_site),
    ]
    return Plan(stages, prefill, f"generation {how}")


def _compute_ms(state: ExecutorState, model: str) -> float:
    return next(m.compute_ms_per_item for m in state.heartbeat.models if m.name == model)


def _try(place: Placer, model: str, sites: list[str] | None) -> Placement | None:
    try:
        return place(model, sites)
    except DinError:
        return None


def _link(links: LinkTable, topology: Topology, data_site: str, tail_site: str) -> LinkEstimate:
    """Data site to tail site: the measured round trips through the hub (where leaf traffic meets) and the path's
    nominal bandwidth."""
    rtt = 0.0 if data_site == tail_site else links.rtt_ms(data_site) + links.rtt_ms(tail_site)
    path = topology.path_between(data_site, tail_site)
    return LinkEstimate(rtt_ms=rtt, bandwidth_mbps=BANDWIDTH_MBPS.get(path, DEFAULT_BANDWIDTH_MBPS))


def plan_split(job: JobV1, catalog: ModelCatalog, place: Placer, links: LinkTable, topology: Topology, *,
               queue_at_site: bool) -> Plan:
    """Head at the data's site and tail elsewhere, at a forced split point or the best one for this request."""
    parts = catalog.split_parts(job.model)
    if not parts:
        raise DinError(ErrorCode.BAD_REQUEST, f"model {job.model!r} has no split points")
    sites = _allowed(job)
    tail_sites = serving_sites(topology, job.tenant)
    limit = next(t.max_leakage for t in topology.tenants if t.name == job.tenant)
    if job.split != SPLIT_AUTO:
        if job.split not in parts:
            raise DinError(ErrorCode.BAD_REQUEST, f"model {job.model!r} cannot be cut at {job.split!r}: split "
                                                  f"points are {', '.join(parts)}")
        head_model, tail_model = parts[job.split]
        head, tail = place(head_model, sites), place(tail_model, tail_sites)
        leakage = catalog.get(head_model).leakage
        if limit is not None and head.executor.site != tail.executor.site and (leakage is None or leakage > limit):
            measured = "is not measured" if leakage is None else f"gives away {leakage:.3f} of the input's variance"
            raise DinError(ErrorCode.BAD_REQUEST, f"split point {job.split!r} {measured} to an inversion attack; "
                                                  f"tenant {job.tenant!r} allows at most {limit:.3f}")
        return _split_plan(job.split, head, tail, sites, tail_sites, f"split at {job.split} as asked",
                           queue_at_site=queue_at_site)

    heads = {p: _try(place, head, sites) for p, (head, _) in parts.items()}
    tails = {p: _try(place, tail, tail_sites) for p, (_, tail) in parts.items()}
    local = _try(place, job.model, sites)
    anywhere = _try(place, job.model, tail_sites)
    anchor = local or next((h for h in heads.values() if h is not None), None)
    if anchor is None:
        raise DinError(ErrorCode.NO_ELIGIBLE_EXECUTOR,
                       f"no executor at a site this request may use serves {job.model} or a head part of it")
    data_site = anchor.executor.site
    tail_choice = anywhere or next((t for t in tails.values() if t is not None), anchor)
    tail_site = tail_choice.executor.site
    candidates = []
    for point, (head_model, tail_model) in parts.items():
        head, tail = heads[point], tails[point]
        if head is None or tail is None or head.executor.site != data_site or tail.executor.site != tail_site:
            continue
        size = catalog.get(head_model).intermediate_bytes or 0.0
        candidates.append(SplitCandidate(point, float(size), _compute_ms(head.executor, head_model),
                                         _compute_ms(tail.executor, tail_model), catalog.get(head_model).leakage))
    tail_per_item = _compute_ms(tail_choice.executor, tail_choice.model) if tail_choice.model == job.model else None
    entry = catalog.get(job.model)
    context = SplitContext(
        data_site=data_site,
        tail_site=tail_site,
        link=_link(links, topology, data_site, tail_site),
        input_bytes=float(entry.input_bytes or 0.0),
        output_bytes=OUTPUT_BYTES_PER_ITEM,
        full_ms_at_data=_compute_ms(local.executor, job.model) if local and local.executor.site == data_site else None,
        full_ms_at_tail=tail_per_item if anywhere and anywhere.executor.site == tail_site else None,
        allowed_sites=sites,
        max_leakage=limit,
        tail_queue_ms=max(0.0, tail_choice.predicted_ms - links.rtt_ms(tail_site)
                          - _compute_ms(tail_choice.executor, tail_choice.model)),
    )
    decision = choose_split_point(candidates, context)
    if decision.point == LOCAL:
        return Plan([], local, decision.reason, LOCAL)
    if decision.point == NO_SPLIT:
        return Plan([], anywhere, decision.reason, NO_SPLIT)
    return _split_plan(decision.point, heads[decision.point], tails[decision.point], sites, tail_sites,
                       decision.reason,
                       queue_at_site=queue_at_site)


def _split_plan(point: str, head: Placement, tail: Placement, sites: list[str] | None, tail_sites: list[str],
                reason: str, *, queue_at_site: bool) -> Plan:
    stages = [
        _stage(StageKind.SPLIT_HEAD, head, sites, point, queue_at_site=queue_at_site),
        _stage(StageKind.SPLIT_TAIL, tail, tail_sites, "answer", queue_at_site=queue_at_site),
    ]
    return Plan(stages, head, reason, point)


def make_plan(job: JobV1, catalog: ModelCatalog, place: Placer, links: LinkTable, topology: Topology, *,
              queue_at_site: bool) -> Plan:
    """The plan of a multi-stage job (see ``is_multi_stage``)."""
    if job.max_tokens is not None:
        return plan_generation(job, catalog, place, queue_at_site=queue_at_site)
    return plan_split(job, catalog, place, links, topology, queue_at_site=queue_at_site)


def stage_placer(job: JobV1, executors: list[ExecutorState], links: LinkTable, topology: Topology, now_ms: float,
                 cost_limits: dict[str, float | None], *, queue_at_site: bool,
                 rng: random.Random | None = None) -> Placer:
    """Places each stage of ``job`` as ``pick_executor`` places a copy of the job for the stage's model (any
    version) and sites."""

    def place_stage(model: str, sites: list[str] | None) -> Placement:
        workload = job.workload.model_copy(update={"candidates": [model], "allowed_sites": sites}) \
            if job.workload else None
        stage_job = job.model_copy(update={"model": model, "model_version": None, "workload": workload})
        return pick_executor(stage_job, executors, links, topology, now_ms, cost_limits, queue_at_site=queue_at_site,
                             rng=rng)

    return place_stage


def place_job(job: JobV1, catalog: ModelCatalog, executors: list[ExecutorState], links: LinkTable,
              topology: Topology, now_ms: float, cost_limits: dict[str, float | None], *,
              queue_at_site: bool) -> Placement:
    """The job's (first stage's) placement; a multi-stage job gets its whole plan in ``job.plan`` (and its split
    point in ``job.split_chosen``), or ``DinError`` when it cannot run."""
    if not is_multi_stage(job):
        return pick_executor(job, executors, links, topology, now_ms, cost_limits, queue_at_site=queue_at_site)
    placer = stage_placer(job, executors, links, topology, now_ms, cost_limits, queue_at_site=queue_at_site)
    plan = make_plan(job, catalog, placer, links, topology, queue_at_site=queue_at_site)
    job.plan, job.stage = plan.stages, 0
    job.split_chosen = plan.split_point
    plan.first.reason = plan.reason
    return plan.first
