"""Benchmark: what one placement and one heartbeat cost as the fleet grows, the indexed scheduler against a scan.

In-process, no broker. For each fleet size (default 100, 1,000, 10,000 and
100,000 executors over 10 sites, 3 models, each executor serving one model with
its own compute per item, random queues per SLA class and in-flight work):

* ``placement``: microseconds per ``pick_executor`` over the registry (pools
  by model and site, bounded search) against ``scan_all_reference``, a copy of the
  placement before the index that evaluates every executor; the jobs are a mix of
  models, SLA classes, sovereign (one allowed site) and cost-limited tenants.
* ``agreement``: for each measured job, whether the indexed choice's prediction
  lies within the near-tie band of the scan's best (the scan itself picks at random
  within that band), and whether both refused with the same error code.
* ``record``: bytes of the decision record (JSON) each writes per request.
* ``heartbeat``: microseconds per ``ExecutorRegistry.observe`` of a heartbeat whose
  load changed (the usual one), of one whose model set changed, and with the
  JSON decode of the heartbeat included (what the handler pays); and
  ``note_dispatch`` and a watchdog ``expire`` tick with nothing due.

Writes ``placement.json`` and ``placement.md`` to ``bench/results/`` (or ``--out``).

    din bench-placement [--sizes 100,1000,10000,100000] [--sites 10] [--jobs 2000]
"""

from __future__ import annotations

import json
import platform
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from din.services.scheduler.links import LinkTable
from din.services.scheduler.placement import NEAR_TIE, NEAR_TIE_MS, Placement, pick_executor, spread
from din.services.scheduler.registry import ExecutorRegistry, ExecutorState
from din.services.scheduler.reports import decision_record
from din.shared.contracts.events import AlternativeV1, HeartbeatV1, ModelLoadedV1
from din.shared.contracts.inference import SlaClass
from din.shared.contracts.job import JobV1, WorkloadClassV1
from din.shared.errors import DinError, ErrorCode
from din.shared.topology import Topology

MODELS = ("digits-large", "digits-small", "charlm")
NOW_MS = 1_000_000.0
DEFAULT_SIZES = (100, 1_000, 10_000, 100_000)
REFERENCE_BUDGET_S = 2.0
"""Wall time the scan reference may spend per fleet size (it measures fewer jobs at large fleets)."""


def scan_all_reference(job: JobV1, executors: list[ExecutorState], links: LinkTable, topology: Topology,
                       now_ms: float, cost_limits: dict[str, float | None], *, queue_at_site: bool = False,
                       rng: random.Random | None = None) -> Placement:
    """The placement before the index (kept here only to compare against): every executor evaluated and listed."""
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
                loaded = next(m for m in state.heartbeat.models if m.name == model)
                per_item = max(loaded.compute_ms_per_item, 0.01)
                ahead = state.queued(job.sla_class) + state.heartbeat.inflight
                predicted = links.rtt_ms(state.site) + ahead * per_item + per_item
                if predicted > budget_ms:
                    excluded = "deadline"
            alternatives.append(AlternativeV1(executor=state.id, site=state.site, model=model,
                                              predicted_ms=None if predicted is None else round(predicted, 3),
                                              excluded_by=excluded))
            if excluded:
                refusals.add(excluded)
                continue
            feasible.append((predicted, state))
        if feasible:
            best = spread(feasible, rng or random.Random())
            return Placement(best[1], model, best[0], rank > 0, "lowest predicted completion", alternatives)
    if not alternatives:
        raise DinError(ErrorCode.NO_ELIGIBLE_EXECUTOR, "no live executor")
    if refusals <= {"sovereignty", "cost"}:
        raise DinError(ErrorCode.NO_ELIGIBLE_EXECUTOR, "no allowed site")
    if refusals & {"capacity", "gave_back"} and "deadline" not in refusals:
        raise DinError(ErrorCode.OVERLOADED, "full")
    raise DinError(ErrorCode.DEADLINE_EXCEEDED, "too late")


def fleet_topology(sites: int) -> Topology:
    """A hub and ``sites - 1`` edges, edges cheaper than the hub."""
    names = [f"site{i}" for i in range(sites)]
    return Topology.model_validate({
        "name": "bench",
        "sites": [{"name": n, "role": "hub" if i == 0 else "edge", "cost_per_1k": 1.0 if i == 0 else 0.2 + 0.1 * i}
                  for i, n in enumerate(names)],
        "links": [{"between": [names[0], n], "path": "vpn"} for n in names[1:]],
        "tenants": [{"name": "acme"}, {"name": "thrifty", "max_cost_per_1k": 0.6}],
    })


def heartbeat(index: int, site: str, rng: random.Random, *, model: str | None = None) -> HeartbeatV1:
    """Executor ``index``'s heartbeat: one model, its own speed, a random backlog."""
    return HeartbeatV1(
        executor=f"ex{index}", site=site,
        models=[ModelLoadedV1(name=model or MODELS[index % len(MODELS)], version="1", max_batch_size=32,
                              compute_ms_per_item=rng.uniform(0.5, 2.0))],
        capacity=64,
        queue_depth={c.value: rng.randrange(0, 12) for c in SlaClass},
        inflight=rng.randrange(0, 4), recent_latency_ms=5.0, interval_s=1.0, sent_ms=NOW_MS,
    )


def fleet_job(index: int, topology: Topology, rng: random.Random) -> JobV1:
    """A job: a random model (the large digits one degrades to the small), class, tenant; 1 in 5 sovereign."""
    model = rng.choice(MODELS)
    sla = rng.choice(list(SlaClass))
    allowed = [rng.choice(topology.sites).name] if rng.random() < 0.2 else None
    return JobV1(
        request_id=f"r{index}", tenant=rng.choice(["acme", "thrifty"]), model=model, sla_class=sla,
        deadline_ms=int(NOW_MS + rng.choice([60.0, 200.0, 2_000.0])), reply_to="_INBOX.x",
        content_type="application/json", received_ms=NOW_MS,
        workload=WorkloadClassV1(
            task="t", sla_class=sla, input_bytes=300, size_class="small", sensitive=allowed is not None,
            allowed_sites=allowed,
            candidates=[model, "digits-small"] if model == "digits-large" else [model]),
    )


def _outcome(place: Callable[..., Placement], *args, **kwargs) -> tuple[Placement | None, str | None]:
    try:
        return place(*args, **kwargs), None
    except DinError as error:
        return None, error.code.value


def _mean_us(samples: list[float]) -> float:
    return round(statistics.fmean(samples) * 1e6, 2) if samples else 0.0


@dataclass
class SizeResult:
    """One fleet size's figures."""

    executors: int
    sites: int
    new_placement_us: float
    new_placement_p50_us: float
    new_placement_p99_us: float
    reference_placement_us: float | None
    reference_jobs: int
    speedup: float | None
    agreement: float
    agreement_of: int
    new_considered_mean: float
    new_record_bytes: float
    reference_record_bytes: float | None
    heartbeat_same_models_us: float
    heartbeat_models_changed_us: float
    heartbeat_with_decode_us: float
    note_dispatch_us: float
    expire_tick_us: float
    refusals: dict[str, int] = field(default_factory=dict)


def _agrees(mine: tuple[Placement | None, str | None], scan: tuple[Placement | None, str | None],
            scan_best_ms: float | None) -> bool:
    if mine[0] is None or scan[0] is None:
        return mine[1] == scan[1]
    return mine[0].model == scan[0].model and mine[0].predicted_ms <= scan_best_ms * (1 + NEAR_TIE) + NEAR_TIE_MS


def _scan_best_ms(placement: Placement | None) -> float | None:
    if placement is None:
        return None
    return min(a.predicted_ms for a in placement.alternatives
               if a.excluded_by is None and a.model == placement.model)


def measure_size(executors: int, sites: int, jobs: int, seed: int = 1) -> SizeResult:
    """All figures for one fleet of ``executors`` over ``sites`` sites."""
    rng = random.Random(seed)
    topology = fleet_topology(sites)
    links = LinkTable(topology, home="site0")
    for i, site in enumerate(topology.sites[1:], start=1):
        links.observe_rtt(site.name, 2.0 + 4.0 * i)
    registry = ExecutorRegistry(rng=random.Random(seed))
    beats = [heartbeat(i, topology.sites[i % sites].name, rng) for i in range(executors)]
    for hb in beats:
        registry.observe(hb, now=0.0)
    cost_limits = {t.name: t.max_cost_per_1k for t in topology.tenants}
    job_list = [fleet_job(i, topology, rng) for i in range(jobs)]
    placer_rng = random.Random(seed)

    new_times, new_outcomes, considered = [], [], []
    refusals: dict[str, int] = {}
    for job in job_list:
        started = time.perf_counter()
        outcome = _outcome(pick_executor, job, registry, links, topology, NOW_MS, cost_limits, rng=placer_rng)
        new_times.append(time.perf_counter() - started)
        new_outcomes.append(outcome)
        if outcome[0] is not None:
            considered.append(outcome[0].counts.considered)
        else:
            refusals[outcome[1]] = refusals.get(outcome[1], 0) + 1

    live = registry.live()
    ref_times, agree = [], 0
    ref_bytes, new_bytes = [], []
    spent = 0.0
    for job, mine in zip(job_list, new_outcomes):
        if spent > REFERENCE_BUDGET_S and len(ref_times) >= 3:
            break
        started = time.perf_counter()
        scan = _outcome(scan_all_reference, job, live, links, topology, NOW_MS, cost_limits, rng=placer_rng)
        elapsed = time.perf_counter() - started
        spent += elapsed
        ref_times.append(elapsed)
        agree += _agrees(mine, scan, _scan_best_ms(scan[0]))
        if scan[0] is not None and mine[0] is not None:
            ref_bytes.append(len(decision_record(job, scan[0], "x", mode="centralized", centralized=True,
                                                 now_ms=NOW_MS).model_dump_json()))
            new_bytes.append(len(decision_record(job, mine[0], "x", mode="centralized", centralized=True,
                                                 now_ms=NOW_MS).model_dump_json()))

    heartbeats = _heartbeat_costs(registry, beats, topology, rng)
    new_us = _mean_us(new_times)
    ref_us = _mean_us(ref_times) if ref_times else None
    ordered = sorted(new_times)
    return SizeResult(
        executors=executors, sites=sites, new_placement_us=new_us,
        new_placement_p50_us=round(ordered[len(ordered) // 2] * 1e6, 2),
        new_placement_p99_us=round(ordered[int(0.99 * (len(ordered) - 1))] * 1e6, 2),
        reference_placement_us=ref_us, reference_jobs=len(ref_times),
        speedup=round(ref_us / new_us, 1) if ref_us and new_us else None,
        agreement=round(agree / len(ref_times), 4) if ref_times else 0.0, agreement_of=len(ref_times),
        new_considered_mean=round(statistics.fmean(considered), 1) if considered else 0.0,
        new_record_bytes=round(statistics.fmean(new_bytes)) if new_bytes else 0.0,
        reference_record_bytes=round(statistics.fmean(ref_bytes)) if ref_bytes else None,
        refusals=refusals, **heartbeats,
    )


def _heartbeat_costs(registry: ExecutorRegistry, beats: list[HeartbeatV1], topology: Topology,
                     rng: random.Random, samples: int = 2_000) -> dict[str, float]:
    picks = [rng.randrange(len(beats)) for _ in range(samples)]
    fresh = [beats[i].model_copy(update={"inflight": rng.randrange(0, 4),
                                         "queue_depth": {c.value: rng.randrange(0, 12) for c in SlaClass}})
             for i in picks]
    same = []
    for hb in fresh:
        started = time.perf_counter()
        registry.observe(hb, now=1.0)
        same.append(time.perf_counter() - started)
    others = [beats[rng.randrange(len(beats))] for _ in range(samples)]
    encoded = [hb.model_copy(update={"inflight": rng.randrange(0, 4)}).model_dump_json().encode() for hb in others]
    decoded = []
    for raw in encoded:
        started = time.perf_counter()
        registry.observe(HeartbeatV1.model_validate_json(raw), now=2.0)
        decoded.append(time.perf_counter() - started)
    changed = []
    for i in picks[: samples // 4]:
        hb = beats[i].model_copy(update={"models": [m.model_copy(update={"name": MODELS[(i + 1) % len(MODELS)]})
                                                    for m in beats[i].models]})
        started = time.perf_counter()
        registry.observe(hb, now=3.0)
        changed.append(time.perf_counter() - started)
        registry.observe(beats[i], now=3.0)
    dispatches = []
    for i in picks:
        started = time.perf_counter()
        registry.note_dispatch(f"ex{i}", SlaClass.INTERACTIVE)
        dispatches.append(time.perf_counter() - started)
    ticks = []
    for _ in range(200):
        started = time.perf_counter()
        registry.expire(now=0.5)
        ticks.append(time.perf_counter() - started)
    return {
        "heartbeat_same_models_us": _mean_us(same),
        "heartbeat_models_changed_us": _mean_us(changed),
        "heartbeat_with_decode_us": _mean_us(decoded),
        "note_dispatch_us": _mean_us(dispatches),
        "expire_tick_us": _mean_us(ticks),
    }


@dataclass
class PlacementReport:
    """Every fleet size's figures, with the machine they were measured on."""

    sizes: list[SizeResult]
    jobs: int
    machine: str = field(default_factory=lambda: f"{platform.processor() or platform.machine()}, "
                                                 f"Python {platform.python_version()}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def to_markdown(self) -> str:
        def fmt(value: float | None, suffix: str = "") -> str:
            return "n/a" if value is None else f"{value:,.1f}{suffix}"

        lines = [
            f"# Placement at scale (in-process, {self.machine})",
            "",
            f"{self.jobs} jobs per fleet (3 models, mixed SLA classes, 1 in 5 sovereign, half cost-limited); "
            "`scan` is the placement before the index (every executor evaluated), timed on as many jobs as fit "
            f"in {REFERENCE_BUDGET_S:.0f} s. Agreement: the indexed choice is within the scan's near-tie band "
            "(or both refused with the same code).",
            "",
            "| executors | sites | indexed µs/job (mean) | p50 µs | p99 µs | scan µs/job | speed-up | agreement "
            "| considered "
            "| record B (indexed / scan) |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for s in self.sizes:
            lines.append(
                f"| {s.executors:,} | {s.sites} | {fmt(s.new_placement_us)} | {fmt(s.new_placement_p50_us)} "
                f"| {fmt(s.new_placement_p99_us)} "
                f"| {fmt(s.reference_placement_us)} | {fmt(s.speedup, '×')} | {s.agreement:.1%} of "
                f"{s.agreement_of} | {s.new_considered_mean} | {s.new_record_bytes:,.0f} / "
                f"{fmt(s.reference_record_bytes)} |"
            )
        lines += [
            "",
            "| executors | heartbeat µs (same models) | with JSON decode | models changed | note_dispatch µs "
            "| expire tick µs |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for s in self.sizes:
            lines.append(f"| {s.executors:,} | {s.heartbeat_same_models_us} | {s.heartbeat_with_decode_us} "
                         f"| {s.heartbeat_models_changed_us} | {s.note_dispatch_us} | {s.expire_tick_us} |")
        return "\n".join(lines)


def run_placement_bench(sizes: tuple[int, ...] = DEFAULT_SIZES, sites: int = 10, jobs: int = 2_000) -> PlacementReport:
    """Measure every fleet size in turn."""
    return PlacementReport(sizes=[measure_size(n, sites, jobs) for n in sizes], jobs=jobs)
