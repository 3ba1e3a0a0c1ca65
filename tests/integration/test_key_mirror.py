"""Sites keep the keys they need while cut off from the hub (issue 11, item 3): every site's JetStream holds a
mirror of the hub's ``DIN_KEYS`` bucket, kept by the key manager, and key agents read their own site's mirror.

One stack for the module (hub ``cloud``, edges ``factory`` and ``branch``, every leaf behind its Toxiproxy link,
sealed clients only). Each test leaves the links up and the declared processes running.
"""

from __future__ import annotations

import signal
import sys

import nats
import numpy as np
import pytest
from nats.js.api import KeyValueConfig
from nats.js.errors import KeyNotFoundError

from din.client import DinClient, DinRequestError
from din.commands.keys import send_command
from din.services.keymanager.mirrors import STALLED_AFTER_S
from din.shared.bus.permissions import tenant_user
from din.shared.contracts.events import HealthV1
from din.shared.contracts.keys import KeyAction
from din.shared.envelope import Identity
from din.shared.naming import Subjects
from din.shared.security import KEYMANAGER, OPERATOR, CryptoPolicy, KeyAgent, PrincipalKeys, site_principal
from din.shared.security.bucket import EntryKeys, Manifest, sign_entry, sign_manifest
from din.shared.security.keyfiles import KEYS_BUCKET, key_file
from din.stack.processes import ManagedProcess
from din.stack.wan import ToxiproxyClient
from tests.integration.network import REPO_ROOT, running_network
from tests.support import three_site_topology, wait_for

pytestmark = pytest.mark.integration

TENANT = "globex"
FACTORY = site_principal("factory")
MIRROR_TOPOLOGY = three_site_topology(
    "key-mirror-tests",
    {"cloud": [{"id": "cloud-1", "models": ["digits-small", "digits-large"]}],
     "factory": [{"id": "factory-1", "models": ["digits-small"]}]},
    [{"name": TENANT, "rate_per_s": 5000, "burst": 5000}],
)
MIRROR_TOPOLOGY["sites"][2]["control_plane"] = False
"""Branch has no executors and no control plane of its own: it still gets a mirror."""
INPUT = {"input": np.zeros((1, 64), dtype=np.float32)}


@pytest.fixture(scope="module")
def network(kafka_access, zoo_dir, tmp_path_factory):
    with running_network(kafka_access, zoo_dir, tmp_path_factory.mktemp("din"), "centralized",
                         security_policy=CryptoPolicy(), topology_spec=MIRROR_TOPOLOGY, wan=True) as net:
        yield net


@pytest.fixture(scope="module")
def links(network) -> ToxiproxyClient:
    return ToxiproxyClient(network.stack.toxiproxy.api_url)


async def health_at(network, site: str, service: str, instance: str) -> HealthV1:
    """One instance's health, asked at ``site``'s own NATS server (so it answers while the site is cut off)."""
    nc = await nats.connect(network.stack.nats_urls[site], **network.stack.nats_options(site))
    try:
        reply = await nc.request(Subjects.health(service, instance), b"", timeout=2.0)
        return HealthV1.model_validate_json(reply.data)
    finally:
        await nc.close()


async def key_manager(network) -> dict[str, str]:
    return (await network.health("keymanager")).detail


async def mirror_last_seq(network, site: str) -> int:
    """The last sequence of the keys stream in ``site``'s JetStream (the mirror; at the hub, the bucket)."""
    nc = await nats.connect(network.stack.nats_urls[site], **network.stack.nats_options(site))
    try:
        return (await nc.jetstream().stream_info(f"KV_{KEYS_BUCKET}")).state.last_seq
    finally:
        await nc.close()


async def mirror_stalled(network, site: str) -> bool:
    """Whether ``site``'s mirror has heard nothing from the hub for longer than the stall interval."""
    nc = await nats.connect(network.stack.nats_urls[site], **network.stack.nats_options(site))
    try:
        active = (await nc.jetstream().stream_info(f"KV_{KEYS_BUCKET}")).mirror.active
        return active is not None and active / 1e9 > STALLED_AFTER_S
    finally:
        await nc.close()


async def mirror_holds(network, site: str, key: str) -> bool:
    nc = await nats.connect(network.stack.nats_urls[site], **network.stack.nats_options(site))
    try:
        await (await nc.jetstream().key_value(KEYS_BUCKET)).get(key)
        return True
    except KeyNotFoundError:
        return False
    finally:
        await nc.close()


async def rotate(network, reader: str) -> int:
    operator = PrincipalKeys.load(key_file(network.stack.keys_dir, OPERATOR))
    result = await send_command(network.hub_url, operator, KeyAction.ROTATE, network.stack.nats_options(),
                                reader=reader, grace_s=600.0)
    return result.versions[reader]


def start_factory_executor(network, executor_id: str, models: str) -> ManagedProcess:
    """A new executor process at the factory serving ``models`` (configured like factory-1 otherwise)."""
    env = {**network.stack.environments()["executor-factory-1"], "DIN_EXECUTOR_ID": executor_id,
           "DIN_EXECUTOR_MODELS": models, "PYTHONUNBUFFERED": "1",
           "DIN_NATS_CREDS": str(network.stack.bus.issue_executor(executor_id, "factory"))}
    proc = ManagedProcess(name=f"executor-{executor_id}", argv=[sys.executable, "-m", "din.services.executor"],
                          log_path=network.stack.run_dir / "logs" / f"executor-{executor_id}.log", env=env,
                          cwd=REPO_ROOT).start()
    network.stack.processes.append(proc)
    return proc


async def synced_mirrors(network) -> dict[str, str]:
    async def synced() -> dict[str, str] | None:
        detail = await key_manager(network)
        return detail if detail["mirrors"] == "branch:synced,factory:synced" else None

    return await wait_for(synced, 30.0, "the key manager reporting both site mirrors synced", interval=0.2,
                          retry_on=(Exception,))


async def test_din_up_leaves_every_other_site_a_mirror_of_the_keys(network):
    detail = await synced_mirrors(network)
    assert int(detail["mirrors_created"]) == 2 and detail["mirror_failures"] == "0"
    hub = await mirror_last_seq(network, "cloud")
    for site in ("factory", "branch"):
        assert await mirror_last_seq(network, site) == hub, site

    async def on_mirror() -> bool:
        return (await network.health("executor", "factory-1")).detail["key_source"] == "site"

    # factory-1 started beside the key manager, perhaps before its site had a mirror: it moves there.
    await wait_for(on_mirror, 15.0, "factory-1 reading its keys from the factory's mirror", interval=0.2,
                   retry_on=(Exception,))


async def test_a_process_started_at_a_cut_off_site_gets_its_keys_there_and_a_rotation_follows_after(network,
                                                                                                    links):
    """The factory's link is cut; an executor and a sealed client started there get their keys from the mirror
    and the client's request is served by that executor. A rotation at the hub meanwhile reaches the factory's
    mirror, and the new executor, once the link is back."""
    links.set_enabled("factory", False)
    try:
        start_factory_executor(network, "factory-2", "digits-large")
        health = await wait_for(lambda: _ready(network, "factory", "executor", "factory-2"), 60.0,
                                "factory-2 ready while the factory is cut off", interval=0.2, retry_on=(Exception,))
        assert health.detail["key_source"] == "site"
        client = await DinClient.connect(
            network.stack.nats_urls["factory"], TENANT, network.token(TENANT), network.keys(TENANT),
            options=network.stack.nats_options("factory", user=tenant_user(TENANT)), site="factory")
        try:
            assert client.security.agent.source == "site"
            result = await wait_for(lambda: client.infer("digits-large", INPUT), 30.0,
                                    "a factory-local request for digits-large answered", interval=0.2,
                                    retry_on=(DinRequestError,))
        finally:
            await client.close()
        assert result.encrypted and result.served_by.executor == "factory-2"
        version = await rotate(network, FACTORY)
        entry = EntryKeys.dek(FACTORY, FACTORY, version)
        assert not await mirror_holds(network, "factory", entry), "the cut link let the rotation through"
        # Past the server's stall interval the mirror gives up on its feed; it must still catch up once the
        # link is back (its durable consumer at the hub is reset, not recreated after a back-off).
        await wait_for(lambda: mirror_stalled(network, "factory"), 30.0, "the factory's mirror noticing the cut",
                       interval=0.5, retry_on=(Exception,))
    finally:
        links.set_enabled("factory", True)
    try:
        await wait_for(lambda: mirror_holds(network, "factory", entry), 30.0,
                       f"{entry} in the factory's mirror after the link is restored", interval=0.5,
                       retry_on=(Exception,))

        async def rotated() -> bool:
            detail = (await health_at(network, "factory", "executor", "factory-2")).detail
            return f"{FACTORY}:{version}" in detail["key_versions"].split(",")

        await wait_for(rotated, 90.0, f"factory-2 sealing with {FACTORY} version {version}", interval=0.5,
                       retry_on=(Exception,))
    finally:
        await network.restore()


async def test_a_deleted_mirror_is_recreated_and_reported(network):
    before = int((await synced_mirrors(network))["mirrors_created"])
    nc = await nats.connect(network.stack.nats_urls["factory"], **network.stack.nats_options("factory"))
    try:
        await nc.jetstream().delete_stream(f"KV_{KEYS_BUCKET}")
    finally:
        await nc.close()

    async def recreated() -> bool:
        return int((await key_manager(network))["mirrors_created"]) > before

    await wait_for(recreated, 30.0, "the key manager recreating the factory's mirror", interval=0.2,
                   retry_on=(Exception,))
    await synced_mirrors(network)
    assert await mirror_last_seq(network, "factory") == await mirror_last_seq(network, "cloud")
    # The factory's executor kept watching: a later rotation reaches it through the new mirror.
    version = await rotate(network, FACTORY)

    async def rotated() -> bool:
        detail = (await network.health("executor", "factory-1")).detail
        return f"{FACTORY}:{version}" in detail["key_versions"].split(",")

    await wait_for(rotated, 90.0, f"factory-1 sealing with {FACTORY} version {version}", interval=0.5,
                   retry_on=(Exception,))


async def test_a_forged_bucket_at_a_site_gives_no_keys_and_is_replaced_by_the_mirror(network):
    """Someone with the factory's JetStream puts a bucket of its own where the mirror was, its entries signed by
    another key. An agent started there refuses the forged manifest, so it applies nothing else and gets no keys;
    the key manager (paused while the forgery is planted and read, so the test sees the forgery) replaces it with
    the mirror again."""
    before = int((await synced_mirrors(network))["mirrors_replaced"])
    network.kill("keymanager", signal.SIGSTOP)
    try:
        nc = await nats.connect(network.stack.nats_urls["factory"], **network.stack.nats_options("factory"))
        try:
            js = nc.jetstream()
            await js.delete_stream(f"KV_{KEYS_BUCKET}")
            forged = await js.create_key_value(KeyValueConfig(bucket=KEYS_BUCKET, history=1))
            forger = Identity.generate(KEYMANAGER)
            for key, body in ((EntryKeys.POLICY, {"integrity_only": [], "plaintext_ingress": [TENANT]}),
                              (EntryKeys.public(FACTORY), {"identity": forger.public.to_dict()})):
                await forged.put(key, sign_entry(forger, key, {**body, "issued_ms": 2**62}))
            last = (await js.stream_info(f"KV_{KEYS_BUCKET}")).state.last_seq
            await forged.put(EntryKeys.MANIFEST, sign_manifest(forger, Manifest(2**62, last + 1, {}, frozenset())))
            agent = KeyAgent(network.keys(TENANT))
            with pytest.raises(TimeoutError):
                await agent.watch(nc, ready=lambda a: a.policy is not None, timeout_s=3.0)
            await agent.stop()
        finally:
            await nc.close()
    finally:
        network.kill("keymanager", signal.SIGCONT)
    assert agent.source == "site" and agent.refusals == {"invalid": 1} and agent.applied == 0

    async def replaced() -> bool:
        return int((await key_manager(network))["mirrors_replaced"]) > before

    await wait_for(replaced, 30.0, "the key manager replacing the forged bucket", interval=0.2, retry_on=(Exception,))
    await synced_mirrors(network)
    assert await mirror_last_seq(network, "factory") == await mirror_last_seq(network, "cloud")


async def _ready(network, site: str, service: str, instance: str) -> HealthV1 | None:
    health = await health_at(network, site, service, instance)
    return health if health.ready else None
