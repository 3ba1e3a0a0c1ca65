"""NATS micro discovery of a service instance: its answers and its subscriptions' counters (pure: no server)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from din.shared import __version__
from din.shared.contracts.micro import MicroInfoV1, MicroPingV1, MicroStatsV1
from din.shared.errors import DinError, ErrorCode, error_reply
from din.shared.micro import MicroDiscovery, subject_matches
from din.shared.naming import InvalidNameError, Subjects, micro_name


def msg(subject: str = "din.v1.infer.acme.m") -> SimpleNamespace:
    return SimpleNamespace(subject=subject, reply="_INBOX.x", headers=None, data=b"")


def test_micro_subjects_are_natss_own():
    assert Subjects.micro("PING") == "$SRV.PING"
    assert Subjects.micro("INFO", "admission") == "$SRV.INFO.din-admission"
    assert Subjects.micro("STATS", "executor", "abc") == "$SRV.STATS.din-executor.abc"
    assert micro_name("scheduler") == "din-scheduler"
    with pytest.raises(InvalidNameError):
        Subjects.micro("KILL")
    with pytest.raises(InvalidNameError):
        Subjects.micro("PING", "executor", "a.b")


def test_an_instance_answers_each_verb_for_all_its_kind_and_itself():
    micro = MicroDiscovery("classifier", "cloud", "cloud", "Labels jobs.")
    assert len(micro.subjects()) == 9
    assert f"$SRV.PING.din-classifier.{micro.id}" in micro.subjects()
    ping = MicroPingV1.model_validate_json(micro.answer("$SRV.PING"))
    assert (ping.name, ping.id, ping.version, ping.metadata) == (
        "din-classifier", micro.id, __version__, {"site": "cloud", "instance": "cloud"})
    micro.add("classify", "din.v1.classify.cloud", "classifier", "job")
    info = MicroInfoV1.model_validate_json(micro.answer(f"$SRV.INFO.din-classifier.{micro.id}"))
    assert info.description == "Labels jobs."
    assert [(e.name, e.subject, e.queue_group, e.metadata) for e in info.endpoints] == [
        ("classify", "din.v1.classify.cloud", "classifier", {"kind": "job"})]
    stats = MicroStatsV1.model_validate_json(micro.answer("$SRV.STATS.din-classifier"))
    assert stats.started.endswith("Z") and stats.endpoints[0].num_requests == 0
    assert stats.endpoints[0].average_processing_time == 0


def test_ids_differ_between_instances():
    assert MicroDiscovery("executor", "a", "s", "").id != MicroDiscovery("executor", "a", "s", "").id


async def test_a_counter_counts_messages_time_and_the_errors_answered():
    counter = MicroDiscovery("admission", "cloud", "cloud", "").add("infer", "din.v1.infer.*.*", "admission", "raw")

    async def refuse(_msg) -> None:
        error_reply(DinError(ErrorCode.OVERLOADED, "too busy", retry_after_ms=10), "r1")

    async def serve(_msg) -> None:
        return None

    await counter.counted(serve)(msg())
    await counter.counted(refuse)(msg())
    stats = counter.stats()
    assert (stats.num_requests, stats.num_errors, stats.last_error) == (2, 1, "overloaded: too busy")
    assert stats.processing_time >= stats.average_processing_time > 0


async def test_a_failing_handler_is_counted_and_still_raises():
    counter = MicroDiscovery("admission", "cloud", "cloud", "").add("infer", "din.v1.infer.*.*", None, "raw")

    async def crash(_msg) -> None:
        raise KeyError("boom")

    with pytest.raises(KeyError):
        await counter.counted(crash)(msg())
    assert (counter.requests, counter.errors, counter.last_error) == (1, 1, "internal: KeyError")


def test_an_error_encoded_outside_a_counted_handler_is_counted_nowhere():
    counter = MicroDiscovery("admission", "cloud", "cloud", "").add("infer", "din.v1.infer.*.*", None, "raw")
    error_reply(DinError(ErrorCode.BAD_REQUEST, "no"), None)
    assert counter.errors == 0


@pytest.mark.parametrize(("pattern", "subject", "matches"), [
    ("din.v1.heartbeat.cloud.*", "din.v1.heartbeat.cloud.cloud-1", True),
    ("din.v1.heartbeat.cloud.*", "din.v1.heartbeat.factory.f-1", False),
    ("din.v1.heartbeat.cloud.*", "din.v1.heartbeat.cloud", False),
    ("din.v1.>", "din.v1.a.b", True),
    ("din.v1.>", "din.v1", False),
    ("din.v1.health.admission", "din.v1.health.admission", True),
    ("din.v1.health.admission", "din.v1.health.admission.cloud", False),
])
def test_subject_matching_is_natss(pattern, subject, matches):
    assert subject_matches(pattern, subject) is matches


def test_a_control_message_finds_its_subscriptions_counter():
    micro = MicroDiscovery("scheduler", "cloud", "cloud", "")
    micro.add("schedule", "din.v1.schedule.cloud", "scheduler", "job")
    heartbeat = micro.add("heartbeat", "din.v1.heartbeat.cloud.*", None, "control")
    assert micro.counter_for("din.v1.heartbeat.cloud.cloud-1", ("control", "health")) is heartbeat
    assert micro.counter_for("din.v1.schedule.cloud", ("control", "health")) is None
