"""Federated placement: site summaries, the table of remote sites, and where a job goes (local first)."""

from dataclasses import dataclass, field

import pytest

from din.services.scheduler.federation import (
    DOWN_AFTER_MS,
    LinkHealth,
    RemoteSites,
    SiteDecision,
    choose_site,
    summarize,
)
from din.services.scheduler.links import LinkTable
from din.services.scheduler.placement import Placement
from din.services.scheduler.registry import ExecutorRegistry, ExecutorState
from din.shared.contracts.events import HeartbeatV1, ModelLoadedV1
from din.shared.contracts.federation import ModelSummaryV1, SiteSummaryV1
from din.shared.contracts.inference import SlaClass
from din.shared.contracts.job import JobV1, WorkloadClassV1
from din.shared.errors import DinError, ErrorCode
from din.shared.topology import Topology

NOW_MS = 1_000_000.0
HOME = "factory"
TOPOLOGY = Topology.model_validate({
    "name": "t",
    "sites": [{"name": "cloud", "role": "hub", "cost_per_1k": 1.0},
              {"name": "factory", "role": "edge", "cost_per_1k": 0.1},
              {"name": "branch", "role": "edge", "cost_per_1k": 0.3},
              {"name": "lab", "role": "edge", "cost_per_1k": 0.2}],
    "links": [{"between": ["cloud", "factory"], "path": "dedicated"},
              {"between": ["cloud", "branch"], "path": "internet"},
              {"between": ["cloud", "lab"], "path": "vpn"}],
    "tenants": [{"name": "acme"}, {"name": "cheap", "max_cost_per_1k": 0.5}],
})
RTT_MS = {"cloud": 2.0, "branch": 20.0, "lab": 10.0}


def beat(executor, site, models=("m",), *, queue=None, inflight=0, capacity=10, per_item=1.0, accuracy=None):
    return HeartbeatV1(
        executor=executor, site=site,
        models=[ModelLoadedV1(name=m, version="1", max_batch_size=8, compute_ms_per_item=per_item, accuracy=accuracy)
                for m in models],
        capacity=capacity, queue_depth=queue or {}, inflight=inflight, recent_latency_ms=1.0, interval_s=0.5,
        sent_ms=NOW_MS,
    )


def job(model="m", *, tenant="acme", budget_ms=100.0, candidates=None, allowed=None, forwarded_from=None,
        version=None):
    j = JobV1(
        request_id="r1", tenant=tenant, model=model, sla_class=SlaClass.INTERACTIVE,
        deadline_ms=int(NOW_MS + budget_ms), reply_to="_INBOX.x", content_type="application/json",
        received_ms=NOW_MS, model_version=version,
        workload=WorkloadClassV1(task="t", sla_class=SlaClass.INTERACTIVE, input_bytes=300, size_class="small",
                                 sensitive=allowed is not None, allowed_sites=allowed,
                                 candidates=candidates or [model]),
    )
    if forwarded_from is not None:
        object.__setattr__(j, "forwarded_from", forwarded_from)
    return j


def site_summary(site, models=None, *, interval_s=1.0):
    """A summary of ``site`` serving ``models`` ({name: best_ms or None for no room}), cost from the topology."""
    models = {"m": 5.0} if models is None else models
    cost = TOPOLOGY.site(site).cost_per_1k
    return SiteSummaryV1(
        site=site, instance=f"{site}-sched", sent_ms=NOW_MS, interval_s=interval_s,
        models=[ModelSummaryV1(model=name, versions=["1"], executors=2, free_slots={c.value: 3 for c in SlaClass},
                               queue_depth=4, compute_ms_per_item=1.0, best_ms={c.value: best for c in SlaClass},
                               cost_per_1k=cost)
                for name, best in models.items()],
    )


def link_health(down=()):
    table = LinkTable(TOPOLOGY, home=HOME)
    for site, rtt in RTT_MS.items():
        table.observe_rtt(site, rtt)
    health = LinkHealth(table)
    for site in down:
        health.probed(site, NOW_MS - DOWN_AFTER_MS - 1)
    return health


def local_placement(predicted_ms, model="m", degraded=False):
    return Placement(ExecutorState(beat("f1", HOME, (model,)), 0.0), model, predicted_ms, degraded, "local", [])


@dataclass
class Case:
    name: str
    job: JobV1
    local: Placement | None
    remotes: dict = field(default_factory=lambda: {"cloud": {"m": 5.0}, "lab": {"m": 1.0}})
    down: tuple = ()
    stale: tuple = ()
    decision: SiteDecision = SiteDecision.FORWARD
    site: str | None = None
    model: str | None = "m"
    degraded: bool = False
    refusal: str | None = None
    code: ErrorCode | None = None
    local_error: DinError | None = None


LOCAL_DEADLINE = DinError(ErrorCode.DEADLINE_EXCEEDED, "local executors too slow")
CASES = [
    Case("a local executor that meets the deadline keeps the job", job(), local_placement(3.0),
         decision=SiteDecision.LOCAL, site=HOME),
    Case("local first even when a remote site predicts faster", job(), local_placement(30.0),
         remotes={"cloud": {"m": 0.1}}, decision=SiteDecision.LOCAL, site=HOME),
    Case("no local executor: the lowest rtt + best_ms wins (cloud 2+5 against lab 10+1)", job(), None,
         site="cloud"),
    Case("sovereignty: only the allowed site", job(allowed=["branch"]), None,
         remotes={"cloud": {"m": 1.0}, "branch": {"m": 1.0}}, site="branch"),
    Case("the only allowed site's link is down: unreachable, answered at once", job(allowed=["branch"]), None,
         remotes={"cloud": {"m": 1.0}, "branch": {"m": 1.0}}, down=("branch",), decision=SiteDecision.REFUSE,
         model=None, refusal="unreachable", code=ErrorCode.UNAVAILABLE),
    Case("the only allowed site's summary is stale: unreachable", job(allowed=["branch"]), None,
         remotes={"cloud": {"m": 1.0}, "branch": {"m": 1.0}}, stale=("branch",), decision=SiteDecision.REFUSE,
         model=None, refusal="unreachable", code=ErrorCode.UNAVAILABLE),
    Case("a down link is skipped for the next best site", job(), None, down=("cloud",), site="lab"),
    Case("cost limit: the hub is too expensive for the tenant", job(tenant="cheap"), None,
         remotes={"cloud": {"m": 1.0}, "lab": {"m": 5.0}}, site="lab"),
    Case("deadline: a site is too slow", job(budget_ms=8.0), None, site="cloud"),
    Case("deadline: every site is too slow", job(budget_ms=5.0), None, decision=SiteDecision.REFUSE, model=None,
         refusal="deadline", code=ErrorCode.DEADLINE_EXCEEDED),
    Case("every site is full", job(), None, remotes={"cloud": {"m": None}, "lab": {"m": None}},
         decision=SiteDecision.REFUSE, model=None, refusal="capacity", code=ErrorCode.OVERLOADED),
    Case("no site serves the model", job("other"), None, decision=SiteDecision.REFUSE, model=None,
         refusal="no_model", code=ErrorCode.NO_ELIGIBLE_EXECUTOR),
    Case("a pinned version no site serves", job(version="9"), None, decision=SiteDecision.REFUSE, model=None,
         refusal="no_model", code=ErrorCode.NO_ELIGIBLE_EXECUTOR),
    Case("a forwarded job is never forwarded again", job(forwarded_from="cloud"), None,
         decision=SiteDecision.REFUSE, model=None, refusal="already_forwarded", code=ErrorCode.NO_ELIGIBLE_EXECUTOR),
    Case("a forwarded job runs here when it can, however slow", job(forwarded_from="cloud", budget_ms=10.0),
         local_placement(50.0), decision=SiteDecision.LOCAL, site=HOME),
    Case("a degraded local answer loses to the preferred variant elsewhere", job("big", candidates=["big", "m"]),
         local_placement(3.0, "m", degraded=True), remotes={"cloud": {"big": 5.0}}, site="cloud", model="big"),
    Case("a degraded local answer stays when no site runs the preferred variant", job("big", candidates=["big", "m"]),
         local_placement(3.0, "m", degraded=True), decision=SiteDecision.LOCAL, site=HOME, degraded=True),
    Case("no site runs the preferred variant: the smaller one elsewhere, degraded", job("big", candidates=["big", "m"]),
         None, site="cloud", degraded=True),
    Case("a late local placement stays within the forwarding margin", job(budget_ms=9.0), local_placement(10.0),
         decision=SiteDecision.LOCAL, site=HOME),
    Case("a late local placement goes when a site is clearly better", job(budget_ms=9.0), local_placement(40.0),
         site="cloud"),
    Case("this site may serve but could not: its own error, not the remote one",
         job(allowed=["factory", "branch"]), None, remotes={"branch": {"m": 1.0}}, down=("branch",),
         decision=SiteDecision.REFUSE, model=None, refusal="remote_unreachable", code=ErrorCode.DEADLINE_EXCEEDED,
         local_error=LOCAL_DEADLINE),
    Case("sovereignty excludes every site", job(allowed=["nowhere"]), None, decision=SiteDecision.REFUSE, model=None,
         refusal="sovereignty", code=ErrorCode.NO_ELIGIBLE_EXECUTOR),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_choose_site(case):
    remote = RemoteSites(HOME)
    for site, models in case.remotes.items():
        remote.observe(site_summary(site, models), NOW_MS - (10_000 if site in case.stale else 0))
    choice = choose_site(case.job, case.local, remote, link_health(case.down), TOPOLOGY, NOW_MS,
                         local_error=case.local_error)
    assert (choice.decision, choice.site, choice.model, choice.degraded) == (
        case.decision, case.site, case.model, case.degraded), choice.reason
    assert choice.refusal == case.refusal
    if case.code is not None:
        assert choice.error().code == case.code
    if case.decision == SiteDecision.FORWARD:
        assert choice.predicted_ms == pytest.approx(
            RTT_MS[case.site] + case.remotes[case.site][case.model])


def registry_at(site_sizes):
    reg = ExecutorRegistry()
    for site, size in site_sizes.items():
        for i in range(size):
            reg.observe(beat(f"{site}{i}", site, ("m", "small"), queue={"interactive": i % 4}, per_item=1.0 + i % 3,
                             accuracy=0.9), now=0.0)
    return reg


def test_a_summary_does_not_grow_with_the_executors_at_the_site():
    small = summarize(registry_at({HOME: 3, "cloud": 5}), link_health(), HOME, instance="s1", topology=TOPOLOGY,
                      now_ms=NOW_MS, interval_s=1.0)
    large = summarize(registry_at({HOME: 600, "cloud": 5}), link_health(), HOME, instance="s1", topology=TOPOLOGY,
                      now_ms=NOW_MS, interval_s=1.0)
    assert [m.model for m in small.models] == [m.model for m in large.models] == ["m", "small"]
    assert [link.site for link in large.links] == ["cloud", "branch", "lab"]
    assert abs(len(large.model_dump_json()) - len(small.model_dump_json())) < 40


def test_a_summary_counts_only_the_sites_own_executors_and_their_room():
    reg = ExecutorRegistry()
    reg.observe(beat("f1", HOME, queue={"interactive": 2}, per_item=1.0, accuracy=0.8), now=0.0)
    reg.observe(beat("f2", HOME, inflight=10, per_item=3.0), now=0.0)
    reg.observe(beat("f3", HOME, per_item=2.0, accuracy=0.9), now=0.0)
    reg.observe(beat("c1", "cloud", per_item=0.1), now=0.0)
    summary = summarize(reg, link_health(down=("branch",)), HOME, instance="s1", topology=TOPOLOGY, now_ms=NOW_MS,
                        interval_s=1.0)
    (m,) = summary.models
    assert (m.executors, m.queue_depth, m.compute_ms_per_item, m.accuracy, m.cost_per_1k) == (3, 12, 2.0, 0.9, 0.1)
    assert m.free_slots["interactive"] == (10 - 2) + 0 + 10
    assert m.best_ms["interactive"] == pytest.approx(2.0)
    assert {link.site: link.up for link in summary.links} == {"cloud": True, "branch": False, "lab": True}


def test_remote_sites_expire_after_three_missed_summaries():
    remote = RemoteSites(HOME)
    assert remote.observe(site_summary(HOME), NOW_MS) is False
    assert remote.observe(site_summary("cloud", interval_s=1.0), NOW_MS) is True
    assert remote.observe(site_summary("cloud", interval_s=1.0), NOW_MS + 500) is False
    assert remote.get("cloud", NOW_MS + 3_400) is not None
    assert remote.get("cloud", NOW_MS + 3_600) is None
    assert [s.site for s in remote.fresh(NOW_MS + 1_000)] == ["cloud"]
    assert remote.expire(NOW_MS + 3_600) == ["cloud"]
    assert remote.get(HOME, NOW_MS) is None


def test_a_link_is_down_while_its_oldest_probe_is_unanswered_too_long():
    health = link_health()
    assert health.up("cloud", NOW_MS)
    health.probed("cloud", NOW_MS)
    health.probed("cloud", NOW_MS + 1_000)
    assert health.up("cloud", NOW_MS + DOWN_AFTER_MS - 1)
    assert not health.up("cloud", NOW_MS + DOWN_AFTER_MS + 1)
    health.answered("cloud", NOW_MS + DOWN_AFTER_MS + 2)
    assert health.up("cloud", NOW_MS + DOWN_AFTER_MS + 3)
    assert health.up(HOME, NOW_MS)
