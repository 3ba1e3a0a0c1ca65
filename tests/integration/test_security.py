"""Security over real brokers: sealed hops, per-path policy, attacks refused beside live traffic, rotation, revocation.

One network for the module, with a strict policy: no tenant may send in clear;
the dedicated link to ``factory`` may carry integrity-only payloads (the operator
allows it), every other path is encrypted. ``frugal`` may only afford factory, so
its requests take that path deterministically. Revocation runs last.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
from collections import Counter

import nats
import numpy as np
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from din.client import DinClient, DinRequestError
from din.commands.keys import send_command
from din.shared import envelope
from din.shared.bus.permissions import tenant_user
from din.shared.contracts.events import CompletionV1
from din.shared.contracts.inference import RequestHeaders
from din.shared.contracts.job import JobV1
from din.shared.contracts.keys import KeyAction
from din.shared.envelope import DataKey, Keyring
from din.shared.errors import DIN_ERROR_HEADER, ErrorReplyV1
from din.shared.naming import Subjects, Topics
from din.shared.security import (
    ANSWER_KEY_FIELD,
    OPERATOR,
    CryptoPolicy,
    JobFacts,
    KeyAgent,
    PayloadSecurity,
    PrincipalKeys,
    encode_answer_key,
    key_file,
    request_binding,
    site_principal,
    tenant_principal,
)
from tests.integration.network import running_network
from tests.support import make_job, three_site_topology, wait_for

MODEL = "digits-small"
SITE_COSTS = {"cloud": 0.5, "factory": 0.1, "branch": 0.5}
"""Cost per 1k requests by site: only factory is cheap enough for ``frugal``."""
_TOPOLOGY = three_site_topology(
    "security-tests",
    {site: [{"id": f"{site}-1", "models": [MODEL]}] for site in SITE_COSTS},
    [
        {"name": "acme", "sensitive_sites": ["factory"], "rate_per_s": 5000, "burst": 5000},
        {"name": "globex", "rate_per_s": 5000, "burst": 5000},
        {"name": "initech", "sensitive_sites": ["branch"], "always_sensitive": True, "rate_per_s": 5000,
         "burst": 5000},
        {"name": "frugal", "max_cost_per_1k": 0.2, "rate_per_s": 5000, "burst": 5000},
    ],
)
SECURITY_TOPOLOGY = {**_TOPOLOGY, "sites": [{**site, "cost_per_1k": SITE_COSTS[site["name"]]}
                                            for site in _TOPOLOGY["sites"]]}
STRICT_POLICY = CryptoPolicy(paths={"dedicated": "integrity"})
RNG = np.random.default_rng(20261126)
SECRET = RNG.uniform(0.0, 16.0, size=(1, 64)).astype(np.float32)
"""The tenants' secret input: its bytes must never show up on the bus or in Kafka outside integrity-only paths."""
FRUGAL_INPUT = RNG.uniform(0.0, 16.0, size=(1, 64)).astype(np.float32)


@pytest.fixture(scope="module")
def network(kafka_access, zoo_dir, tmp_path_factory):
    with running_network(kafka_access, zoo_dir, tmp_path_factory.mktemp("din"), "centralized",
                         security_policy=STRICT_POLICY, topology_spec=SECURITY_TOPOLOGY) as net:
        yield net


@contextlib.asynccontextmanager
async def clients(network, *tenants: str):
    opened = {t: await DinClient.connect(network.hub_url, t, network.token(t), network.keys(t),
                                         options=network.stack.nats_options(user=tenant_user(t))) for t in tenants}
    try:
        yield opened
    finally:
        for client in opened.values():
            await client.close()


def operator(network) -> PrincipalKeys:
    return PrincipalKeys.load(key_file(network.stack.keys_dir, OPERATOR))


async def key_command(network, action: KeyAction, **fields):
    return await send_command(network.hub_url, operator(network), action, network.stack.nats_options(), **fields)


async def detail(network, service: str, instance: str | None = None) -> dict[str, str]:
    return (await network.health(service, instance)).detail


def refused_count(detail_: dict[str, str], reason: str) -> int:
    return int(detail_.get(f"auth_refused_{reason}", "0"))


def job_refused(detail_: dict[str, str], reason: str) -> int:
    """Jobs a service refused because their job header's tag did not verify (``JobFacts``), by reason."""
    return int(detail_.get(f"job_refused_{reason}", "0"))


class Sniffer:
    """Every message crossing the hub (and, through its interest, every leaf), kept raw."""

    def __init__(self, url: str, options: dict) -> None:
        self.url, self.options = url, options
        self.messages: list = []
        self.nc = None

    async def __aenter__(self) -> Sniffer:
        self.nc = await nats.connect(self.url, **self.options)  # the operator: may hear everything

        async def keep(msg) -> None:
            self.messages.append(msg)

        await self.nc.subscribe(">", cb=keep)
        await self.nc.flush()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.nc.close()


def _needles(array: np.ndarray) -> list[bytes]:
    raw = array.tobytes()
    as_json = json.dumps([float(v) for v in array.reshape(-1)[:8]])[1:-1].encode()
    return [raw, raw[:32], raw[-32:], as_json]


async def test_requests_are_served_signed_and_each_reports_its_protection(network):
    completions: list[CompletionV1] = []
    nc = await nats.connect(network.hub_url, **network.stack.nats_options())
    await nc.subscribe(Subjects.COMPLETED_ALL, cb=_completions_into(completions))
    async with clients(network, "globex", "initech", "frugal", "acme") as c:
        results = {
            "globex": [await c["globex"].infer(MODEL, {"input": SECRET}, binary=True) for _ in range(10)],
            "initech": [await c["initech"].infer(MODEL, {"input": SECRET}) for _ in range(10)],
            "frugal": [await c["frugal"].infer(MODEL, {"input": FRUGAL_INPUT}, binary=True) for _ in range(10)],
            "acme-pii": [await c["acme"].infer(MODEL, {"input": SECRET}, labels=["pii"]) for _ in range(10)],
        }
    request_ids = {r.response.id for served in results.values() for r in served}
    await wait_for(lambda: request_ids <= {event.request_id for event in completions}, 10,
                   lambda: f"a completion event for each of the 40 requests ({len(completions)} seen)")
    await nc.close()
    completions = [event for event in completions if event.request_id in request_ids]
    for name, served in results.items():
        for result in served:
            assert result.signer == site_principal(result.served_by.site), name
    assert {r.served_by.site for r in results["initech"]} == {"branch"}
    assert {r.served_by.site for r in results["frugal"]} == {"factory"}
    assert {r.served_by.site for r in results["acme-pii"]} == {"factory"}
    assert all(r.encrypted for key in ("globex", "initech", "acme-pii") for r in results[key])
    assert not any(r.encrypted for r in results["frugal"]), "factory's link is integrity-only for non-sensitive data"
    protection = Counter((c.tenant, c.site, c.protection) for c in completions)
    assert protection[("frugal", "factory", "integrity")] == 10
    assert protection[("acme", "factory", "encrypted")] == 10, "sensitive data is encrypted whatever the path"
    assert protection[("initech", "branch", "encrypted")] == 10
    assert sum(n for (tenant, _, level), n in protection.items() if tenant == "globex" and level == "encrypted") == 10


def completed_ids(messages: list) -> set[str]:
    """The request ids of the completion events among raw bus ``messages``."""
    prefix = Subjects.COMPLETED_ALL.removesuffix("*")
    ids = set()
    for msg in messages:
        if msg.subject.startswith(prefix):
            with contextlib.suppress(ValueError):
                ids.add(CompletionV1.model_validate_json(msg.data).request_id)
    return ids


def _completions_into(into: list):
    async def keep(msg) -> None:
        with contextlib.suppress(ValueError):
            into.append(CompletionV1.model_validate_json(msg.data))

    return keep


async def test_the_bus_carries_only_ciphertext_outside_integrity_only_links(network):
    needles = _needles(SECRET)
    frugal_needles = _needles(FRUGAL_INPUT)
    async with Sniffer(network.hub_url, network.stack.nats_options()) as sniffer, \
            clients(network, "globex", "initech", "acme", "frugal") as c:
        results = []
        for i in range(6):
            results.append(await c["globex"].infer(MODEL, {"input": FRUGAL_INPUT}, binary=i % 2 == 0))
            results.append(await c["initech"].infer(MODEL, {"input": SECRET}, binary=i % 2 == 1))
            results.append(await c["acme"].infer(MODEL, {"input": SECRET}, labels=["pii"], binary=True))
            results.append(await c["frugal"].infer(MODEL, {"input": FRUGAL_INPUT}, binary=True))
        request_ids = {r.response.id for r in results}
        # A request's completion event is the last message its hops send: once the sniffer has all 24, it has
        # seen every message those requests put on the bus.
        await wait_for(lambda: request_ids <= completed_ids(sniffer.messages), 10,
                       "the sniffer seeing the completion event of each of the 24 requests")
    seen_subjects = Counter(m.subject.split(".")[2] if m.subject.startswith("din.") else m.subject.split(".")[0]
                            for m in sniffer.messages)
    assert seen_subjects["infer"] >= 24 and seen_subjects["exec"] >= 24, seen_subjects
    readable = []
    for msg in sniffer.messages:
        blob = msg.data + json.dumps(dict(msg.headers or {})).encode()
        assert not any(n in blob for n in needles), f"secret input in clear on {msg.subject}"
        if any(n in blob for n in frugal_needles):
            readable.append(msg)
    # Data that is not sensitive (frugal's, globex's) is readable only where the operator allowed it: integrity-only
    # jobs to factory. frugal can only afford factory; globex goes there when the scheduler finds it best.
    assert readable, "frugal's jobs to factory are integrity-only by policy"
    for msg in readable:
        assert msg.subject == Subjects.execute("factory", "factory-1"), msg.subject
        assert msg.headers[envelope.H_MODE] == envelope.MODE_MAC


async def test_attacks_are_refused_counted_and_live_traffic_is_untouched(network):
    before = {s: await detail(network, s) for s in ("admission", "scheduler")}
    before_exec = await detail(network, "executor", "cloud-1")
    failures: list = []
    served = Counter()
    stop = asyncio.Event()
    nc = await nats.connect(network.hub_url, **network.stack.nats_options())
    captured_requests: list = []
    captured_jobs: list = []
    captured_results: list = []
    await nc.subscribe(Subjects.infer("globex", MODEL), cb=_into(captured_requests))
    await nc.subscribe(Subjects.execute("cloud", "cloud-1"), cb=_into(captured_jobs))
    await nc.subscribe("_INBOX.>", cb=_into(captured_results))

    async def legit(client: DinClient, tenant: str) -> None:
        while not stop.is_set():
            try:
                result = await client.infer(MODEL, {"input": SECRET}, timeout_ms=5000)
                served[tenant] += 1
                assert result.signer is not None
            except Exception as exc:  # noqa: BLE001 - every failure is a finding
                failures.append((tenant, repr(exc)))

    attacker_inbox = nc.new_inbox()
    answers: list = []
    await nc.subscribe(attacker_inbox + ".*", cb=_into(answers))

    async with clients(network, "globex", "initech", "acme") as c:
        workers = [asyncio.create_task(legit(c[t], t)) for t in ("globex", "initech", "globex", "initech")]
        await wait_for(lambda: served["globex"] and served["initech"], 10, "live traffic being served")
        globex = c["globex"]

        def sealed_request(client: DinClient, token: str, model: str = MODEL):
            body, headers = client.build({"input": SECRET}, timeout_ms=3000)
            return client.seal(model, body, headers, f"{attacker_inbox}.{token}")

        async def attack(token: str, subject: str, body: bytes, headers: dict) -> None:
            await nc.publish(subject, body, reply=f"{attacker_inbox}.{token}", headers=headers)

        subject = Subjects.infer("globex", MODEL)
        body, headers = sealed_request(globex, "tampered")
        await attack("tampered", subject, body[:-1] + bytes([body[-1] ^ 1]), headers)
        first, second = sealed_request(globex, "swapped"), sealed_request(globex, "other")
        await attack("swapped", subject, second[0], {**first[1], RequestHeaders.REQUEST_ID:
                                                      second[1][RequestHeaders.REQUEST_ID]})
        body, headers = sealed_request(globex, "unknown-key")
        await attack("unknown-key", subject, body, {**headers, envelope.H_KEY_VERSION: "977"})
        body, headers = sealed_request(c["acme"], "other-tenant")
        await attack("other-tenant", subject, body, headers)
        await attack("unsealed", subject, *c["globex"].build({"input": SECRET}, timeout_ms=3000))

        # Sealed for another site's admission, and sealed more than an epoch of the pairwise keys ago.
        body, headers = globex.build({"input": SECRET}, timeout_ms=3000)
        aad = request_binding(headers[RequestHeaders.REQUEST_ID], "globex", MODEL, f"{attacker_inbox}.other-site",
                              headers) | {ANSWER_KEY_FIELD: encode_answer_key(globex._answer)}
        elsewhere = globex.security.seal_to(body, to=site_principal("factory"), aad=aad)
        await attack("other-site", subject, elsewhere.body, {**headers, **elsewhere.to_headers()})
        body, headers = globex.build({"input": SECRET}, timeout_ms=3000)
        aad = request_binding(headers[RequestHeaders.REQUEST_ID], "globex", MODEL, f"{attacker_inbox}.stale",
                              headers) | {ANSWER_KEY_FIELD: encode_answer_key(globex._answer)}
        old = envelope.seal_pair(body, pairs=globex.security.pairs, reader=site_principal("cloud"),
                                 reader_x25519=globex.security.agent.publics[site_principal("cloud")].x25519,
                                 aad=aad, now=time.time() - 3 * envelope.PAIR_EPOCH_S)
        await attack("stale", subject, old.body, {**headers, **old.to_headers()})

        # Replays of a request and of a job captured on the bus, after their answers went out.
        seen = len(captured_requests)

        def answered(reply: str) -> bool:
            return any(m.subject == reply for m in captured_results)

        request = await wait_for(
            lambda: next((m for m in captured_requests[seen:] if m.reply.startswith(globex._inbox)
                          and answered(m.reply)), None),
            10, "a live globex request captured and answered")
        job = await wait_for(
            lambda: next((m for m in reversed(captured_jobs) if answered(JobV1.from_headers(m.headers).reply_to)),
                         None),
            10, "a live job to cloud-1 captured and answered")
        replay_watch: list = []
        await nc.subscribe(request.reply, cb=_into(replay_watch))
        await nc.publish(request.subject, request.data, reply=request.reply, headers=request.headers)
        await nc.publish(job.subject, job.data, headers=job.headers)
        # A job forged with a key nobody was given.
        forged_ring = Keyring()
        forged_ring.install(DataKey(site_principal("cloud"), 1, bytes(32)))
        forged = envelope.seal(b"{}", reader=site_principal("cloud"), keyring=forged_ring,
                               sender=site_principal("cloud"), aad={"rid": "forged"})
        await nc.publish(job.subject, forged.body, headers={**job.headers, **forged.to_headers()})

        # A captured result with its signature flipped: the client refuses it.
        result_msg = next(m for m in captured_results if m.headers and envelope.SIGNATURE_HEADER in m.headers
                          and m.subject.startswith(globex._inbox))
        signature = envelope._b64d(result_msg.headers[envelope.SIGNATURE_HEADER])
        forged_sig = envelope._b64e(bytes([signature[0] ^ 1]) + signature[1:])
        with pytest.raises(DinRequestError) as caught:
            globex.open_answer("captured", result_msg.data, {**result_msg.headers,
                                                             envelope.SIGNATURE_HEADER: forged_sig})
        assert caught.value.error.code.value == "unauthenticated"

        tokens = ("tampered", "swapped", "unknown-key", "other-tenant", "unsealed", "other-site")
        await wait_for(lambda: {m.subject.rsplit(".", 1)[1] for m in answers} >= set(tokens), 10,
                       lambda: f"an answer to each attack (got {sorted(m.subject for m in answers)})")
        await wait_for(lambda: admission_refusals_grew(network, before["admission"]), 10,
                       "admission refusing each kind of attack, the replayed request included")
        await wait_for(lambda: executor_refusals_grew(network, before_exec), 10,
                       "cloud-1 refusing the replayed and the forged job")
        await wait_for(lambda: served["globex"] > 20 and served["initech"] > 20, 30,
                       lambda: f"live traffic served throughout (served {dict(served)})")
        stop.set()
        await asyncio.gather(*workers)
    await nc.close()

    assert failures == [], failures[:5]
    by_token = {m.subject.rsplit(".", 1)[1]: m for m in answers}
    for token in tokens:
        msg = by_token[token]
        error = ErrorReplyV1.model_validate_json(msg.data).error
        assert (msg.headers[DIN_ERROR_HEADER], error.code.value, error.message) == (
            "unauthenticated", "unauthenticated", "message could not be authenticated"), token
    assert replay_watch == [], "a replay gets no answer (its reply subject is the original requester's)"
    assert "stale" not in by_token, "a stale request gets no answer, like a replay"

    for service in ("admission", "classifier", "scheduler", "keymanager", "telemetry"):
        assert (await network.health(service)).ready, service
    for executor in ("cloud-1", "factory-1", "branch-1"):
        assert (await network.health("executor", executor)).ready, executor


ATTACK_REASONS = ("bad_tag", "unknown_key", "wrong_reader", "malformed", "stale", "replay")
"""What admission counts the attacks under: tampered, unknown key or another tenant's request, sealed for another
site's admission, unsealed, sealed epochs ago, replay."""


async def admission_refusals_grew(network, before: dict[str, str]) -> bool:
    """Whether admission has counted at least one more refusal for each of ``ATTACK_REASONS`` since ``before``."""
    now = await detail(network, "admission")
    return all(refused_count(now, reason) > refused_count(before, reason) for reason in ATTACK_REASONS)


async def executor_refusals_grew(network, before: dict[str, str]) -> bool:
    """Whether cloud-1 has refused a replayed job and at least two messages in all since ``before``."""
    now = await detail(network, "executor", "cloud-1")
    return (refused_count(now, "replay") > refused_count(before, "replay")
            and int(now["auth_refused"]) >= int(before["auth_refused"]) + 2)


def _into(into: list):
    async def keep(msg) -> None:
        into.append(msg)

    return keep


async def test_kafka_holds_no_plaintext_payloads(network, kafka_bootstrap, kafka_operator):
    completions_topic = Topics.scoped(Topics.COMPLETIONS, network.topic_scope)
    dead_letters_topic = Topics.scoped(Topics.DEAD_LETTER, network.topic_scope)
    partitions = await scoped_partitions(kafka_bootstrap, network.topic_scope, kafka_operator)
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka_bootstrap, enable_auto_commit=False, **kafka_operator)
    await consumer.start()
    records: list = []
    try:
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)

        async def read_to_the_end() -> bool:
            """Read what is there; done when every partition is read to its end and the earlier tests' completions
            and the attacks' dead letters have been relayed."""
            for batch in (await consumer.getmany(timeout_ms=200)).values():
                records.extend(batch)
            ends = await consumer.end_offsets(partitions)
            read_all = all([await consumer.position(tp) >= ends[tp] for tp in partitions])
            by_topic = Counter(r.topic for r in records)
            return read_all and by_topic[completions_topic] > 50 and by_topic[dead_letters_topic] > 0

        await wait_for(read_to_the_end, 30, lambda: f"every scoped topic read to its end, with more than 50 "
                       f"completions and a dead letter (read {dict(Counter(r.topic for r in records))})",
                       interval=0.01)
    finally:
        await consumer.stop()
    dead = [r for r in records if r.topic == dead_letters_topic]
    needles = _needles(SECRET)
    for record in records:
        raw = (record.value or b"") + b"".join(v for _, v in record.headers)
        assert not any(n in raw for n in needles), f"secret in clear in {record.topic}"
    for record in dead:
        body = base64.b64decode(json.loads(record.value)["body_b64"])
        assert not any(n in body for n in needles), "a dead letter kept a payload in clear"


async def scoped_partitions(bootstrap: str, scope: str, client_kwargs: dict) -> list[TopicPartition]:
    """Every partition of the DIN topics under ``scope`` that exist."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **client_kwargs)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        described = await admin.describe_topics(sorted({Topics.scoped(t, scope) for t in Topics.ALL} & existing))
    finally:
        await admin.close()
    return [TopicPartition(topic["topic"], p["partition"]) for topic in described for p in topic["partitions"]]


async def test_rotation_under_load_loses_no_request(network):
    failures: list = []
    served = Counter()
    stop = asyncio.Event()

    async def load(client: DinClient, tenant: str, i: int) -> None:
        while not stop.is_set():
            try:
                await client.infer(MODEL, {"input": SECRET}, binary=i % 2 == 0, timeout_ms=5000)
                served[tenant] += 1
            except Exception as exc:  # noqa: BLE001 - every failure is a finding
                failures.append((tenant, repr(exc)))

    tenants = ("globex", "initech", "acme", "frugal")

    async def each_tenant_served(more: int) -> None:
        """Wait until every tenant has had ``more`` requests served; stop at the first failure."""
        mark = Counter(served)

        def served_more() -> bool:
            assert failures == [], failures[:5]
            return all(served[t] >= mark[t] + more for t in tenants)

        await wait_for(served_more, 30, lambda: f"{more} more requests served for each tenant (served {dict(served)})")

    def sealing_versions(c: dict[str, DinClient]) -> dict[str, int | None]:
        return {tenant_principal(t): c[t].security.agent.keyring.current_version(tenant_principal(t)) for t in c}

    start = await key_command(network, KeyAction.STATUS)
    async with clients(network, *tenants) as c:
        workers = [asyncio.create_task(load(c[t], t, i)) for i, t in enumerate(tenants * 2)]
        for _ in range(3):
            await each_tenant_served(10)
            await key_command(network, KeyAction.ROTATE)
        end = await key_command(network, KeyAction.STATUS)
        newest = {reader: end.versions[reader] for reader in sealing_versions(c)}
        await wait_for(lambda: sealing_versions(c) == newest, 10,
                       lambda: f"clients sealing with the newest versions {newest} (not {sealing_versions(c)})")
        await each_tenant_served(10)
        stop.set()
        await asyncio.gather(*workers)
    assert failures == [], failures[:5]
    assert end.rotations >= start.rotations + 3 * len(start.versions)
    for reader, version in start.versions.items():
        assert end.versions[reader] == version + 3, reader


async def test_a_revoked_site_gets_no_work_and_its_messages_are_refused(network):
    branch = PayloadSecurity(KeyAgent(PrincipalKeys.load(key_file(network.stack.keys_dir, site_principal("branch")))))
    nc = await nats.connect(network.stack.nats_urls["branch"], **network.stack.nats_options("branch"))
    await branch.start(nc, readers=lambda a: [site_principal("branch")])
    before = await detail(network, "scheduler")
    async with clients(network, "globex", "initech") as c:
        globex = c["globex"]
        # Branch signs a result before its revocation; afterwards the client refuses anything from it.
        late = branch.seal_answer(b"{}", answer_key=encode_answer_key(globex._answer),
                                  aad={"rid": "late", "tenant": "globex"})
        late_headers = branch.sign_answer(late.body, late.to_headers())
        # And a give-back sealed by branch to the scheduler (a real message shape, from branch's own keys).
        give_back_body, give_back_headers = globex.build({"input": SECRET}, request_id="from-branch")
        job_reply = f"{globex._inbox}.from-branch"
        sealed = branch.seal_to(give_back_body, to=site_principal("cloud"), aad=request_binding(
            "from-branch", "globex", MODEL, job_reply, give_back_headers) | {
            ANSWER_KEY_FIELD: encode_answer_key(globex._answer)})

        result = await key_command(network, KeyAction.REVOKE, principal=site_principal("branch"))
        assert site_principal("branch") in result.revoked
        await wait_for(lambda: site_principal("branch") in globex.security.agent.revoked, 10,
                       "globex's client learning that branch is revoked")
        await network.wait_live_executors(2)
        with pytest.raises(DinRequestError) as refused:
            globex.open_answer("late", late.body, late_headers)
        assert refused.value.error.code.value == "unauthenticated"

        now_ms = time.time() * 1000
        job = make_job(request_id="from-branch", tenant="globex", model=MODEL, deadline_ms=int(now_ms) + 3000,
                       reply_to=job_reply, received_ms=now_ms)
        hub = await nats.connect(network.hub_url, **network.stack.nats_options())
        headers = JobFacts(branch, "branch").tag({**job.to_headers(), **sealed.to_headers()}, "cloud")
        await hub.publish(Subjects.schedule("cloud"), sealed.body, headers=headers)
        await hub.flush()
        await hub.close()

        # No new work for branch: initech may only run there, globex runs elsewhere.
        with pytest.raises(DinRequestError) as nowhere:
            await c["initech"].infer(MODEL, {"input": SECRET}, timeout_ms=2000)
        assert nowhere.value.error.code.value == "no_eligible_executor"
        sites = Counter()
        for _ in range(30):
            sites[(await globex.infer(MODEL, {"input": SECRET})).served_by.site] += 1
        assert "branch" not in sites and sum(sites.values()) == 30, sites

    async def give_back_refused() -> dict[str, str] | None:
        now = await detail(network, "scheduler")
        return now if job_refused(now, "revoked") > job_refused(before, "revoked") else None

    after = await wait_for(give_back_refused, 10, "the scheduler refusing the give-back from revoked branch")
    assert job_refused(after, "revoked") == job_refused(before, "revoked") + 1
    assert site_principal("branch") in after["revoked"]
    await branch.stop()
    await nc.close()
