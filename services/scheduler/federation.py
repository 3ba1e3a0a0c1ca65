"""Federated placement across sites: summaries in, a site out. Pure logic, no NATS.

Each site's scheduler places on its own executors and, at a modest rate,
publishes ``SiteSummaryV1`` (``summarize``): per model its free capacity, queue,
best predicted queueing plus compute, cost and accuracy, and its links as it
measures them. Others keep the latest summary per site (``RemoteSites``; a site
silent for ``MISSED_SUMMARIES`` intervals is stale) and, for a job, decide where it
runs (``choose_site``).

**The rule (local first).** In order:

1. A job already forwarded once (``job.forwarded_from``) runs here or is refused:
   it is never forwarded again (no ping-pong, no loops).
2. When a local executor can meet the job (``local_best``, which ``pick_executor``
   only returns within the deadline), it runs here; the one exception is a local
   placement that had to degrade while a remote site can run a variant the job
   prefers within the deadline: the job's preference order outranks locality, as
   it does between sites of one scheduler.
3. Otherwise the best remote site: among reachable sites (link up as measured
   from here, summary fresh) that the data may go to (sovereignty), that the
   tenant can afford (cost limit) and that serve a candidate with room, the one
   with the lowest predicted latency ``rtt from here + best_ms`` (the site's best
   executor's jobs ahead times compute per item, plus compute) within the
   deadline; the most preferred candidate first, a smaller one only when no site
   can run the preferred one (degraded). A ``local_best`` that is late (a caller
   may pass one placed without the deadline) keeps the job unless the remote
   site is better by a clear margin (``FORWARD_MARGIN_MS`` or
   ``FORWARD_MARGIN_FRACTION`` of the local prediction, whichever is larger):
   forwarding costs a hop that a prediction does not fully see.
4. Nothing fits: a refusal with a reason. When every site the request may use is
   another one and all of them are unreachable, the refusal says so
   (``unreachable``, ``ErrorCode.UNAVAILABLE``) so the client gets a clear error
   at once, not a timeout. When this site may serve the job but could not, its own
   placement error (``local_error``) is the answer.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from enum import StrEnum

from din.services.scheduler.links import LinkTable
from din.services.scheduler.placement import Placement
from din.services.scheduler.registry import CLASSES, ExecutorRegistry, ExecutorState
from din.shared.contracts.federation import LinkSummaryV1, ModelSummaryV1, SiteSummaryV1
from din.shared.contracts.job import JobV1
from din.shared.errors import DinError, ErrorCode
from din.shared.topology import Topology

MISSED_SUMMARIES = 3
DOWN_AFTER_MS = 3_000.0
"""A link is down once its oldest unanswered probe is this old."""
FORWARD_MARGIN_MS = 5.0
FORWARD_MARGIN_FRACTION = 0.2


class LinkHealth:
    """Link round trips (a ``LinkTable``) plus whether each link is up, from probe answers.

    The scheduler calls ``probed`` when it sends a probe and ``answered`` when the echo comes back; a link is
    down from the moment its oldest unanswered probe is ``down_after_ms`` old until the next answer.
    """

    def __init__(self, links: LinkTable, down_after_ms: float = DOWN_AFTER_MS) -> None:
        self.links = links
        self.down_after_ms = down_after_ms
        self._unanswered_since: dict[str, float] = {}

    @property
    def home(self) -> str:
        return self.links.home

    def probed(self, site: str, now_ms: float) -> None:
        self._unanswered_since.setdefault(site, now_ms)

    def answered(self, site: str, now_ms: float) -> None:
        self._unanswered_since.pop(site, None)

    def up(self, site: str, now_ms: float) -> bool:
        if site == self.home:
            return True
        since = self._unanswered_since.get(site)
        return since is None or now_ms - since < self.down_after_ms

    def rtt_ms(self, site: str) -> float:
        return self.links.rtt_ms(site)


def _best_with_room(registry: ExecutorRegistry, model: str, site: str) -> dict[str, float | None]:
    best: dict[str, float | None] = {}
    pools = [p for p in registry.pools(model) if p.site == site]
    for c in CLASSES:
        found = [next((s.queue_ms(model, c) for s in pool.best(c) if s.load() < s.capacity_for(c)), None)
                 for pool in pools]
        known = [f for f in found if f is not None]
        best[c.value] = round(min(known), 3) if known else None
    return best


def _model_summary(registry: ExecutorRegistry, model: str, site: str, cost_per_1k: float) -> ModelSummaryV1 | None:
    pools = [p for p in registry.pools(model) if p.site == site]
    members: dict[str, ExecutorState] = {s.id: s for p in pools for s in p.members()}
    if not members:
        return None
    states = list(members.values())
    accuracies = [m.accuracy for s in states for m in s.heartbeat.models if m.name == model and m.accuracy is not None]
    return ModelSummaryV1(
        model=model,
        versions=sorted({p.version for p in pools}),
        executors=len(states),
        free_slots={c.value: sum(max(0, s.capacity_for(c) - s.load()) for s in states) for c in CLASSES},
        queue_depth=sum(s.load() for s in states),
        compute_ms_per_item=round(statistics.median(s.per_item_ms(model) for s in states), 3),
        best_ms=_best_with_room(registry, model, site),
        cost_per_1k=cost_per_1k,
        accuracy=max(accuracies) if accuracies else None,
    )


def summarize(registry: ExecutorRegistry, links: LinkHealth, site: str, *, instance: str, topology: Topology,
              now_ms: float, interval_s: float) -> SiteSummaryV1:
    """This site's summary: one entry per model served here and one per other site's link.

    Its size depends on models and sites only; computing it walks the site's executors once per model (at the
    summary rate, not per job).
    """
    cost = topology.site(site).cost_per_1k
    models = [m for m in (_model_summary(registry, name, site, cost) for name in sorted(registry.models())) if m]
    link_list = [LinkSummaryV1(site=s.name, rtt_ms=round(links.rtt_ms(s.name), 3), up=links.up(s.name, now_ms))
                 for s in topology.sites if s.name != site]
    return SiteSummaryV1(site=site, instance=instance, sent_ms=now_ms, interval_s=interval_s, models=models,
                         links=link_list)


@dataclass
class _Held:
    summary: SiteSummaryV1
    received_ms: float


class RemoteSites:
    """The latest summary of every other site, by the local time it arrived; stale after ``MISSED_SUMMARIES``
    intervals without one (any instance of the site's scheduler may send it)."""

    def __init__(self, home: str) -> None:
        self.home = home
        self._held: dict[str, _Held] = {}

    def observe(self, summary: SiteSummaryV1, now_ms: float) -> bool:
        """Keep ``summary`` (not one of this site's own); return True when the site was unknown or stale."""
        if summary.site == self.home:
            return False
        known = self.get(summary.site, now_ms) is not None
        self._held[summary.site] = _Held(summary, now_ms)
        return not known

    def _stale(self, held: _Held, now_ms: float) -> bool:
        return now_ms - held.received_ms > MISSED_SUMMARIES * held.summary.interval_s * 1000.0

    def get(self, site: str, now_ms: float) -> SiteSummaryV1 | None:
        """The fresh summary of ``site``, or None (never heard of, or stale)."""
        held = self._held.get(site)
        return None if held is None or self._stale(held, now_ms) else held.summary

    def fresh(self, now_ms: float) -> list[SiteSummaryV1]:
        return [h.summary for h in self._held.values() if not self._stale(h, now_ms)]

    def expire(self, now_ms: float) -> list[str]:
        """Drop and return the sites whose summaries went stale."""
        stale = [site for site, held in self._held.items() if self._stale(held, now_ms)]
        for site in stale:
            del self._held[site]
        return stale


class SiteDecision(StrEnum):
    """Where a job goes."""

    LOCAL = "local"
    FORWARD = "forward"
    REFUSE = "refuse"


@dataclass
class SiteOption:
    """One remote site considered for one candidate model: its prediction, or why it was excluded."""

    site: str
    model: str
    predicted_ms: float | None
    excluded_by: str | None


@dataclass
class SiteChoice:
    """The outcome of ``choose_site``: run here, forward to ``site``, or refuse with ``refusal``."""

    decision: SiteDecision
    reason: str
    site: str | None = None
    model: str | None = None
    predicted_ms: float | None = None
    degraded: bool = False
    refusal: str | None = None
    options: list[SiteOption] = field(default_factory=list)
    local_error: DinError | None = None

    def error(self) -> DinError:
        """What to answer the client with when the job is refused."""
        if self.local_error is not None and self.refusal != "unreachable":
            return self.local_error
        code = {
            "unreachable": ErrorCode.UNAVAILABLE,
            "remote_unreachable": ErrorCode.UNAVAILABLE,
            "deadline": ErrorCode.DEADLINE_EXCEEDED,
            "capacity": ErrorCode.OVERLOADED,
        }.get(self.refusal or "", ErrorCode.NO_ELIGIBLE_EXECUTOR)
        retry = {"unreachable": 1000, "remote_unreachable": 1000, "capacity": 50}.get(self.refusal or "")
        return DinError(code, self.reason, retry_after_ms=retry)


def _site_option(job: JobV1, model: str, site: str, summary: SiteSummaryV1 | None, links: LinkHealth,
                 allowed: set[str] | None, cost_limit: float | None, budget_ms: float, now_ms: float) -> SiteOption:
    def excluded(reason: str) -> SiteOption:
        return SiteOption(site, model, None, reason)

    if allowed is not None and site not in allowed:
        return excluded("sovereignty")
    if summary is None or not links.up(site, now_ms):
        return excluded("unreachable")
    served = summary.model_summary(model)
    if served is None or (job.model_version is not None and job.model_version not in served.versions):
        return excluded("no_model")
    if cost_limit is not None and served.cost_per_1k > cost_limit:
        return excluded("cost")
    best = served.best_ms.get(job.sla_class.value)
    if best is None:
        return excluded("capacity")
    predicted = links.rtt_ms(site) + best
    if predicted > budget_ms:
        return SiteOption(site, model, round(predicted, 3), "deadline")
    return SiteOption(site, model, round(predicted, 3), None)


def _best_remote(job: JobV1, candidates: list[str], remote: RemoteSites, links: LinkHealth, topology: Topology,
                 now_ms: float, options: list[SiteOption]) -> tuple[int, SiteOption] | None:
    """The best remote option of the most preferred candidate any site can run in time, with its rank."""
    workload = job.workload
    allowed = set(workload.allowed_sites) if workload and workload.allowed_sites else None
    tenant = next((t for t in topology.tenants if t.name == job.tenant), None)
    cost_limit = tenant.max_cost_per_1k if tenant else None
    costs = {s.name: s.cost_per_1k for s in topology.sites}
    budget_ms = job.deadline_ms - now_ms
    sites = [s.name for s in topology.sites if s.name != remote.home]
    for rank, model in enumerate(candidates):
        considered = [_site_option(job, model, site, remote.get(site, now_ms), links, allowed, cost_limit,
                                   budget_ms, now_ms) for site in sites]
        options.extend(considered)
        feasible = [o for o in considered if o.excluded_by is None]
        if feasible:
            return rank, min(feasible, key=lambda o: (o.predicted_ms, costs.get(o.site, 0.0), o.site))
    return None


def _refusal(job: JobV1, home: str, options: list[SiteOption]) -> tuple[str, str]:
    """(reason code, message) when no site can take ``job``."""
    workload = job.workload
    allowed = set(workload.allowed_sites) if workload and workload.allowed_sites else None
    remote_allowed = sorted({o.site for o in options if o.excluded_by != "sovereignty"})
    unreachable = sorted({o.site for o in options if o.excluded_by == "unreachable"})
    reasons = {o.excluded_by for o in options if o.excluded_by not in (None, "sovereignty", "unreachable")}
    local_allowed = allowed is None or home in allowed
    if remote_allowed and unreachable == remote_allowed and not local_allowed:
        which = "the only site" if len(unreachable) == 1 else "every site"
        return "unreachable", f"{which} this request may use ({', '.join(unreachable)}) is unreachable from {home}"
    if not remote_allowed and not local_allowed:
        return "sovereignty", f"no site this request may use serves {job.model}"
    for reason, message in (("deadline", "no site can answer before the deadline"),
                            ("capacity", f"every site serving {job.model} is full"),
                            ("cost", "no site within the tenant's cost limit serves it"),
                            ("no_model", f"no reachable site serves {job.model}")):
        if reason in reasons:
            return reason, message
    if unreachable:
        return "remote_unreachable", f"the other sites this request may use ({', '.join(unreachable)}) are unreachable"
    return "no_model", f"no other site serves {job.model}"


def choose_site(job: JobV1, local_best: Placement | None, remote: RemoteSites, links: LinkHealth,
                topology: Topology, now_ms: float, *, local_error: DinError | None = None) -> SiteChoice:
    """Where ``job`` runs: here (``local_best``), at the best remote site, or nowhere (see the module's rule).

    ``local_error`` is why local placement failed, if it did; a refusal answers with it when this site may serve
    the job and no remote site is the reason.
    """
    workload = job.workload
    candidates = workload.candidates if workload else [job.model]
    budget_ms = job.deadline_ms - now_ms
    local_in_time = local_best is not None and local_best.predicted_ms <= budget_ms

    def local(reason: str, options: list[SiteOption]) -> SiteChoice:
        return SiteChoice(SiteDecision.LOCAL, reason, remote.home, local_best.model, local_best.predicted_ms,
                          local_best.degraded, options=options)

    forwarded_from = getattr(job, "forwarded_from", None)
    if forwarded_from is not None:
        if local_best is not None:
            return local(f"forwarded from {forwarded_from}: placed here", [])
        return SiteChoice(SiteDecision.REFUSE, f"forwarded from {forwarded_from} and cannot be served here",
                          refusal="already_forwarded", local_error=local_error)
    if local_in_time and not local_best.degraded:
        return local("a local executor meets the deadline", [])

    options: list[SiteOption] = []
    found = _best_remote(job, candidates, remote, links, topology, now_ms, options)
    if found is not None:
        rank, best = found
        local_rank = candidates.index(local_best.model) if local_best and local_best.model in candidates else None
        if local_in_time and (local_rank is None or rank >= local_rank):
            return local("a local executor meets the deadline (degraded; no site runs a preferred variant)",
                         options)
        if not local_in_time and local_best is not None:
            margin = max(FORWARD_MARGIN_MS, FORWARD_MARGIN_FRACTION * local_best.predicted_ms)
            if best.predicted_ms + margin >= local_best.predicted_ms:
                return local("local prediction within the forwarding margin of the best remote site", options)
        why = "a preferred variant runs there in time" if local_in_time else "this site cannot meet the deadline"
        return SiteChoice(SiteDecision.FORWARD, f"forwarded to {best.site}: {why}", best.site, best.model,
                          best.predicted_ms, rank > 0, options=options)
    if local_best is not None:
        return local("no remote site does better", options)
    refusal, message = _refusal(job, remote.home, options)
    return SiteChoice(SiteDecision.REFUSE, message, refusal=refusal, options=options, local_error=local_error)
