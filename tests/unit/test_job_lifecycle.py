"""The job lifecycle rules (shared.lifecycle): how a job ends at an executor and when the scheduler closes it."""

import pytest

from din.services.scheduler.registry import ExecutorRegistry
from din.shared.contracts.inference import RequestHeaders, SlaClass
from din.shared.contracts.job import STAGE_DONE_HEADER, JobV1, StageKind, StageV1, WorkloadClassV1
from din.shared.errors import ErrorCode
from din.shared.lifecycle import (
    MAX_ATTEMPTS,
    Outcome,
    Redispatch,
    Settlement,
    closes_job,
    completion_headers,
    cutoff_ms,
    escalate,
    expired_on_arrival,
    give_back,
    hand_on,
    has_streamed,
    left_to_sender,
    may_escalate,
    may_redispatch,
    outcome_of_error,
    past_cutoff,
    reports_completion,
    reset_for_redispatch,
    runs_here,
    settlement,
    stage_done,
    untaken_answer_at_ms,
    watchdog_at_ms,
    watchdog_error,
    watchdog_may_answer,
)
from tests.support import NOW_MS, make_heartbeat, make_job

MARGIN_MS = 5.0


def job(**fields) -> JobV1:
    return make_job(**{"model": "m", "received_ms": NOW_MS - 10, **fields})


def two_stage_plan() -> list[StageV1]:
    return [StageV1(kind=StageKind.PREFILL, model="p", site="edge", executor="e1", output="stream"),
            StageV1(kind=StageKind.DECODE, model="d", site="cloud", executor="e2", output="stream")]


@pytest.mark.parametrize(
    ("code", "pulled", "streamed", "attempt", "plan_stage", "outcome"),
    [
        (ErrorCode.OVERLOADED, True, False, 1, 0, Outcome.REQUEUED),
        (ErrorCode.OVERLOADED, True, False, MAX_ATTEMPTS, 1, Outcome.REQUEUED),
        (ErrorCode.OVERLOADED, True, True, 1, 0, Outcome.FAILED),
        (ErrorCode.OVERLOADED, False, False, 1, 0, Outcome.GIVEN_BACK),
        (ErrorCode.OVERLOADED, False, False, MAX_ATTEMPTS - 1, 0, Outcome.GIVEN_BACK),
        (ErrorCode.OVERLOADED, False, False, MAX_ATTEMPTS, 0, Outcome.FAILED),
        (ErrorCode.OVERLOADED, False, False, 1, 1, Outcome.FAILED),
        (ErrorCode.OVERLOADED, False, True, 1, 0, Outcome.FAILED),
        (ErrorCode.DEADLINE_EXCEEDED, False, False, 1, 0, Outcome.FAILED),
        (ErrorCode.DEADLINE_EXCEEDED, True, True, 1, 1, Outcome.FAILED),
        (ErrorCode.BAD_REQUEST, True, False, 1, 0, Outcome.FAILED),
        (ErrorCode.INFERENCE_FAILED, False, False, 1, 0, Outcome.FAILED),
    ],
)
def test_outcome_of_error(code, pulled, streamed, attempt, plan_stage, outcome):
    assert outcome_of_error(code, pulled=pulled, streamed=streamed, attempt=attempt, plan_stage=plan_stage) == outcome


@pytest.mark.parametrize("pulled", [False, True])
def test_a_job_reached_after_its_deadline_is_the_watchdogs_to_answer(pulled):
    late = outcome_of_error(ErrorCode.DEADLINE_EXCEEDED, pulled=pulled, streamed=False, attempt=1, plan_stage=0,
                            past_deadline=True)
    assert late == Outcome.LEFT_TO_WATCHDOG and completion_headers(late, "r1") is None
    assert settlement(late) == Settlement.ACK


@pytest.mark.parametrize(
    ("outcome", "headers", "reported"),
    [
        (Outcome.ANSWERED, {RequestHeaders.REQUEST_ID: "r1"}, True),
        (Outcome.FAILED, {RequestHeaders.REQUEST_ID: "r1"}, True),
        (Outcome.HANDED_ON, {STAGE_DONE_HEADER: "r1"}, True),
        (Outcome.ESCALATED, None, True),
        (Outcome.GIVEN_BACK, None, False),
        (Outcome.REQUEUED, None, False),
    ],
)
def test_completion_event_of_each_outcome(outcome, headers, reported):
    assert reports_completion(outcome) is reported
    if reported:
        assert completion_headers(outcome, "r1") == headers
    else:
        with pytest.raises(ValueError):
            completion_headers(outcome, "r1")


@pytest.mark.parametrize(
    ("outcome", "closed", "advanced"),
    [(Outcome.ANSWERED, "r1", None), (Outcome.FAILED, "r1", None), (Outcome.HANDED_ON, None, "r1"),
     (Outcome.ESCALATED, None, None)],
)
def test_scheduler_reads_what_the_executor_reports(outcome, closed, advanced):
    headers = completion_headers(outcome, "r1")
    assert closes_job(headers) == closed
    assert stage_done(headers) == advanced


@pytest.mark.parametrize(
    ("headers", "closed"),
    [({}, None), (None, None), ({RequestHeaders.REQUEST_ID: ""}, None),
     ({RequestHeaders.REQUEST_ID: "r1", STAGE_DONE_HEADER: "r1"}, None)],
)
def test_what_does_not_close_a_job(headers, closed):
    assert closes_job(headers) == closed


@pytest.mark.parametrize(
    ("outcome", "expected"),
    [(None, Settlement.TERM), (Outcome.REQUEUED, Settlement.NAK), (Outcome.ANSWERED, Settlement.ACK),
     (Outcome.FAILED, Settlement.ACK),
     (Outcome.HANDED_ON, Settlement.ACK), (Outcome.ESCALATED, Settlement.ACK)],
)
def test_pulled_message_settlement(outcome, expected):
    assert settlement(outcome) == expected


@pytest.mark.parametrize(
    ("now_ms", "past"),
    [(NOW_MS + 1000 - MARGIN_MS - 0.1, False), (NOW_MS + 1000 - MARGIN_MS, True), (NOW_MS + 2000, True)],
)
def test_past_cutoff(now_ms, past):
    assert past_cutoff(NOW_MS + 1000, now_ms, MARGIN_MS) is past


@pytest.mark.parametrize(
    ("fields", "stages_done", "now_ms", "verdict"),
    [
        ({}, 0, NOW_MS, Redispatch.DISPATCH_AGAIN),
        ({"max_tokens": 8}, 0, NOW_MS, Redispatch.DISPATCH_AGAIN),
        ({"max_tokens": 8}, 1, NOW_MS, Redispatch.STREAM_INTERRUPTED),
        ({"split": "auto"}, 1, NOW_MS, Redispatch.DISPATCH_AGAIN),
        ({}, 0, NOW_MS + 1000 - MARGIN_MS, Redispatch.NO_TIME_LEFT),
        ({"max_tokens": 8}, 1, NOW_MS + 1000, Redispatch.STREAM_INTERRUPTED),
    ],
)
def test_may_redispatch(fields, stages_done, now_ms, verdict):
    assert may_redispatch(job(**fields), stages_done, now_ms, MARGIN_MS) == verdict


def test_reset_for_redispatch_forgets_the_plan():
    lost = job(plan=two_stage_plan(), stage=1, split_chosen="p", executor_chosen="e2", attempt=1)
    reset_for_redispatch(lost)
    assert (lost.attempt, lost.executor_chosen, lost.plan, lost.stage, lost.split_chosen) == (2, None, [], 0, None)


@pytest.mark.parametrize(
    ("assigned", "alive", "code"),
    [("e1", False, ErrorCode.EXECUTOR_LOST), ("e1", True, ErrorCode.DEADLINE_EXCEEDED),
     (None, False, ErrorCode.DEADLINE_EXCEEDED)],
)
def test_watchdog_error(assigned, alive, code):
    assert watchdog_error(assigned, alive) == code


@pytest.mark.parametrize(
    ("cascade_stage", "escalate_to", "expected"),
    [(1, "large", True), (1, None, False), (2, "large", False), (None, "large", False)],
)
def test_may_escalate(cascade_stage, escalate_to, expected):
    assert may_escalate(job(cascade_stage=cascade_stage, escalate_to=escalate_to)) is expected


def test_escalate_places_the_large_variant_afresh():
    workload = WorkloadClassV1(task="t", sla_class=SlaClass.INTERACTIVE, input_bytes=1, size_class="small",
                               sensitive=False, candidates=["small", "large"])
    small = job(cascade_stage=1, escalate_to="large", workload=workload, model_chosen="small", site_chosen="edge",
                executor_chosen="e1", avoid=["e0"])
    escalate(small, NOW_MS)
    assert small.cascade_stage == 2 and small.workload.candidates == ["large"]
    assert (small.model_chosen, small.site_chosen, small.executor_chosen, small.avoid) == (None, None, None, [])
    assert small.stamps_ms["escalated"] == NOW_MS


def test_give_back_avoids_the_full_executor():
    full = job(attempt=1)
    give_back(full, "e1")
    give_back(full, "e2")
    assert full.attempt == 3 and full.avoid == ["e1", "e2"]


def test_hand_on_moves_to_the_next_stage_and_stamps_it():
    staged = job(plan=two_stage_plan(), stage=0)
    following = hand_on(staged, NOW_MS)
    assert following.executor == "e2" and staged.stage == 1
    assert (staged.model_chosen, staged.site_chosen, staged.executor_chosen) == ("d", "cloud", "e2")
    assert staged.stamps_ms == {"stage_1": NOW_MS}


@pytest.mark.parametrize(
    ("site", "executor", "serves", "expected"),
    [("cloud", "e2", True, True), ("cloud", "e3", True, False), ("edge", "e2", True, False),
     ("cloud", "e2", False, False)],
)
def test_runs_here(site, executor, serves, expected):
    assert runs_here(two_stage_plan()[1], site, executor, serves) is expected


def test_runs_here_when_the_stage_waits_in_a_queue():
    queued = two_stage_plan()[1].model_copy(update={"executor": None})
    assert runs_here(queued, "cloud", "any", True)


def test_has_streamed():
    streaming = job(max_tokens=4)
    assert not has_streamed(streaming)
    streaming.stamps_ms["first_token"] = NOW_MS
    assert has_streamed(streaming)


def test_the_watchdog_speaks_after_the_executor_had_its_say():
    deadline, margin, transit = 1_000.0, 5.0, 20.0
    executor_gives_up = cutoff_ms(deadline, margin)
    assert watchdog_at_ms(deadline, transit) - transit > executor_gives_up


def test_leases_derive_from_the_heartbeat_interval_and_the_claims():
    from din.shared.lifecycle import loss_timeout_s, stall_limit_s

    assert loss_timeout_s(0.5) == 1.5
    assert stall_limit_s(0.5, loss_timeout_s(0.5)) == pytest.approx(0.5)
    assert stall_limit_s(0.2, 0.6) == pytest.approx(0.2)


def test_a_job_is_exposed_from_its_dispatch_less_the_clock_slack():
    from din.shared.lifecycle import EXPOSURE_SLACK_MS, exposed_ms

    placed = job(stamps_ms={"scheduled": NOW_MS})
    assert exposed_ms(placed, NOW_MS + 50, pulled=False, pull_wait_ms=1000) == NOW_MS - EXPOSURE_SLACK_MS
    handed = job(stamps_ms={"scheduled": NOW_MS, "stage_1": NOW_MS + 20}, plan=two_stage_plan(), stage=1)
    assert exposed_ms(handed, NOW_MS + 50, pulled=False, pull_wait_ms=1000) == NOW_MS + 20 - EXPOSURE_SLACK_MS
    queued_long_ago = job(stamps_ms={"scheduled": NOW_MS})
    assert exposed_ms(queued_long_ago, NOW_MS + 5000, pulled=True, pull_wait_ms=1000) == \
        NOW_MS + 4000 - EXPOSURE_SLACK_MS


def test_a_fenced_job_goes_back_to_the_scheduler_only_while_it_still_holds_that_dispatch():
    from din.shared.lifecycle import dispatch_key, fenced_job, takes_back

    held = job(attempt=1)
    headers = completion_headers(Outcome.FENCED, "r1", dispatch_key(held))
    assert closes_job(headers) is None and stage_done(headers) is None
    request_id, key = fenced_job(headers)
    assert request_id == "r1" and takes_back("e1", dispatch_key(held, 0), "e1", key)
    assert not takes_back("e2", dispatch_key(held, 0), "e1", key), "dispatched again elsewhere"
    reset_for_redispatch(held)
    assert not takes_back("e1", dispatch_key(held, 0), "e1", key), "dispatched again to the same executor"
    assert not takes_back(None, dispatch_key(held, 0), "e1", key), "waiting in a site queue"
    assert fenced_job({}) is None and fenced_job({"Din-Fenced": "r1"}) is None


def test_a_fenced_pulled_job_is_left_for_the_queue():
    assert settlement(Outcome.FENCED) == Settlement.LEAVE
    assert reports_completion(Outcome.FENCED)


def test_a_stage_reached_past_the_deadline_leaves_the_answer_to_the_sender_that_still_owns_it():
    late = job(deadline_ms=NOW_MS)
    assert left_to_sender(late, NOW_MS) and left_to_sender(late, NOW_MS + 1)
    assert not left_to_sender(late, NOW_MS - 1)
    assert expired_on_arrival(late, NOW_MS - 1, MARGIN_MS).code == ErrorCode.DEADLINE_EXCEEDED
    assert expired_on_arrival(late, NOW_MS - 10, MARGIN_MS) is None
    assert untaken_answer_at_ms(NOW_MS) > NOW_MS, "the sender waits for an acknowledgement sent just in time"


def test_the_watchdog_answers_a_live_executors_job_only_once_heard_from_past_the_deadline():
    """The executor's answer, decided in time, may still sit in its write buffer at the deadline: only a message
    the executor sent at or after the deadline (delivered after that answer's completion) proves it is silent."""
    deadline = 10_000.0
    assert not watchdog_may_answer(deadline, deadline - 1.0)
    assert not watchdog_may_answer(deadline, 0.0)
    assert watchdog_may_answer(deadline, deadline)
    assert watchdog_may_answer(deadline, None), "an executor out of view has nothing in flight to wait for"


def test_the_registry_hears_an_executor_by_its_heartbeats_and_completions():
    registry = ExecutorRegistry()
    registry.observe(make_heartbeat("e1", "cloud", ["m"], sent_ms=100.0), now=1.0)
    assert registry.get("e1").heard_ms == 100.0
    registry.heard("e1", 250.0)
    registry.heard("e1", 200.0)
    assert registry.get("e1").heard_ms == 250.0
    registry.observe(make_heartbeat("e1", "cloud", ["m"], sent_ms=300.0), now=2.0)
    assert registry.get("e1").heard_ms == 300.0
    registry.heard("nobody", 1.0)
