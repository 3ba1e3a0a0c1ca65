"""The autoscaler in ``din report`` (the "Elastic capacity" section, jobs held for a cold start counted once) and in
``din status`` (pools, cost, decisions from its health answer)."""

from __future__ import annotations

import json
import re

import pytest

from din.commands.report import REPORT_TOPICS
from din.commands.stack import autoscaler_lines, pool_rows
from din.replay.elastic import elastic_capacity, held_waits
from din.replay.outcomes import NO_OUTCOME, ends_request, final_outcomes, is_awaiting
from din.replay.reader import RecordRange
from din.replay.recorded import EVENT_TOPICS, RecordedWindow, _target
from din.replay.report import render_report, window_traffic
from din.shared.bus.kafka import READS
from din.shared.contracts.events import CompletionV1, HealthV1, SchedulingDecisionV1
from din.shared.contracts.scaling import AWAITING_EXECUTOR, ScalingAction, ScalingDecisionV1
from din.shared.naming import Topics

T0 = 1_700_000_000_000.0


def decided(rid: str, at: float, site: str | None, reason: str = "lowest predicted completion") -> SchedulingDecisionV1:
    return SchedulingDecisionV1(request_id=rid, tenant="acme", mode="centralized", sla_class="interactive",
                                chosen_executor=f"{site}-pool-1" if site else None, chosen_site=site,
                                chosen_model="m" if site else None, degraded=False,
                                predicted_ms=1.0 if site else None, reason=reason, alternatives=[], attempt=1,
                                at_ms=T0 + at)


def held(rid: str, at: float) -> SchedulingDecisionV1:
    return decided(rid, at, None, AWAITING_EXECUTOR)


def done(rid: str, at: float, total: float = 5.0) -> CompletionV1:
    return CompletionV1(request_id=rid, tenant="acme", site="cloud", executor="cloud-pool-1", model="m",
                        model_version="1", sla_class="interactive", ok=True, batch_size=1, degraded=False,
                        timings_ms={"total": total}, at_ms=T0 + at)


def scaled(action: ScalingAction, at: float, before: int, after: int, *, pool: str = "small", site: str = "cloud",
           executor: str | None = None, cold_start_ms: float | None = None, cost: float = 1.0,
           reason: str = "busy 0.9 > 0.7") -> ScalingDecisionV1:
    return ScalingDecisionV1(site=site, pool=pool, models=["m"], action=action, executor=executor,
                             executors_before=before, executors_after=after, burst=site == "rented", reason=reason,
                             cost_per_hour=cost, cold_start_ms=cold_start_ms, provider="local", at_ms=T0 + at)


def window(schedulings=(), completions=(), scalings=()) -> RecordedWindow:
    return RecordedWindow(rng=RecordRange(since_ms=T0), schedulings=list(schedulings), completions=list(completions),
                          scalings=list(scalings), since_ms=T0, until_ms=T0 + 60_000)


HISTORY = [
    scaled(ScalingAction.SCALE_OUT, 1_000, 0, 1, executor="cloud-small-1", reason="a job awaits an executor"),
    scaled(ScalingAction.STARTED, 3_000, 1, 1, executor="cloud-small-1", cold_start_ms=2_000.0, cost=2.0),
    scaled(ScalingAction.SCALE_OUT, 10_000, 1, 2, executor="cloud-small-2"),
    scaled(ScalingAction.START_FAILED, 40_000, 2, 2, executor="cloud-small-2", reason="not ready in 30 s"),
    scaled(ScalingAction.SCALE_OUT, 41_000, 2, 2, executor="cloud-small-3"),
    scaled(ScalingAction.STARTED, 45_000, 2, 2, executor="cloud-small-3", cold_start_ms=4_000.0, cost=3.0),
    scaled(ScalingAction.SCALE_OUT, 20_000, 0, 1, site="rented", executor="rented-small-1", cost=2.5),
    scaled(ScalingAction.STARTED, 29_000, 1, 1, site="rented", executor="rented-small-1", cold_start_ms=9_000.0,
           cost=3.5),
    scaled(ScalingAction.SCALE_IN, 50_000, 1, 0, site="rented", executor="rented-small-1", reason="idle 60 s"),
    scaled(ScalingAction.STOPPED, 52_000, 0, 0, site="rented", executor="rented-small-1", cost=2.75),
]


# -- a job held while a pool scales from zero counts once, by its final outcome

def test_an_awaiting_executor_record_is_no_end_of_the_request():
    hold = held("r", 0)
    assert is_awaiting(hold) and not ends_request(hold)
    assert ends_request(decided("r", 0, None, "no_eligible_executor"))
    assert not is_awaiting(decided("r", 0, "cloud")) and not ends_request(decided("r", 0, "cloud"))


def test_a_held_request_placed_after_the_cold_start_counts_once_as_answered():
    outcomes = final_outcomes([], [held("r", 0), decided("r", 2_500, "cloud")], [done("r", 2_600, total=2_600.0)])
    assert list(outcomes) == ["r"]
    o = outcomes["r"]
    assert (o.ok, o.stage, o.code, o.latency_ms, o.awaited_executor) == (True, "executor", "ok", 2_600.0, True)
    traffic = window_traffic(window([held("r", 0), decided("r", 2_500, "cloud")], [done("r", 2_600)]))
    live = traffic.live.summary()
    assert (live["requests"], live["answered"], live["refused_by_scheduler"]) == (1, 1, {})
    assert live["awaited_executor"] == 1


def test_a_held_request_still_waiting_at_the_window_end_is_not_refused():
    o = final_outcomes([], [held("r", 0)], [])["r"]
    assert (o.ok, o.code, o.stage) == (False, NO_OUTCOME, None)
    placed_not_done = final_outcomes([], [held("r", 0), decided("r", 100, "cloud")], [])["r"]
    assert (placed_not_done.code, placed_not_done.stage) == (NO_OUTCOME, None)


def test_a_held_request_refused_at_its_deadline_counts_once_by_that_refusal():
    traffic = window_traffic(window([held("r", 0), decided("r", 30_000, None, "no_eligible_executor")]))
    assert traffic.live.refused("scheduler") == {"no_eligible_executor": 1}
    assert traffic.live.requests == 1


def test_a_request_held_twice_counts_once():
    records = [held("r", 0), decided("r", 100, "cloud"), held("r", 200), decided("r", 900, "cloud")]
    outcomes = final_outcomes([], records, [done("r", 1_000)])
    assert len(outcomes) == 1 and outcomes["r"].ok
    assert held_waits(records) == [100.0], "the first hold to the first placement after it"


# -- the "Elastic capacity" section

def test_no_section_and_no_json_without_scaling_records():
    w = window([decided("r", 0, "cloud")], [done("r", 5)])
    traffic = window_traffic(w)
    assert traffic.elastic is None and elastic_capacity([]) is None
    assert "elastic_capacity" not in traffic.summary()
    assert "Elastic capacity" not in render_report(w, traffic=traffic)


def test_pools_counts_cold_starts_and_desired_sizes():
    capacity = elastic_capacity(HISTORY)
    assert sorted(capacity.pools) == ["cloud/small", "rented/small"]
    cloud, rented = capacity.pools["cloud/small"], capacity.pools["rented/small"]
    assert [d.at_ms for d in cloud.decisions] == sorted(d.at_ms for d in cloud.decisions)
    assert cloud.actions() == {"scale_out": 3, "started": 2, "start_failed": 1}
    assert capacity.actions()["started"] == 3 and capacity.actions()["stopped"] == 1
    summary = capacity.summary()
    assert summary["cold_starts"] == {"count": 3, "median_ms": 4_000.0, "max_ms": 9_000.0}
    assert summary["pools"]["cloud/small"]["cold_starts"] == {"count": 2, "median_ms": 3_000.0, "max_ms": 4_000.0}
    assert summary["pools"]["rented/small"]["burst"] is True
    assert summary["pools"]["rented/small"]["desired"] == {"first": 0, "last": 0, "max": 1}
    assert summary["cost_per_hour"] == {"last": 2.75, "max": 3.5}
    assert len(summary["decisions"]) == len(HISTORY)
    assert rented.desired(T0, T0 + 60_000) == [(T0, 0.0), (T0 + 20_000, 1.0), (T0 + 29_000, 1.0),
                                               (T0 + 50_000, 0.0), (T0 + 52_000, 0.0), (T0 + 60_000, 0.0)]
    assert cloud.desired()[0] == (T0 + 1_000, 0.0) and cloud.desired()[-1] == (T0 + 45_000, 2.0)


def test_the_section_lists_decisions_plots_desired_sizes_and_held_requests():
    w = window([held("r1", 0), decided("r1", 3_100, "cloud"), held("r2", 500),
                decided("r2", 30_000, None, "no_eligible_executor"), held("replay-ab12cd34-r3", 600)],
               [done("r1", 3_200)], HISTORY)
    traffic = window_traffic(w)
    page = render_report(w, traffic=traffic)
    section = page[page.index("<h2>Elastic capacity</h2>"):]
    assert section.count("<svg") == 1 and "Desired executors per pool" in section
    assert "<polyline" in section and "cloud/small" in section and "rented/small" in section
    assert section.count('stroke-dasharray="4,3"') == 1, "the failed start is marked"
    rows = re.findall(r"<tr><td>(\d{4}-[^<]*)</td><td>([^<]*)</td><td>([^<]*)</td><td>([^<]*)</td>"
                      r"<td>([^<]*)</td><td>([^<]*)</td><td>([^<]*)</td></tr>", section)
    assert len(rows) == len(HISTORY)
    assert rows[1][1:] == ("cloud/small", "started", "cloud-small-1", "1→1", "busy 0.9 &gt; 0.7", "2,000")
    assert [r[1] for r in rows] == sorted(r[1] for r in rows), "grouped per pool, by time within a pool"
    assert "3 cold start(s), median 4,000 ms, max 9,000 ms" in section
    assert "<td>answered</td><td>1</td>" in section and "<td>scheduler: no_eligible_executor</td><td>1</td>" in section
    assert "(1 replayed, apart)" in section
    summary = json.loads(json.dumps(traffic.summary()))
    held_summary = summary["elastic_capacity"]["held_for_executor"]
    assert held_summary["outcomes"] == {"answered": 1, "scheduler: no_eligible_executor": 1}
    assert held_summary["wait_until_placed"] == {"count": 1, "median_ms": 3_100.0, "max_ms": 3_100.0}
    assert summary["live"]["refused_by_scheduler"] == {"no_eligible_executor": 1}, "the holds are not refusals"


def test_the_report_reads_and_may_read_the_scaling_topic():
    assert Topics.SCALING_DECISIONS in REPORT_TOPICS and Topics.SCALING_DECISIONS in READS["report"]
    assert EVENT_TOPICS[Topics.SCALING_DECISIONS] is ScalingDecisionV1
    w = window()
    assert _target(w, Topics.SCALING_DECISIONS) is w.scalings


# -- din status

def autoscaler_health(**detail: str) -> HealthV1:
    return HealthV1(service="autoscaler", instance="autoscaler", version="1", site="cloud", ready=True,
                    detail={"records": "120", "decisions": "7", "starts_failed": "1", "provider": "local",
                            "cost_per_hour": "3.25", "pools": "cloud/small:1/2,rented/small:0/0",
                            "signals": "cloud/small:busy=0.9:wait=12:done=40:refused=0", **detail})


def test_status_shows_each_pool_the_cost_and_the_decisions():
    lines = autoscaler_lines(autoscaler_health())
    assert lines[0] == "autoscaler (local provider, ready): executors cost 3.25/h; 7 decisions, 1 failed starts"
    table = [line.split() for line in lines[1:]]
    assert table == [["SITE", "POOL", "READY", "WANTED"], ["cloud", "small", "1", "2"], ["rented", "small", "0", "0"]]
    assert autoscaler_lines(autoscaler_health(pools=""))[1] == "  no pools"
    assert "NOT READY" in autoscaler_lines(autoscaler_health().model_copy(update={"ready": False}))[0]
    assert autoscaler_lines("no health answer (TimeoutError)") == ["autoscaler: no health answer (TimeoutError)"]


@pytest.mark.parametrize("pools, rows", [
    ("cloud/small:1/2", [["cloud", "small", "1", "2"]]),
    ("edge-1/gpu-a:0/3,cloud/small:2/2", [["edge-1", "gpu-a", "0", "3"], ["cloud", "small", "2", "2"]]),
    ("garbage", [["garbage", "?", "?", "?"]]),
    ("", []),
])
def test_pool_rows_parse_the_health_detail(pools, rows):
    assert pool_rows(pools) == rows
