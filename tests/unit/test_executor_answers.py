"""What an executor reports about a job (services.executor.answers): completion fields and the latency breakdown."""

import pytest

from din.services.executor.answers import AnswerWriter, latency_breakdown
from din.services.executor.batcher import ItemResult
from din.shared.contracts.job import JobV1, StageKind, StageV1
from din.shared.errors import DinError, ErrorCode
from din.shared.lifecycle import Outcome
from din.shared.security import PayloadProtection
from tests.support import NOW_MS, make_job

WRITER = AnswerWriter("edge", "e1")


def job(**fields) -> JobV1:
    return make_job(**{"model": "m", "received_ms": NOW_MS - 10, **fields})


def split_plan() -> list[StageV1]:
    return [StageV1(kind=StageKind.SPLIT_HEAD, model="m-head", site="edge", executor="e1", output="hidden"),
            StageV1(kind=StageKind.SPLIT_TAIL, model="m-tail", site="cloud", executor="e2", output="answer")]


def result() -> ItemResult:
    return ItemResult(outputs={}, model_version="2", batch_size=3, queue_ms=0.5, compute_ms=1.5)


@pytest.mark.parametrize(
    ("fields", "outcome", "stage", "plan_stage", "cascade_step", "escalated", "handed_on_to", "kind"),
    [
        ({}, Outcome.ANSWERED, None, None, None, False, None, None),
        ({"cascade_stage": 1, "escalate_to": "big"}, Outcome.ANSWERED, 1, None, 1, False, None, None),
        ({"cascade_stage": 1, "escalate_to": "big"}, Outcome.ESCALATED, 1, None, 1, True, None, None),
        ({"cascade_stage": 2}, Outcome.ANSWERED, 2, None, 2, True, None, None),
        ({"plan": split_plan(), "stage": 0}, Outcome.HANDED_ON, 0, 0, None, False, "cloud", "split-head"),
        ({"plan": split_plan(), "stage": 1}, Outcome.ANSWERED, 1, 1, None, False, None, "split-tail"),
    ],
)
def test_completion_says_which_stage_or_step_ran(fields, outcome, stage, plan_stage, cascade_step, escalated,
                                                  handed_on_to, kind):
    event = WRITER.completion(job(**fields), outcome, model="m", version="2", result=result(), error=None,
                              protection=PayloadProtection.OFF)
    assert (event.stage, event.plan_stage, event.cascade_step) == (stage, plan_stage, cascade_step)
    assert (event.escalated, event.handed_on_to, event.stage_kind) == (escalated, handed_on_to, kind)
    assert event.ok and event.batch_size == 3 and event.site == "edge" and event.executor == "e1"


def test_a_failed_completion_carries_the_code_and_no_batch():
    event = WRITER.completion(job(), Outcome.FAILED, model="m-small", version="1", result=None,
                              error=DinError(ErrorCode.BAD_REQUEST, "no"), protection=PayloadProtection.ENCRYPTED)
    assert (event.ok, event.error_code, event.batch_size, event.protection) == (False, "bad_request", 0, "encrypted")
    assert event.degraded


def test_latency_breakdown_names_each_earlier_plan_stage():
    stamps = {"admitted": NOW_MS - 9, "classified": NOW_MS - 8, "scheduled": NOW_MS - 6, "stage_1": NOW_MS - 2}
    timings = latency_breakdown(job(plan=split_plan(), stage=1, stamps_ms=stamps), result(), NOW_MS)
    assert timings == pytest.approx({"total": 10.0, "admission": 1.0, "classify": 1.0, "schedule": 2.0,
                                     "stage_0": 4.0, "queue": 0.5, "compute": 1.5})


def test_latency_breakdown_of_an_escalated_cascade():
    stamps = {"admitted": NOW_MS - 9, "classified": NOW_MS - 8, "escalated": NOW_MS - 5, "scheduled": NOW_MS - 4}
    timings = latency_breakdown(job(cascade_stage=2, stamps_ms=stamps), None, NOW_MS)
    assert timings == pytest.approx({"total": 10.0, "admission": 1.0, "classify": 1.0, "schedule": 1.0,
                                     "small_stage": 3.0})
