"""What-if: the scheduler's decision logic run offline on recorded traffic under another policy or topology.

Nothing touches the live stack. The recorded heartbeats rebuild the executor
registry as the scheduler saw it (queues, in-flight jobs, compute per item);
each recorded request, with the workload class the classifier recorded for
it, is placed at the time it was scheduled; a placed job holds its executor
until its predicted completion. Link round trips are estimated from the
predictions the live scheduler recorded (lowest prediction at each site less
the compute time per item), or 5 ms where nothing was recorded.

Two offline runs are compared, so that differences come from the change and
not from the simulation: the *baseline* (the recorded topology and the live
policy, ``latency``) and the *what-if* (the chosen policy and/or topology).
The decisions the live scheduler actually recorded are shown beside them.

Policies:

``latency``     the live policy: lowest predicted completion (``pick_executor``)
``cost``        the cheapest site that can meet the deadline, then lowest prediction
``edge-first``  an edge site when one can meet the deadline, else the hub
``hub-only``    only the hub's executors
``no-degrade``  never a smaller variant than the one asked for
"""

from __future__ import annotations

import heapq
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from din.replay.reader import ReplayError
from din.replay.recorded import RecordedWindow
from services.scheduler.links import UNMEASURED_RTT_MS, LinkTable
from services.scheduler.placement import Placement, pick_executor
from services.scheduler.registry import ExecutorRegistry, ExecutorState
from shared.contracts.events import HeartbeatV1, ModelLoadedV1
from shared.contracts.inference import SlaClass
from shared.contracts.job import JobV1
from shared.errors import DinError
from shared.topology import Topology

Policy = Callable[[JobV1, list[ExecutorState], LinkTable, Topology, float, dict], Placement]
DEFAULT_PER_ITEM_MS = 0.2
DEFAULT_TIMEOUT_MS = {SlaClass.REALTIME: 1_000, SlaClass.INTERACTIVE: 5_000, SlaClass.BATCH: 60_000}


def _cheapest_feasible(key: Callable[[str, float], tuple]) -> Policy:
    def policy(job, executors, links, topology, now_ms, cost_limits):
        best = pick_executor(job, executors, links, topology, now_ms, cost_limits)
        by_id = {e.id: e for e in executors}
        feasible = [a for a in best.alternatives
                    if a.excluded_by is None and a.model == best.model and a.predicted_ms is not None]
        if not feasible:
            return best
        choice = min(feasible, key=lambda a: key(a.site, a.predicted_ms) + (a.predicted_ms,))
        return Placement(by_id[choice.executor], choice.model, choice.predicted_ms, best.degraded,
                         f"what-if: {best.reason}", best.alternatives)
    return policy


def _latency(job, executors, links, topology, now_ms, cost_limits):
    return pick_executor(job, executors, links, topology, now_ms, cost_limits)


def _no_degrade(job, executors, links, topology, now_ms, cost_limits):
    if job.workload is not None:
        job = job.model_copy(update={"workload": job.workload.model_copy(update={"candidates": [job.model]})})
    return pick_executor(job, executors, links, topology, now_ms, cost_limits)


def _hub_only(job, executors, links, topology, now_ms, cost_limits):
    hub = topology.hub.name
    return pick_executor(job, [e for e in executors if e.site == hub], links, topology, now_ms, cost_limits)


def make_policies() -> dict[str, Policy]:
    return {
        "latency": _latency,
        "cost": lambda job, ex, links, topo, now, limits: _cheapest_feasible(
            lambda site, _p: (topo.site(site).cost_per_1k,))(job, ex, links, topo, now, limits),
        "edge-first": lambda job, ex, links, topo, now, limits: _cheapest_feasible(
            lambda site, _p: (topo.site(site).role == "hub",))(job, ex, links, topo, now, limits),
        "hub-only": _hub_only,
        "no-degrade": _no_degrade,
    }


POLICIES = tuple(make_policies())


@dataclass
class Decision:
    """One placement (or refusal) of one request."""

    request_id: str
    tenant: str
    sla_class: str
    site: str | None
    model: str | None
    predicted_ms: float | None
    degraded: bool
    refused: str | None
    cost: float


def build_jobs(window: RecordedWindow) -> tuple[list[tuple[float, JobV1]], int]:
    """``(decision time ms, job)`` for each recorded request, and how many had no recorded classification."""
    workloads = {c.request_id: c.workload for c in window.classifications}
    first_decision: dict[str, float] = {}
    for decision in window.schedulings:
        if decision.attempt == 1:
            first_decision.setdefault(decision.request_id, decision.at_ms)
    jobs, unclassified = [], 0
    for recorded in window.requests:
        meta = recorded.meta
        workload = workloads.get(meta.request_id)
        unclassified += workload is None
        job = JobV1(
            request_id=meta.request_id, tenant=meta.tenant, model=meta.model, model_version=meta.model_version,
            sla_class=meta.sla_class, deadline_ms=int(meta.received_ms + meta.timeout_ms), reply_to="",
            content_type=meta.content_type, labels=meta.labels, allow_degrade=meta.allow_degrade,
            min_accuracy=meta.min_accuracy, received_ms=meta.received_ms, workload=workload,
        )
        jobs.append((first_decision.get(meta.request_id, meta.received_ms), job))
    jobs.sort(key=lambda item: item[0])
    return jobs, unclassified


def estimate_links(window: RecordedWindow, topology: Topology) -> tuple[LinkTable, dict[str, float]]:
    """Round trips from the hub to each site, from the live scheduler's recorded predictions."""
    per_item: dict[tuple[str, str], float] = {}
    for hb in window.heartbeats:
        for model in hb.models:
            per_item[(hb.executor, model.name)] = model.compute_ms_per_item
    lowest: dict[str, float] = {}
    for decision in window.schedulings:
        for alt in decision.alternatives:
            if alt.predicted_ms is None:
                continue
            rtt = alt.predicted_ms - per_item.get((alt.executor, alt.model), DEFAULT_PER_ITEM_MS)
            lowest[alt.site] = min(lowest.get(alt.site, float("inf")), max(rtt, 0.0))
    home = topology.hub.name
    links = LinkTable(topology, home=home)
    estimated = {}
    for site in topology.sites:
        if site.name == home:
            continue
        rtt = lowest.get(site.name)
        if rtt is not None and rtt != float("inf"):
            links.observe_rtt(site.name, rtt)
        estimated[site.name] = round(rtt if rtt is not None else UNMEASURED_RTT_MS, 3)
    return links, estimated


class Simulator:
    """Replays heartbeats and jobs through a registry and a placement policy."""

    def __init__(self, topology: Topology, policy: Policy, links: LinkTable) -> None:
        self.topology = topology
        self.policy = policy
        self.links = links
        self.cost_limits = {t.name: t.max_cost_per_1k for t in topology.tenants}
        self._specs = {e.id: (s.name, e) for s in topology.sites for e in s.executors}

    def _adapt(self, hb: HeartbeatV1) -> HeartbeatV1 | None:
        """``hb`` as this topology's executor of that id would send it (its site and capacity), or None."""
        if hb.executor not in self._specs:
            return None
        site, spec = self._specs[hb.executor]
        return hb.model_copy(update={"site": site, "capacity": spec.capacity})

    def _synthetic(self, now_ms: float, seen: set[str], per_item: dict[str, float],
                   batch: dict[str, int]) -> list[HeartbeatV1]:
        beats = []
        for executor, (site, spec) in self._specs.items():
            if executor in seen:
                continue
            beats.append(HeartbeatV1(
                executor=executor, site=site,
                models=[ModelLoadedV1(name=m, version="1", max_batch_size=batch.get(m, 64),
                                      compute_ms_per_item=per_item.get(m, DEFAULT_PER_ITEM_MS)) for m in spec.models],
                capacity=spec.capacity, queue_depth={}, inflight=0, recent_latency_ms=0.0,
                interval_s=3600.0, sent_ms=now_ms,
            ))
        return beats

    def run(self, jobs: list[tuple[float, JobV1]], heartbeats: list[HeartbeatV1]) -> list[Decision]:
        registry = ExecutorRegistry()
        recorded_executors = {hb.executor for hb in heartbeats}
        per_item: dict[str, float] = {}
        batch: dict[str, int] = {}
        beats = sorted(heartbeats, key=lambda h: h.sent_ms)
        releases: list[tuple[float, str, SlaClass]] = []
        decisions: list[Decision] = []
        b = 0
        synthesized = False
        for at_ms, job in jobs:
            while b < len(beats) and beats[b].sent_ms <= at_ms:
                hb = beats[b]
                b += 1
                for model in hb.models:
                    per_item[model.name] = model.compute_ms_per_item
                    batch[model.name] = model.max_batch_size
                adapted = self._adapt(hb)
                if adapted is not None:
                    registry.observe(adapted, adapted.sent_ms / 1000.0)
            if not synthesized and (per_item or not beats):
                for fake in self._synthetic(at_ms, recorded_executors, per_item, batch):
                    registry.observe(fake, at_ms / 1000.0)
                synthesized = True
            while releases and releases[0][0] <= at_ms:
                _, executor, sla = heapq.heappop(releases)
                registry.note_completion(executor, sla)
            registry.expire(at_ms / 1000.0)
            decisions.append(self._place(job, registry, at_ms, releases))
        return decisions

    def _place(self, job: JobV1, registry: ExecutorRegistry, at_ms: float, releases: list) -> Decision:
        sla = job.sla_class
        try:
            placement = self.policy(job, registry.live(), self.links, self.topology, at_ms, self.cost_limits)
        except DinError as error:
            return Decision(job.request_id, job.tenant, sla.value, None, None, None, False, error.code.value, 0.0)
        state = placement.executor
        registry.note_dispatch(state.id, sla)
        heapq.heappush(releases, (at_ms + placement.predicted_ms, state.id, sla))
        cost = self.topology.site(state.site).cost_per_1k / 1000.0
        return Decision(job.request_id, job.tenant, sla.value, state.site, placement.model,
                        placement.predicted_ms, placement.degraded, None, cost)


def recorded_decisions(window: RecordedWindow, topology: Topology) -> list[Decision]:
    """The live scheduler's first decision for each recorded request."""
    wanted = {r.meta.request_id for r in window.requests}
    sites = {s.name: s.cost_per_1k for s in topology.sites}
    seen, out = set(), []
    for d in sorted(window.schedulings, key=lambda d: d.at_ms):
        if d.request_id not in wanted or d.request_id in seen or d.attempt != 1:
            continue
        seen.add(d.request_id)
        refused = d.reason if d.chosen_site is None else None
        out.append(Decision(d.request_id, d.tenant, d.sla_class.value, d.chosen_site, d.chosen_model,
                            d.predicted_ms, d.degraded, refused, sites.get(d.chosen_site, 0.0) / 1000.0
                            if d.chosen_site else 0.0))
    return out


def _p50_p99(values: dict[str, float] | None) -> str:
    return f"{values['p50']:.2f}/{values['p99']:.2f}" if values else "-"


def _summary(decisions: list[Decision]) -> dict[str, object]:
    placed = [d for d in decisions if d.refused is None]
    by_class: dict[str, dict[str, float | None]] = {}
    groups = defaultdict(list)
    for d in placed:
        if d.predicted_ms is not None:
            groups[d.sla_class].append(d.predicted_ms)
            groups["all"].append(d.predicted_ms)
    for sla, values in sorted(groups.items()):
        arr = np.asarray(values)
        by_class[sla] = {"p50": float(np.percentile(arr, 50)), "p95": float(np.percentile(arr, 95)),
                         "p99": float(np.percentile(arr, 99))}
    cost = sum(d.cost for d in placed)
    return {
        "decisions": len(decisions),
        "placed": len(placed),
        "refused": dict(Counter(d.refused for d in decisions if d.refused)),
        "sites": dict(Counter(d.site for d in placed)),
        "models": dict(Counter(d.model for d in placed)),
        "degraded": sum(d.degraded for d in placed),
        "predicted_ms": by_class,
        "cost": round(cost, 6),
        "cost_per_1k": round(1000.0 * cost / len(placed), 4) if placed else 0.0,
    }


@dataclass
class WhatIfReport:
    """Recorded live decisions, the offline baseline and the what-if, side by side."""

    policy: str
    topology_name: str
    baseline_topology: str
    recorded: list[Decision]
    baseline: list[Decision]
    whatif: list[Decision]
    link_rtt_ms: dict[str, float]
    notes: list[str] = field(default_factory=list)

    def changes(self) -> dict[str, object]:
        base = {d.request_id: d for d in self.baseline}
        moved = Counter()
        changed = 0
        for d in self.whatif:
            b = base.get(d.request_id)
            if b is None:
                continue
            if (b.site, b.model, b.refused) != (d.site, d.model, d.refused):
                changed += 1
                moved[(b.site or f"refused:{b.refused}", d.site or f"refused:{d.refused}")] += 1
        return {"changed": changed, "of": len(self.whatif),
                "moves": {f"{a}->{b}": n for (a, b), n in moved.most_common()}}

    def as_dict(self) -> dict[str, object]:
        return {
            "policy": self.policy,
            "topology": self.topology_name,
            "baseline_topology": self.baseline_topology,
            "link_rtt_ms": self.link_rtt_ms,
            "recorded": _summary(self.recorded),
            "baseline": _summary(self.baseline),
            "whatif": _summary(self.whatif),
            "changes": self.changes(),
            "notes": list(self.notes),
        }

    def text(self) -> str:
        data = self.as_dict()
        cols = [("recorded (live)", data["recorded"]), ("baseline (offline)", data["baseline"]),
                (f"what-if ({self.policy}, {self.topology_name})", data["whatif"])]
        rows: list[tuple[str, list[str]]] = []

        def row(label: str, fn: Callable[[dict], str]) -> None:
            rows.append((label, [fn(c) for _, c in cols]))

        row("requests placed", lambda c: f"{c['placed']}/{c['decisions']}")
        row("refused", lambda c: ", ".join(f"{k} {v}" for k, v in sorted(c["refused"].items())) or "0")
        row("degraded", lambda c: str(c["degraded"]))
        sites = sorted({s for _, c in cols for s in c["sites"]})
        for site in sites:
            row(f"  at {site}", lambda c, s=site: str(c["sites"].get(s, 0)))
        models = sorted({m for _, c in cols for m in c["models"]})
        for model in models:
            row(f"  by {model}", lambda c, m=model: str(c["models"].get(m, 0)))
        classes = sorted({k for _, c in cols for k in c["predicted_ms"]})
        for sla in classes:
            row(f"predicted p50/p99 {sla} ms", lambda c, s=sla: _p50_p99(c["predicted_ms"].get(s)))
        row("cost (sum, per 1k)", lambda c: f"{c['cost']:.4f}, {c['cost_per_1k']:.3f}")
        width = max(len(label) for label, _ in rows) + 2
        col_w = [max(len(name), *(len(r[1][i]) for r in rows)) + 2 for i, (name, _) in enumerate(cols)]
        lines = [" " * width + "".join(name.ljust(w) for (name, _), w in zip(cols, col_w, strict=True))]
        for label, cells in rows:
            lines.append(label.ljust(width) + "".join(cell.ljust(w) for cell, w in zip(cells, col_w, strict=True)))
        change = data["changes"]
        lines.append("")
        lines.append(f"placements changed vs baseline: {change['changed']}/{change['of']}"
                     + ("; " + ", ".join(f"{k} {v}" for k, v in list(change["moves"].items())[:8])
                        if change["moves"] else ""))
        lines.append("link round trips used (ms, estimated from recorded predictions): "
                     + ", ".join(f"{k} {v}" for k, v in sorted(self.link_rtt_ms.items())))
        for note in self.notes:
            lines.append(f"note: {note}")
        return "\n".join(lines)


def what_if(window: RecordedWindow, recorded_topology: Topology, policy: str,
            topology: Topology | None = None) -> WhatIfReport:
    """Run the baseline and the what-if over ``window``; raise ``ReplayError`` for an unknown policy."""
    policies = make_policies()
    if policy not in policies:
        raise ReplayError(f"unknown what-if policy {policy!r}: choose from {', '.join(POLICIES)}")
    target = topology or recorded_topology
    jobs, unclassified = build_jobs(window)
    links, rtts = estimate_links(window, recorded_topology)
    target_links, _ = estimate_links(window, target)
    notes = []
    if not window.heartbeats:
        notes.append("no heartbeats recorded in the window: executors are assumed idle with default compute times")
    if unclassified:
        notes.append(f"{unclassified} request(s) had no recorded classification: only the model asked for "
                     "was considered, at any site")
    baseline = Simulator(recorded_topology, policies["latency"], links).run(jobs, window.heartbeats)
    changed = Simulator(target, policies[policy], target_links).run(jobs, window.heartbeats)
    return WhatIfReport(policy, target.name, recorded_topology.name, recorded_decisions(window, recorded_topology),
                        baseline, changed, rtts, notes)
