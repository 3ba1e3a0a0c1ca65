"""The autoscaler over the real stack (issue 15): pools grow under load and burst to rented capacity, sensitive
data never goes there, pools drain back without failing a request, and a start that fails (the ``broken`` pool's
executor finds no NATS credentials, as when a provider cannot hand it its secret, and exits) is a recorded,
backed-off decision, not a broken fleet.

The scaling thresholds are far below production ones (a pool of ``digits-small`` executors is never busy on this
machine): the test is of the mechanism (Kafka traffic in, processes started and drained, decisions recorded),
the rules themselves are unit-tested in ``tests/unit/test_autoscaler_policy.py``.
"""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
from aiokafka import AIOKafkaConsumer

from din.bench.tally import Load
from din.services.autoscaler.providers import recorded_executors
from din.shared.contracts.scaling import ScalingDecisionV1
from din.shared.naming import Topics
from din.stack.launcher import AUTOSCALER_STATE
from tests.integration.network import RAW_CLIENT_POLICY, running_network
from tests.support import wait_for

ELASTIC_TOPOLOGY = {
    "name": "autoscaler-tests",
    "sites": [
        {"name": "cloud", "role": "hub",
         "pools": [{"name": "small", "models": ["digits-small"], "min": 1, "max": 2},
                   {"name": "broken", "models": ["digits-small"], "min": 0, "max": 1},
                   {"name": "large", "models": ["digits-large"], "min": 0, "max": 1}]},
        {"name": "rented", "role": "edge", "control_plane": False, "executor_hour_cost": 3.0,
         "burst": {"startup_s": 3, "max_executors": 1},
         "pools": [{"name": "small", "models": ["digits-small"], "min": 0, "max": 2}]},
    ],
    "links": [{"between": ["cloud", "rented"], "path": "internet"}],
    "tenants": [{"name": "globex", "rate_per_s": 5000, "burst": 5000},
                {"name": "initech", "rate_per_s": 5000, "burst": 5000, "may_burst": False}],
    "control_plane": "hub",
    "scaling": {"interval_s": 0.5, "window_s": 3, "target_utilisation": 0.01, "scale_in_utilisation": 0.004,
                "max_wait_ms": 1000, "scale_out_cooldown_s": 1, "scale_in_cooldown_s": 3, "idle_to_zero_s": 4,
                "start_timeout_s": 60},
}


@pytest.fixture(scope="module")
def network(kafka_access, zoo_dir, tmp_path_factory):
    with running_network(kafka_access, zoo_dir, tmp_path_factory.mktemp("din"), "centralized",
                         security_policy=RAW_CLIENT_POLICY.model_copy(update={"plaintext_ingress": ["globex",
                                                                                                     "initech"]}),
                         topology_spec=ELASTIC_TOPOLOGY) as net:
        net.stack.bus.nats.creds_path("executor-cloud-broken-1").unlink()
        yield net


async def pools(network) -> dict[str, str]:
    detail = await network.detail("autoscaler", None)
    return dict(entry.split(":", 1) for entry in detail["pools"].split(","))


async def wait_pools(network, wanted: dict[str, str], timeout_s: float = 60.0) -> None:
    seen: list[dict] = []

    async def reached() -> bool:
        seen.append(await pools(network))
        return all(seen[-1].get(k) == v for k, v in wanted.items())

    await wait_for(reached, timeout_s, lambda: f"pools {wanted} (last {seen[-1:]})", interval=0.25,
                   retry_on=(Exception,))


async def decisions(network) -> list[ScalingDecisionV1]:
    consumer = AIOKafkaConsumer(Topics.scoped(Topics.SCALING_DECISIONS, network.topic_scope),
                                bootstrap_servers=network.stack.kafka_bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False, consumer_timeout_ms=2000,
                                **network.stack.kafka_access.client_kwargs("operator"))
    await consumer.start()
    try:
        found = []
        while batch := await consumer.getmany(timeout_ms=1500):
            found += [ScalingDecisionV1.model_validate_json(r.value) for rs in batch.values() for r in rs]
        return found
    finally:
        await consumer.stop()


async def steady(load: Load, tenant: str, seconds: float, per_s: float, labels: str | None = None) -> None:
    for _ in range(int(seconds * per_s)):
        await load.request(tenant, "digits-small", timeout_ms=10000, labels=labels)
        await asyncio.sleep(1.0 / per_s)


async def test_pools_grow_burst_and_drain_back_with_every_request_answered_and_sensitive_data_kept_home(network):
    await wait_pools(network, {"cloud/small": "1/1", "rented/small": "0/0"})
    globex = Load(network.hub_url, {"globex": network.token("globex")}, network.stack.nats_options())
    initech = Load(network.hub_url, {"initech": network.token("initech")}, network.stack.nats_options())
    async with globex, initech:
        flood = asyncio.gather(steady(globex, "globex", 25, 60), steady(initech, "initech", 25, 15),
                               steady(globex, "globex", 25, 10, labels="pii"))
        await wait_pools(network, {"cloud/small": "2/2", "rented/small": "1/1"})
        await flood
        await wait_pools(network, {"cloud/small": "1/1", "rented/small": "0/0"})
        trickle = await asyncio.gather(steady(globex, "globex", 2, 10), steady(initech, "initech", 2, 10))
        del trickle
        outcome = {"globex": await globex.settle(30.0), "initech": await initech.settle(30.0)}
    assert outcome["globex"] == {"ok": len(globex.tally.sent), "unanswered": 0, "duplicated": 0}
    assert outcome["initech"] == {"ok": len(initech.tally.sent), "unanswered": 0, "duplicated": 0}
    assert initech.tally.sites.get("rented", 0) == 0, "a tenant that may not burst was served at the burst site"
    made = await decisions(network)
    actions = [(d.site, d.pool, d.action.value) for d in made]
    for step in ("scale_out", "started", "scale_in", "stopped"):
        assert ("cloud", "small", step) in actions and ("rented", "small", step) in actions, step
    started = [d for d in made if d.action.value == "started"]
    assert all(d.cold_start_ms and d.cold_start_ms > 0 for d in started)
    assert all(d.reason for d in made)
    assert any(d.burst and "at their max" in d.reason for d in made if d.action.value == "scale_out")


async def test_an_executor_that_cannot_start_is_a_recorded_failure_backed_off_not_a_loop(network):
    async def failed() -> list[ScalingDecisionV1]:
        return [d for d in await decisions(network) if d.pool == "broken" and d.action.value == "start_failed"]

    found = await wait_for(failed, 30.0, "a failed start of the broken pool", interval=1.0)
    assert "exited before it was ready" in found[0].reason and "next try in" in found[0].reason
    detail = await network.detail("autoscaler", None)
    assert int(detail["starts_failed"]) >= 1
    assert (await pools(network))["cloud/broken"].startswith("0/")


async def test_the_first_request_for_an_idle_model_waits_for_its_cold_start_and_the_pool_goes_back_to_zero(
        network):
    assert (await pools(network))["cloud/large"] == "0/0"
    load = Load(network.hub_url, {"globex": network.token("globex")}, network.stack.nats_options())
    async with load:
        await load.request("globex", "digits-large", timeout_ms=30000)
        outcome = await load.settle(40.0)
        assert outcome == {"ok": 1, "unanswered": 0, "duplicated": 0}
        await wait_pools(network, {"cloud/large": "0/0"}, timeout_s=60.0)
    made = [d for d in await decisions(network) if d.pool == "large"]
    actions = [d.action.value for d in made]
    assert actions[:2] == ["scale_out", "started"] and "cold start" in made[0].reason
    assert made[1].cold_start_ms > 0
    assert "scale_in" in actions and actions[-1] == "stopped"
    assert int((await network.detail("scheduler"))["awaiting_executor"]) >= 1


async def test_a_pool_executor_killed_under_the_autoscaler_is_replaced_and_serves_again(network):
    await wait_pools(network, {"cloud/small": "1/1"})
    os.kill(recorded_executors(network.stack.run_dir / AUTOSCALER_STATE)["cloud-small-1"], signal.SIGKILL)

    async def replaced() -> bool:
        return any(d.action.value == "replaced" and d.executor == "cloud-small-1" for d in await decisions(network))

    await wait_for(replaced, 30.0, "a replaced decision for cloud-small-1", interval=1.0)
    await wait_pools(network, {"cloud/small": "1/1"}, timeout_s=60.0)
    await network.wait_live_executors(1)
    load = Load(network.hub_url, {"globex": network.token("globex")}, network.stack.nats_options())
    async with load:
        await load.send("globex", "digits-small", 20, every_s=0.02, timeout_ms=10000)
        assert await load.settle(20.0) == {"ok": 20, "unanswered": 0, "duplicated": 0}
