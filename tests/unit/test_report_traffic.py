"""``din report`` counts requests, not stage hand-offs, and keeps replayed traffic apart from live traffic."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from din.replay.compare import recorded_outcomes
from din.replay.outcomes import (
    HANDED_OVER,
    NO_OUTCOME,
    final_outcomes,
    is_hand_off,
    replay_request_id,
    replay_run,
)
from din.replay.reader import RecordRange
from din.replay.recorded import RecordedWindow
from din.replay.report import render_report, window_traffic
from din.shared.contracts.events import AdmissionDecisionV1, CompletionV1, SchedulingDecisionV1
from din.shared.contracts.options import MAX_REQUEST_ID
from din.shared.recording import parse_request_record, request_record
from tests.support import make_job

T0 = 1_700_000_000_000.0


def done(rid: str, at: float, *, ok: bool = True, site: str = "cloud", total: float = 5.0, **fields) -> CompletionV1:
    """A completion of ``rid`` at ``T0 + at``."""
    return CompletionV1(request_id=rid, tenant="acme", site=site, executor=f"{site}-1", model=fields.pop("model", "m"),
                        model_version="1", sla_class=fields.pop("sla_class", "interactive"), ok=ok,
                        error_code=None if ok else fields.pop("error_code", "inference_failed"), batch_size=1,
                        degraded=False, timings_ms={"total": total}, at_ms=T0 + at, **fields)


def decided(rid: str, at: float, site: str | None, reason: str = "lowest predicted completion", **fields):
    return SchedulingDecisionV1(request_id=rid, tenant="acme", mode="centralized", sla_class="interactive",
                                chosen_executor=f"{site}-1" if site else None, chosen_site=site,
                                chosen_model="m" if site else None, degraded=False,
                                predicted_ms=1.0 if site else None, reason=reason, alternatives=[], attempt=1,
                                at_ms=T0 + at, **fields)


def admitted(rid: str, at: float, ok: bool = True, reason: str = "ok", count: int = 1) -> AdmissionDecisionV1:
    return AdmissionDecisionV1(request_id=rid, tenant="acme", model="m", sla_class="interactive", admitted=ok,
                               reason=reason, input_bytes=10, at_ms=T0 + at, count=count)


def split_job(rid: str, at: float) -> list[CompletionV1]:
    """A split-inference request: the head's completion hands it on, the tail's answers it."""
    return [done(rid, at, site="factory", plan_stage=0, stage_kind="split-head", handed_on_to="cloud"),
            done(rid, at + 3, plan_stage=1, stage_kind="split-tail", total=9.0)]


def generation(rid: str, at: float) -> list[CompletionV1]:
    return [done(rid, at, plan_stage=0, stage_kind="prefill", handed_on_to="cloud"),
            done(rid, at + 4, plan_stage=1, stage_kind="decode", total=12.0)]


def cascade(rid: str, at: float) -> list[CompletionV1]:
    """A cascade whose small variant was not sure: step 1 escalated, step 2 answered."""
    return [done(rid, at, cascade_step=1, escalated=True, model="small"),
            done(rid, at + 2, cascade_step=2, escalated=True, model="large", total=7.0)]


def test_replay_ids_mark_replayed_traffic_and_name_the_run():
    rid = replay_request_id("ab12cd34", "req-7")
    assert rid == "replay-ab12cd34-req-7"
    assert replay_run(rid) == "ab12cd34"
    assert replay_run(replay_request_id("kinds", "replay-x1-req")) == "kinds", "a replay of a replay is its own run"
    for live in ("req-7", "replayed-thing", "replay-", "replay-run", ""):
        assert replay_run(live) is None, live
    assert len(replay_request_id("r", "x" * 200)) == MAX_REQUEST_ID


@pytest.mark.parametrize("records, expected_hand_offs", [
    (split_job("r", 0), 1),
    (generation("r", 0), 1),
    (cascade("r", 0), 1),
    ([done("r", 0)], 0),
])
def test_a_multi_stage_or_cascade_request_counts_once_by_its_final_completion(records, expected_hand_offs):
    outcomes = final_outcomes([admitted("r", -1)], [decided("r", -0.5, "cloud")], records)
    assert list(outcomes) == ["r"]
    (outcome,) = outcomes.values()
    assert outcome.ok and outcome.stage == "executor" and outcome.count == 1
    assert outcome.latency_ms == records[-1].timings_ms["total"], "the latency is the final stage's total"
    assert len(outcome.hand_offs) == expected_hand_offs
    assert [is_hand_off(c) for c in records] == [True] * expected_hand_offs + [False]


def test_a_failed_stage_ends_its_request_and_a_stage_left_hanging_is_no_outcome():
    head_failed = [done("a", 0, ok=False, site="factory", plan_stage=0, stage_kind="split-head")]
    hanging = [done("b", 0, site="factory", plan_stage=0, stage_kind="split-head", handed_on_to="cloud")]
    outcomes = final_outcomes([], [], head_failed + hanging)
    assert not outcomes["a"].ok and outcomes["a"].code == "inference_failed" and outcomes["a"].stage == "executor"
    assert outcomes["b"].code == NO_OUTCOME and outcomes["b"].stage is None and len(outcomes["b"].hand_offs) == 1


def test_the_last_ending_wins_and_forwards_and_hand_overs_are_not_refusals():
    records = [
        done("fenced", 0, ok=False, error_code="executor_lost"), done("fenced", 5),  # dispatched again, answered
        done("then-refused", 0, cascade_step=1, escalated=True),
    ]
    decisions = [
        decided("forwarded", 0, None, "forwarded to branch: faster there", forwarded_to="branch"),
        decided("old-forward", 0, None, "forwarded to cloud: nothing here in time"),
        decided("forwarded", 1, "branch"),
        decided("then-refused", 2, None, "overloaded"),
    ]
    admissions = [admitted("forwarded", -1, False, HANDED_OVER), admitted("forwarded", -0.5),
                  admitted("shed", 0, False, "overloaded", count=5)]
    outcomes = final_outcomes(admissions, decisions, records + [done("forwarded", 3, site="branch")])
    assert outcomes["fenced"].ok
    assert outcomes["forwarded"].ok and outcomes["forwarded"].site == "branch"
    assert outcomes["old-forward"].code == NO_OUTCOME, "a recording without forwarded_to: the reason says forward"
    assert (outcomes["then-refused"].code, outcomes["then-refused"].stage) == ("overloaded", "scheduler")
    assert (outcomes["shed"].code, outcomes["shed"].count, outcomes["shed"].stage) == ("overloaded", 5, "admission")


def window_with_live_and_replayed() -> RecordedWindow:
    """3 live requests (one split, one cascade, one plain that failed) and the same 3 replayed twice (two runs),
    plus one live request refused at admission and 4 shed together."""
    window = RecordedWindow(rng=RecordRange(since_ms=T0), since_ms=T0, until_ms=T0 + 10_000)
    for prefix, base in (("", 0.0), (replay_request_id("run1", ""), 1000.0), (replay_request_id("run2", ""), 2000.0)):
        window.completions += split_job(f"{prefix}s", base) + cascade(f"{prefix}c", base + 10)
        window.completions.append(done(f"{prefix}p", base + 20, ok=False))
        for rid in ("s", "c", "p"):
            window.admissions.append(admitted(prefix + rid, base - 1))
            window.schedulings.append(decided(prefix + rid, base - 0.5, "cloud"))
    window.admissions += [admitted("refused", 5, False, "rate_limited"), admitted("shed", 6, False, "overloaded", 4)]
    return window


def test_report_separates_replayed_from_live_traffic_and_counts_requests():
    window = window_with_live_and_replayed()
    traffic = window_traffic(window)
    summary = traffic.summary()
    live = summary["live"]
    assert live["requests"] == 3 + 1 + 4 and live["answered"] == 2
    assert live["failed"] == {"inference_failed": 1}
    assert live["refused_at_admission"] == {"rate_limited": 1, "overloaded": 4}
    assert live["stage_hand_offs"] == {"split-head": 1, "cascade step 1": 1}
    assert live["models"] == {"m": 1, "large": 1}
    assert set(summary["replayed"]) == {"run1", "run2"}
    for run in summary["replayed"].values():
        assert (run["requests"], run["answered"], run["failed"]) == (3, 2, {"inference_failed": 1})
    assert summary["replayed_requests"] == 6
    assert summary["stage_hand_offs"] == 6 and summary["completion_records"] == 15

    page = render_report(window, traffic=traffic)
    assert "8</b><span>live requests" in page and "6</b><span>replayed requests (2 runs), apart" in page
    assert "6</b><span>stage hand-offs (not completions)" in page
    assert "<td>run1</td><td>interactive</td><td>3</td><td>2</td><td>1</td>" in page
    assert "<td>live</td><td>split-head</td><td>1</td>" in page
    assert "<td>replay run2</td><td>cascade step 1</td><td>1</td>" in page
    assert "admission: overloaded" in page and "executor: inference_failed" in page


def test_recorded_outcomes_of_a_replay_comparison_use_the_same_rule():
    window = window_with_live_and_replayed()
    key, value, headers = request_record(make_job(request_id="s", received_ms=T0 - 2), b"{}", {})
    window.requests = [parse_request_record(SimpleNamespace(key=key, value=value, headers=headers))]
    outcomes = recorded_outcomes(window)
    assert list(outcomes) == ["s"] and outcomes["s"].ok and outcomes["s"].latency_ms == 9.0
