"""Choosing where a job runs: the lowest predicted completion time under hard constraints.

Predicted completion = network (round trip to the executor's site)
+ queueing (jobs ahead of this SLA class times compute per item, which the
executor reports per model from its recent batches) + compute. Hard constraints:
the data's allowed sites (sovereignty), the deadline, the tenant's cost limit,
executor capacity. The requested model is
preferred; a listed smaller variant answers only when no executor of the
requested one can meet the deadline or all are full (graceful degradation).
Pure logic: usable offline for what-if analysis.

**Bounded search.** Placement looks only at the pools (``registry.ExecutorPool``)
of the job's candidate models at its allowed, affordable sites, and evaluates a
bounded number of executors in each:

* Sovereignty and cost are properties of a site, so they exclude whole pools
  without looking at an executor.
* A pool is ordered by predicted queueing plus compute for the job's SLA class,
  and its whole population shares the site's round trip, so
  ``rtt + pool.floor_ms`` is a lower bound on every member's prediction. Pools are
  visited from the lowest bound up, and the search stops at the first pool whose
  bound exceeds the near-tie band of the best prediction found (nothing there can
  win or tie), or the deadline (everything there, and after it, is too late; when
  nothing else fits, those pools are walked as far as it takes to tell "too late"
  from "full", so the refusal says the same as a scan would).
* Within a pool the walk goes best first: executors that are full or that gave
  the job back are stepped over (at most ``SKIP_LIMIT``), the first feasible one
  is the pool's best, and the walk stops after ``PER_POOL`` feasible executors or
  at the first one outside the near-tie band. ``SAMPLE_PER_POOL`` random members
  are evaluated too (power-of-two choices), so load also spreads beyond the band's
  head when very many executors tie.

Why the best by prediction is never lost: the bound is exact for the pool's head and
lower for the rest, so the best executor's pool is visited before any pool that
cannot beat it, and within that pool the walk reaches the best feasible executor
first. The only case that differs from a scan of every executor is a pool whose
``SKIP_LIMIT`` best executors are all full or gave the job back (a saturated
site: the best feasible one, if any, is then searched in the other pools; a
site that full is better left alone). Near-ties spread as before: among the
executors within ``NEAR_TIE`` of the best, the least loaded wins; when a pool
holds more than ``PER_POOL`` such near-ties, the choice is among the best of them
plus the random sample instead of all of them, which keeps the same guarantee
(within ``NEAR_TIE`` of the best).

The decision keeps the ``MAX_ALTERNATIVES`` best placements considered (feasible
first, then refused ones; the head of each site not visited fills free places)
and counts: executors serving the candidate models, how many were evaluated, how
many of those were feasible, and refusals by reason (site-wide refusals count
every executor of the site's pool; ``outranked`` counts the executors of pools
not visited because they could not beat the choice).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from din.services.scheduler.links import LinkTable
from din.services.scheduler.registry import ExecutorPool, ExecutorState, ListSource, PoolSource
from din.shared.contracts.events import AlternativeV1, PlacementCountsV1
from din.shared.contracts.job import JobV1
from din.shared.errors import DinError, ErrorCode
from din.shared.topology import Topology

NEAR_TIE = 0.1
NEAR_TIE_MS = 0.05
PER_POOL = 4
SAMPLE_PER_POOL = 2
SKIP_LIMIT = 32
MAX_CONSIDERED = 48
"""Once this many executors were evaluated, pools that cannot beat the best found are not visited."""
MAX_ALTERNATIVES = 5
_RNG = random.Random()

SITE_WIDE = ("sovereignty", "cost")
OUTRANKED = "outranked"
"""Not a refusal: executors in pools not visited because none of them could beat the choice."""

Considered = tuple[ExecutorState, str, float | None, str | None]
"""An executor looked at: (executor, model, predicted ms or None, reason it was refused or None)."""


@dataclass
class Placement:
    """A chosen executor and model, with its prediction and the alternatives considered."""

    executor: ExecutorState
    model: str
    predicted_ms: float
    degraded: bool
    reason: str
    alternatives: list[AlternativeV1]
    counts: PlacementCountsV1 = field(default_factory=PlacementCountsV1)


def predict_ms(state: ExecutorState, model: str, job: JobV1, links: LinkTable) -> float:
    """Predicted completion of ``job`` on ``state`` running ``model``: link round trip + queueing + compute."""
    return links.rtt_ms(state.site) + state.queue_ms(model, job.sla_class)


def spread(feasible: list[tuple[float, ExecutorState]], rng: random.Random) -> tuple[float, ExecutorState]:
    """The best prediction, spreading load among near-ties: within ``NEAR_TIE`` of the best, the least loaded
    executor wins, and equally loaded ones are picked at random, so a new executor gets work at once."""
    fastest = min(predicted for predicted, _ in feasible)
    near = [(p, s) for p, s in feasible if p <= fastest * (1 + NEAR_TIE) + NEAR_TIE_MS]
    lightest = min(s.load() for _, s in near)
    return rng.choice([(p, s) for p, s in near if s.load() == lightest])


def as_source(executors: PoolSource | Iterable[ExecutorState], rng: random.Random | None = None) -> PoolSource:
    """The registry (or a view) as it is; a plain list of executors as pools built from it."""
    if hasattr(executors, "pools"):
        return executors
    return ListSource(list(executors), rng)


@dataclass
class _Search:
    """One candidate model's search: what was evaluated, found feasible and refused."""

    job: JobV1
    model: str
    links: LinkTable
    budget_ms: float
    queue_at_site: bool
    rng: random.Random
    feasible: list[tuple[float, ExecutorState]] = field(default_factory=list)
    considered: list[Considered] = field(default_factory=list)
    refusals: Counter = field(default_factory=Counter)
    seen: set[str] = field(default_factory=set)
    fastest: float = float("inf")
    evaluated: int = 0

    @property
    def band_ms(self) -> float:
        return self.fastest * (1 + NEAR_TIE) + NEAR_TIE_MS

    def evaluate(self, state: ExecutorState, rtt: float) -> float | str:
        """The prediction of a feasible executor, or the reason it is refused (recorded either way)."""
        self.seen.add(state.id)
        job = self.job
        predicted = None
        if state.id in job.avoid:
            excluded = "gave_back"
        elif not self.queue_at_site and state.load() >= state.capacity_for(job.sla_class):
            excluded = "capacity"
        else:
            predicted = rtt + state.queue_ms(self.model, job.sla_class)
            excluded = "deadline" if predicted > self.budget_ms else None
        self.considered.append((state, self.model, predicted, excluded))
        if excluded:
            self.refusals[excluded] += 1
            return excluded
        self.feasible.append((predicted, state))
        if predicted < self.fastest:
            self.fastest = predicted
        return predicted

    def walk(self, pool: ExecutorPool, rtt: float) -> None:
        """Best first through ``pool`` (see the module's docstring for where it stops), then a random sample."""
        taken = skipped = 0
        for state in pool.best(self.job.sla_class):
            if state.id in self.seen:
                continue
            outcome = self.evaluate(state, rtt)
            if outcome == "deadline":
                self.refusals["deadline"] += len(pool) - taken - skipped - 1
                return
            if isinstance(outcome, str):
                skipped += 1
                if skipped >= SKIP_LIMIT:
                    break
                continue
            taken += 1
            if taken >= PER_POOL or outcome > self.band_ms:
                break
        for state in pool.sample(SAMPLE_PER_POOL, self.rng):
            if state.id not in self.seen:
                self.evaluate(state, rtt)

    def glance(self, pool: ExecutorPool, rtt: float) -> None:
        """The head of a pool that cannot win, evaluated for the record only."""
        head = next((s for s in pool.best(self.job.sla_class) if s.id not in self.seen), None)
        if head is not None:
            self.evaluate(head, rtt)
            self.feasible = [f for f in self.feasible if f[1] is not head]


def _search_model(job: JobV1, model: str, source: PoolSource, links: LinkTable, topology: Topology,
                  budget_ms: float, cost_limit: float | None, *, queue_at_site: bool,
                  rng: random.Random) -> tuple[_Search, int]:
    """Search ``model``'s pools; return the search and how many executors serve the model."""
    workload = job.workload
    allowed = set(workload.allowed_sites) if workload and workload.allowed_sites else None
    search = _Search(job, model, links, budget_ms, queue_at_site, rng)
    excluded_pools: list[tuple[str, ExecutorPool]] = []
    visitable: list[tuple[float, float, ExecutorPool, int]] = []
    site_cost: dict[str, float] = {}
    population = 0
    for pool in source.pools(model, job.model_version):
        size = len(pool)
        population += size
        reason = None
        if allowed is not None and pool.site not in allowed:
            reason = "sovereignty"
        elif cost_limit is not None:
            if pool.site not in site_cost:
                site_cost[pool.site] = topology.site(pool.site).cost_per_1k
            if site_cost[pool.site] > cost_limit:
                reason = "cost"
        if reason:
            search.refusals[reason] += size
            excluded_pools.append((reason, pool))
            continue
        rtt = links.rtt_ms(pool.site)
        visitable.append((rtt + pool.floor_ms(job.sla_class), rtt, pool, size))
    visitable.sort(key=lambda entry: entry[0])

    unvisited: list[tuple[float, ExecutorPool]] = []
    too_late: list[tuple[float, ExecutorPool, int]] = []
    for index, (bound, rtt, pool, _) in enumerate(visitable):
        if bound > budget_ms:
            too_late = [(r, p, size) for _, r, p, size in visitable[index:]]
        if bound > budget_ms or bound > search.band_ms or (
                len(search.considered) >= MAX_CONSIDERED and bound >= search.fastest):
            unvisited.extend((r, p) for _, r, p, _ in visitable[index:])
            outranked = sum(size for *_, size in visitable[index:]) - sum(size for *_, size in too_late)
            if outranked:
                search.refusals[OUTRANKED] += outranked
            break
        search.walk(pool, rtt)
    for rtt, pool, size in too_late:
        if search.feasible:
            search.refusals["deadline"] += size
        else:
            search.walk(pool, rtt)
    search.evaluated = len(search.seen)
    _fill_record(search, unvisited, excluded_pools)
    return search, population


def _fill_record(search: _Search, unvisited: list[tuple[float, ExecutorPool]],
                 excluded_pools: list[tuple[str, ExecutorPool]]) -> None:
    """Free places among the alternatives go to the heads of pools not visited, then to excluded sites."""
    refusals = search.refusals.copy()
    for rtt, pool in unvisited:
        if len(search.considered) >= MAX_ALTERNATIVES:
            break
        search.glance(pool, rtt)
    for reason, pool in excluded_pools:
        for state in pool.best(search.job.sla_class):
            if len(search.considered) >= MAX_ALTERNATIVES:
                break
            if state.id not in search.seen:
                search.seen.add(state.id)
                search.considered.append((state, search.model, None, reason))
    search.refusals = refusals


def _ranked(considered: list[Considered]) -> list[AlternativeV1]:
    """The ``MAX_ALTERNATIVES`` best considered: feasible by prediction, then refused (predicted ones first)."""
    def rank(entry: Considered) -> tuple:
        _, _, predicted, excluded = entry
        return (excluded is not None, predicted is None, predicted or 0.0)

    return [
        AlternativeV1(executor=state.id, site=state.site, model=model,
                      predicted_ms=None if predicted is None else round(predicted, 3), excluded_by=excluded)
        for state, model, predicted, excluded in sorted(considered, key=rank)[:MAX_ALTERNATIVES]
    ]


def pick_executor(
    job: JobV1,
    executors: PoolSource | Iterable[ExecutorState],
    links: LinkTable,
    topology: Topology,
    now_ms: float,
    cost_limits: dict[str, float | None],
    *,
    queue_at_site: bool = False,
    rng: random.Random | None = None,
) -> Placement:
    """Choose an executor and model variant for ``job`` or raise ``DinError`` saying why none fits.

    ``executors`` is the scheduler's ``ExecutorRegistry`` or a ``RegistryView`` of it (bounded cost), or any list
    of executors (offline use; pools are built from it first). With ``queue_at_site`` (distributed mode) a job
    waits in its site's work queue until an executor has room, so a full executor is not excluded; its backlog only
    lengthens the predicted completion.
    """
    rng = rng or _RNG
    source = as_source(executors, rng)
    workload = job.workload
    candidates = workload.candidates if workload else [job.model]
    cost_limit = cost_limits.get(job.tenant)
    budget_ms = job.deadline_ms - now_ms
    considered: list[Considered] = []
    refusals: Counter = Counter()
    population = evaluated = 0

    for rank, model in enumerate(candidates):
        search, serving = _search_model(job, model, source, links, topology, budget_ms, cost_limit,
                                        queue_at_site=queue_at_site, rng=rng)
        population += serving
        evaluated += search.evaluated
        considered.extend(search.considered)
        refusals.update(search.refusals)
        if search.feasible:
            best = spread(search.feasible, rng)
            reason = "lowest predicted completion"
            if rank > 0:
                reason = f"degraded: {candidates[0]} cannot meet the deadline or is saturated"
            counts = PlacementCountsV1(candidates=population, considered=evaluated, feasible=len(search.feasible),
                                       excluded=dict(refusals))
            return Placement(best[1], model, best[0], rank > 0, reason, _ranked(considered), counts)

    if population == 0:
        raise DinError(ErrorCode.NO_ELIGIBLE_EXECUTOR, f"no live executor serves {job.model}", retry_after_ms=1000)
    reasons = set(refusals) - {OUTRANKED}
    if reasons <= set(SITE_WIDE):
        raise DinError(
            ErrorCode.NO_ELIGIBLE_EXECUTOR,
            f"no executor of {job.model} at a site this request may use ({', '.join(sorted(reasons))})",
        )
    if reasons & {"capacity", "gave_back"} and "deadline" not in reasons:
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
