"""Key distribution that cannot be rolled back, over the real brokers (issue 13, item 6).

The attacker holds a JetStream credential at the hub (the operator's NATS user plays it) but not the key
manager's signing key: it overwrites entries of ``DIN_KEYS`` with garbage, writes back old entries the key manager
really signed (a revocation list and a manifest from before a revocation), deletes entries and deletes the whole
bucket. Each time a process that starts during the attack refuses what it must (counted by reason) and gets the
real keys once the key manager has repaired the bucket; the key manager counts the damage by reason and reports
not ready while the bucket is gone; a tenant's requests are answered in full throughout.

While an attack is planted and read the key manager is paused (SIGSTOP), so the test sees the attack before the
repair; one stack for the module; each test leaves the bucket intact.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal

import nats
import numpy as np
import pytest
from nats.js.api import StreamConfig

from din.client import DinClient
from din.commands.keys import send_command
from din.shared.bus.permissions import tenant_user
from din.shared.contracts.keys import KeyAction
from din.shared.security import OPERATOR, CryptoPolicy, KeyAgent, PrincipalKeys, site_principal, tenant_principal
from din.shared.security.agent import Refused
from din.shared.security.bucket import EntryKeys
from din.shared.security.keyfiles import KEYS_BUCKET, key_file
from tests.integration.network import running_network
from tests.support import three_site_topology, wait_for

pytestmark = pytest.mark.integration

TENANT = "globex"
READER = tenant_principal(TENANT)
BRANCH = site_principal("branch")
MODEL = "digits-small"
INPUT = {"input": np.zeros((1, 64), dtype=np.float32)}
ROLLBACK_TOPOLOGY = three_site_topology(
    "keys-rollback-tests", {"cloud": [{"id": "cloud-1", "models": [MODEL]}]},
    [{"name": TENANT, "rate_per_s": 5000, "burst": 5000}],
)
for _edge in ROLLBACK_TOPOLOGY["sites"][1:]:
    _edge["control_plane"] = False


@pytest.fixture(scope="module")
def network(kafka_access, zoo_dir, tmp_path_factory):
    with running_network(kafka_access, zoo_dir, tmp_path_factory.mktemp("din"), "centralized",
                         security_policy=CryptoPolicy(), topology_spec=ROLLBACK_TOPOLOGY) as net:
        yield net


@contextlib.asynccontextmanager
async def attacker(network):
    """The hub's JetStream, as someone holding a JetStream credential there."""
    nc = await nats.connect(network.hub_url, **network.stack.nats_options())
    try:
        yield nc.jetstream()
    finally:
        await nc.close()


@contextlib.asynccontextmanager
async def paused_key_manager(network):
    network.kill("keymanager", signal.SIGSTOP)
    try:
        yield
    finally:
        network.kill("keymanager", signal.SIGCONT)


@contextlib.asynccontextmanager
async def legitimate_traffic(network):
    """A tenant's client sending requests one after another for the whole block; every one must be answered."""
    answered: list[int] = []
    failures: list[BaseException] = []
    stop = asyncio.Event()
    async with network.client(TENANT) as client:
        async def run() -> None:
            while not stop.is_set():
                try:
                    await client.infer(MODEL, INPUT)
                    answered.append(1)
                except Exception as exc:  # noqa: BLE001 - reported by the assertion below
                    failures.append(exc)

        task = asyncio.create_task(run())
        try:
            await wait_for(lambda: answered, 30.0, "a first legitimate answer")
            yield answered
            before = len(answered)
            await wait_for(lambda: len(answered) > before, 30.0, "a legitimate answer after the attack")
        finally:
            stop.set()
            await task
    assert not failures, f"{len(failures)} legitimate requests failed, first: {failures[0]!r}"


class Starting:
    """A key agent of the tenant started now, as a new process would (``watch`` runs in the background)."""

    def __init__(self, network) -> None:
        self.nc = None
        self.network = network
        self.agent = KeyAgent(network.keys(TENANT))
        self.task: asyncio.Task | None = None

    async def __aenter__(self) -> Starting:
        self.nc = await nats.connect(self.network.hub_url,
                                     **self.network.stack.nats_options(user=tenant_user(TENANT)))
        self.task = asyncio.create_task(self.agent.watch(
            self.nc, ready=lambda a: a.ready_for([READER]) and a.sites is not None, timeout_s=60.0))
        return self

    async def ready(self) -> KeyAgent:
        await asyncio.wait_for(asyncio.shield(self.task), 60.0)
        return self.agent

    async def __aexit__(self, *exc) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.agent.stop()
        await self.nc.close()


async def km(network) -> dict[str, str]:
    return (await network.health("keymanager")).detail


async def counted(network, name: str, more_than: int) -> dict[str, str]:
    async def grown() -> dict[str, str] | None:
        detail = await km(network)
        return detail if int(detail[name]) > more_than else None

    return await wait_for(grown, 30.0, f"the key manager counting {name} above {more_than}", interval=0.2,
                          retry_on=(Exception,))


async def intact(network) -> dict[str, str]:
    async def clean():
        health = await network.health("keymanager")
        return health.detail if health.ready and health.detail["bucket"] == "intact" else None

    return await wait_for(clean, 30.0, "the key manager ready with its bucket intact", interval=0.2,
                          retry_on=(Exception,))


async def a_new_client_is_served(network) -> None:
    client = await DinClient.connect(network.hub_url, TENANT, network.token(TENANT), network.keys(TENANT),
                                     options=network.stack.nats_options(user=tenant_user(TENANT)))
    try:
        assert (await client.infer(MODEL, INPUT)).encrypted
    finally:
        await client.close()


async def key_command(network, action: KeyAction, **fields):
    operator = PrincipalKeys.load(key_file(network.stack.keys_dir, OPERATOR))
    return await send_command(network.hub_url, operator, action, network.stack.nats_options(), **fields)


async def test_entries_overwritten_with_garbage_are_refused_then_written_back(network):
    before = await intact(network)
    async with legitimate_traffic(network), attacker(network) as js:
        kv = await js.key_value(KEYS_BUCKET)
        version = (await key_command(network, KeyAction.STATUS)).versions[READER]
        dek = EntryKeys.dek(READER, READER, version)
        async with paused_key_manager(network):
            await kv.put(dek, b"\x00not a key")
            await kv.put(EntryKeys.sites(READER), b'{"body": "{}", "sig": "forged"}')
            starting = await Starting(network).__aenter__()
            try:
                await wait_for(lambda: starting.agent.refusals[Refused.INVALID] >= 2, 30.0,
                               "the new process refusing both garbage entries")
                assert not starting.task.done(), "a process got keys out of garbage"
            except BaseException:
                await starting.__aexit__()
                raise
        try:
            agent = await starting.ready()
            assert agent.keyring.current_version(READER) == version and agent.sites is not None
        finally:
            await starting.__aexit__()
        detail = await counted(network, "bucket_damage_invalid", int(before["bucket_damage_invalid"]) + 1)
        assert int(detail["bucket_repairs"]) > int(before["bucket_repairs"])
    await intact(network)
    await a_new_client_is_served(network)


async def test_an_old_signed_revocation_list_and_manifest_written_back_do_not_undo_a_revocation(network):
    before = await intact(network)
    async with legitimate_traffic(network), attacker(network) as js:
        kv = await js.key_value(KEYS_BUCKET)
        old_revoked = (await kv.get(EntryKeys.REVOKED)).value
        old_manifest = (await kv.get(EntryKeys.MANIFEST)).value
        assert BRANCH in (await key_command(network, KeyAction.REVOKE, principal=BRANCH)).revoked
        async with paused_key_manager(network):
            await kv.put(EntryKeys.REVOKED, old_revoked)
            async with Starting(network) as first:
                agent = await first.ready()
                assert BRANCH in agent.revoked and agent.refusals[Refused.STALE] >= 1
            await kv.put(EntryKeys.MANIFEST, old_manifest)
            second = await Starting(network).__aenter__()
            try:
                await wait_for(lambda: second.agent.refusals[Refused.INVALID] >= 1, 30.0,
                               "the new process refusing the old manifest at its new sequence")
                assert second.agent.manifest is None and second.agent.applied == 0
                assert not second.task.done()
            except BaseException:
                await second.__aexit__()
                raise
        try:
            agent = await second.ready()
            assert BRANCH in agent.revoked, "the revocation was undone for a new process"
        finally:
            await second.__aexit__()
        # The revocation list is found stale; the old manifest may be too, unless the end of the revocation's grace
        # (due while the key manager was paused) sealed a new one before the key manager's next look.
        detail = await counted(network, "bucket_damage_stale", int(before["bucket_damage_stale"]))
        assert BRANCH in detail["revoked"].split(",")
    await intact(network)
    status = await key_command(network, KeyAction.STATUS)
    assert BRANCH in status.revoked and status.bucket == "intact"


async def test_deleted_entries_are_written_back(network):
    before = await intact(network)
    async with legitimate_traffic(network), attacker(network) as js:
        kv = await js.key_value(KEYS_BUCKET)
        for key in (EntryKeys.POLICY, EntryKeys.sites(READER), EntryKeys.public(site_principal("cloud"))):
            await kv.delete(key)
        await counted(network, "bucket_damage_missing", int(before["bucket_damage_missing"]) + 2)
        await intact(network)
        for key in (EntryKeys.POLICY, EntryKeys.sites(READER)):
            assert (await kv.get(key)).value
    await a_new_client_is_served(network)


async def test_a_deleted_bucket_leaves_the_key_manager_not_ready_until_it_has_created_it_again(network):
    """The attacker deletes the bucket and holds its subjects with a stream of its own, so the key manager cannot
    create it again: it reports not ready and ``din keys status`` flags the revocations it lists; once the
    squatter is gone it recreates the bucket, and a new process gets its keys, the revocation included."""
    before = await intact(network)
    if BRANCH not in (await key_command(network, KeyAction.STATUS)).revoked:
        await key_command(network, KeyAction.REVOKE, principal=BRANCH)
    squatter = "KEYS_SQUAT"
    async with legitimate_traffic(network), attacker(network) as js:
        async with paused_key_manager(network):
            await js.delete_key_value(KEYS_BUCKET)
            await js.add_stream(StreamConfig(name=squatter, subjects=[f"$KV.{KEYS_BUCKET}.>"]))
        try:
            async def not_ready():
                health = await network.health("keymanager")
                return health.detail if not health.ready and health.detail["bucket"] == "bucket_missing:1" else None

            detail = await wait_for(not_ready, 30.0, "the key manager reporting not ready, its bucket missing",
                                    interval=0.2, retry_on=(Exception,))
            assert int(detail["bucket_repair_failures"]) > int(before["bucket_repair_failures"])
            status = await key_command(network, KeyAction.STATUS)
            assert status.bucket == "bucket_missing:1" and BRANCH in status.revoked
        finally:
            await js.delete_stream(squatter)
        detail = await intact(network)
        assert int(detail["bucket_repairs"]) > int(before["bucket_repairs"])
    async with Starting(network) as starting:
        agent = await starting.ready()
        assert BRANCH in agent.revoked
    await a_new_client_is_served(network)
    # The processes that watched the old bucket follow the new one: a rotation reaches the executor.
    version = (await key_command(network, KeyAction.ROTATE, reader=READER, grace_s=600.0)).versions[READER]

    async def rotated() -> bool:
        detail = (await network.health("executor", "cloud-1")).detail
        return f"{READER}:{version}" in detail["key_versions"].split(",")

    await wait_for(rotated, 60.0, f"cloud-1 sealing with {READER} version {version} from the new bucket",
                   interval=0.5, retry_on=(Exception,))
