"""What-if: the scheduler's decision logic run offline on recorded traffic under another policy or topology.

Nothing touches the live stack. Each recorded request is placed again, at the
time the live scheduler placed it, by the scheduler's own functions
(``pick_executor``, ``place_job`` for multi-stage jobs when a model repository is
given), over facts rebuilt from the recording:

* **who decided**: the scheduler whose decision the recording holds
  (``SchedulingDecisionV1.scheduler_site``; with a control plane per site an edge
  site's scheduler places its own requests on its own executors, the hub's every
  site's). The job is placed from that scheduler's point of view, with the
  executors it places on (``Topology.scheduled_sites``); what a site's scheduler
  cannot place goes to the hub's, as a forward would;
* **the links**: the round trip that scheduler priced to each site when it decided
  (``SchedulingDecisionV1.link_rtt_ms``, its probes' figures with jitter and loss
  priced in), the latest one recorded at or before the decision. A recording that
  predates the field falls back to an estimate (the lowest recorded prediction
  per site less its compute per item) and says so;
* **the executors and their load**: the recorded heartbeats rebuild the
  registry as the scheduler saw it (queues, in-flight jobs, compute per item). An
  executor no heartbeat of which is recorded (with a control plane per site only
  the hub's executors' heartbeats are; the hub's scheduler learns the others from
  rosters) is taken as the live decisions saw it: each recorded prediction for it,
  less the round trip priced, is its predicted queueing plus compute at that
  moment (``sightings``). An executor of the topology neither heard of nor seen is
  assumed idle. Between those facts the registry counts what was placed on each
  executor, as the live one does, until the job's recorded completion there (as
  the scheduler heard it) or, where it was placed elsewhere than live, its
  predicted completion;
* **the mode** (centralized or distributed) of each decision.

Two offline runs are compared, so that differences come from the change and
not from the simulation: the *baseline* (the recorded topology and the live
policy, ``latency``) and the *what-if* (the chosen policy and/or topology).
The decisions the live scheduler actually recorded are shown beside them, with
how many of them the baseline reproduces (same site and model). What stays
apart: near-ties (within ``NEAR_TIE`` of the best) are spread by load and a
seeded random choice, as live, so between equally good executors the choice may
differ; the live registry heard heartbeats and completions a little later than
they were sent; a cascade's second step and a federated forward to another
edge site are not replayed.

Policies:

``latency``     the live policy: lowest predicted completion (``pick_executor``, ``place_job``)
``cost``        the cheapest site that can meet the deadline, then lowest prediction
``edge-first``  an edge site when one can meet the deadline, else the hub
``hub-only``    only the hub's executors, placed by the hub's scheduler
``no-degrade``  never a smaller variant than the one asked for
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import random
import statistics
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from din.replay.outcomes import is_awaiting, is_forward
from din.replay.reader import ReplayError
from din.replay.recorded import RecordedWindow
from din.services.scheduler.inflight import InflightJob
from din.services.scheduler.links import SAME_SITE_RTT_MS, UNMEASURED_RTT_MS, LinkTable
from din.services.scheduler.placement import Placement, assign, pick_executor
from din.services.scheduler.plans import is_multi_stage, place_job
from din.services.scheduler.registry import ExecutorRegistry, ExecutorState, Finished, RegistryView, finished_by
from din.services.scheduler.settings import SchedulingMode
from din.shared.catalog import ModelCatalog
from din.shared.contracts.events import CompletionV1, HeartbeatV1, ModelLoadedV1, SchedulingDecisionV1
from din.shared.contracts.inference import SlaClass
from din.shared.contracts.job import JobV1
from din.shared.errors import DinError
from din.shared.topology import Topology

DEFAULT_PER_ITEM_MS = 0.2
ASSUMED_INTERVAL_S = 3600.0
"""Heartbeat interval of an executor assumed from the decisions (never expires: its real heartbeats, if any are
recorded later, take over)."""
SEED = 0
"""The seed of the random choices placement makes (near-ties, pool samples): the same recording gives the same
what-if."""


# --------------------------------------------------------------------------- facts from the recording


@dataclass
class Placing:
    """One recorded request to place again: when the live scheduler placed it, the job, and that decision."""

    at_ms: float
    job: JobV1
    live: SchedulingDecisionV1 | None


def placing_decisions(window: RecordedWindow) -> dict[str, SchedulingDecisionV1]:
    """The decision that placed (or refused) each request the first time: its first dispatch's decision by the
    scheduler that kept it (a forward to another site's scheduler is not one, nor a hold while a pool scales from
    zero)."""
    found: dict[str, SchedulingDecisionV1] = {}
    for d in sorted(window.schedulings, key=lambda d: d.at_ms):
        if d.attempt == 1 and not is_forward(d) and not is_awaiting(d):
            found.setdefault(d.request_id, d)
    return found


def build_jobs(window: RecordedWindow) -> tuple[list[Placing], int]:
    """Each recorded request as the job the scheduler placed (every serving option it asked for, the workload
    class the classifier recorded), at the time it was placed; and how many had no recorded classification."""
    workloads = {c.request_id: c.workload for c in window.classifications}
    decisions = placing_decisions(window)
    placings, unclassified = [], 0
    for recorded in window.requests:
        meta = recorded.meta
        workload = workloads.get(meta.request_id)
        unclassified += workload is None
        job = JobV1(
            **meta.serving_options(), request_id=meta.request_id, tenant=meta.tenant, model=meta.model,
            deadline_ms=int(meta.received_ms + meta.timeout_ms), reply_to="", content_type=meta.content_type,
            received_ms=meta.received_ms, workload=workload,
        )
        live = decisions.get(meta.request_id)
        placings.append(Placing(live.at_ms if live else meta.received_ms, job, live))
    placings.sort(key=lambda p: p.at_ms)
    return placings, unclassified


def estimate_links(window: RecordedWindow, topology: Topology) -> dict[str, float]:
    """For recordings that predate ``link_rtt_ms``: round trips from the hub to each site estimated from the
    live scheduler's recorded predictions (the lowest at each site less its compute per item)."""
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
    return {site.name: round(lowest.get(site.name, UNMEASURED_RTT_MS), 3)
            for site in topology.sites if site.name != home}


class PricedLinks(LinkTable):
    """A scheduler's links as it priced them at one decision: ``rtt_ms`` answers the recorded figure."""

    def __init__(self, topology: Topology, home: str, priced: dict[str, float],
                 default: Callable[[str], float]) -> None:
        super().__init__(topology, home)
        self.priced = priced
        self._default = default

    def rtt_ms(self, site: str) -> float:
        if site == self.home:
            return SAME_SITE_RTT_MS
        found = self.priced.get(site)
        return found if found is not None else self._default(site)


class LinkFacts:
    """The round trips each scheduler priced over the recording, by its site and time."""

    def __init__(self, window: RecordedWindow, recorded_topology: Topology) -> None:
        self._times: dict[str, list[float]] = defaultdict(list)
        self._priced: dict[str, list[dict[str, float]]] = defaultdict(list)
        hub = recorded_topology.hub.name
        for d in sorted(window.schedulings, key=lambda d: d.at_ms):
            if d.link_rtt_ms:
                home = d.scheduler_site or hub
                self._times[home].append(d.at_ms)
                self._priced[home].append(d.link_rtt_ms)
        self.recorded = bool(self._times)
        self.estimated = {} if self.recorded else estimate_links(window, recorded_topology)
        self.hub = hub

    def homes(self) -> list[str]:
        """The sites whose schedulers' decisions were recorded with their links."""
        return sorted(self._times)

    def priced_at(self, home: str, at_ms: float) -> dict[str, float]:
        """What the scheduler at ``home`` priced its links at: at its latest recorded decision at or before
        ``at_ms``, else at its first one; an estimate (the hub's, from older recordings) when none was recorded."""
        times = self._times.get(home)
        if not times:
            return dict(self.estimated) if home == self.hub else {}
        i = bisect.bisect_right(times, at_ms) - 1
        return self._priced[home][max(i, 0)]

    def view(self, topology: Topology, home: str, at_ms: float) -> PricedLinks:
        """``home``'s links at ``at_ms`` for placement in ``topology`` (a site nothing was recorded for: its
        configured round trip)."""
        return PricedLinks(topology, home, self.priced_at(home, at_ms),
                           lambda site: 2.0 * topology.bus_one_way_ms(home, site))

    def medians(self) -> dict[str, dict[str, float]]:
        """Per scheduler site, the median round trip it priced to each other site (ms)."""
        out: dict[str, dict[str, float]] = {}
        for home, priced in self._priced.items():
            sites: dict[str, list[float]] = defaultdict(list)
            for entry in priced:
                for site, rtt in entry.items():
                    if site != home:
                        sites[site].append(rtt)
            out[home] = {site: round(statistics.median(v), 3) for site, v in sorted(sites.items())}
        if not out and self.estimated:
            out[self.hub] = dict(self.estimated)
        return out


@dataclass(frozen=True)
class Sighting:
    """What the live scheduler believed of one executor at one decision: its predicted queueing plus compute for
    a new job of ``model`` (the prediction it recorded less the round trip it priced)."""

    at_ms: float
    executor: str
    site: str
    model: str
    queue_ms: float


def sightings(window: RecordedWindow) -> list[Sighting]:
    """Every executor the recorded decisions (with their links) predicted for, in time order."""
    found = []
    for d in window.schedulings:
        if not d.link_rtt_ms:
            continue
        for alt in d.alternatives:
            if alt.predicted_ms is None:
                continue
            rtt = SAME_SITE_RTT_MS if alt.site == d.scheduler_site else d.link_rtt_ms.get(alt.site)
            if rtt is not None:
                found.append(Sighting(d.at_ms, alt.executor, alt.site, alt.model, max(alt.predicted_ms - rtt, 0.0)))
    return sorted(found, key=lambda s: s.at_ms)


# --------------------------------------------------------------------------- policies


@dataclass
class Situation:
    """What one job is placed in: the executors in view of the deciding scheduler, its links, the clock."""

    executors: RegistryView
    links: LinkTable
    topology: Topology
    now_ms: float
    cost_limits: dict[str, float | None]
    queue_at_site: bool
    rng: random.Random
    catalog: ModelCatalog | None

    def pick(self, job: JobV1, site_ok: Callable[[str], bool] | None = None) -> Placement:
        """``pick_executor`` over the executors in view (only at sites ``site_ok`` accepts, when given)."""
        executors = self.executors if site_ok is None else RegistryView(self.executors, site_ok)
        return pick_executor(job, executors, self.links, self.topology, self.now_ms, self.cost_limits,
                             queue_at_site=self.queue_at_site, rng=self.rng)

    def executor(self, executor_id: str) -> ExecutorState | None:
        return self.executors.registry.get(executor_id)


Policy = Callable[[JobV1, Situation], Placement]


def _latency(job: JobV1, at: Situation) -> Placement:
    if at.catalog is not None and is_multi_stage(job):
        return place_job(job, at.catalog, at.executors, at.links, at.topology, at.now_ms, at.cost_limits,
                         queue_at_site=at.queue_at_site)
    return at.pick(job)


def _cheapest_feasible(key: Callable[[Topology, str], tuple]) -> Policy:
    def policy(job: JobV1, at: Situation) -> Placement:
        best = at.pick(job)
        feasible = [a for a in best.alternatives
                    if a.excluded_by is None and a.model == best.model and a.predicted_ms is not None
                    and at.executor(a.executor) is not None]
        if not feasible:
            return best
        choice = min(feasible, key=lambda a: key(at.topology, a.site) + (a.predicted_ms,))
        return Placement(at.executor(choice.executor), choice.model, choice.predicted_ms, best.degraded,
                         f"what-if: {best.reason}", best.alternatives)
    return policy


def _no_degrade(job: JobV1, at: Situation) -> Placement:
    if job.workload is not None:
        job = job.model_copy(update={"workload": job.workload.model_copy(update={"candidates": [job.model]})})
    return at.pick(job)


def _hub_only(job: JobV1, at: Situation) -> Placement:
    hub = at.topology.hub.name
    return at.pick(job, lambda site: site == hub)


def make_policies() -> dict[str, Policy]:
    return {
        "latency": _latency,
        "cost": _cheapest_feasible(lambda topo, site: (topo.site(site).cost_per_1k,)),
        "edge-first": _cheapest_feasible(lambda topo, site: (topo.site(site).role == "hub",)),
        "hub-only": _hub_only,
        "no-degrade": _no_degrade,
    }


POLICIES = tuple(make_policies())
HUB_VIEW = frozenset({"hub-only"})
"""Policies whose every job is placed by the hub's scheduler."""


# --------------------------------------------------------------------------- the simulation


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
    executor: str | None = None
    scheduler_site: str | None = None


def _completions_by_request(window: RecordedWindow) -> dict[str, list[CompletionV1]]:
    found: dict[str, list[CompletionV1]] = defaultdict(list)
    for c in sorted(window.completions, key=lambda c: c.at_ms):
        found[c.request_id].append(c)
    return found


class Simulator:
    """Replays heartbeats and jobs through a registry and a placement policy, each job placed by the scheduler
    that placed it live."""

    def __init__(self, topology: Topology, policy: str, links: LinkFacts, *, catalog: ModelCatalog | None = None,
                 completions: dict[str, list[CompletionV1]] | None = None, seed: int = SEED) -> None:
        self.topology = topology
        self.policy_name = policy
        self.policy = make_policies()[policy]
        self.links = links
        self.catalog = catalog
        self.completions = completions or {}
        self._sighted: dict[tuple[str, str], float] = {}
        self._typical: dict[str, float] = {}
        self.rng = random.Random(seed)
        self.registry = ExecutorRegistry(rng=random.Random(seed))
        self.cost_limits = {t.name: t.max_cost_per_1k for t in topology.tenants}
        self._specs = {e.id: (s.name, e) for s in topology.sites for e in s.executors}
        self._controls = set(topology.control_sites())
        self._order = itertools.count()
        self._used: set[tuple[str, int]] = set()
        """Recorded completions already taken for a stage (a co-located plan's stages run on one executor)."""
        self.forwarded = 0

    def _adapt(self, hb: HeartbeatV1) -> HeartbeatV1 | None:
        """``hb`` as this topology's executor of that id would send it (its site and capacity), or None."""
        if hb.executor not in self._specs:
            return None
        site, spec = self._specs[hb.executor]
        return hb.model_copy(update={"site": site, "capacity": spec.capacity})

    def _assumed(self, executor: str, now_ms: float, per_item: dict[str, float],
                 batch: dict[str, int]) -> HeartbeatV1:
        """A heartbeat standing for an executor of the topology the recording holds no heartbeat of (yet): idle,
        its compute per item as last sighted (else as other executors report for its models)."""
        site, spec = self._specs[executor]
        return HeartbeatV1(
            executor=executor, site=site,
            models=[ModelLoadedV1(name=m, version="1", max_batch_size=batch.get(m, 64),
                                  compute_ms_per_item=self._sighted.get(
                                      (executor, m), per_item.get(m, self._typical.get(m, DEFAULT_PER_ITEM_MS))))
                    for m in spec.models],
            capacity=spec.capacity, queue_depth={}, inflight=0, recent_latency_ms=0.0,
            interval_s=ASSUMED_INTERVAL_S, sent_ms=now_ms,
        )

    def home_of(self, placing: Placing) -> str:
        """The site whose scheduler places this job: the one that placed it live, when it runs a control plane
        in this topology and the policy does not place everything from the hub."""
        site = placing.live.scheduler_site if placing.live is not None else None
        if self.policy_name in HUB_VIEW or site is None or site not in self._controls:
            return self.topology.hub.name
        return site

    def run(self, placings: list[Placing], heartbeats: list[HeartbeatV1],
            seen: list[Sighting] | None = None) -> list[Decision]:
        """Place every job in turn, the registry kept as the live scheduler's was: the recorded heartbeats; for an
        executor not heard from (yet), what the live scheduler's decisions predicted for it (``seen``), as it
        learnt it (from a site's roster, say); an executor of the topology never heard of nor seen, idle."""
        registry = self.registry
        seen = seen or []
        heard = {hb.executor for hb in heartbeats if hb.executor in self._specs}
        never = [e for e in self._specs if e not in heard and e not in {s.executor for s in seen}]
        reported: dict[str, list[float]] = defaultdict(list)
        for hb in heartbeats:
            for model in hb.models:
                reported[model.name].append(model.compute_ms_per_item)
        self._typical = {m: statistics.median(values) for m, values in reported.items()}
        per_item: dict[str, float] = {}
        batch: dict[str, int] = {}
        beats = sorted(heartbeats, key=lambda h: h.sent_ms)
        releases: list[tuple[float, int, str, SlaClass, Finished | None]] = []
        decisions: list[Decision] = []
        b = v = 0
        live_heard: set[str] = set()
        inf = float("inf")
        for placing in placings:
            at_ms = placing.at_ms
            while True:  # what happened up to this decision, in the order it happened
                beat_ms = beats[b].sent_ms if b < len(beats) else inf
                seen_ms = seen[v].at_ms if v < len(seen) else inf
                done_ms = releases[0][0] if releases else inf
                first = min(beat_ms, seen_ms, done_ms)
                if first > at_ms:
                    break
                if done_ms == first:
                    _, _, executor, sla, finished = heapq.heappop(releases)
                    registry.note_completion(executor, sla, finished)
                elif beat_ms == first:
                    hb = beats[b]
                    b += 1
                    for model in hb.models:
                        per_item[model.name] = model.compute_ms_per_item
                        batch[model.name] = model.max_batch_size
                    adapted = self._adapt(hb)
                    if adapted is not None:
                        registry.observe(adapted, adapted.sent_ms / 1000.0)
                        live_heard.add(adapted.executor)
                else:
                    sighting = seen[v]
                    v += 1
                    if sighting.executor in self._specs and sighting.executor not in live_heard:
                        self._sighted[(sighting.executor, sighting.model)] = sighting.queue_ms
                        registry.observe(self._assumed(sighting.executor, sighting.at_ms, per_item, batch),
                                         sighting.at_ms / 1000.0)
            if never:
                for executor in never:
                    registry.observe(self._assumed(executor, at_ms, per_item, batch), at_ms / 1000.0)
                never = []
            registry.expire(at_ms / 1000.0)
            decisions.append(self._place(placing, releases))
        return decisions

    def _situation(self, home: str, at_ms: float, queue_at_site: bool) -> Situation:
        sites = set(self.topology.scheduled_sites(home))
        return Situation(self.registry.view(lambda site: site in sites), self.links.view(self.topology, home, at_ms),
                         self.topology, at_ms, self.cost_limits, queue_at_site, self.rng, self.catalog)

    def _place(self, placing: Placing, releases: list) -> Decision:
        job = placing.job.model_copy(deep=True)
        at_ms = placing.at_ms
        sla = job.sla_class
        queue_at_site = placing.live is not None and placing.live.mode == SchedulingMode.DISTRIBUTED.value
        home = self.home_of(placing)
        situation = self._situation(home, at_ms, queue_at_site)
        try:
            try:
                placement = self.policy(job, situation)
            except DinError:
                hub = self.topology.hub.name
                if home == hub:
                    raise
                # local first: what a site's scheduler cannot place goes to the hub's
                home, situation = hub, self._situation(hub, at_ms, queue_at_site)
                job = placing.job.model_copy(deep=True)
                placement = self.policy(job, situation)
                self.forwarded += 1
        except DinError as error:
            return Decision(job.request_id, job.tenant, sla.value, None, None, None, False, error.code.value, 0.0,
                            scheduler_site=home)
        state = placement.executor
        assign(job, placement, centralized=not queue_at_site, now_ms=at_ms)
        counted = InflightJob.dispatched(job, b"", {}, {}, state.id, state.site).counted_on
        ahead = 0.0
        stages = [s.predicted_ms or placement.predicted_ms for s in job.plan] or [placement.predicted_ms]
        for k, executor in enumerate(counted):
            self.registry.note_dispatch(executor, sla)
            ahead += stages[min(k, len(stages) - 1)]
            done_ms, finished = self._done(job.request_id, executor, at_ms, situation.links, queue_at_site)
            heapq.heappush(releases, (done_ms if done_ms is not None else at_ms + ahead, next(self._order), executor,
                                      sla, finished))
        cost = self.topology.site(state.site).cost_per_1k / 1000.0
        return Decision(job.request_id, job.tenant, sla.value, state.site, placement.model, placement.predicted_ms,
                        placement.degraded, None, cost, state.id, home)

    def _done(self, request_id: str, executor: str, at_ms: float, links: LinkTable,
              queue_at_site: bool) -> tuple[float | None, Finished | None]:
        """When the scheduler heard the recorded completion of this request at ``executor`` (at its site, for a
        job queued there) after ``at_ms``, and when the executor held it; (None, None) when it did not run there
        live."""
        state = self.registry.get(executor)
        site = state.site if state is not None else None
        for i, c in enumerate(self.completions.get(request_id, ())):
            if (request_id, i) in self._used:
                continue
            if c.at_ms >= at_ms and (c.executor == executor or (queue_at_site and c.site == site)):
                self._used.add((request_id, i))
                return c.at_ms + links.rtt_ms(c.site) / 2.0, finished_by(c, executor)
        return None, None


def recorded_decisions(window: RecordedWindow, topology: Topology) -> list[Decision]:
    """The live scheduler's decision that placed (or refused) each recorded request."""
    wanted = {r.meta.request_id for r in window.requests}
    sites = {s.name: s.cost_per_1k for s in topology.sites}
    out = []
    for d in sorted(placing_decisions(window).values(), key=lambda d: d.at_ms):
        if d.request_id not in wanted:
            continue
        refused = d.reason if d.chosen_site is None else None
        out.append(Decision(d.request_id, d.tenant, d.sla_class.value, d.chosen_site, d.chosen_model,
                            d.predicted_ms, d.degraded, refused,
                            sites.get(d.chosen_site, 0.0) / 1000.0 if d.chosen_site else 0.0,
                            d.chosen_executor, d.scheduler_site))
    return out


# --------------------------------------------------------------------------- the report


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


def agreement(live: list[Decision], offline: list[Decision]) -> dict[str, object]:
    """How many of the live decisions an offline run reproduces: the same site, the same site and model (a
    refusal matches a refusal), per request; and the per-site counts side by side."""
    by_id = {d.request_id: d for d in offline}
    pairs = [(d, by_id[d.request_id]) for d in live if d.request_id in by_id]
    same_site = sum(1 for a, b in pairs if a.site == b.site)
    same = sum(1 for a, b in pairs if (a.site, a.model) == (b.site, b.model))
    live_sites = Counter(a.site or "refused" for a, _ in pairs)
    offline_sites = Counter(b.site or "refused" for _, b in pairs)
    return {
        "compared": len(pairs),
        "same_site": same_site,
        "same_placement": same,
        "sites": {site: {"live": live_sites.get(site, 0), "offline": offline_sites.get(site, 0)}
                  for site in sorted(set(live_sites) | set(offline_sites))},
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
    link_rtt_ms: dict[str, dict[str, float]]
    """Per scheduler site, the median round trip it priced to each other site."""
    links_recorded: bool = True
    notes: list[str] = field(default_factory=list)
    hub: str = ""

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
            "link_rtt_ms": self.link_rtt_ms.get(self.hub, {}),
            "link_rtt_ms_by_scheduler": self.link_rtt_ms,
            "links_recorded": self.links_recorded,
            "recorded": _summary(self.recorded),
            "baseline": _summary(self.baseline),
            "whatif": _summary(self.whatif),
            "reproduced": agreement(self.recorded, self.baseline),
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
        lines.append("")
        same = data["reproduced"]
        if same["compared"]:
            lines.append(f"live policy reproduces {same['same_placement']} of {same['compared']} live placements "
                         f"(same site and model; {same['same_site']} at the same site): "
                         + ", ".join(f"{site} {n['live']} live -> {n['offline']} offline"
                                     for site, n in same["sites"].items()))
        change = data["changes"]
        lines.append(f"placements changed vs baseline: {change['changed']}/{change['of']}"
                     + ("; " + ", ".join(f"{k} {v}" for k, v in list(change["moves"].items())[:8])
                        if change["moves"] else ""))
        how = "as the live scheduler priced them, median" if self.links_recorded else \
            "ESTIMATED from recorded predictions: the recording predates link_rtt_ms"
        for home, rtts in sorted(self.link_rtt_ms.items()):
            lines.append(f"link round trips from {home} ({how}, ms): "
                         + (", ".join(f"{k} {v}" for k, v in rtts.items()) or "-"))
        for note in self.notes:
            lines.append(f"note: {note}")
        return "\n".join(lines)


def what_if(window: RecordedWindow, recorded_topology: Topology, policy: str,
            topology: Topology | None = None, *, catalog: ModelCatalog | None = None) -> WhatIfReport:
    """Run the baseline and the what-if over ``window``; raise ``ReplayError`` for an unknown policy.

    ``catalog`` (the model repository's) lets multi-stage jobs be planned as the scheduler plans them; without it
    they are placed whole."""
    if policy not in make_policies():
        raise ReplayError(f"unknown what-if policy {policy!r}: choose from {', '.join(POLICIES)}")
    target = topology or recorded_topology
    placings, unclassified = build_jobs(window)
    links = LinkFacts(window, recorded_topology)
    completions = _completions_by_request(window)
    seen = sightings(window)
    notes = []
    if not window.heartbeats:
        notes.append("no heartbeats recorded in the window: executors are assumed idle with the compute times "
                     "their recorded predictions imply")
    if unclassified:
        notes.append(f"{unclassified} request(s) had no recorded classification: only the model asked for "
                     "was considered, at any site")
    if not links.recorded:
        notes.append("the recorded decisions predate link_rtt_ms: link round trips are estimated, and every "
                     "request is placed from the hub")
    multi = sum(is_multi_stage(p.job) for p in placings)
    if multi and catalog is None:
        notes.append(f"{multi} multi-stage request(s) placed whole: give the model repository to plan them")
    unplaced = sum(p.live is None for p in placings)
    if unplaced:
        notes.append(f"{unplaced} request(s) have no recorded scheduling decision: placed at their receipt, from "
                     "the hub")
    runs = {}
    for name, topo, chosen in (("baseline", recorded_topology, "latency"), ("whatif", target, policy)):
        sim = Simulator(topo, chosen, links, catalog=catalog, completions=completions)
        runs[name] = sim.run(placings, window.heartbeats, seen)
        if sim.forwarded:
            notes.append(f"{name}: {sim.forwarded} request(s) a site's scheduler could not place went to the hub's")
    return WhatIfReport(policy, target.name, recorded_topology.name, recorded_decisions(window, recorded_topology),
                        runs["baseline"], runs["whatif"], links.medians(), links.recorded, notes,
                        recorded_topology.hub.name)
