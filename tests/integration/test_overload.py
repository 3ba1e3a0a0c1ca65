"""Overload over the real stack (issue 14), counted per request: ok, each error code, unanswered, duplicated.

globex floods one site far past what its two executors finish while acme sends a light load. Shedding must
engage (refusals ``overloaded``, each with a ``retry_after_ms``), every request of both tenants gets exactly
one answer, acme (asking for far less than its share) fares better than the flood, and the shed requests,
recorded together, still add up in Kafka to every refusal admission counted.
"""

from __future__ import annotations

import asyncio

import pytest

from din.bench.overload import OVERLOAD_TOPOLOGY, CountingLoad
from din.shared.naming import Topics
from din.shared.security import CryptoPolicy
from tests.integration.network import read_events, running_network

FLOOD = 3000
LIGHT = 30


@pytest.fixture(scope="module")
def network(kafka_access, zoo_dir, tmp_path_factory):
    with running_network(kafka_access, zoo_dir, tmp_path_factory.mktemp("din"), "centralized",
                         security_policy=CryptoPolicy(plaintext_ingress=["acme", "globex"]),
                         topology_spec=OVERLOAD_TOPOLOGY) as net:
        yield net


def ok_share(outcome: dict[str, int], sent: int) -> float:
    return outcome.get("ok", 0) / sent


async def test_a_flood_is_shed_early_a_light_tenant_is_spared_and_every_request_gets_one_answer(
        network, kafka_access):
    tokens = {tenant: network.token(tenant) for tenant in ("acme", "globex")}
    options = network.stack.nats_options()
    async with CountingLoad(network.hub_url, tokens, options) as flood, \
            CountingLoad(network.hub_url, tokens, options) as light:
        flooding = asyncio.create_task(flood.send("globex", "digits-small", FLOOD, every_s=0.001, timeout_ms=2000))
        await light.send("acme", "digits-small", LIGHT, every_s=0.1, timeout_ms=2000)
        await flooding
        flooded, spared = await flood.settle(30.0), await light.settle(30.0)
    for outcome in (flooded, spared):
        assert outcome["unanswered"] == 0 and outcome["duplicated"] == 0, outcome
    assert flooded.get("overloaded", 0) > 0, flooded
    assert flood.no_retry_after == 0 and light.no_retry_after == 0
    assert ok_share(spared, LIGHT) > ok_share(flooded, FLOOD), (spared, flooded)

    health = (await network.health("admission")).detail
    refused = int(health["refused"])
    assert int(health["shed"]) > 0
    topic = Topics.scoped(Topics.ADMISSION_DECISIONS, network.topic_scope)
    read = await read_events(kafka_access, [topic], keep=lambda decision: not decision["admitted"],
                             enough=lambda read: sum(d.get("count", 1) for _, d in read.found) >= refused,
                             what=f"records of all {refused} refusals")
    assert sum(d.get("count", 1) for _, d in read.found) == refused
    assert any(d.get("count", 1) > 1 for _, d in read.found)
