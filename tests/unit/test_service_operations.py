"""The AsyncAPI operations come from what service classes declare, and a bad declaration stops the render."""

from __future__ import annotations

import sys
import types

import pytest

import din.service_operations as service_operations
from din.schemas import asyncapi_document
from din.service_operations import InvalidDeclaration, MissingServiceClass, operations, service_class
from din.shared.channels import CHANNELS, PARTIES, TOPIC_CHANNELS
from din.shared.contracts.inference import STREAM_SEQ_HEADER
from din.shared.contracts.job import STAGE_DONE_HEADER
from din.shared.naming import Subjects, Topics
from din.shared.runtime import Service, control, endpoint, job_endpoint


class Prober(Service):
    """A fake service with one endpoint of each kind, a callable subject and queue, and requests it sends."""

    name = "executor"
    publishes = ("heartbeat", "probe", "execute", Topics.COMPLETIONS)

    @job_endpoint("execute", lambda s: Subjects.execute(s.site, s.id), publishes=("inferReply", "completed"))
    async def on_execute(self, job, msg) -> None: ...

    @endpoint("probe", lambda s: Subjects.probe(s.site), queue=lambda s: f"probe-{s.site}")
    async def on_probe(self, msg) -> None: ...

    @control("control", lambda s: Subjects.control("executor", s.id))
    async def on_control(self, command) -> None: ...


def by_key(found) -> dict:
    return {op.key: op for op in found}


def test_operations_follow_the_declarations_and_the_runtime():
    ops = by_key(operations([Prober]))
    assert ops["executor_receive_execute"].messages == CHANNELS["execute"].messages
    assert ops["executor_receive_probe"].queue == "probe-{site}"
    assert ops["executor_receive_execute"].queue is None
    assert ops["executor_receive_control"].messages == ("loadModel",)
    for sent in ("inferReply", "completed", "heartbeat", "probe", "topic_executor_completions"):
        assert f"executor_send_{sent}" in ops, sent
    for implied in ("receive_health", "receive_healthInstance", "send_healthReply", "send_topic_telemetry_spans",
                    "send_topic_deadletter", "send_controlReply", "receive_microAll", "receive_microKind",
                    "receive_microInstance", "send_microReply"):
        assert f"executor_{implied}" in ops, implied
    assert ops["executor_send_controlReply"].messages == ("modelLoaded", "controlError")
    assert ops["executor_send_probe"].reply is CHANNELS["probeReply"]
    assert "executor_receive_probeReply" in ops, "a requester receives the reply"
    assert "executor_send_schedule" not in ops


def test_only_declared_channels_appear():
    class Quiet(Service):
        name = "telemetry"

    ops = by_key(operations([Quiet]))
    mine = {key for key in ops if key.startswith("telemetry_")}
    assert mine == {"telemetry_receive_health", "telemetry_send_healthReply", "telemetry_send_topic_telemetry_spans",
                    "telemetry_receive_microAll", "telemetry_receive_microKind", "telemetry_receive_microInstance",
                    "telemetry_send_microReply"}
    parties = {op.party for op in ops.values()}
    assert parties == {"telemetry", *(party.name for party in PARTIES)}


def test_consumes_adds_kafka_receives():
    class Reader(Service):
        name = "telemetry"
        consumes = (Topics.SCHEDULING_DECISIONS,)

    assert "telemetry_receive_topic_scheduler_decisions" in by_key(operations([Reader]))


def test_reads_outside_endpoints_come_from_consumes():
    class Puller(Service):
        name = "executor"
        consumes = ("work",)

    class Silent(Service):
        name = "executor"

    assert "executor_receive_work" in by_key(operations([Puller]))
    assert "executor_receive_work" not in by_key(operations([Silent]))


def test_an_unknown_channel_is_refused_with_the_handler_named():
    class Typo(Service):
        name = "classifier"

        @endpoint("clasify", Subjects.classify("cloud"))
        async def on_classify(self, msg) -> None: ...

    with pytest.raises(InvalidDeclaration, match=r"Typo.on_classify: no channel 'clasify'"):
        operations([Typo])


def test_an_unknown_published_channel_is_refused():
    class Typo(Service):
        name = "classifier"
        publishes = ("din.v1.nowhere",)

    with pytest.raises(InvalidDeclaration, match="Typo.publishes: no channel 'din.v1.nowhere'"):
        operations([Typo])


def test_a_subject_off_its_channel_is_refused():
    class Misfiled(Service):
        name = "scheduler"

        @endpoint("completed", Subjects.HEARTBEAT_ALL)
        async def on_completed(self, msg) -> None: ...

    with pytest.raises(InvalidDeclaration, match=r"Misfiled.on_completed subscribes din.v1.heartbeat.\*.\*"):
        operations([Misfiled])


def test_wildcard_and_literal_subjects_fit_their_channel():
    class Listener(Service):
        name = "scheduler"

        @endpoint("completed", Subjects.COMPLETED_ALL)
        async def on_completed(self, msg) -> None: ...

        @endpoint("heartbeat", Subjects.heartbeat("cloud", "cloud-1"))
        async def on_heartbeat(self, msg) -> None: ...

    ops = by_key(operations([Listener]))
    assert {"scheduler_receive_completed", "scheduler_receive_heartbeat"} <= set(ops)


def test_a_stale_message_narrowing_is_refused():
    class Silent(Service):
        name = "admission"

    assert "admission" in CHANNELS["inferReply"].sends_only
    with pytest.raises(InvalidDeclaration, match="inferReply narrows what admission sends"):
        operations([Silent], check_catalog=True)


def test_a_missing_service_class_is_named(monkeypatch):
    module = types.ModuleType("fake_admission_main")
    monkeypatch.setitem(sys.modules, "fake_admission_main", module)
    monkeypatch.setitem(service_operations.SERVICE_CLASSES, "admission", "fake_admission_main:Admission")
    with pytest.raises(MissingServiceClass, match="service 'admission'"):
        service_class("admission")
    module.Admission = Prober
    with pytest.raises(MissingServiceClass, match="named 'executor', not 'admission'"):
        service_class("admission")


def test_the_reply_subject_documents_results_chunks_errors_and_behaviour_headers():
    document = asyncapi_document([Prober])
    reply = document["channels"]["inferReply"]["messages"]
    assert set(reply) == {"inferResponse", "streamChunk", "errorReply"}
    schemas = document["components"]["schemas"]
    assert STREAM_SEQ_HEADER in schemas["StreamHeaders"]["properties"]
    assert STAGE_DONE_HEADER in schemas["CompletionHeaders"]["properties"]
    assert {m["$ref"].rsplit("/", 1)[-1] for m in document["operations"]["executor_send_execute"]["messages"]} == {
        "stageJob"}


def test_every_channel_is_in_the_catalog_once():
    keys = [channel.key for channel in (*CHANNELS.values(), *TOPIC_CHANNELS.values())]
    assert len(keys) == len(set(keys))
    assert set(TOPIC_CHANNELS) == set(Topics.ALL)
