import pytest

from din.services.scheduler.inflight import InflightJob, InflightTable
from din.services.scheduler.links import SAME_SITE_RTT_MS, LinkTable
from din.services.scheduler.placement import pick_executor
from din.services.scheduler.registry import ExecutorRegistry, Finished, finished_by
from din.shared.contracts.events import CompletionV1, HeartbeatV1, ModelLoadedV1
from din.shared.contracts.inference import SlaClass
from din.shared.contracts.job import JobV1, WorkloadClassV1
from din.shared.errors import DinError, ErrorCode
from din.shared.topology import Topology

NOW_MS = 1_000_000.0

TOPOLOGY = Topology.model_validate(
    {
        "name": "t",
        "sites": [
            {"name": "cloud", "role": "hub", "cost_per_1k": 1.0},
            {"name": "factory", "role": "edge", "cost_per_1k": 0.1},
            {"name": "branch", "role": "edge", "cost_per_1k": 0.1},
        ],
        "links": [{"between": ["cloud", "factory"], "path": "dedicated"},
                  {"between": ["cloud", "branch"], "path": "internet"}],
        "tenants": [{"name": "acme"}, {"name": "cheap", "max_cost_per_1k": 0.5}],
    }
)


def beat(executor, site, models, *, queue=None, inflight=0, capacity=100, per_item=1.0, draining=False):
    return HeartbeatV1(
        executor=executor,
        site=site,
        models=[ModelLoadedV1(name=m, version="1", max_batch_size=8, compute_ms_per_item=per_item) for m in models],
        capacity=capacity,
        queue_depth=queue or {},
        inflight=inflight,
        recent_latency_ms=1.0,
        draining=draining,
        interval_s=0.5,
        sent_ms=NOW_MS,
    )


def job(model="digits-large", *, tenant="acme", sla=SlaClass.INTERACTIVE, budget_ms=1000.0, candidates=None,
        allowed=None):
    return JobV1(
        request_id="r1",
        tenant=tenant,
        model=model,
        sla_class=sla,
        deadline_ms=int(NOW_MS + budget_ms),
        reply_to="_INBOX.x",
        content_type="application/json",
        received_ms=NOW_MS,
        workload=WorkloadClassV1(
            task="image-classification",
            sla_class=sla,
            input_bytes=300,
            size_class="small",
            sensitive=allowed is not None,
            allowed_sites=allowed,
            candidates=candidates or [model],
        ),
    )


def registry(*beats):
    reg = ExecutorRegistry()
    for hb in beats:
        reg.observe(hb, now=0.0)
    return reg


def links(**rtts):
    table = LinkTable(TOPOLOGY, home="cloud")
    for site, rtt in rtts.items():
        table.observe_rtt(site, rtt)
    return table


def place(j, reg, table=None):
    return pick_executor(j, reg.live(), table or links(factory=1.0, branch=20.0), TOPOLOGY, NOW_MS,
                         {"acme": None, "cheap": 0.5})


def test_lowest_predicted_completion_wins_network_plus_queue_plus_compute():
    reg = registry(
        beat("cloud-1", "cloud", ["digits-large"], queue={"interactive": 30}),
        beat("factory-1", "factory", ["digits-large"], queue={"interactive": 2}),
        beat("branch-1", "branch", ["digits-large"]),
    )
    chosen = place(job(), reg)
    assert chosen.executor.id == "factory-1"
    assert chosen.predicted_ms == pytest.approx(1.0 + 2 * 1.0 + 1.0)
    assert {a.executor for a in chosen.alternatives} == {"cloud-1", "factory-1", "branch-1"}


def test_realtime_does_not_count_batch_work_queued_behind_it():
    reg = registry(
        beat("cloud-1", "cloud", ["m"], queue={"batch": 500}, capacity=1000),
        beat("factory-1", "factory", ["m"]),
    )
    assert place(job("m", sla=SlaClass.REALTIME), reg).executor.id == "cloud-1"
    assert place(job("m", sla=SlaClass.BATCH), reg).executor.id == "factory-1"


def test_dispatches_between_heartbeats_count_as_queued():
    reg = registry(beat("a", "cloud", ["m"]), beat("b", "cloud", ["m"]))
    first = place(job("m"), reg).executor.id
    reg.note_dispatch(first, SlaClass.INTERACTIVE)
    assert place(job("m"), reg).executor.id != first


def test_sovereignty_is_a_hard_constraint():
    reg = registry(beat("cloud-1", "cloud", ["m"]), beat("branch-1", "branch", ["m"], queue={"interactive": 90}))
    chosen = place(job("m", allowed=["branch"]), reg)
    assert chosen.executor.site == "branch"
    assert any(a.excluded_by == "sovereignty" for a in chosen.alternatives)
    with pytest.raises(DinError) as caught:
        place(job("m", allowed=["factory"]), reg)
    assert caught.value.code == ErrorCode.NO_ELIGIBLE_EXECUTOR


def test_cost_limit_excludes_expensive_sites():
    reg = registry(beat("cloud-1", "cloud", ["m"]), beat("factory-1", "factory", ["m"], queue={"interactive": 50}))
    assert place(job("m", tenant="cheap"), reg).executor.site == "factory"


def test_degrades_to_a_smaller_variant_when_the_large_one_is_saturated_or_too_slow():
    reg = registry(
        beat("cloud-1", "cloud", ["big"], queue={"interactive": 99}, inflight=1, capacity=100),
        beat("cloud-2", "cloud", ["small"], per_item=0.1),
    )
    chosen = place(job("big", candidates=["big", "small"]), reg)
    assert (chosen.model, chosen.degraded) == ("small", True)
    with pytest.raises(DinError) as caught:
        place(job("big"), reg)
    assert caught.value.code == ErrorCode.OVERLOADED
    slow = registry(beat("cloud-1", "cloud", ["big"], per_item=50.0), beat("cloud-2", "cloud", ["small"]))
    chosen = place(job("big", budget_ms=20.0, candidates=["big", "small"]), slow)
    assert chosen.model == "small"
    with pytest.raises(DinError) as caught:
        place(job("big", budget_ms=20.0), slow)
    assert caught.value.code == ErrorCode.DEADLINE_EXCEEDED


def test_preferred_model_wins_when_it_can_meet_the_deadline():
    reg = registry(beat("cloud-1", "cloud", ["big"], per_item=3.0), beat("cloud-2", "cloud", ["small"], per_item=0.1))
    chosen = place(job("big", candidates=["big", "small"]), reg)
    assert (chosen.model, chosen.degraded) == ("big", False)


def test_unknown_model_and_draining_executors():
    reg = registry(beat("cloud-1", "cloud", ["m"], draining=True))
    with pytest.raises(DinError) as caught:
        place(job("m"), reg)
    assert caught.value.code == ErrorCode.NO_ELIGIBLE_EXECUTOR


def test_registry_discovers_and_expires_after_three_missed_beats():
    reg = ExecutorRegistry()
    assert reg.observe(beat("a", "cloud", ["m"]), now=0.0) is True
    assert reg.observe(beat("a", "cloud", ["m"]), now=0.4) is False
    assert reg.expire(now=1.8) == []
    assert [s.id for s in reg.expire(now=2.0)] == ["a"]
    assert reg.live() == []


def test_link_table_prices_jitter_and_loss():
    table = LinkTable(TOPOLOGY, home="cloud")
    assert table.rtt_ms("cloud") == SAME_SITE_RTT_MS
    for rtt in (10.0, 10.0, 10.0):
        table.sent("branch")
        table.observe_rtt("branch", rtt)
    steady = table.rtt_ms("branch")
    assert steady == pytest.approx(10.0)
    table.sent("branch")
    table.sent("branch")
    assert table.rtt_ms("branch") > steady
    assert table.snapshot()["branch"]["path"] == "internet"


def test_inflight_table_by_executor_and_deadline():
    table = InflightTable()
    for i, (executor, deadline) in enumerate([("a", 100), ("b", 50), ("a", 300)]):
        j = job("m")
        j.request_id, j.deadline_ms = f"r{i}", deadline
        table.add(InflightJob(j, b"", {}, executor, "cloud", [executor]), due_ms=deadline + 5)
    assert table.due(now_ms=50) == [], "not before the deadline plus the completion's way back"
    assert [e.job.request_id for e in table.due(now_ms=55)] == ["r1"]
    assert table.complete("r0") is not None
    assert [e.job.request_id for e in table.on_executor("a")] == ["r2"]
    assert len(table) == 0
    assert table.due(now_ms=10_000) == []


def test_a_site_queue_absorbs_work_beyond_an_executors_capacity():
    reg = registry(beat("cloud-1", "cloud", ["m"], queue={"batch": 5}, capacity=5))
    with pytest.raises(DinError):
        place(job("m", sla=SlaClass.BATCH), reg)
    queued = pick_executor(job("m", sla=SlaClass.BATCH), reg.live(), links(), TOPOLOGY, NOW_MS, {},
                           queue_at_site=True)
    assert queued.executor.id == "cloud-1" and queued.predicted_ms > 5.0


def test_near_ties_spread_over_the_least_loaded_executors():
    import random

    reg = registry(beat("a", "cloud", ["m"]), beat("b", "cloud", ["m"]), beat("c", "cloud", ["m"], per_item=5.0))
    rng = random.Random(1)
    picks = {pick_executor(job("m"), reg.live(), links(), TOPOLOGY, NOW_MS, {}, rng=rng).executor.id
             for _ in range(40)}
    assert picks == {"a", "b"}
    reg.note_dispatch("a", SlaClass.INTERACTIVE)
    assert {pick_executor(job("m"), reg.live(), links(), TOPOLOGY, NOW_MS, {}, rng=rng).executor.id
            for _ in range(20)} == {"b"}


def test_completions_after_a_heartbeat_release_what_its_snapshot_counted():
    reg = registry(beat("a", "cloud", ["m"], inflight=1, capacity=1))
    with pytest.raises(DinError):
        place(job("m"), reg)
    reg.note_completion("a", SlaClass.INTERACTIVE)
    assert reg.get("a").load() == 0
    assert place(job("m"), reg).executor.id == "a"



def test_a_heartbeat_handled_after_a_completion_it_predates_does_not_count_that_job_again():
    reg = registry(beat("a", "cloud", ["m"], capacity=1))
    reg.note_dispatch("a", SlaClass.INTERACTIVE)
    done = Finished(SlaClass.INTERACTIVE, queued_ms=NOW_MS - 5, done_ms=NOW_MS + 20)
    reg.note_completion("a", SlaClass.INTERACTIVE, done)
    stale = beat("a", "cloud", ["m"], queue={"interactive": 1}, capacity=1)
    reg.observe(stale, now=0.1)
    assert reg.get("a").load() == 0
    assert place(job("m"), reg).executor.id == "a"
    later = stale.model_copy(update={"queue_depth": {}, "sent_ms": NOW_MS + 30})
    reg.observe(later, now=0.2)
    assert reg.get("a").load() == 0 and not reg.get("a").finished


def test_a_completion_queued_after_the_snapshot_is_not_taken_off_it():
    reg = registry(beat("a", "cloud", ["m"], capacity=2))
    reg.note_completion("a", SlaClass.INTERACTIVE, Finished(SlaClass.INTERACTIVE, NOW_MS + 1, NOW_MS + 2))
    reg.observe(beat("a", "cloud", ["m"], queue={"interactive": 1}, capacity=2), now=0.1)
    assert reg.get("a").load() == 1


def test_finished_by_times_a_completion_only_for_the_executor_that_sent_it():
    event = CompletionV1(request_id="r", tenant="acme", site="cloud", executor="a", model="m", model_version="1",
                         sla_class=SlaClass.BATCH, ok=True, batch_size=1, degraded=False,
                         timings_ms={"queue": 3.0, "compute": 2.0, "total": 9.0}, at_ms=NOW_MS)
    assert finished_by(event, "a") == Finished(SlaClass.BATCH, NOW_MS - 5.0, NOW_MS)
    assert finished_by(event, "b") is None

def staged(request_id, executor, later, deadline=10_000):
    j = job("m")
    j.request_id, j.deadline_ms = request_id, deadline
    return InflightJob(j, b"", {}, executor, "factory", [executor, *later] if executor else list(later),
                       later=list(later))


def test_inflight_advance_moves_a_job_on_to_its_next_stages_executor():
    table = InflightTable()
    table.add(staged("r1", "head-1", ["tail-1", "last-1"]))
    entry = table.advance("r1")
    assert (entry.executor, entry.later, entry.advanced) == ("tail-1", ["last-1"], 1)
    assert table.advance("r1").executor == "last-1"
    last = table.advance("r1")
    assert (last.executor, last.later, last.advanced) == (None, [], 3)
    assert len(table) == 1  # advancing never closes the job: only its answer does
    assert table.complete("r1") is entry


def test_inflight_advance_of_an_unknown_job_changes_nothing():
    table = InflightTable()
    table.add(staged("r1", "head-1", ["tail-1"]))
    assert table.advance("nope") is None
    assert table.complete("r1").executor == "head-1"
    assert table.advance("r1") is None  # a stage-done event arriving after the answer


def test_inflight_on_executor_finds_a_job_by_a_later_stages_executor():
    table = InflightTable()
    table.add(staged("r1", "head-1", ["tail-1"]))
    table.add(staged("r2", "head-2", ["tail-2"]))
    table.add(staged("r3", "tail-1", []))
    assert sorted(e.job.request_id for e in table.on_executor("tail-1")) == ["r1", "r3"]
    assert [e.job.request_id for e in table.on_executor("head-2")] == ["r2"]
    assert len(table) == 0


def test_inflight_a_finished_stages_executor_no_longer_holds_the_job():
    table = InflightTable()
    table.add(staged("r1", "prefill-1", ["decode-1"]))
    table.advance("r1")
    assert table.on_executor("prefill-1") == []
    assert [e.job.request_id for e in table.on_executor("decode-1")] == ["r1"]


def test_inflight_distributed_stages_wait_in_site_queues():
    table = InflightTable()
    table.add(staged("r1", None, []))
    assert table.advance("r1").executor is None
    assert [e.job.request_id for e in table.on_site("factory")] == ["r1"]


def test_registry_pardons_every_executor_after_the_scheduler_was_deaf():
    reg = ExecutorRegistry()
    reg.observe(beat("a", "cloud", ["m"]), now=0.0)
    assert reg.overdue(now=2.0)
    reg.pardon(now=2.0)
    assert not reg.overdue(now=3.0) and reg.expire(now=3.0) == []
    assert [s.id for s in reg.expire(now=3.6)] == ["a"]


def test_inflight_watchdog_takes_a_job_at_its_latest_dispatchs_due_time():
    table = InflightTable()
    j = job("m")
    j.request_id, j.deadline_ms = "r0", 100
    table.add(InflightJob(j, b"", {}, "a", "cloud", ["a"]), due_ms=105)
    table.add(InflightJob(j, b"", {}, "b", "factory", ["b"]), due_ms=140)
    assert not table.overdue(now_ms=120) and table.due(now_ms=120) == []
    assert table.get("r0").executor == "b"
    assert [e.executor for e in table.due(now_ms=140)] == ["b"]
    assert not table.overdue(now_ms=10_000)
