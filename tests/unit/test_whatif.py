"""The what-if's baseline (the live policy, offline) decides on the facts the live scheduler decided on: who decided,
the link round trips it priced, its load; so on the same recording it reproduces the live placement."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from din.replay.reader import RecordRange
from din.replay.recorded import RecordedWindow
from din.replay.whatif import LinkFacts, build_jobs, placing_decisions, what_if
from din.services.scheduler.links import LinkTable
from din.services.scheduler.placement import pick_executor
from din.services.scheduler.registry import ExecutorRegistry
from din.services.scheduler.reports import decision_record
from din.shared.contracts.events import AlternativeV1, ClassificationV1, SchedulingDecisionV1
from din.shared.contracts.job import WorkloadClassV1
from din.shared.recording import parse_request_record, request_record
from din.shared.topology import Topology
from tests.support import make_heartbeat, make_job, three_site_topology

T0 = 1_700_000_000_000.0
RTT = {"cloud": {"cloud": 0.1, "factory": 4.2, "branch": 86.0},
       "branch": {"branch": 0.1, "cloud": 86.0, "factory": 90.0},
       "factory": {"factory": 0.1, "cloud": 4.2, "branch": 90.0}}
"""What each site's scheduler priced its links at: a dedicated line to factory, the internet to branch."""

TOPOLOGY = Topology.model_validate(three_site_topology(
    "whatif", {site: [{"id": f"{site}-1", "models": ["small"]}] for site in ("cloud", "factory", "branch")},
    [{"name": "acme"}, {"name": "initech", "sensitive_sites": ["branch"], "always_sensitive": True}]))


def recorded(rid: str, tenant: str, at: float, **options):
    job = make_job(request_id=rid, tenant=tenant, model="small", deadline_ms=int(T0 + at) + 1000, reply_to="",
                   received_ms=T0 + at, **options)
    key, value, headers = request_record(job, b"{}", {})
    return parse_request_record(SimpleNamespace(key=key, value=value, headers=headers))


def live_decision(rid: str, tenant: str, at: float, home: str, site: str, rtt: dict[str, float],
                  queue_ms: float = 1.0, **fields) -> SchedulingDecisionV1:
    """The decision of the scheduler at ``home``: ``site``'s executor, ``queue_ms`` of queueing plus compute, at
    ``rtt[site]``."""
    predicted = rtt[site] + queue_ms
    return SchedulingDecisionV1(
        request_id=rid, tenant=tenant, mode="centralized", sla_class="interactive", chosen_executor=f"{site}-1",
        chosen_site=site, chosen_model="small", degraded=False, predicted_ms=predicted,
        reason="lowest predicted completion",
        alternatives=[AlternativeV1(executor=f"{site}-1", site=site, model="small", predicted_ms=predicted)],
        attempt=1, at_ms=T0 + at + 0.5, scheduler_site=home, link_rtt_ms=rtt, **fields)


def classified(rid: str, tenant: str, at: float, allowed: list[str] | None = None) -> ClassificationV1:
    return ClassificationV1(request_id=rid, tenant=tenant, at_ms=T0 + at, workload=WorkloadClassV1(
        task="t", sla_class="interactive", input_bytes=2, size_class="small", sensitive=allowed is not None,
        allowed_sites=allowed, candidates=["small"]))


def per_site_window(n: int = 40) -> RecordedWindow:
    """A control plane per site: acme's requests placed by the hub's scheduler at the hub (busy: two jobs queued,
    3 ms), initech's (sensitive, branch only) handed to branch and placed by branch's scheduler there (idle, 0.3 ms
    per item). Only the hub's executors' heartbeats are recorded, as with a control plane per site: from the hub,
    branch looks near only to an estimate that mixes in branch's own decisions (the bug: 0.0 ms)."""
    window = RecordedWindow(rng=RecordRange(since_ms=T0))
    for i in range(n):
        at = i * 50.0
        tenant, home = ("initech", "branch") if i % 4 == 3 else ("acme", "cloud")
        rid = f"r{i}"
        window.requests.append(recorded(rid, tenant, at))
        window.classifications.append(classified(rid, tenant, at, ["branch"] if tenant == "initech" else None))
        window.schedulings.append(live_decision(rid, tenant, at, home, home, RTT[home],
                                                0.3 if home == "branch" else 3.0))
    window.heartbeats = [make_heartbeat("cloud-1", "cloud", ["small"], sent_ms=T0 + t, queue_depth={"interactive": 2})
                         for t in range(-500, 2500, 500)]
    window.since_ms, window.until_ms = T0, T0 + n * 50.0 + 2000
    return window


def test_the_live_policy_reproduces_the_live_placement_of_a_control_plane_per_site():
    window = per_site_window()
    report = what_if(window, TOPOLOGY, "latency").as_dict()
    assert report["recorded"]["sites"] == {"cloud": 30, "branch": 10}
    assert report["baseline"]["sites"] == report["recorded"]["sites"], \
        "branch's own decisions price branch at 0.1 ms from branch, never from the hub"
    assert report["reproduced"] == {"compared": 40, "same_site": 40, "same_placement": 40, "sites": {
        "branch": {"live": 10, "offline": 10}, "cloud": {"live": 30, "offline": 30}}}
    assert report["baseline"]["predicted_ms"] == report["recorded"]["predicted_ms"], \
        "the same predictions: branch's executor (no heartbeats recorded) as branch's decisions saw it"
    assert report["link_rtt_ms"] == {"branch": 86.0, "factory": 4.2}, "the hub's links, as it priced them"
    assert report["link_rtt_ms_by_scheduler"]["branch"] == {"cloud": 86.0, "factory": 90.0}
    text = what_if(window, TOPOLOGY, "latency").text()
    assert "live policy reproduces 40 of 40 live placements" in text
    assert "cloud 30 live -> 30 offline" in text and "branch 86.0" in text


def test_without_recorded_links_the_estimate_is_flagged():
    window = per_site_window()
    for d in window.schedulings:
        d.link_rtt_ms, d.scheduler_site = {}, None
    report = what_if(window, TOPOLOGY, "latency")
    assert not report.links_recorded
    assert any("predate link_rtt_ms" in note for note in report.notes)
    assert "ESTIMATED from recorded predictions" in report.text()


def test_links_are_priced_as_recorded_at_the_time_of_each_decision():
    """A branch-only tenant's requests may run at factory or branch; factory's link degrades half-way (as the
    hub's probes measured), and the live scheduler moved them to branch: so does the baseline."""
    topology = Topology.model_validate(three_site_topology(
        "moving", {site: [{"id": f"{site}-1", "models": ["small"]}] for site in ("cloud", "factory", "branch")},
        [{"name": "acme", "sensitive_sites": ["factory", "branch"], "always_sensitive": True}]))
    window = RecordedWindow(rng=RecordRange(since_ms=T0))
    slow_factory = {**RTT["cloud"], "factory": 300.0}
    for i in range(20):
        at, rid = i * 50.0, f"r{i}"
        rtt = RTT["cloud"] if i < 10 else slow_factory
        window.requests.append(recorded(rid, "acme", at))
        window.classifications.append(classified(rid, "acme", at, ["factory", "branch"]))
        window.schedulings.append(live_decision(rid, "acme", at, "cloud", "factory" if i < 10 else "branch", rtt))
    report = what_if(window, topology, "latency").as_dict()
    assert report["recorded"]["sites"] == {"factory": 10, "branch": 10}
    assert report["reproduced"]["same_placement"] == 20
    links = LinkFacts(window, topology)
    assert links.priced_at("cloud", T0 + 100)["factory"] == 4.2
    assert links.priced_at("cloud", T0 + 700)["factory"] == 300.0
    assert links.priced_at("cloud", T0 - 1e6)["factory"] == 4.2, "before the first decision: the first one's"


def test_a_forward_is_not_the_placing_decision_and_the_job_keeps_every_serving_option():
    window = per_site_window(4)
    forward = window.schedulings[3].model_copy(update={
        "chosen_site": None, "chosen_executor": None, "chosen_model": None, "predicted_ms": None,
        "reason": "forwarded to branch: its data may be opened there", "forwarded_to": "branch",
        "scheduler_site": "cloud", "at_ms": window.schedulings[3].at_ms - 0.2})
    window.schedulings.append(forward)
    window.requests.append(recorded("gen", "acme", 300.0, max_tokens=8, split="auto", cascade_threshold=0.7))
    placing = placing_decisions(window)
    assert placing["r3"].scheduler_site == "branch" and placing["r3"].chosen_site == "branch"
    report = what_if(window, TOPOLOGY, "latency").as_dict()
    assert report["recorded"]["refused"] == {}, "a forward is not a refusal"
    job = next(p.job for p in build_jobs(window)[0] if p.job.request_id == "gen")
    assert (job.max_tokens, job.split, job.cascade_threshold) == (8, "auto", 0.7)


def test_hub_only_places_from_the_hub_and_other_policies_from_the_deciding_scheduler():
    window = per_site_window()
    hub_only = what_if(window, TOPOLOGY, "hub-only").as_dict()
    assert hub_only["whatif"]["sites"] == {"cloud": 30}
    assert hub_only["whatif"]["refused"] == {"no_eligible_executor": 10}, "initech's data may not leave branch"
    assert hub_only["baseline"]["sites"] == {"cloud": 30, "branch": 10}


def test_the_decision_record_carries_who_decided_and_the_links_it_priced():
    links = LinkTable(TOPOLOGY, home="cloud")
    links.observe_rtt("factory", 4.0)
    links.observe_rtt("branch", 80.0)
    registry = ExecutorRegistry()
    for site in ("cloud", "factory"):
        registry.observe(make_heartbeat(f"{site}-1", site, ["small"]), 0.0)
    job = make_job(model="small", deadline_ms=int(T0) + 1000)
    placement = pick_executor(job, registry, links, TOPOLOGY, T0, {})
    record = decision_record(job, placement, placement.reason, mode="centralized", centralized=True, now_ms=T0,
                             scheduler_site="cloud", links=links)
    assert record.scheduler_site == "cloud" and record.forwarded_to is None
    assert record.link_rtt_ms == {"cloud": 0.1, "factory": 4.0, "branch": 80.0}
    factory = next(a for a in record.alternatives if a.site == "factory")
    assert factory.predicted_ms == pytest.approx(record.link_rtt_ms["factory"] + 1.0), \
        "the priced round trip is the network part of each prediction"
    forward = decision_record(job, None, "forwarded to cloud: x", mode="centralized", centralized=True, now_ms=T0,
                              scheduler_site="branch", links=links, forwarded_to="cloud")
    assert forward.forwarded_to == "cloud"
