"""The ``nats`` CLI against a running network, as an operator uses it: NATS micro discovery and the system account.

Every service instance answers ``$SRV.PING|INFO|STATS`` (``shared.micro``), so ``nats micro ls|info|stats``
list them with their subscriptions and counts; the system account's user (``users/system.creds``) runs
``nats server list|report`` at any site's server. The CLI is natscli (built by ``ops/setup.sh``), which checks
every micro answer against NATS's own JSON schemas, so a malformed answer would be left out of its output.
"""

from __future__ import annotations

import json
import os
import subprocess

import nats
import pytest

from din.commands.nats_env import nats_cli, nats_env
from din.stack.launcher import service_instances
from shared.bus.permissions import tenant_user
from shared.naming import Subjects, micro_name
from tests.integration.network import running_network
from tests.support import wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(kafka_access, zoo_dir, tmp_path_factory):
    with running_network(kafka_access, zoo_dir, tmp_path_factory.mktemp("din"), "centralized", gateway=True) as net:
        yield net


@pytest.fixture
async def network(stack):
    await stack.restore()
    return stack


def run_nats(network, *args: str, site: str | None = None, system: bool = False) -> subprocess.CompletedProcess:
    """``nats ARGS`` with the environment ``din nats-env`` prints for this network."""
    env = {**os.environ, **nats_env(network.stack.state(), site, system=system), "NO_COLOR": "1"}
    return subprocess.run([nats_cli(), *args], env=env, capture_output=True, text=True, timeout=60)


def nats_json(network, *args: str, **kwargs) -> list | dict:
    done = run_nats(network, *args, "--json", **kwargs)
    assert done.returncode == 0, f"nats {' '.join(args)} failed: {done.stderr or done.stdout}"
    return json.loads(done.stdout)


async def test_nats_micro_ls_lists_every_service_instance_at_every_site(network):
    listed = nats_json(network, "micro", "ls")
    expected = sorted((micro_name(inst.service), inst.site) for inst in service_instances(network.topology))
    assert sorted((info["name"], info["metadata"]["site"]) for info in listed) == expected
    assert len({info["id"] for info in listed}) == len(listed)
    assert all(info["description"] and info["version"] for info in listed)


async def test_nats_micro_info_shows_an_instances_subscriptions(network):
    (scheduler,) = [info for info in nats_json(network, "micro", "ls", "din-scheduler")
                    if info["metadata"]["site"] == network.topology.hub.name]
    info = nats_json(network, "micro", "info", "din-scheduler", scheduler["id"])["info"]
    endpoints = {(e["name"], e["subject"], e.get("queue_group", "")) for e in info["endpoints"]}
    hub = network.topology.hub.name
    assert ("schedule", Subjects.schedule(hub), "scheduler") in endpoints
    assert ("health", Subjects.health("scheduler"), "") in endpoints
    assert {e["metadata"]["kind"] for e in info["endpoints"]} >= {"job", "control", "health"}


async def test_nats_micro_stats_count_requests_and_the_errors_answered(network, digits):
    x, _ = digits

    def infer_stats() -> list[dict]:
        return [e for s in nats_json(network, "micro", "stats", "din-admission") for e in s["endpoints"]
                if e["name"] == "infer"]

    before = sum(e["num_requests"] for e in infer_stats())
    errors_before = sum(e["num_errors"] for e in infer_stats())
    async with network.client("acme") as client:
        for i in range(5):
            await client.infer("digits-small", {"input": x[i : i + 1]})
    nc = await nats.connect(network.hub_url, **network.stack.nats_options())
    try:
        reply = await nc.request(Subjects.infer("acme", "digits-small"), b"not json", timeout=10)
        assert b"unauthenticated" in reply.data or b"bad_request" in reply.data
    finally:
        await nc.close()

    await wait_for(lambda: sum(e["num_requests"] for e in infer_stats()) >= before + 6, 15,
                   "admission's infer endpoint to count 6 more requests")
    failing = [e for e in infer_stats() if e["num_errors"]]
    assert sum(e["num_errors"] for e in failing) >= errors_before + 1
    assert any(e["last_error"].startswith(("unauthenticated:", "bad_request:")) for e in failing)
    assert all(e["processing_time"] >= e["average_processing_time"] >= 0 for e in infer_stats())


async def test_nats_server_report_works_with_the_system_account_at_each_site(network):
    for site in (network.topology.hub.name, *[s.name for s in network.topology.sites if s.role == "edge"]):
        report = nats_json(network, "server", "report", "connections", site=site, system=True)
        names = {connection.get("name", "") for connection in report}
        assert f"din-admission-{site}" in names, f"the report at {site} lists no admission: {sorted(names)}"


async def test_a_tenant_cannot_discover_or_impersonate_services(network):
    refusals: list[str] = []

    async def error_cb(error: Exception) -> None:
        refusals.append(str(error))

    nc = await nats.connect(network.hub_url, error_cb=error_cb, allow_reconnect=False,
                            **network.stack.nats_options(user=tenant_user("acme")))
    try:
        await nc.publish(Subjects.micro("PING"), b"")
        await nc.subscribe(Subjects.micro("INFO", "admission"))
        await nc.flush()
        await wait_for(lambda: sum("permissions violation" in r.lower() for r in refusals) >= 2, 10,
                       lambda: f"two permission refusals (got {refusals})")
    finally:
        await nc.close()
