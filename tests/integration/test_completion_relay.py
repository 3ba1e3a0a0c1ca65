"""No completion is lost while telemetry is down: each site's completion stream keeps them until Kafka has them.

Telemetry runs as its own process against the session's NATS (hub and leaves, each site its own JetStream domain)
and Kafka; it is killed (SIGKILL) in the middle of a stream of completions published at two sites, and restarted.
"""

from __future__ import annotations

import json
import os
import signal
import sys

import pytest

from din.shared.completionstream import relay_durable
from din.shared.contracts.events import CompletionV1
from din.shared.naming import Subjects, Topics, completions_stream
from din.stack.processes import ManagedProcess
from tests.integration.network import REPO_ROOT
from tests.integration.test_telemetry_service import read_topic
from tests.support import free_port, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

SITES = ("cloud", "factory")


def completion(request_id: str, site: str) -> bytes:
    return CompletionV1(
        request_id=request_id, tenant="acme", site=site, executor=f"{site}-1", model="digits-small",
        model_version="1", sla_class="batch", ok=True, batch_size=1, degraded=False,
        timings_ms={"queue": 1.0, "compute": 0.5, "total": 3.0}, at_ms=1.0,
    ).model_dump_json().encode()


def telemetry_env(nats_network, kafka_access, unique: str) -> dict[str, str]:
    login = nats_network.service_login("telemetry", "cloud")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "DIN_NATS_URL": nats_network.hub_url, "DIN_SITE": "cloud",
           "DIN_TOPIC_SCOPE": unique, "DIN_TELEMETRY_METRICS_PORT": str(free_port()),
           "DIN_TELEMETRY_HEARTBEAT_SITE": "cloud", "DIN_TELEMETRY_RELAY_FROM": "latest",
           "DIN_TELEMETRY_RELAY_CHECK_INTERVAL_S": "0.2", **kafka_access.environment("telemetry")}
    if login:
        env |= {"DIN_NATS_CREDS": login["nats_creds_file"], "DIN_BUS_SITES": login["bus_sites"]}
    return env


async def relay_health(nc) -> dict[str, str]:
    return json.loads((await nc.request(Subjects.health("telemetry"), b"", timeout=1.0)).data)["detail"]


async def backlog(connections: dict, unique: str) -> int:
    """Completions the relay consumers hold unacknowledged, as each site's JetStream reports them."""
    total = 0
    for site, nc in connections.items():
        info = await nc.jetstream().consumer_info(completions_stream(site), relay_durable(unique))
        total += info.num_pending + info.num_ack_pending
    return total


async def test_completions_published_while_telemetry_is_killed_all_reach_kafka(
    nats_network, kafka_access, kafka_operator, recorded_topics, unique, tmp_path
):
    if nats_network.single:
        pytest.skip("needs a JetStream domain per site")
    await recorded_topics(unique)
    env = telemetry_env(nats_network, kafka_access, unique)

    def start(n: int) -> ManagedProcess:
        return ManagedProcess(name=f"telemetry-{n}", argv=[sys.executable, "-m", "din.services.telemetry"],
                              log_path=tmp_path / f"telemetry-{n}.log", env=env, cwd=REPO_ROOT).start()

    connections = {site: await nats_network.connect(site) for site in SITES}
    hub = connections["cloud"]
    sent: list[str] = []

    async def publish(count: int) -> None:
        for _ in range(count):
            site = SITES[len(sent) % len(SITES)]
            sent.append(f"{unique}-{len(sent)}")
            await connections[site].publish(Subjects.completed(site), completion(sent[-1], site))
        for nc in connections.values():
            await nc.flush()

    async def relaying() -> bool:
        relay = (await relay_health(hub))["relay"]
        return all(f"{site}:relaying" in relay for site in SITES)

    first = start(1)
    second = None
    try:
        await wait_for(relaying, 30, lambda: f"telemetry relaying both sites ({first.log_tail()})", interval=0.2,
                       retry_on=(Exception,))
        await publish(200)
        await wait_for(lambda: _relayed(hub), 15, "telemetry relaying before it is killed", interval=0.05,
                       retry_on=(Exception,))
        os.kill(first.pid, signal.SIGKILL)
        await publish(600)
        await wait_for(lambda: _at_least(backlog(connections, unique), 600), 10,
                       "the completions published while telemetry is down waiting in the sites' streams")
        second = start(2)
        await wait_for(relaying, 30, lambda: f"the restarted telemetry relaying ({second.log_tail()})",
                       interval=0.2, retry_on=(Exception,))
        await publish(200)
        await wait_for(lambda: _at_least(backlog(connections, unique), 0, exactly=True), 20,
                       "the restarted telemetry catching up with both streams", interval=0.1)
        records = await read_topic(kafka_access.bootstrap, Topics.scoped(Topics.COMPLETIONS, unique), kafka_operator)
        relayed = [CompletionV1.model_validate_json(r.value).request_id for r in records]
        assert set(sent) - set(relayed) == set(), "every completion reached Kafka"
        assert set(relayed) <= set(sent)
        assert len(relayed) - len(set(relayed)) <= 2 * 256, "at most the batch each relay held when killed twice"
        health = await relay_health(hub)
        assert health["relay_pending"] == "0" and health["relay_lagging"] == ""
        assert int(health["relayed"]) >= 600, "the restarted telemetry relayed the completions it missed"
    finally:
        for proc in (first, second):
            if proc is not None:
                proc.stop()
        for nc in connections.values():
            await nc.close()


async def _relayed(nc) -> bool:
    return int((await relay_health(nc))["relayed"]) > 0


async def _at_least(count, floor: int, *, exactly: bool = False) -> bool:
    value = await count
    return value == floor if exactly else value >= floor

