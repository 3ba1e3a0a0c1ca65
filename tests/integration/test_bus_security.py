"""Attacks on the closed NATS bus, each with its expected refusal, over the session's real hub and leaves.

The session network is what ``din up`` runs: every server trusts DIN's operator, users carry
least-privilege permissions, leaves reach the hub over TLS. Each attacker here holds credentials a
real party could steal (a tenant's, an executor's, a site's) or none at all; legitimate traffic runs
throughout and must not notice.
"""

from __future__ import annotations

import asyncio
import contextlib

import nats
import pytest
from nats.errors import Error as NatsError

from din.shared.bus.nats_auth import NatsAuthority
from din.shared.bus.permissions import operator
from din.shared.naming import Subjects
from din.stack.bus import service_permissions
from tests.support import wait_for

pytestmark = pytest.mark.usefixtures("closed_bus")


@pytest.fixture
def closed_bus(nats_network):
    if nats_network.bus is None:
        pytest.skip("an external NATS server is not DIN's closed bus")
    return nats_network


class Attacker:
    """A connection that records what the server refuses it."""

    def __init__(self) -> None:
        self.refusals: list[str] = []
        self.nc = None

    async def error_cb(self, error: Exception) -> None:
        self.refusals.append(str(error))

    async def connect(self, network, site: str | None, user: str, **extra):
        self.nc = await nats.connect(network.url(site or network.hub_site), error_cb=self.error_cb,
                                     allow_reconnect=False, **network.options(site, user), **extra)
        return self

    async def refused(self, what: str, count: int = 1) -> None:
        await self.nc.flush()
        await wait_for(lambda: sum(what.lower() in r.lower() for r in self.refusals) >= count, 10,
                       lambda: f"{count} refusals of {what} (got {self.refusals})")


@contextlib.asynccontextmanager
async def listening(network, site: str, subjects: list[str]):
    """An operator subscribed to ``subjects`` at ``site``: what actually got through."""
    nc = await network.connect(site)
    got: list[str] = []

    async def record(msg) -> None:
        got.append(msg.subject)

    for subject in subjects:
        await nc.subscribe(subject, cb=record)
    await nc.flush()
    try:
        yield got
    finally:
        await nc.close()


async def settle(network, *sites: str) -> None:
    """A round trip through every listed server and the hub, so anything let through would have arrived."""
    for site in sites:
        nc = await network.connect(site)
        await nc.flush()
        await nc.close()
    await asyncio.sleep(0.3)


@contextlib.asynccontextmanager
async def legitimate_traffic(network, unique: str):
    """A tenant's requests answered by a responder all along; yields the count of answers and failures."""
    responder = await network.connect()
    subject = Subjects.infer("acme", f"{unique}-m")

    async def echo(msg) -> None:
        await responder.publish(msg.reply, msg.data)

    await responder.subscribe(subject, cb=echo)
    await responder.flush()
    client = await nats.connect(network.url(network.hub_site), **network.tenant_options("acme"))
    tally = {"ok": 0, "failed": 0}
    stop = asyncio.Event()

    async def loop() -> None:
        while not stop.is_set():
            try:
                await client.request(subject, b"x", timeout=2)
                tally["ok"] += 1
            except Exception:  # noqa: BLE001 - counted
                tally["failed"] += 1
            await asyncio.sleep(0.005)

    task = asyncio.create_task(loop())
    try:
        yield tally
    finally:
        stop.set()
        await task
        await client.close()
        await responder.close()


async def test_no_credentials_no_connection(closed_bus, tmp_path):
    for site in closed_bus.urls:
        with pytest.raises(NatsError, match="Authorization Violation"):
            await nats.connect(closed_bus.url(site), allow_reconnect=False, max_reconnect_attempts=0,
                               connect_timeout=3)
    foreign = NatsAuthority.load_or_create(tmp_path / "other")
    creds = foreign.issue("operator", operator())
    with pytest.raises(NatsError, match="Authorization Violation"):
        await nats.connect(closed_bus.hub_url, user_credentials=str(creds), allow_reconnect=False,
                           max_reconnect_attempts=0, connect_timeout=3)
    assert "authentication error" in closed_bus.server_log(closed_bus.hub_site)


async def test_a_tenant_cannot_reach_internal_subjects_or_other_tenants(closed_bus, unique):
    internal = [Subjects.schedule("cloud"), Subjects.classify("cloud"), Subjects.execute("cloud", "cloud-1"),
                Subjects.heartbeat("cloud", "cloud-1"), Subjects.infer("globex", "digits-small"),
                Subjects.control("executor", "cloud-1"), "$KV.DIN_KEYS.pub.tenant-acme",
                "$JS.API.STREAM.DELETE.KV_DIN_KEYS", "$JS.API.STREAM.PURGE.KV_DIN_KEYS", "$JS.API.STREAM.LIST"]
    async with legitimate_traffic(closed_bus, unique) as tally, listening(closed_bus, "cloud", internal) as got:
        attacker = await Attacker().connect(closed_bus, None, "tenant-acme")
        for subject in internal:
            await attacker.nc.publish(subject, b"forged")
        await attacker.refused("Permissions Violation for Publish", len(internal))
        for subject in (">", "_INBOX.>", "_INBOX.globex.>", "din.v1.>", "_DIN_INBOX.>"):
            await attacker.nc.subscribe(subject)
        await attacker.refused("Permissions Violation for Subscription", 5)
        await settle(closed_bus, "cloud")
        assert got == []
        await attacker.nc.close()
    assert tally["ok"] > 0 and tally["failed"] == 0
    assert "Violation" in closed_bus.server_log("cloud") and "tenant-acme" in closed_bus.server_log("cloud")


async def test_an_executor_cannot_speak_for_another_or_load_models(closed_bus, unique):
    login = closed_bus.service_login("executor", "cloud", instance="cloud-1")
    forged = [Subjects.heartbeat("cloud", "cloud-2"), Subjects.heartbeat("factory", "factory-1"),
              Subjects.control("executor", "cloud-2"), Subjects.summary("cloud"), Subjects.pressure("cloud")]
    own = Subjects.heartbeat("cloud", "cloud-1")
    async with listening(closed_bus, "cloud", [*forged, own]) as got:
        attacker = Attacker()
        attacker.nc = await nats.connect(closed_bus.hub_url, error_cb=attacker.error_cb, allow_reconnect=False,
                                         user_credentials=login["nats_creds_file"])
        for subject in forged:
            await attacker.nc.publish(subject, b"forged")
        await attacker.nc.publish(own, b"mine")
        await attacker.refused("Permissions Violation for Publish", len(forged))
        await attacker.nc.subscribe(Subjects.execute("cloud", "cloud-2"))
        await attacker.refused("Permissions Violation for Subscription")
        await settle(closed_bus, "cloud")
        assert got == [own]
        await attacker.nc.close()


async def test_a_sites_servers_cannot_hear_or_speak_for_another_site(closed_bus, unique):
    to_factory = [Subjects.execute("factory", "factory-1"), "_INBOX.acme.factory.x", Subjects.schedule("factory")]
    async with listening(closed_bus, "factory", to_factory) as at_factory, \
            listening(closed_bus, "branch", to_factory) as at_branch:
        hub = await closed_bus.connect()
        for subject in to_factory:
            await hub.publish(subject, b"for factory")
        await hub.flush()
        await wait_for(lambda: len(at_factory) == len(to_factory), 10, "factory's own traffic")
        await settle(closed_bus, "branch", "factory")
        assert at_branch == [], "the hub delivered another site's jobs or replies into branch"
        await hub.close()
    spoofed = [Subjects.heartbeat("factory", "factory-1"), Subjects.summary("factory"), Subjects.completed("factory")]
    genuine = Subjects.heartbeat("branch", "branch-1")
    async with listening(closed_bus, "cloud", [*spoofed, genuine]) as at_hub:
        branch = await closed_bus.connect("branch")
        for subject in [*spoofed, genuine]:
            await branch.publish(subject, b"from branch")
        await branch.flush()
        await wait_for(lambda: genuine in at_hub, 10, "branch's own heartbeat at the hub")
        await settle(closed_bus, "branch", "cloud")
        assert at_hub == [genuine], "branch's leaf let it speak for factory"
        await branch.close()


async def test_services_hold_no_more_than_they_declare(closed_bus):
    topology = closed_bus.bus.topology
    for service in ("admission", "classifier", "scheduler", "telemetry"):
        perms = service_permissions(topology, service, "factory", f"{service}-factory", "factory")
        assert ">" not in perms.publish and ">" not in perms.subscribe
