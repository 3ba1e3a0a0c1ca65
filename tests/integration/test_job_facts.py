"""A job's routing facts cannot be changed on the bus: options are bound by the client's seal, job headers by tags.

A party with the run's widest NATS login (the operator's: it may read and publish on every subject, as a
compromised service could) but none of DIN's keys attacks acme's ``pii`` requests, which only the factory may
open, while acme's real requests run beside it:

- it changes, adds or removes the option headers of sealed requests (labels, SLA class, timeout, deadline):
  admission answers each ``unauthenticated`` (the client's seal binds them);
- it re-publishes jobs it captured between the factory's classifier and scheduler with their labels,
  sensitivity and allowed sites rewritten, or with the tag stripped: the scheduler refuses each
  (``job_refused_*``) and answers nobody;
- it re-addresses a job the scheduler dispatched to the factory to the branch executor: refused there.

Every real request is answered once, at the factory, with the right labels.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter

import nats
import numpy as np
import pytest

from din.shared.bus.connect import nats_servers
from din.shared.contracts.inference import RequestHeaders
from din.shared.contracts.job import JobV1
from din.shared.errors import DIN_ERROR_HEADER, ErrorReplyV1
from din.shared.naming import Subjects
from din.shared.security import JOB_TAG_HEADER
from din.shared.security.jobfacts import JOB_HEADER
from tests.integration.network import running_network
from tests.support import wait_for

pytestmark = pytest.mark.integration

MODEL = "digits-small"
REQUESTS = 20


@pytest.fixture(scope="module")
def network(kafka_access, zoo_dir, tmp_path_factory):
    with running_network(kafka_access, zoo_dir, tmp_path_factory.mktemp("din"), "centralized") as net:
        yield net


def count(detail_: dict[str, str], key: str) -> int:
    return int(detail_.get(key, "0"))


async def admissions(network) -> Counter[str]:
    """Every admission's health counters, summed (acme's ``pii`` requests are opened at the factory's)."""
    total: Counter[str] = Counter()
    for site in network.topology.control_sites():
        total.update({k: int(v) for k, v in (await network.detail("admission", site)).items() if v.isdigit()})
    return total


def unconfined(header: str) -> str:
    """A job header rewritten to let acme's ``pii`` data run anywhere."""
    job = json.loads(header)
    job["labels"] = []
    if job.get("workload"):
        job["workload"].update(sensitive=False, allowed_sites=None)
    return json.dumps(job, separators=(",", ":"))


async def test_options_changed_after_sealing_are_refused_at_admission(network, digits):
    x, _ = digits
    attacker = await nats.connect(nats_servers(network.hub_url), **network.stack.nats_options())
    inbox = attacker.new_inbox()
    answers: dict[str, list] = {}

    async def keep(msg) -> None:
        answers.setdefault(msg.subject.rsplit(".", 1)[1], []).append(msg)

    await attacker.subscribe(f"{inbox}.*", cb=keep)
    before = await admissions(network)
    far = str(int(time.time() * 1000) + 50_000)
    tamperings = {
        "labels-removed": lambda h: {k: v for k, v in h.items() if k != RequestHeaders.LABELS},
        "labels-changed": lambda h: {**h, RequestHeaders.LABELS: "public"},
        "sla-added": lambda h: {**h, RequestHeaders.SLA_CLASS: "realtime"},
        "timeout-changed": lambda h: {**h, RequestHeaders.TIMEOUT_MS: "60000"},
        "deadline-moved": lambda h: {**h, RequestHeaders.DEADLINE_MS: far},
    }
    try:
        async with network.client("acme") as client:
            for name, tamper in [("untouched", dict), *tamperings.items()]:
                body, headers = client.build({"input": x[:1]}, labels=["pii"], timeout_ms=5000)
                body, headers = client.seal(MODEL, body, headers, f"{inbox}.{name}")
                await attacker.publish(Subjects.infer("acme", MODEL), body, reply=f"{inbox}.{name}",
                                       headers=tamper(headers))
            await wait_for(lambda: len(answers) == len(tamperings) + 1, 15, lambda: f"answers to {sorted(answers)}")
    finally:
        await attacker.close()
    assert DIN_ERROR_HEADER not in (answers["untouched"][0].headers or {}), "the untouched request is served"
    for name in tamperings:
        (answer,) = answers[name]
        assert ErrorReplyV1.model_validate_json(answer.data).error.code.value == "unauthenticated", name
    after = await admissions(network)
    refused = {reason: after[f"auth_refused_{reason}"] - before[f"auth_refused_{reason}"]
               for reason in ("aad_mismatch", "wrong_reader")}
    # A request whose labels no longer say pii is opened where it arrived, the hub, which it was not sealed for.
    assert refused == {"aad_mismatch": len(tamperings) - 2, "wrong_reader": 2}, refused


async def test_job_headers_rewritten_on_the_bus_are_refused_and_answer_nobody(network, digits, local_labels):
    x, _ = digits
    attacker = await nats.connect(nats_servers(network.hub_url), **network.stack.nats_options())
    forged = {"rewritten": 0, "untagged": 0, "readdressed": 0}

    async def reforge(msg) -> None:
        if not msg.reply or JOB_TAG_HEADER not in (msg.headers or {}) or \
                JobV1.from_headers(msg.headers).tenant != "acme":
            return
        header = msg.headers[JOB_HEADER]
        rewritten = {**msg.headers, JOB_HEADER: unconfined(header)}
        untagged = {k: v for k, v in msg.headers.items() if k != JOB_TAG_HEADER}
        for kind, headers in (("rewritten", rewritten), ("untagged", untagged)):
            await attacker.publish(Subjects.schedule("factory"), msg.data, headers=headers)
            forged[kind] += 1

    async def readdress(msg) -> None:
        job = json.loads(msg.headers[JOB_HEADER])
        if job["tenant"] != "acme":
            return
        job.update(site_chosen="branch", executor_chosen="branch-1")
        headers = {**msg.headers, JOB_HEADER: json.dumps(job)}
        await attacker.publish(Subjects.execute("branch", "branch-1"), msg.data, headers=headers)
        forged["readdressed"] += 1

    await attacker.subscribe(Subjects.schedule("factory"), cb=reforge)
    await attacker.subscribe(Subjects.execute("factory", "factory-1"), cb=readdress)
    await attacker.flush()
    scheduler_before = await network.detail("scheduler", "factory")
    branch_before = await network.detail("executor", "branch-1")
    try:
        async with network.client("acme") as client:
            results = await asyncio.gather(*(client.infer(MODEL, {"input": x[i : i + 1]}, labels=["pii"],
                                                          timeout_ms=10_000) for i in range(REQUESTS)))
            await wait_for(lambda: forged["readdressed"] >= REQUESTS and forged["rewritten"] >= REQUESTS, 10,
                           lambda: f"the attacker forging every job ({forged})")
            await attacker.flush()
            refused = await wait_for(_refusals(network, scheduler_before, 2 * forged["rewritten"]), 10,
                                     "the scheduler refusing every forged job")
            branch = await wait_for(_refusals(network, branch_before, forged["readdressed"], "executor", "branch-1"),
                                    10, "the branch executor refusing every re-addressed job")
    finally:
        await attacker.close()

    assert {r.served_by.site for r in results} == {"factory"}
    np.testing.assert_array_equal(np.concatenate([r.outputs["label"] for r in results]),
                                  local_labels(x[:REQUESTS]))
    assert count(refused, "job_refused_bad_tag") - count(scheduler_before, "job_refused_bad_tag") \
        == forged["rewritten"]
    assert count(refused, "job_refused_malformed") - count(scheduler_before, "job_refused_malformed") \
        == forged["untagged"]
    assert count(branch, "job_refused_wrong_reader") - count(branch_before, "job_refused_wrong_reader") \
        == forged["readdressed"]
    assert count(branch, "completed") == count(branch_before, "completed"), "nothing of acme's ran at branch"


def _refusals(network, before: dict[str, str], expected: int, service: str = "scheduler",
              instance: str | None = "factory"):
    async def reached() -> dict[str, str] | None:
        now = await network.detail(service, instance)
        return now if count(now, "job_refused") - count(before, "job_refused") >= expected else None

    return reached
