"""A large-small cascade over real brokers: digits-small answers, unsure answers escalate to digits-large.

The request asks for a cascade with the ``Din-Cascade`` header (a confidence
threshold); the small model's executor either answers or hands the job back to
the scheduler for the large model, whose executor answers. Either way the
client gets exactly one answer, and ``served_by.escalated`` says which.
"""

from __future__ import annotations

import json

import nats
import numpy as np
import pytest

from din.client import DinRequestError
from din.shared.contracts.events import CompletionV1
from din.shared.contracts.inference import InferResponseV1, RequestHeaders
from din.shared.credentials import request_proof
from din.shared.errors import DIN_ERROR_HEADER, ErrorReplyV1
from din.shared.naming import Subjects
from din.shared.tensors import encode_request_json
from tests.integration.network import running_network
from tests.support import wait_for


@pytest.fixture(scope="module", params=["centralized", "distributed"])
def network(request, kafka_access, zoo_dir, tmp_path_factory):
    with running_network(kafka_access, zoo_dir, tmp_path_factory.mktemp("din"), request.param) as net:
        yield net


async def test_threshold_zero_never_escalates_and_above_one_always_does(network, digits):
    x, _ = digits
    async with network.client("globex") as client:
        for i in range(8):
            kept = await client.infer("digits-large", {"input": x[i : i + 1]}, cascade=0.0)
            assert (kept.served_by.model, kept.served_by.escalated, kept.served_by.degraded) == (
                "digits-small", False, False)
            assert kept.encrypted, "a sealed request is answered sealed"
            raised = await client.infer("digits-large", {"input": x[i : i + 1]}, cascade=1.01)
            assert (raised.served_by.model, raised.served_by.escalated, raised.served_by.degraded) == (
                "digits-large", True, False)
            assert raised.encrypted, "the escalated job was sealed again on its way to the large model"
            assert "small_stage" in raised.response.timings_ms
            assert raised.outputs["probabilities"].shape == (1, 10)


async def test_completion_events_record_both_stages_of_an_escalated_request(network, digits):
    x, _ = digits
    nc = await nats.connect(network.hub_url, max_reconnect_attempts=0, **network.stack.nats_options())
    events: list = []

    async def collect(msg):
        events.append((CompletionV1.model_validate_json(msg.data), dict(msg.headers or {})))

    await nc.subscribe(Subjects.COMPLETED_ALL, cb=collect)
    await nc.flush()
    async with network.client("globex") as client:
        body, headers = client.build({"input": x[:1]}, cascade=1.01, request_id="staged-escalation")
        await client.send("digits-large", body, headers, 5.0)
        body, headers = client.build({"input": x[:1]}, cascade=0.0, request_id="staged-kept")
        await client.send("digits-large", body, headers, 5.0)

    def seen() -> dict:
        return {(e.request_id, e.stage): (e.model, e.escalated, e.degraded, RequestHeaders.REQUEST_ID in h)
                for e, h in events if e.request_id.startswith("staged-")}

    await wait_for(lambda: len(seen()) >= 3, 10, lambda: f"completions of both stages (saw {sorted(seen())})")
    await nc.close()
    assert seen() == {
        ("staged-escalation", 1): ("digits-small", True, False, False),
        ("staged-escalation", 2): ("digits-large", True, False, True),
        ("staged-kept", 1): ("digits-small", False, False, True),
    }, "stage 1 hands on without closing the job; stage 2 closes it"


async def test_a_realistic_threshold_escalates_some_answers_each_once_and_keeps_accuracy(network, digits):
    x, y = digits
    count = 150
    nc = await nats.connect(network.hub_url, max_reconnect_attempts=0, **network.stack.nats_options())
    answers: list = []
    inbox = nc.new_inbox()

    async def collect(msg):
        answers.append(msg)

    await nc.subscribe(inbox, cb=collect)
    token = network.token("globex")
    for i in range(count):
        await nc.publish(
            "din.v1.infer.globex.digits-large", encode_request_json({"input": x[i : i + 1]}), reply=inbox,
            headers={RequestHeaders.TOKEN: request_proof(token, "digits-large", f"cascade-{i}", inbox),
                     RequestHeaders.REQUEST_ID: f"cascade-{i}",
                     RequestHeaders.CASCADE: "0.8", RequestHeaders.TIMEOUT_MS: "5000"},
        )
        await wait_for(lambda sent=i + 1: len(answers) >= sent, 5, f"an answer to cascade-{i}", interval=0.001)
    await network.barrier(nc, inbox, answers, headers={RequestHeaders.CASCADE: "1.01"})
    await nc.close()

    errors = [m.data for m in answers if DIN_ERROR_HEADER in (m.headers or {})]
    assert errors == []
    responses = [InferResponseV1.model_validate_json(m.data) for m in answers]
    assert sorted(r.id for r in responses) == sorted(f"cascade-{i}" for i in range(count)), "exactly one answer each"
    by_id = {int(r.id.split("-")[1]): r for r in responses}
    escalated = [i for i, r in by_id.items() if r.served_by.escalated]
    for r in by_id.values():
        assert r.served_by.model == ("digits-large" if r.served_by.escalated else "digits-small")
    assert 0 < len(escalated) < count
    labels = np.array([int(np.asarray(by_id[i].outputs[1].data)[0]) for i in range(count)])
    assert by_id[0].outputs[1].name == "label"
    async with network.client("globex") as client:
        small = np.array([int((await client.infer("digits-small", {"input": x[i : i + 1]})).outputs["label"][0])
                          for i in range(count)])
    cascade_accuracy, small_accuracy = np.mean(labels == y[:count]), np.mean(small == y[:count])
    assert cascade_accuracy >= small_accuracy, (cascade_accuracy, small_accuracy, len(escalated))


async def test_a_target_rate_escalates_about_that_fraction(network, digits):
    x, y = digits
    count = 120
    async with network.client("globex") as client:
        results = [await client.infer("digits-large", {"input": x[i : i + 1]}, cascade_rate=0.25)
                   for i in range(count)]
    escalated = [r.served_by.escalated for r in results]
    assert all(r.served_by.model == ("digits-large" if r.served_by.escalated else "digits-small") for r in results)
    assert 0.1 <= np.mean(escalated) <= 0.45, np.mean(escalated)


@pytest.mark.parametrize("value", ["sure", "-0.5", "nan", "rate:2"])
async def test_an_invalid_cascade_threshold_is_a_structured_bad_request(network, digits, value):
    x, _ = digits
    async with network.client("globex") as client:
        body, headers = client.build({"input": x[:1]}, request_id=f"bad-cascade-{value}")
        headers[RequestHeaders.CASCADE] = value
        with pytest.raises(DinRequestError) as caught:
            await client.send("digits-large", body, headers, 5.0)
    error = caught.value.error
    assert (error.code.value, error.request_id) == ("bad_request", f"bad-cascade-{value}")
    assert "cascade" in error.message


async def test_cascade_in_json_parameters_works_without_headers(network, digits):
    x, _ = digits
    body = json.loads(encode_request_json({"input": x[:1]}))
    body["id"] = "cascade-in-parameters"
    body["parameters"] = {"cascade": 1.5,
                          "token": request_proof(network.token("globex"), "digits-small", body["id"])}
    nc = await nats.connect(network.hub_url, max_reconnect_attempts=0, **network.stack.nats_options())
    try:
        msg = await nc.request("din.v1.infer.globex.digits-small", json.dumps(body).encode(), timeout=5)
    finally:
        await nc.close()
    assert DIN_ERROR_HEADER not in (msg.headers or {}), ErrorReplyV1.model_validate_json(msg.data)
    served = InferResponseV1.model_validate_json(msg.data).served_by
    assert (served.model, served.escalated) == ("digits-large", True)
