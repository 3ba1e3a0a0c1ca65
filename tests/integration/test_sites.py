"""Every site stands on its own (issue 11): a control plane per site, real WAN links through Toxiproxy, local-first
placement, and failures counted per request: ok, each error code, unanswered (must be 0), duplicated (must be 0).

One stack for the module (hub ``cloud``, edges ``factory`` over a dedicated line and ``branch`` over the
internet, every leaf behind its Toxiproxy link), supervised like ``din up`` supervises. Each test leaves the
links up and every process running as it found them.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
import urllib.request
import uuid

import nats
import numpy as np
import pytest

from din.bench.tally import Load, Tally
from din.client import DinClient
from din.shared.bus.permissions import tenant_inbox, tenant_user
from din.shared.contracts.inference import RequestHeaders
from din.shared.contracts.job import JobV1
from din.shared.credentials import request_proof
from din.shared.naming import Subjects
from din.shared.security import CryptoPolicy
from din.stack.supervision import RestartPolicy, Supervisor
from din.stack.wan import ToxiproxyClient
from tests.integration.network import decode_json, running_network
from tests.support import make_job, subject_covers, three_site_topology, wait_for

pytestmark = pytest.mark.integration

SITES_TOPOLOGY = three_site_topology(
    "sites-tests",
    {
        "cloud": [{"id": "cloud-1", "models": ["digits-large", "digits-small"]}],
        "factory": [{"id": "factory-1", "models": ["digits-small"]}],
        "branch": [{"id": "branch-1", "models": ["digits-small"]}],
    },
    [
        {"name": "acme", "sensitive_sites": ["factory"], "rate_per_s": 5000, "burst": 5000},
        {"name": "globex", "rate_per_s": 5000, "burst": 5000},
        {"name": "tiny", "rate_per_s": 2, "burst": 10, "models": ["digits-small"]},
    ],
)
SITES_TOPOLOGY["sites"][2]["replicas"] = 2
"""Branch runs two instances of each control-plane service."""
PLAIN_CLIENTS = CryptoPolicy(plaintext_ingress=["acme", "globex", "tiny"])


@pytest.fixture(scope="module")
def network(kafka_access, zoo_dir, tmp_path_factory):
    with running_network(kafka_access, zoo_dir, tmp_path_factory.mktemp("din"), "centralized",
                         security_policy=PLAIN_CLIENTS, topology_spec=SITES_TOPOLOGY, wan=True) as net:
        stop = threading.Event()
        supervisor = Supervisor(net.stack, RestartPolicy(first_delay_s=0.2), report=lambda line: None)
        watcher = threading.Thread(target=supervisor.run, kwargs={"poll_s": 0.1, "until": stop}, daemon=True)
        watcher.start()
        try:
            yield net
        finally:
            stop.set()
            watcher.join(timeout=5)


@pytest.fixture(scope="module")
def links(network) -> ToxiproxyClient:
    return ToxiproxyClient(network.stack.toxiproxy.api_url)


def at(network, site: str) -> Load:
    """A counting load from ``site``'s own NATS server."""
    return Load(network.stack.nats_urls[site], {t: network.token(t) for t in ("acme", "globex", "tiny")},
                network.stack.nats_options(site))


async def kill_under_load(network, load: Load, process: str, instance: str) -> dict[str, int]:
    """kill -9 ``process`` while ``load`` sends 80 requests at 40/s; the outcome, once the process is back."""
    sender = asyncio.create_task(load.send("globex", "digits-small", 80, every_s=0.025))
    await asyncio.sleep(0.5)
    victim = network.process(process)
    old_pid = victim.pid
    victim.popen.send_signal(signal.SIGKILL)
    await sender
    outcome = await load.settle()
    await wait_for(lambda: victim.pid != old_pid and victim.alive(), 30, f"{process} restarted")
    await network.wait_ready(process.split("-")[0], instance, timeout_s=30.0)
    return outcome


async def scheduled(network, site: str) -> int:
    return int((await network.health("scheduler", site)).detail["scheduled"])


async def test_a_request_its_own_site_can_serve_never_leaves_the_site(network):
    hub_before, factory_before = await scheduled(network, "cloud"), await scheduled(network, "factory")
    load = at(network, "factory")
    async with load:
        await load.send("globex", "digits-small", 20)
        outcome = await load.settle()
    assert outcome == {"ok": 20, "unanswered": 0, "duplicated": 0}
    assert load.tally.sites == {"factory": 20}
    assert await scheduled(network, "factory") - factory_before == 20
    assert await scheduled(network, "cloud") == hub_before, "the hub's scheduler placed an edge-local request"


def hub_subscriptions(network) -> list[str]:
    """Every subject some client or route has interest in at the hub's NATS server (its monitoring endpoint)."""
    url = f"http://127.0.0.1:{network.stack.ports.hub_monitor}/subsz?subs=1&limit=100000"
    with urllib.request.urlopen(url, timeout=5) as answer:
        listed = json.load(answer).get("subscriptions_list") or []
    return [entry["subject"] for entry in listed]


async def test_edge_executors_heartbeats_never_reach_the_hub_which_knows_them_from_rosters(network):
    """The hub's NATS server carries no per-executor message of another site: nothing at the hub subscribes to a
    subject an edge executor's heartbeat would match, yet the hub's scheduler knows every edge executor (from
    its site's roster) and places what crosses sites on them."""
    edge_beats = [Subjects.heartbeat(site, f"{site}-1") for site in ("factory", "branch")]
    subscribed = hub_subscriptions(network)
    assert any(subject_covers(s, Subjects.heartbeat("cloud", "cloud-1")) for s in subscribed), "the hub's own"
    interest = [s for s in subscribed if any(subject_covers(s, beat) for beat in edge_beats)]
    assert interest == [], f"the hub hears edge heartbeats through {interest}"

    async def hub_knows_all() -> bool:
        return int((await network.health("scheduler", "cloud")).detail["executors"]) == 3

    await wait_for(hub_knows_all, 10, "the hub's scheduler knows factory-1 and branch-1 from rosters")


async def test_what_the_site_cannot_serve_goes_to_the_hub_once(network):
    factory = await network.health("scheduler", "factory")
    load = at(network, "factory")
    async with load:
        await load.send("globex", "digits-large", 10)
        outcome = await load.settle()
    assert outcome == {"ok": 10, "unanswered": 0, "duplicated": 0}
    assert load.tally.sites == {"cloud": 10}
    after = await network.health("scheduler", "factory")
    assert int(after.detail["forwarded"]) - int(factory.detail["forwarded"]) == 10


async def test_sensitive_data_is_opened_only_at_its_sites(network):
    before = {site: await network.health("admission", site) for site in ("cloud", "factory")}
    load = at(network, "cloud")
    async with load:
        await load.send("acme", "digits-small", 10, labels="pii")
        outcome = await load.settle()
    assert outcome == {"ok": 10, "unanswered": 0, "duplicated": 0}
    assert load.tally.sites == {"factory": 10}
    after = {site: await network.health("admission", site) for site in ("cloud", "factory")}
    assert int(after["cloud"].detail["handed_over"]) - int(before["cloud"].detail["handed_over"]) == 10
    assert int(after["cloud"].detail["admitted"]) == int(before["cloud"].detail["admitted"])
    assert int(after["factory"].detail["admitted"]) - int(before["factory"].detail["admitted"]) == 10


async def test_a_partitioned_site_keeps_serving_its_own_clients(network, links):
    """The factory's link is cut: its own requests are served there; those that need the hub are refused at
    once (unavailable), not left to time out; nothing goes unanswered or twice."""
    load = at(network, "factory")
    links.set_enabled("factory", False)
    try:
        async with load:
            await load.send("globex", "digits-small", 30)
            local = await load.settle()
            remote = await load.send("globex", "digits-large", 10)
            await load.settle()
    finally:
        links.set_enabled("factory", True)
    assert local == {"ok": 30, "unanswered": 0, "duplicated": 0}
    assert load.tally.outcome(remote) == {"unavailable": 10, "unanswered": 0, "duplicated": 0}
    await network.wait_live_executors(3, timeout_s=30.0)


@pytest.mark.parametrize("service", ["scheduler-factory", "classifier-factory", "admission-factory"])
async def test_killing_a_site_control_process_loses_no_request(network, service):
    """kill -9 under load: until the supervisor has it back, requests are answered another way (another site's
    admission takes the queue group; a missing classifier or scheduler is answered unavailable at once; a job
    the dead process held unacknowledged is answered at its deadline by the service that handed it on).

    Admission has no DIN service upstream: a request already in a killed admission's socket buffer is lost to
    DIN (core NATS delivers at most once) and only the client's own timeout ends it; at most one or two at this
    rate, and the test says how many."""
    load = at(network, "factory")
    async with load:
        outcome = await kill_under_load(network, load, service, "factory")
        load.tally = Tally()
        await load.send("globex", "digits-small", 5)
        after = await load.settle()
    lost_in_buffer = 2 if service.startswith("admission") else 0
    assert outcome["unanswered"] <= lost_in_buffer and outcome["duplicated"] == 0, outcome
    assert set(outcome) <= {"ok", "unavailable", "deadline_exceeded", "unanswered", "duplicated"}, outcome
    assert after == {"ok": 5, "unanswered": 0, "duplicated": 0}


async def held_at_a_frozen_executor(network, load: Load, timeout_ms: int, thaw_after_s: float,
                                    kill_scheduler: bool) -> dict[str, int]:
    """10 jobs placed on the factory's executor while it is frozen (SIGSTOP, shorter than the heartbeats it may
    miss), optionally the factory's scheduler killed meanwhile, the executor thawed ``thaw_after_s`` after the
    freeze: their outcome, once a request sent after the thaw was answered (the executor has caught up, so a
    second answer from it would have arrived)."""
    executor = network.process("executor-factory-1")
    before = await scheduled(network, "factory")
    async with load:
        os.kill(executor.pid, signal.SIGSTOP)
        frozen = time.monotonic()
        try:
            held = await load.send("globex", "digits-small", 10, every_s=0.01, timeout_ms=timeout_ms)

            async def placed() -> bool:
                return await scheduled(network, "factory") - before >= 10

            await wait_for(placed, 5, "the factory's scheduler placed the 10 jobs")
            if kill_scheduler:
                network.kill("scheduler-factory")
            await asyncio.sleep(max(0.0, thaw_after_s - (time.monotonic() - frozen)))
        finally:
            os.kill(executor.pid, signal.SIGCONT)
        await load.settle()
        await load.send("globex", "digits-small", 1)
        await load.settle()
        return load.tally.outcome(held)


async def test_the_jobs_an_executor_holds_are_answered_when_the_scheduler_that_placed_them_dies(network):
    """The executor owns the jobs it holds: with their scheduler killed, every one is still answered once."""
    scheduler = network.process("scheduler-factory")
    old = scheduler.pid
    outcome = await held_at_a_frozen_executor(network, at(network, "factory"), 3000, 0.3, kill_scheduler=True)
    assert outcome == {"ok": 10, "unanswered": 0, "duplicated": 0}
    await wait_for(lambda: scheduler.pid != old and scheduler.alive(), 30, "scheduler-factory restarted")
    await network.wait_ready("scheduler", "factory", timeout_s=30.0)


async def test_a_paused_executor_past_the_deadline_leaves_the_one_answer_to_the_watchdog(network):
    """Jobs held by a paused executor until after their deadline: the scheduler's watchdog answers each, the
    executor, resumed, stays silent (it reached them after the deadline), so each gets exactly one answer."""
    outcome = await held_at_a_frozen_executor(network, at(network, "factory"), 300, 0.8, kill_scheduler=False)
    assert outcome == {"deadline_exceeded": 10, "unanswered": 0, "duplicated": 0}


async def test_a_job_reaching_a_stage_past_its_deadline_is_answered_once_by_its_owner(network):
    """The classifier and the scheduler each answer a job that reaches them past its deadline with
    ``deadline_exceeded``, once, and do no work on it, when no sender awaits their acknowledgement; when one does,
    they neither answer nor acknowledge it (``lifecycle.left_to_sender``): the sender, still its owner, answers."""
    nc = await nats.connect(network.stack.nats_urls["factory"], **network.stack.nats_options("factory"))
    inbox = nc.new_inbox()
    answers: list = []

    async def collect(msg) -> None:
        answers.append(msg)

    await nc.subscribe(f"{inbox}.*", cb=collect)
    past = int(time.time() * 1000) - 10
    stages = ((Subjects.classify("factory"), "classify"), (Subjects.schedule("factory"), "schedule"))

    def late(rid: str) -> JobV1:
        return make_job(request_id=rid, tenant="globex", model="digits-small", deadline_ms=past,
                        reply_to=f"{inbox}.{rid}", received_ms=past - 1000)

    try:
        async with network.site_job_facts("factory", nc) as facts:
            for subject, stage in stages:
                with pytest.raises(nats.errors.TimeoutError):
                    await nc.request(subject, b"{}", headers=facts.tag(late(f"awaited-{stage}").to_headers(),
                                                                       "factory"), timeout=0.5)
                await nc.publish(subject, b"{}", headers=facts.tag(late(f"late-{stage}").to_headers(), "factory"))
            await wait_for(lambda: len(answers) >= 2, 5, "both unawaited late jobs answered")
            await asyncio.sleep(0.2)
    finally:
        await nc.close()
    codes = sorted((msg.subject.rsplit(".", 1)[1], decode_json(msg.data)["error"]["code"]) for msg in answers)
    assert codes == [("late-classify", "deadline_exceeded"), ("late-schedule", "deadline_exceeded")]
    for service in ("classifier", "scheduler"):
        assert int((await network.health(service, "factory")).detail["left_to_sender"]) >= 1


async def test_two_admissions_at_a_site_grant_the_tenants_quota_once(network):
    """Branch runs two admissions; a tenant's burst of 10 at 2/s is the site's, not each instance's."""
    load = at(network, "branch")
    async with load:
        started = time.monotonic()
        await load.send("tiny", "digits-small", 60, every_s=0.005)
        elapsed = time.monotonic() - started
        outcome = await load.settle()
    assert outcome["unanswered"] == 0 and outcome["duplicated"] == 0, outcome
    assert outcome.get("rate_limited", 0) + outcome.get("ok", 0) == 60, outcome
    granted_at_most = 10 + 2 * elapsed + 2
    assert outcome.get("ok", 0) <= granted_at_most, outcome
    details = [await network.health("admission", instance) for instance in ("branch", "branch-2")]
    assert all(int(d.detail["admitted"]) > 0 for d in details), "the queue group did not use both admissions"


async def test_a_tenant_gets_only_the_models_the_topology_gives_it_and_never_a_models_internal_parts(network):
    load = at(network, "factory")
    async with load:
        await load.send("tiny", "digits-large", 3, every_s=0.0)
        await load.send("globex", "digits-large-head-hidden_1", 3, every_s=0.0)
        outcome = await load.settle()
    assert outcome == {"forbidden": 6, "unanswered": 0, "duplicated": 0}


async def test_a_replica_dying_leaves_its_peer_serving(network):
    """kill -9 one of branch's two schedulers under load: its peer in the queue group takes the work."""
    load = at(network, "branch")
    async with load:
        outcome = await kill_under_load(network, load, "scheduler-branch", "branch")
    assert outcome["unanswered"] == 0 and outcome["duplicated"] == 0, outcome
    assert outcome.get("unavailable", 0) == 0, "the surviving scheduler should have taken every job"
    assert set(outcome) <= {"ok", "deadline_exceeded", "unanswered", "duplicated"}, outcome


async def test_a_replay_to_another_admission_of_the_site_is_refused(network):
    """A captured sealed request published again and again at branch (two admissions) is answered once: the
    site's admissions claim each nonce in the site's JetStream bucket, not only in their own memory."""
    client = await DinClient.connect(network.stack.nats_urls["branch"], "globex", network.token("globex"),
                                     network.keys("globex"),
                                     options=network.stack.nats_options("branch", tenant_user("globex")),
                                     site="branch")
    nc = await nats.connect(network.stack.nats_urls["branch"], **network.stack.nats_options("branch"))
    inbox = f"{tenant_inbox('globex', 'branch')}.replay{uuid.uuid4().hex[:12]}"  # the captured reply subject
    answers: dict[str, int] = {}

    async def answered(msg) -> None:
        answers[msg.subject] = answers.get(msg.subject, 0) + 1

    try:
        await nc.subscribe(f"{inbox}.*", cb=answered)
        subject = Subjects.infer("globex", "digits-small")
        body, headers = client.seal("digits-small", *client.build({"input": np.zeros((1, 64), np.float32)},
                                                                  timeout_ms=3000), f"{inbox}.captured")
        for _ in range(20):
            await nc.publish(subject, body, reply=f"{inbox}.captured", headers=headers)
            await asyncio.sleep(0.01)
        barrier = client.seal("digits-small", *client.build({"input": np.zeros((1, 64), np.float32)},
                                                            timeout_ms=3000), f"{inbox}.barrier")
        await nc.publish(subject, barrier[0], reply=f"{inbox}.barrier", headers=barrier[1])
        await wait_for(lambda: f"{inbox}.barrier" in answers, 10, "the answer to a fresh request after the replays")
    finally:
        await nc.close()
        await client.close()
    assert answers[f"{inbox}.captured"] == 1, answers
    refused = [int((await network.health("admission", i)).detail.get("auth_refused_replay", 0))
               for i in ("branch", "branch-2")]
    assert sum(refused) >= 19 and min(refused) > 0, f"both admissions should have seen replays: {refused}"


async def test_a_captured_token_proof_is_good_for_nothing_else(network):
    """A party that sees a tenant's plaintext request at branch (two admissions) sends its token proof again:
    the same request over and over (dropped at both admissions, unanswered), the proof on another request id,
    on another model, on its own reply subject, a bare token and a proof issued a minute ago (each answered
    ``unauthenticated``), while the tenant's own requests beside it are all answered."""
    token = network.token("globex")
    nc = await nats.connect(network.stack.nats_urls["branch"], **network.stack.nats_options("branch"))
    inbox = f"{tenant_inbox('globex', 'branch')}.proofs{uuid.uuid4().hex[:12]}"
    answers: dict[str, list[str]] = {}

    async def answered(msg) -> None:
        code = json.loads(msg.data)["error"]["code"] if "Din-Error" in (msg.headers or {}) else "ok"
        answers.setdefault(msg.subject.rsplit(".", 1)[1], []).append(code)

    def request(request_id: str, proof: str, model: str = "digits-small") -> tuple[str, bytes, dict[str, str]]:
        return (Subjects.infer("globex", model), b'{"inputs": [{"name": "input", "shape": [1, 64], "datatype": '
                b'"FP32", "data": [' + b",".join([b"0.0"] * 64) + b"]}]}",
                {RequestHeaders.TOKEN: proof, RequestHeaders.REQUEST_ID: request_id,
                 RequestHeaders.TIMEOUT_MS: "5000"})

    before = [(await network.health("admission", i)).detail for i in ("branch", "branch-2")]
    try:
        await nc.subscribe(f"{inbox}.*", cb=answered)
        async with at(network, "branch") as load:
            beside = asyncio.create_task(load.send("globex", "digits-small", 40, every_s=0.05, timeout_ms=5000))
            captured = request("captured", request_proof(token, "digits-small", "captured", f"{inbox}.captured"))
            await nc.publish(captured[0], captured[1], reply=f"{inbox}.captured", headers=captured[2])
            await wait_for(lambda: "captured" in answers, 10, "the answer to the captured request")
            for _ in range(10):
                await nc.publish(captured[0], captured[1], reply=f"{inbox}.captured", headers=captured[2])
            proof = captured[2][RequestHeaders.TOKEN]
            attacks = {
                "other-id": request("other-id", proof),
                "other-model": request("captured", proof, "digits-large"),
                "bare": request("bare", token),
                "minute-old": request("minute-old", request_proof(token, "digits-small", "minute-old",
                                                                  f"{inbox}.minute-old", now=time.time() - 60)),
            }
            for name, (subject, body, headers) in attacks.items():
                await nc.publish(subject, body, reply=f"{inbox}.{name}", headers=headers)
            own = request("own-reply", proof)
            await nc.publish(own[0], own[1], reply=f"{inbox}.own-reply", headers={**own[2],
                             RequestHeaders.REQUEST_ID: "captured"})
            await wait_for(lambda: all(name in answers for name in (*attacks, "own-reply")), 10,
                           lambda: f"an answer to every attack (got {sorted(answers)})")
            await beside
            beside_outcome = await load.settle()
        barrier = request("barrier", request_proof(token, "digits-small", "barrier", f"{inbox}.barrier"))
        await nc.publish(barrier[0], barrier[1], reply=f"{inbox}.barrier", headers=barrier[2])
        await wait_for(lambda: "barrier" in answers, 10, "the answer to a fresh request after the replays")
    finally:
        await nc.close()
    assert answers["captured"] == ["ok"], "the replays were answered"
    assert {name: answers[name] for name in (*attacks, "own-reply")} == {
        name: ["unauthenticated"] for name in (*attacks, "own-reply")}
    assert beside_outcome == {"ok": 40, "unanswered": 0, "duplicated": 0}, beside_outcome
    after = [(await network.health("admission", i)).detail for i in ("branch", "branch-2")]

    def grown(reason: str) -> int:
        key = f"credential_refused_{reason}"
        return sum(int(a[key]) - int(b[key]) for a, b in zip(after, before, strict=True))

    assert grown("replay") == 10 and grown("bearer") == 1 and grown("stale") == 1
    assert grown("signature") == 3
