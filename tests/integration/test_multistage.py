"""Multi-stage jobs over real brokers across sites: split inference and prefill/decode with streamed tokens.

Topology (every executor a process, security on, tenants' clients seal):

* factory (edge): ``factory-head`` serves the digits-large heads; ``factory-gen`` serves charlm's prefill and
  decode (co-located generation).
* branch (edge): ``branch-prefill`` serves charlm's prefill only.
* cloud (hub): two tail executors (the digits-large tails and the whole model), ``cloud-decode`` serves charlm.

acme's ``pii`` data may run only at factory: its split head runs there and only the intermediate leaves
(careful's too, and only an intermediate that leaks at most 0.95 of the input's variance);
its generation is co-located on factory-gen. initech's data may run at branch and cloud: its prefill runs at
branch and its decode state crosses to cloud (disaggregated).
"""

from __future__ import annotations

import asyncio
import json
import signal
import uuid

import nats
import numpy as np
import onnxruntime as ort
import pytest

from din.client import DinRequestError
from din.shared.contracts.events import CompletionV1, SchedulingDecisionV1
from din.shared.contracts.inference import RequestHeaders
from din.shared.contracts.job import JobV1, StageKind, StageV1
from din.shared.naming import Subjects, Topics
from din.shared.security import CryptoPolicy
from din.zoo.text import generate, onnx_stepper
from tests.integration.network import read_events, running_network
from tests.support import THREE_SITE_LINKS, wait_for

TAILS = ["digits-large-tail-hidden_1", "digits-large-tail-hidden_2", "digits-large"]
MULTISTAGE_TOPOLOGY = {
    "name": "multistage-tests",
    "sites": [
        {
            "name": "cloud",
            "role": "hub",
            "executors": [
                {"id": "cloud-tail-1", "models": TAILS},
                {"id": "cloud-tail-2", "models": TAILS},
                {"id": "cloud-decode", "models": ["charlm"]},
            ],
        },
        {"name": "factory", "role": "edge", "executors": [
            {"id": "factory-head", "models": ["digits-large-head-hidden_1", "digits-large-head-hidden_2"]},
            {"id": "factory-gen", "models": ["charlm-prefill", "charlm"]},
        ]},
        {"name": "branch", "role": "edge", "executors": [{"id": "branch-prefill", "models": ["charlm-prefill"]}]},
    ],
    "links": THREE_SITE_LINKS,
    "tenants": [
        {"name": "acme", "sensitive_sites": ["factory"], "rate_per_s": 5000, "burst": 5000},
        {"name": "initech", "sensitive_sites": ["branch", "cloud"], "always_sensitive": True, "rate_per_s": 5000,
         "burst": 5000},
        {"name": "careful", "sensitive_sites": ["factory"], "max_leakage": 0.95, "rate_per_s": 5000, "burst": 5000},
    ],
}


@pytest.fixture(scope="module", params=["centralized", "distributed"])
def stack(request, kafka_access, zoo_dir, tmp_path_factory):
    with running_network(kafka_access, zoo_dir, tmp_path_factory.mktemp("din"), request.param,
                         security_policy=CryptoPolicy(), topology_spec=MULTISTAGE_TOPOLOGY) as net:
        yield net


@pytest.fixture
async def network(stack):
    """The module's network as its topology declares it: the tests that kill executors do not leave them dead."""
    await stack.restore()
    return stack


@pytest.fixture(scope="module")
def whole_model(zoo_dir):
    session = ort.InferenceSession(str(zoo_dir / "digits-large" / "1" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    return lambda x: session.run(["label"], {"input": x.astype(np.float32)})[0]


@pytest.fixture(scope="module")
def greedy(zoo_dir):
    config = json.loads((zoo_dir / "charlm" / "config.json").read_text())
    session = ort.InferenceSession(str(zoo_dir / "charlm" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    return lambda prompt, count: generate(onnx_stepper(session), config["vocab"], prompt, count, config["hidden"])


async def test_split_keeps_raw_input_at_its_site_and_answers_like_the_whole_model(network, digits, whole_model):
    x, _ = digits
    async with network.client("acme") as client:
        for point in ("hidden_1", "hidden_2", "auto"):
            for i in range(6):
                result = await client.infer("digits-large", {"input": x[i : i + 1]}, labels=["pii"], split=point)
                served = result.served_by
                assert served.model == "digits-large" and result.encrypted
                assert served.split_point in ("hidden_1", "hidden_2"), "factory has no whole model: auto must cut"
                if point != "auto":
                    assert served.split_point == point
                head, tail = served.stages
                assert head.startswith(f"split-head:digits-large-head-{served.split_point}@factory/")
                assert tail.startswith(f"split-tail:digits-large-tail-{served.split_point}@cloud/")
                assert served.site == "cloud"
                assert "stage_0" in result.response.timings_ms, "the head stage's time is in the breakdown"
                assert int(result.outputs["label"][0]) == int(whole_model(x[i : i + 1])[0])


async def test_a_tenants_leakage_limit_decides_which_intermediate_may_leave(network, digits):
    x, _ = digits
    async with network.client("careful") as client:
        for i in range(5):
            result = await client.infer("digits-large", {"input": x[i : i + 1]}, labels=["pii"], split="auto")
            assert result.served_by.split_point == "hidden_2", "hidden_1 gives away more than careful allows"
        with pytest.raises(DinRequestError) as raised:
            await client.infer("digits-large", {"input": x[:1]}, labels=["pii"], split="hidden_1")
    assert raised.value.error.code.value == "bad_request" and "allows at most 0.950" in raised.value.error.message


async def test_protected_intermediate_still_answers(network, digits, whole_model):
    x, _ = digits
    agree = 0
    async with network.client("acme") as client:
        for i in range(20):
            result = await client.infer("digits-large", {"input": x[i : i + 1]}, labels=["pii"], split="hidden_2",
                                        split_protection="quantize:4")
            agree += int(result.outputs["label"][0]) == int(whole_model(x[i : i + 1])[0])
    assert agree >= 18, "4-bit quantisation of the intermediate barely changes the answers"


async def test_unsplittable_points_and_bad_options_are_refused_clearly(network, digits):
    x, _ = digits
    async with network.client("acme") as client:
        cases = [
            ("digits-large", dict(split="probabilities"), "cannot be cut at 'probabilities'"),
            ("digits-large", dict(split="input"), "cannot be cut at 'input'"),
            ("digits-small", dict(split="auto"), "no split points"),
            ("digits-large", dict(split="hidden_1", split_protection="quantize:12"), "bit count"),
            ("digits-large", dict(max_tokens=5), "does not generate tokens"),
            ("digits-large", dict(split="hidden_1", cascade=0.5), "cannot be combined"),
        ]
        for model, options, expected in cases:
            with pytest.raises(DinRequestError) as raised:
                await client.infer(model, {"input": x[:1]}, labels=["pii"], **options)
            assert raised.value.error.code.value == "bad_request" and expected in raised.value.error.message, options


async def test_plan_and_every_hop_are_recorded(network, digits):
    x, _ = digits
    nc = await nats.connect(network.hub_url, max_reconnect_attempts=0, **network.stack.nats_options())
    completions: list[tuple[CompletionV1, dict]] = []

    async def collect(msg):
        completions.append((CompletionV1.model_validate_json(msg.data), dict(msg.headers or {})))

    await nc.subscribe(Subjects.COMPLETED_ALL, cb=collect)
    await nc.flush()
    request_id = uuid.uuid4().hex
    trace_id = uuid.uuid4().hex
    async with network.client("acme") as client:
        await client.infer("digits-large", {"input": x[:1]}, labels=["pii"], split="hidden_1", request_id=request_id,
                           traceparent=f"00-{trace_id}-00f067aa0ba902b7-01")

    def mine() -> list[tuple[CompletionV1, dict]]:
        return [(c, h) for c, h in completions if c.request_id == request_id]

    await wait_for(lambda: len(mine()) >= 2, 5, "completions of the head and the tail stage")
    await nc.close()
    kinds = {c.stage_kind: (c, h) for c, h in mine()}
    head, head_headers = kinds["split-head"]
    assert head.site == "factory" and head.handed_on_to == "cloud" and head.output_bytes >= 256 * 4
    assert head_headers.get("Din-Stage-Done") == request_id and RequestHeaders.REQUEST_ID not in head_headers
    tail, tail_headers = kinds["split-tail"]
    assert tail.site == "cloud" and tail.handed_on_to is None and tail.ok
    assert tail_headers[RequestHeaders.REQUEST_ID] == request_id
    decision = await _scheduling_decision(network, request_id)
    assert [s.kind for s in decision.plan] == [StageKind.SPLIT_HEAD, StageKind.SPLIT_TAIL]
    assert [s.site for s in decision.plan] == ["factory", "cloud"]
    spans = await _records(network, Topics.SPANS, lambda span: span["trace_id"] == trace_id, want=5,
                           what=f"five spans of trace {trace_id}")
    by_name = {span["name"]: span for span in spans}
    head, tail = by_name["executor split-head"], by_name["executor split-tail"]
    assert (head["site"], tail["site"]) == ("factory", "cloud")
    assert tail["parent_span_id"] == head["span_id"], "the tail's span follows the head's in the request's trace"


async def _records(network, topic: str, keep, want: int, what: str) -> list[dict]:
    read = await read_events(network.stack.kafka_access, [Topics.scoped(topic, network.topic_scope)], keep,
                             enough=lambda read: len(read.found) >= want, what=what)
    return [event for _, event in read.found]


async def _scheduling_decision(network, request_id: str) -> SchedulingDecisionV1:
    """The placement of the request (a site that forwarded it to the hub records that first)."""
    found = await _records(network, Topics.SCHEDULING_DECISIONS,
                           lambda d: d["request_id"] == request_id and not d["reason"].startswith("forwarded"),
                           want=1, what=f"the scheduling decision of {request_id}")
    return SchedulingDecisionV1.model_validate(found[0])


async def _stream(client, prompt: str, count: int, **options):
    return [chunk async for chunk in client.generate("charlm", prompt, max_tokens=count, **options)]


async def test_colocated_generation_streams_the_models_own_continuation(network, greedy):
    async with network.client("acme") as client:
        for prompt in ("def ", "The "):
            chunks = await _stream(client, prompt, 24, labels=["pii"])
            assert [c.seq for c in chunks] == list(range(25)) and chunks[-1].done
            assert "".join(c.text for c in chunks) == greedy(prompt, 24)
            last = chunks[-1]
            assert (last.finish_reason, last.prompt_tokens, last.completion_tokens) == ("length", len(prompt), 24)
            assert {"ttft", "tpot", "prefill", "state_transfer"} <= last.timings_ms.keys()
            assert [s.split("@")[1] for s in last.served_by.stages] == ["factory/factory-gen"] * 2 or \
                network.stack.mode == "distributed"
            assert all(s.split("@")[1].startswith("factory/") for s in last.served_by.stages)


async def test_disaggregated_generation_moves_the_sealed_state_across_sites(network, greedy):
    async with network.client("initech") as client:
        prompt = "import os\nimport sys\n" * 8
        chunks = await _stream(client, prompt, 40)
    assert "".join(c.text for c in chunks) == greedy(prompt, 40)
    stages = chunks[-1].served_by.stages
    assert stages[0].startswith("prefill:charlm-prefill@branch/") and stages[1].startswith("decode:charlm@cloud/")
    assert chunks[-1].served_by.site == "cloud"


async def test_bad_prompts_and_token_counts_get_one_clear_error(network):
    async with network.client("acme") as client:
        for prompt, count, code, text in [("é€", 4, "bad_request", "vocabulary"),
                                           ("def ", 0, "bad_request", "max_tokens"),
                                           ("def ", 10_000, "bad_request", "max_tokens")]:
            with pytest.raises(DinRequestError) as raised:
                await _stream(client, prompt, count, labels=["pii"])
            assert raised.value.error.code.value == code and text in raised.value.error.message


async def test_forged_or_corrupted_stage_input_is_refused_and_the_executor_keeps_serving(network, digits):
    x, _ = digits
    nc = await nats.connect(network.hub_url, max_reconnect_attempts=0, **network.stack.nats_options())
    inbox = nc.new_inbox()
    answers = await nc.subscribe(inbox)
    job = JobV1(request_id="forged", tenant="acme", model="digits-large", sla_class="interactive",
                deadline_ms=2**42, reply_to=inbox, content_type="application/json", received_ms=0.0, stage=1,
                plan=[StageV1(kind=StageKind.SPLIT_HEAD, model="digits-large-head-hidden_1", site="factory",
                              output="hidden_1"),
                      StageV1(kind=StageKind.SPLIT_TAIL, model="digits-large-tail-hidden_1", site="cloud",
                              executor="cloud-tail-2", output="answer")],
                model_chosen="digits-large-tail-hidden_1")
    headers = {**job.to_headers(), "Din-Env-V": "1", "Din-Env-Key": "site-cloud.1", "Din-Env-Nonce": "AAAA"}
    wrong_site = job.model_copy(update={"stage": 0})
    refused_before = await _refused(network, "cloud-tail-2")
    await nc.publish(Subjects.execute("cloud", "cloud-tail-2"), b"\x00" * 1024, headers=headers)
    await nc.publish(Subjects.execute("cloud", "cloud-tail-2"), b"\x00" * 1024, headers=wrong_site.to_headers())
    await nc.publish(Subjects.work("cloud", "digits-large-tail-hidden_1"), b"garbage", headers=headers)

    async def both_refused() -> bool:
        return await _refused(network, "cloud-tail-2") >= refused_before + 2

    await wait_for(both_refused, 10, "cloud-tail-2 refusing both forged stage inputs")
    await nc.flush()
    assert answers.pending_msgs == 0, "a forged stage input was answered"
    await nc.close()
    async with network.client("acme") as client:
        result = await client.infer("digits-large", {"input": x[:1]}, labels=["pii"], split="hidden_1")
        assert result.served_by.split_point == "hidden_1"


async def _refused(network, executor: str) -> int:
    """Messages ``executor`` refused: dead-lettered, or refused by its payload security."""
    detail = (await network.health("executor", executor)).detail
    return int(detail["dead_lettered"]) + int(detail.get("auth_refused", 0))


async def test_a_dead_tail_executor_is_replaced_within_the_deadline(network, digits, whole_model):
    """Centralized: the scheduler re-plans the job; distributed: JetStream redelivers the unacknowledged stage to
    the site's other tail executor once the frozen one stops claiming it."""
    x, _ = digits
    network.kill("executor-cloud-tail-1", signal.SIGSTOP)
    try:
        async with network.client("acme") as client:
            results = await asyncio.gather(*(
                client.infer("digits-large", {"input": x[i : i + 1]}, labels=["pii"], split="hidden_1",
                             timeout_ms=8000)
                for i in range(10)
            ))
        for i, result in enumerate(results):
            assert int(result.outputs["label"][0]) == int(whole_model(x[i : i + 1])[0])
            assert "cloud-tail-1" not in result.served_by.stages[1] and result.served_by.executor != "cloud-tail-1"
        if network.stack.mode == "centralized":
            ids = {result.response.id for result in results}
            placed = await _records(network, Topics.SCHEDULING_DECISIONS,
                                    lambda d: d["request_id"] in ids and len(d.get("plan") or []) == 2,
                                    want=len(ids), what="the placements of the ten split requests")
            on_frozen = any(d["plan"][1].get("executor") == "cloud-tail-1" for d in placed)
            health = await network.health("scheduler")
            # Load spreading decides whether any tail landed on the frozen executor; those that did were re-planned.
            assert int(health.detail["redispatched"]) >= 1 or not on_frozen
    finally:
        network.kill("executor-cloud-tail-1", signal.SIGKILL)


async def test_a_dying_decode_executor_ends_the_stream_with_an_error(network):
    """Centralized: the scheduler sees the decode executor die and ends the stream at once. Distributed: the state
    waits in the site's queue for a decode executor (there is no other) and the stream ends at its deadline."""
    centralized = network.stack.mode == "centralized"
    network.kill("executor-cloud-decode", signal.SIGSTOP)
    try:
        received = []
        async with network.client("initech") as client:
            with pytest.raises(DinRequestError) as raised:
                async for chunk in client.generate("charlm", "def main():\n", max_tokens=64,
                                                   timeout_ms=8000 if centralized else 3000):
                    received.append(chunk)
        assert [c.seq for c in received] == [0], "the first token comes from prefill, before the state moves"
        if centralized:
            assert raised.value.error.code.value == "executor_lost"
            assert "interrupted" in raised.value.error.message
        else:
            assert raised.value.error.code.value in ("deadline_exceeded", "executor_lost")
    finally:
        network.kill("executor-cloud-decode", signal.SIGKILL)


async def test_a_stream_that_runs_out_of_time_still_ends_with_one_error(network):
    """512 tokens rarely fit in these deadlines: the executor stops at its cutoff and the scheduler ends the stream."""
    async with network.client("acme") as client:
        for timeout_ms in (60, 120, 250):
            chunks = []
            try:
                async for chunk in client.generate("charlm", "def ", max_tokens=512, timeout_ms=timeout_ms,
                                                   labels=["pii"]):
                    chunks.append(chunk)
            except DinRequestError as ended:
                assert ended.error.code.value == "deadline_exceeded", ended.error
            else:
                assert chunks[-1].done

