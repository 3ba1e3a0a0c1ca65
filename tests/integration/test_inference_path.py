"""The inference path over real brokers: clients publish, admission → classifier → scheduler → executor answer.

One centralized-mode network serves the module; before each test it is
restored to its topology (executors a test killed are restarted, ones it
added are stopped), so the order of the tests does not matter.
"""

from __future__ import annotations

import asyncio
import json
import math
import signal
import time
from collections import Counter

import nats
import numpy as np
import pytest

from din.client import DinRequestError
from din.shared.contracts.events import LoadModelV1, ModelLoadedV1
from din.shared.contracts.inference import RequestHeaders
from din.shared.credentials import request_proof
from din.shared.errors import DIN_ERROR_HEADER, ERROR_CODE_HEADER, ErrorReplyV1
from din.shared.naming import Subjects, Topics
from din.shared.security import OPERATOR, ControlSigner, PrincipalKeys, key_file
from din.shared.tensors import encode_binary, encode_request_json
from tests.integration.network import read_events, running_network
from tests.support import wait_for


@pytest.fixture(scope="module")
def stack(kafka_access, zoo_dir, tmp_path_factory):
    with running_network(kafka_access, zoo_dir, tmp_path_factory.mktemp("din"), "centralized") as net:
        yield net


@pytest.fixture
async def network(stack):
    """The module's network, as its topology declares it."""
    await stack.restore()
    return stack


async def test_json_and_binary_requests_are_answered_with_correct_labels(network, digits):
    x, y = digits
    async with network.client("globex") as client:
        for i in range(20):
            result = await client.infer("digits-small", {"input": x[i : i + 1]}, binary=i % 2 == 0, sla="realtime")
            served = result.served_by
            assert (served.model, served.degraded) == ("digits-small", False)
            assert served.site in {"cloud", "factory", "branch"}
            assert result.outputs["probabilities"].shape == (1, 10)
        labels = [int((await client.infer("digits-small", {"input": x[i : i + 1]})).outputs["label"][0])
                  for i in range(60)]
    assert np.mean(np.array(labels) == y[:60]) > 0.9


BARE = "bare:"


async def test_each_request_good_or_bad_gets_exactly_one_answer(network, digits):
    """N mixed requests on one inbox: exactly N answers, each error structured with code and request id."""
    x, _ = digits
    token = network.token("acme")
    good = encode_request_json({"input": x[:1]})
    nan = x[:1].copy()
    nan[0, 3] = math.nan
    binary_body, binary_headers = encode_binary("input", x[:2])
    auth = {RequestHeaders.TOKEN: token}
    cases = [
        ("good", "acme", "digits-small", good, auth, None),
        ("good-binary", "acme", "digits-small", binary_body, {**auth, **binary_headers}, None),
        ("malformed-json", "acme", "digits-small", b"{nope", auth, "bad_request"),
        ("schema", "acme", "digits-small", b'{"inputs": [{"name": "input"}]}', auth, "schema_violation"),
        ("shape", "acme", "digits-small", encode_request_json({"input": x[:1, :10]}), auth, "bad_tensor"),
        ("dtype", "acme", "digits-small", encode_request_json({"input": x[:1].astype(np.float64)}), auth,
         "bad_tensor"),
        ("nan", "acme", "digits-small", encode_request_json({"input": nan}), auth, "bad_tensor"),
        ("unknown-tenant", "nobody", "digits-small", good, auth, "unknown_tenant"),
        ("unknown-model", "acme", "resnet-50", good, auth, "unknown_model"),
        ("unknown-version", "acme", "digits-small", good, {**auth, RequestHeaders.MODEL_VERSION: "7"},
         "unknown_model"),
        ("oversized", "acme", "digits-small", b"x" * (5 * 1024 * 1024), auth, "payload_too_large"),
        ("expired", "acme", "digits-small", good,
         {**auth, RequestHeaders.DEADLINE_MS: str(int(time.time() * 1000) - 5)}, "deadline_exceeded"),
        ("no-token", "acme", "digits-small", good, {}, "unauthenticated"),
        ("forged-token", "acme", "digits-small", good, {RequestHeaders.TOKEN: token[:-2] + "00"}, "unauthenticated"),
        ("bare-token", "acme", "digits-small", good, {RequestHeaders.TOKEN: BARE + token}, "unauthenticated"),
        ("proof-for-another-model", "acme", "digits-small", good,
         {RequestHeaders.TOKEN: request_proof(token, "digits-large", "proof-for-another-model-0")},
         "unauthenticated"),
        ("bad-sla", "acme", "digits-small", good, {**auth, RequestHeaders.SLA_CLASS: "gold"}, "bad_request"),
        ("binary-bad-shape", "acme", "digits-small", binary_body[:-4],
         {**auth, **binary_headers}, "bad_tensor"),
        ("non-ascii-token", "acme", "digits-small", good, {RequestHeaders.TOKEN: token + "\u00e9"},
         "unauthenticated"),
        ("far-deadline", "acme", "digits-small", good, {**auth, RequestHeaders.DEADLINE_MS: "1" + "0" * 30},
         "bad_request"),
        ("rank-100", "acme", "digits-small",
         b'{"inputs": [{"name": "input", "shape": [' + b",".join([b"1"] * 100) + b'], "datatype": "FP32", '
         b'"data": [0.0]}]}', auth, "bad_tensor"),
        ("control-label", "acme", "digits-small", good, {**auth, RequestHeaders.LABELS: "pii,\u0007"}, "bad_request"),
        ("internal-part", "acme", "digits-large-head-hidden_1", good, auth, "forbidden"),
        ("number-labels", "acme", "digits-small",
         b'{"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [' +
         b",".join([b"0.0"] * 64) + b']}], "parameters": {"labels": [5]}}', auth, "bad_request"),
    ]
    nc = await nats.connect(network.hub_url, max_reconnect_attempts=0, **network.stack.nats_options())
    answers: list = []
    inbox = nc.new_inbox()

    async def collect(msg):
        answers.append(msg)

    await nc.subscribe(inbox, cb=collect)
    rounds = 3
    for round_ in range(rounds):
        for name, tenant, model, body, headers, _ in cases:
            subject = f"din.v1.infer.{tenant}.{model}"
            if headers.get(RequestHeaders.TOKEN) == token:
                headers = {**headers, RequestHeaders.TOKEN: request_proof(token, model, f"{name}-{round_}", inbox)}
            elif headers.get(RequestHeaders.TOKEN, "").startswith(BARE):
                headers = {**headers, RequestHeaders.TOKEN: token}
            await nc.publish(subject, body, reply=inbox,
                             headers={**headers, RequestHeaders.REQUEST_ID: f"{name}-{round_}",
                                      RequestHeaders.TIMEOUT_MS: headers.get(RequestHeaders.TIMEOUT_MS, "3000")}
                             if RequestHeaders.DEADLINE_MS not in headers else
                             {**headers, RequestHeaders.REQUEST_ID: f"{name}-{round_}"})
    expected = rounds * len(cases)
    await wait_for(lambda: len(answers) >= expected, 10, lambda: f"{expected} answers (got {len(answers)})")
    await network.barrier(nc, inbox, answers)
    await nc.close()

    assert len(answers) == expected
    by_id: dict[str, list] = {}
    for msg in answers:
        if msg.headers and DIN_ERROR_HEADER in msg.headers:
            error = ErrorReplyV1.model_validate_json(msg.data).error
            assert msg.headers[ERROR_CODE_HEADER] == str(error.status)
            by_id.setdefault(error.request_id or "?", []).append(error.code.value)
        else:
            by_id.setdefault(json.loads(msg.data)["id"], []).append(None)
    for round_ in range(rounds):
        for name, *_, code in cases:
            assert by_id.get(f"{name}-{round_}") == [code], name


async def test_sensitive_data_runs_only_at_the_tenants_allowed_sites(network, digits):
    x, _ = digits
    async with network.client("acme") as acme, network.client("initech") as initech, \
            network.client("globex") as globex:
        acme_sites = {(await acme.infer("digits-small", {"input": x[i : i + 1]}, labels=["pii"])).served_by.site
                      for i in range(30)}
        initech_sites = {(await initech.infer("digits-small", {"input": x[i : i + 1]})).served_by.site
                         for i in range(30)}
        open_sites = Counter([
            (await globex.infer("digits-small", {"input": x[i : i + 1]}, labels=["pii"])).served_by.site
            for i in range(60)])
    assert acme_sites == {"factory"}
    assert initech_sites == {"branch"}
    assert "cloud" in open_sites, "globex has no sovereignty policy: its requests go to the fastest site"


async def test_large_model_saturated_degrades_only_requests_that_allow_it(network, digits):
    """cloud-1 (the only digits-large executor) holds 2 jobs; a burst beyond it degrades to digits-small."""
    x, _ = digits
    async with network.client("globex") as client:
        async def one(i: int, allow: bool):
            try:
                result = await client.infer("digits-large", {"input": x[i % 100 : i % 100 + 1]}, sla="batch",
                                            allow_degrade=allow, timeout_ms=5000)
                return result.served_by
            except DinRequestError as exc:
                return exc.error.code.value

        degraded = []
        for _ in range(10):
            served = await asyncio.gather(*(one(i, True) for i in range(40)))
            assert all(not isinstance(s, str) for s in served), [s for s in served if isinstance(s, str)]
            degraded = [s for s in served if s.degraded]
            if degraded:
                break
        assert degraded, "a burst of 40 never saturated cloud-1"
        assert {(s.model, s.degraded) for s in degraded} == {("digits-small", True)}
        assert any(s.model == "digits-large" and not s.degraded for s in served)
        strict = await asyncio.gather(*(one(i, False) for i in range(40)))
    assert all(isinstance(s, str) or (s.model == "digits-large" and not s.degraded) for s in strict)
    assert set(s for s in strict if isinstance(s, str)) <= {"overloaded"}


async def test_model_version_swap_under_load_fails_no_request(network, digits):
    x, _ = digits
    nc = await nats.connect(network.hub_url, **network.stack.nats_options())
    operator = ControlSigner(PrincipalKeys.load(key_file(network.stack.keys_dir, OPERATOR)).identity)
    versions = Counter()
    failures = []
    stop = asyncio.Event()

    async def load(client):
        i = 0
        while not stop.is_set():
            try:
                result = await client.infer("digits-small", {"input": x[i % 100 : i % 100 + 1]}, sla="interactive")
                if result.served_by.executor == "cloud-2":
                    versions[result.served_by.model_version] += 1
            except Exception as exc:
                failures.append(exc)
            i += 1

    async def served_more(version: str, count: int) -> None:
        """Wait until cloud-2 has served ``count`` more requests with ``version`` than it had so far."""
        wanted = versions[version] + count
        await wait_for(lambda: versions[version] >= wanted or failures, 15,
                       lambda: f"cloud-2 serving {count} requests with version {version} (served {dict(versions)})")

    async with network.client("globex") as client:
        workers = [asyncio.create_task(load(client)) for _ in range(8)]
        for version in ("1", "2", "1", "2"):
            subject = Subjects.control("executor", "cloud-2")
            body = LoadModelV1(model="digits-small", version=version).model_dump_json().encode()
            reply = await nc.request(subject, body, headers=operator.headers(subject, body), timeout=10)
            assert ModelLoadedV1.model_validate_json(reply.data).version == version
            await served_more(version, 5)
        stop.set()
        await asyncio.gather(*workers)
    await nc.close()
    assert failures == []
    assert versions["1"] > 0 and versions["2"] > 0


async def test_every_decision_lands_in_kafka_with_its_reason(network, digits, kafka_access):
    x, _ = digits
    async with network.client("globex") as client:
        result = await client.infer("digits-small", {"input": x[:1]}, request_id="kafka-probe-1")
        with pytest.raises(DinRequestError):
            await client.infer("resnet", {"input": x[:1]}, request_id="kafka-probe-2")
    admission, scheduling, completions = (Topics.scoped(topic, network.topic_scope) for topic in (
        Topics.ADMISSION_DECISIONS, Topics.SCHEDULING_DECISIONS, Topics.COMPLETIONS))
    wanted = {(admission, "kafka-probe-1"), (admission, "kafka-probe-2"), (scheduling, "kafka-probe-1"),
              (completions, "kafka-probe-1")}
    events = await read_events(
        kafka_access, [admission, scheduling, completions],
        keep=lambda event: event.get("request_id") in ("kafka-probe-1", "kafka-probe-2"),
        enough=lambda read: wanted <= {(topic, event["request_id"]) for topic, event in read.found},
        what="the admission, scheduling and completion events of both probes",
    )
    found = {(topic, event["request_id"]): event for topic, event in events.found}
    admitted, refused = found[(admission, "kafka-probe-1")], found[(admission, "kafka-probe-2")]
    placed, done = found[(scheduling, "kafka-probe-1")], found[(completions, "kafka-probe-1")]
    assert (admitted["admitted"], admitted["reason"]) == (True, "ok")
    assert (refused["admitted"], refused["reason"]) == (False, "unknown_model")
    assert placed["chosen_executor"] == result.served_by.executor and placed["reason"]
    assert {a["executor"] for a in placed["alternatives"]} >= {"cloud-2", "factory-1", "branch-1"}
    assert done["ok"] and done["executor"] == result.served_by.executor


async def test_services_survive_garbage_and_keep_serving(network, digits):
    x, _ = digits
    nc = await nats.connect(network.hub_url, **network.stack.nats_options())
    garbage = [b"", b"\x00\xff\x10", b"{", b'{"request_id": 1}', b"x" * 10000]
    for subject in (Subjects.classify("cloud"), Subjects.schedule("cloud"), Subjects.execute("cloud", "cloud-2"),
                    Subjects.heartbeat("cloud", "ghost"), Subjects.pressure("cloud"), Subjects.completed("cloud"),
                    Subjects.control("executor", "cloud-2"), "din.v1.infer.acme", "din.v1.infer.a.b"):
        for body in garbage:
            await nc.publish(subject, body, headers={"Din-Job-V1": "{broken"})
            await nc.publish(subject, body)
    await nc.flush()
    await nc.close()

    async def classifier_dead_lettered_the_garbage() -> bool:
        return int((await network.health("classifier")).detail["dead_lettered"]) >= len(garbage)

    await wait_for(classifier_dead_lettered_the_garbage, 10,
                   f"the classifier dead-lettering {len(garbage)} garbage messages")
    for service in ("admission", "classifier", "scheduler", "telemetry", "keymanager"):
        assert (await network.health(service)).ready, service
    assert (await network.health("executor", "cloud-2")).ready
    async with network.client("globex") as client:
        assert (await client.infer("digits-small", {"input": x[:1]})).outputs["label"].shape == (1,)


async def test_new_executor_is_used_and_a_killed_one_is_avoided(network, digits):
    """initech may only run at branch: a second branch executor gets traffic; killing the first loses nothing."""
    x, _ = digits
    network.start_executor("branch-2", "branch", like="branch-1")
    await network.wait_ready("executor", "branch-2")
    async with network.client("initech") as client:
        seen = Counter()
        for i in range(200):
            seen[(await client.infer("digits-small", {"input": x[i % 100 : i % 100 + 1]})).served_by.executor] += 1
            if seen["branch-2"] >= 5:
                break
        assert seen["branch-2"] >= 5, seen

        async def one(i):
            try:
                return (await client.infer("digits-small", {"input": x[i % 100 : i % 100 + 1]},
                                           timeout_ms=3000)).served_by.executor
            except DinRequestError as exc:
                return exc.error.code.value

        in_flight = [asyncio.create_task(one(i)) for i in range(100)]
        await wait_for(lambda: any(task.done() for task in in_flight), 10, "a first answer to the burst",
                       interval=0.001)
        network.kill("executor-branch-1")
        outcomes = Counter(await asyncio.gather(*in_flight))
        assert sum(outcomes.values()) == 100
        assert set(outcomes) <= {"branch-1", "branch-2", "executor_lost", "deadline_exceeded", "overloaded"}, outcomes
        branch_2_replaces_branch_1 = len(network.topology_executors())
        await network.wait_live_executors(branch_2_replaces_branch_1)
        after = Counter([await one(i) for i in range(40)])
    assert after == Counter({"branch-2": 40})


async def test_sigterm_drains_in_flight_work(network, digits):
    """acme's sensitive data may only run at factory: SIGTERM factory-1 mid-burst; what it took is answered."""
    x, _ = digits
    async with network.client("acme") as client:
        async def one(i):
            try:
                result = await client.infer("digits-small", {"input": x[i % 100 : i % 100 + 1]}, labels=["pii"],
                                            timeout_ms=3000)
                return result.served_by.executor
            except DinRequestError as exc:
                return exc.error.code.value

        burst = [asyncio.create_task(one(i)) for i in range(300)]
        await wait_for(lambda: sum(task.done() for task in burst) >= 10, 10, "10 answers to the burst",
                       interval=0.001)
        proc = network.kill("executor-factory-1", signal.SIGTERM)
        outcomes = Counter(await asyncio.gather(*burst))
        assert sum(outcomes.values()) == 300
        assert outcomes["factory-1"] > 0
        assert set(outcomes) <= {"factory-1", "no_eligible_executor", "overloaded", "executor_lost"}, outcomes
        proc.popen.wait(timeout=15)
        assert proc.popen.returncode == 0
        await network.wait_live_executors(len(network.topology_executors()) - 1)
        with pytest.raises(DinRequestError) as caught:
            await client.infer("digits-small", {"input": x[:1]}, labels=["pii"], timeout_ms=2000)
        assert caught.value.error.code.value == "no_eligible_executor"


async def test_one_request_can_be_followed_across_every_hop(network, digits, kafka_access):
    """A sampled traceparent from the client: admission, classifier, scheduler and executor spans share its trace."""
    x, _ = digits
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    async with network.client("globex") as client:
        result = await client.infer("digits-small", {"input": x[:1]}, traceparent=f"00-{trace_id}-00f067aa0ba902b7-01")
    read = await read_events(
        kafka_access, [Topics.scoped(Topics.SPANS, network.topic_scope)],
        keep=lambda span: span["trace_id"] == trace_id,
        enough=lambda read: len({span["service"] for _, span in read.found}) >= 4,
        what=f"spans of trace {trace_id} from four services",
    )
    spans = [span for _, span in read.found]
    by_service = {s["service"]: s for s in spans}
    assert set(by_service) == {"din-admission", "din-classifier", "din-scheduler", "din-executor"}
    assert by_service["din-admission"]["parent_span_id"] == "00f067aa0ba902b7"
    for child, parent in (("din-classifier", "din-admission"), ("din-scheduler", "din-classifier"),
                          ("din-executor", "din-scheduler")):
        assert by_service[child]["parent_span_id"] == by_service[parent]["span_id"]
    assert by_service["din-executor"]["site"] == result.served_by.site
    assert by_service["din-executor"]["instance"] == result.served_by.executor
