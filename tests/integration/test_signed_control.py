"""Signed control messages over the real brokers: forged, mis-signed, replayed and out-of-range heartbeats, pressure,
summaries, completions and load commands are dropped and counted by reason, while legitimate traffic beside them
is answered in full. The attacker is on the bus (the operator's NATS user may publish anywhere) and holds the
factory's keys (``site-factory``'s key file): it can speak for the factory, never for cloud.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import nats
import pytest

from din.shared.bus.connect import nats_servers
from din.shared.contracts.events import CompletionV1, LoadModelV1, PressureV1
from din.shared.contracts.federation import SiteSummaryV1
from din.shared.contracts.inference import SlaClass
from din.shared.errors import DIN_ERROR_HEADER, ErrorReplyV1
from din.shared.naming import Subjects
from din.shared.security import OPERATOR, ControlSigner, PrincipalKeys, key_file, site_principal
from tests.integration.network import running_network
from tests.integration.test_telemetry_service import http_get
from tests.support import make_heartbeat, wait_for

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def stack(kafka_access, zoo_dir, tmp_path_factory):
    with running_network(kafka_access, zoo_dir, tmp_path_factory.mktemp("din"), "centralized") as net:
        yield net


@pytest.fixture
async def network(stack):
    await stack.restore()
    return stack


@pytest.fixture
async def bus(network):
    nc = await nats.connect(nats_servers(network.hub_url), **network.stack.nats_options())
    yield nc
    await nc.close()


def signer_of(network, principal: str, clock: Callable[[], float] = time.time) -> ControlSigner:
    return ControlSigner(PrincipalKeys.load(key_file(network.stack.keys_dir, principal)).identity, clock=clock)


async def refused(network, service: str, instance: str | None = None) -> dict[str, int]:
    detail = (await network.health(service, instance)).detail
    return {k.removeprefix("control_refused_"): int(v) for k, v in detail.items()
            if k.startswith("control_refused_")}


async def wait_refused(network, service: str, before: dict[str, int], expected: dict[str, int],
                       instance: str | None = None) -> None:
    """Wait until ``service`` counts exactly ``expected`` more refusals by reason than ``before``."""
    seen: list[dict] = []

    async def counted() -> bool:
        now = await refused(network, service, instance)
        delta = {k: now.get(k, 0) - before.get(k, 0) for k in set(now) | set(before)}
        seen.append({k: v for k, v in delta.items() if v})
        return seen[-1] == expected

    await wait_for(counted, 20, lambda: f"{service} refusing {expected} (counted {seen[-1] if seen else None})")


async def answered_beside(network, digits, attack: Callable[[], Awaitable[None]], requests: int = 40) -> None:
    """Run ``attack`` while one client sends ``requests`` requests; every request must be answered correctly."""
    x, y = digits
    async with network.client("globex") as client:
        async def traffic() -> list[int]:
            labels = []
            for i in range(requests):
                result = await client.infer("digits-small", {"input": x[i : i + 1]}, sla="interactive")
                labels.append(int(result.outputs["label"][0]))
            return labels

        labels, _ = await asyncio.gather(traffic(), attack())
    assert sum(label == int(y[i]) for i, label in enumerate(labels)) >= 0.9 * requests


def completion(i: int, site: str, **fields) -> CompletionV1:
    defaults = dict(request_id=f"fake-{i}", tenant=f"tenant{i}", site=site, executor=f"exec{i}", model=f"model{i}",
                    model_version="1", sla_class=SlaClass.BATCH, ok=True, batch_size=1, degraded=False,
                    timings_ms={"total": 1.0 + i % 50}, at_ms=time.time() * 1000)
    return CompletionV1(**{**defaults, **fields})


async def test_forged_pressure_is_refused_and_admission_keeps_admitting(network, bus, digits):
    factory = signer_of(network, site_principal("factory"))
    subject = Subjects.pressure("cloud")
    before = await refused(network, "admission")

    async def attack() -> None:
        for i in range(50):
            body = PressureV1(inflight=10**5 + i, capacity=1, fastest_ms=500_000.0, executors=1,
                              at_ms=time.time() * 1000).model_dump_json().encode()
            headers = factory.headers(subject, body) if i % 2 else None
            await bus.publish(subject, body, headers=headers)
            await asyncio.sleep(0.01)
        await bus.flush()

    await answered_beside(network, digits, attack)
    await wait_refused(network, "admission", before, {"unsigned": 25, "not_allowed": 25})


async def test_forged_and_replayed_heartbeats_never_bring_a_ghost_into_view(network, bus):
    """The hub's scheduler and telemetry hear cloud's heartbeats, the factory's scheduler the factory's."""
    cloud_beats = await bus.subscribe(Subjects.heartbeat("cloud", "cloud-1"))
    genuine = await cloud_beats.next_msg(timeout=5)
    await cloud_beats.unsubscribe()
    factory = signer_of(network, site_principal("factory"))
    an_hour_ago = signer_of(network, site_principal("factory"), clock=lambda: time.time() - 3600)
    hearers = [("scheduler", None), ("telemetry", None), ("scheduler", "factory")]
    before = {hearer: await refused(network, *hearer) for hearer in hearers}

    ghost = Subjects.heartbeat("cloud", "ghost")
    body = make_heartbeat("ghost", "cloud", ["digits-small"], capacity=1000).model_dump_json().encode()
    await bus.publish(ghost, body)
    await bus.publish(ghost, body, headers=factory.headers(ghost, body))
    ours = Subjects.heartbeat("factory", "ghost")
    long_lived = make_heartbeat("ghost", "factory", ["digits-small"], interval_s=10**6).model_dump_json().encode()
    old = make_heartbeat("ghost", "factory", ["digits-small"]).model_dump_json().encode()
    at_factory = await nats.connect(nats_servers(network.stack.nats_urls["factory"]),
                                    **network.stack.nats_options("factory"))
    await at_factory.publish(ours, long_lived, headers=factory.headers(ours, long_lived))
    await at_factory.publish(ours, old, headers=an_hour_ago.headers(ours, old))
    await at_factory.close()
    await bus.publish(genuine.subject, genuine.data, headers=genuine.headers)
    await bus.flush()

    for service, instance in hearers[:2]:
        await wait_refused(network, service, before[(service, instance)],
                           {"unsigned": 1, "not_allowed": 1, "replay": 1})
    await wait_refused(network, "scheduler", before[hearers[2]], {"out_of_range": 1, "stale": 1}, instance="factory")
    assert await network.live_executors() == 4


async def test_a_forged_load_command_is_refused_and_the_operator_s_is_obeyed(network, bus):
    subject = Subjects.control("executor", "cloud-2")
    before = await refused(network, "executor", "cloud-2")
    serving = (await network.health("executor", "cloud-2")).detail["models"]
    other = "1" if serving != "digits-small@1" else "2"
    forged = [None, signer_of(network, site_principal("factory")), signer_of(network, site_principal("cloud"))]
    for signer in forged:
        body = LoadModelV1(model="digits-small", version=other).model_dump_json().encode()
        reply = await bus.request(subject, body, headers=signer.headers(subject, body) if signer else None,
                                  timeout=10)
        assert DIN_ERROR_HEADER in (reply.headers or {})
        assert ErrorReplyV1.model_validate_json(reply.data).error.code == "unauthenticated"
    await wait_refused(network, "executor", before, {"unsigned": 1, "not_allowed": 2}, instance="cloud-2")
    assert (await network.health("executor", "cloud-2")).detail["models"] == serving

    operator = signer_of(network, OPERATOR)
    for version in (other, serving.rsplit("@", 1)[1]):
        body = LoadModelV1(model="digits-small", version=version).model_dump_json().encode()
        reply = await bus.request(subject, body, headers=operator.headers(subject, body), timeout=10)
        assert DIN_ERROR_HEADER not in (reply.headers or {}), reply.data
        assert (await network.health("executor", "cloud-2")).detail["models"] == f"digits-small@{version}"


async def test_factory_keys_cannot_speak_for_cloud(network, bus):
    factory = signer_of(network, site_principal("factory"))
    before = {service: await refused(network, service) for service in ("scheduler", "telemetry")}
    summary = Subjects.summary("cloud")
    body = SiteSummaryV1(site="cloud", instance="cloud", sent_ms=time.time() * 1000, interval_s=1.0,
                         models=[]).model_dump_json().encode()
    await bus.publish(summary, body, headers=factory.headers(summary, body))
    done = Subjects.completed("cloud")
    body = completion(0, "cloud").model_dump_json().encode()
    await bus.publish(done, body, headers=factory.headers(done, body, {"Din-Request-Id": "fake-0"}))
    await bus.flush()
    for service in ("scheduler", "telemetry"):
        await wait_refused(network, service, before[service], {"not_allowed": 2})


async def test_thousands_of_fake_completions_leave_metrics_bounded(network, bus, digits):
    port = network.stack.ports.telemetry_metrics
    _, page = await http_get(port, "/metrics")
    factory = signer_of(network, site_principal("factory"))
    before = await refused(network, "telemetry")
    sent = 3000
    # A site's completions are kept (and relayed) where they are published: the factory's at the factory.
    at_factory = await nats.connect(nats_servers(network.stack.nats_urls["factory"]),
                                    **network.stack.nats_options("factory"))

    async def attack() -> None:
        for i in range(sent):
            subject = Subjects.completed("factory" if i % 2 else "cloud")
            body = completion(i, "factory" if i % 2 else "cloud").model_dump_json().encode()
            await (at_factory if i % 2 else bus).publish(subject, body,
                                                         headers=factory.headers(subject, body) if i % 2 else None)
            if i % 100 == 0:
                await asyncio.sleep(0)
        await bus.flush()
        await at_factory.flush()

    try:
        await answered_beside(network, digits, attack)
    finally:
        await at_factory.close()
    await wait_refused(network, "telemetry", before, {"unsigned": sent // 2})

    async def folded() -> bool:
        _, text = await http_get(port, "/metrics")
        return b'din_telemetry_folded_labels_total{label="tenant"}' in text

    await wait_for(folded, 20, "telemetry folding the tenants past its budget")
    _, after = await http_get(port, "/metrics")
    assert len(after) < len(page) + 1_000_000, (len(page), len(after))


async def test_legitimate_control_traffic_is_never_refused(network):
    """Probes from every site's scheduler reach each executor signed, and nothing any service sent was refused
    by an executor no attack was aimed at."""
    for executor in ("cloud-1", "factory-1", "branch-1"):
        detail = (await network.health("executor", executor)).detail
        assert detail["control_refused"] == "0", (executor, detail)
