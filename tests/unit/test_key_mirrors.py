"""Site mirrors of the keys bucket (pure): what each site's mirror is, what the key manager does about what it sees,
who may create mirrors and what a leaf lets through for one, and where an agent reads its keys."""

from __future__ import annotations

import asyncio
import dataclasses
from types import SimpleNamespace

import pytest
from nats.js.api import ConsumerConfig, StreamInfo
from nats.js.errors import BucketNotFoundError, NotFoundError

from din.services.keymanager.main import look_at_mirror, mirror_config, mirror_consumer_config, mirror_seen
from din.services.keymanager.mirrors import (
    STALLED_AFTER_S,
    MirrorAction,
    MirrorLedger,
    MirrorSeen,
    MirrorSpec,
    MirrorState,
    judge,
    mirror_specs,
)
from din.shared.bus import permissions as rules
from din.shared.envelope import Identity
from din.shared.security import KeyAgent, PrincipalKeys
from din.shared.security import agent as agent_module
from din.shared.security.agent import HUB_SOURCE, SITE_SOURCE
from din.shared.topology import Topology
from din.stack.bus import service_permissions
from din.stack.launcher import service_instances
from tests.integration.network import INFERENCE_TOPOLOGY
from tests.support import subject_covers, wait_for

TOPOLOGY = Topology.model_validate(INFERENCE_TOPOLOGY)
FACTORY = MirrorSpec.of(TOPOLOGY, "factory", "DIN_KEYS")


def allowed(patterns: tuple[str, ...], subject: str) -> bool:
    return any(subject_covers(p, subject) for p in patterns)


def good(**changes) -> MirrorSeen:
    seen = {"reachable": True, "exists": True, "source": "KV_DIN_KEYS", "origin_api": "$JS.cloud.API",
            "consumer_name": "MIRROR_factory", "deliver_subject": "$JS.M.factory.KV_DIN_KEYS", "lag": 0,
            "idle_s": 0.5}
    return MirrorSeen(**{**seen, **changes})


def test_every_site_but_the_hub_mirrors_the_hubs_keys_stream():
    specs = mirror_specs(TOPOLOGY, "DIN_KEYS")
    assert [s.site for s in specs] == ["factory", "branch"]
    assert FACTORY == MirrorSpec("factory", "KV_DIN_KEYS", "$JS.cloud.API", "MIRROR_factory",
                                 "$JS.M.factory.KV_DIN_KEYS")


@pytest.mark.parametrize(("seen", "state", "action"), [
    (MirrorSeen(reachable=False), MirrorState.UNREACHABLE, MirrorAction.KEEP),
    (MirrorSeen(reachable=True), MirrorState.CREATED, MirrorAction.CREATE),
    (good(), MirrorState.SYNCED, MirrorAction.KEEP),
    (good(lag=3), MirrorState.SYNCING, MirrorAction.KEEP),
    (good(idle_s=None), MirrorState.SYNCING, MirrorAction.KEEP),
    (good(idle_s=STALLED_AFTER_S + 1), MirrorState.STALLED, MirrorAction.KEEP),
    (good(source=None, origin_api=None, consumer_name=None, deliver_subject=None), MirrorState.REPLACED,
     MirrorAction.REPLACE),
    (good(origin_api="$JS.factory.API"), MirrorState.REPLACED, MirrorAction.REPLACE),
    (good(consumer_name=None, deliver_subject=None), MirrorState.REPLACED, MirrorAction.REPLACE),
    (good(deliver_subject="$JS.M.branch.KV_DIN_KEYS"), MirrorState.REPLACED, MirrorAction.REPLACE),
    (good(source="KV_OTHER"), MirrorState.REPLACED, MirrorAction.REPLACE),
    (good(consumer=False), MirrorState.REPLACED, MirrorAction.REPLACE),
    (good(consumer=None), MirrorState.SYNCED, MirrorAction.KEEP),
], ids=["unreachable", "missing", "synced", "lagging", "never-heard", "stalled", "not-a-mirror", "other-origin",
        "ephemeral-consumer", "other-subject", "other-stream", "consumer-gone", "hub-silent"])
def test_the_key_manager_creates_missing_and_replaces_foreign_mirrors(seen, state, action):
    assert judge(FACTORY, seen) == (state, action)


def test_the_mirror_the_key_manager_creates_is_judged_its_own_once_it_hears_the_hub():
    config = mirror_config(FACTORY, replicas=1).as_dict()
    assert config["max_msgs_per_subject"] == 1 and "subjects" not in config
    consumer = mirror_consumer_config(FACTORY).as_dict()
    assert (consumer["durable_name"], consumer["deliver_subject"], consumer["ack_policy"]) == (
        "MIRROR_factory", "$JS.M.factory.KV_DIN_KEYS", "flow_control")
    answered = StreamInfo.from_response({
        "config": config, "state": {"messages": 5, "bytes": 1, "first_seq": 1, "last_seq": 5, "consumer_count": 0},
        "mirror": {"name": "KV_DIN_KEYS", "lag": 0, "active": 300_000_000},
    })
    assert mirror_seen(answered) == good(idle_s=0.3)
    assert judge(FACTORY, mirror_seen(answered)) == (MirrorState.SYNCED, MirrorAction.KEEP)


class _SiteAndHub:
    """Answers a look at the factory's mirror: the mirror the key manager makes, and a consumer at the hub."""

    def __init__(self, consumer: ConsumerConfig | None) -> None:
        self.consumer = consumer

    async def stream_info(self, stream: str) -> StreamInfo:
        return StreamInfo.from_response({
            "config": mirror_config(FACTORY).as_dict(), "state": {"messages": 1, "bytes": 1, "first_seq": 1,
                                                                  "last_seq": 1, "consumer_count": 0},
            "mirror": {"name": stream, "lag": 0, "active": 1_000_000}})

    async def consumer_info(self, stream: str, consumer: str):
        if self.consumer is None:
            raise NotFoundError
        return SimpleNamespace(config=self.consumer)


@pytest.mark.parametrize(("consumer", "action"), [
    (mirror_consumer_config(FACTORY), MirrorAction.KEEP),
    (None, MirrorAction.REPLACE),
    (dataclasses.replace(mirror_consumer_config(FACTORY), deliver_subject="_INBOX.acme.factory.x"),
     MirrorAction.REPLACE),
], ids=["as-made", "gone", "redirected"])
async def test_a_mirror_whose_consumer_at_the_hub_is_gone_or_redirected_is_replaced(consumer, action):
    answers = _SiteAndHub(consumer)
    assert judge(FACTORY, await look_at_mirror(answers, answers, FACTORY))[1] is action


def test_the_ledger_reports_each_sites_state_and_counts_repairs():
    ledger = MirrorLedger()
    for site, state in [("factory", MirrorState.CREATED), ("branch", MirrorState.UNREACHABLE),
                        ("factory", MirrorState.SYNCED), ("factory", MirrorState.CREATED)]:
        ledger.record(site, state)
    assert ledger.detail() == {"mirrors": "branch:unreachable,factory:created", "mirrors_created": 2,
                               "mirrors_replaced": 0, "mirror_failures": 0}


def test_only_the_key_manager_creates_or_removes_site_mirrors_and_their_consumers():
    for inst in service_instances(TOPOLOGY):
        perms = service_permissions(TOPOLOGY, inst.service, inst.site, inst.name, inst.instance)
        for call in ("STREAM.CREATE.KV_DIN_KEYS", "STREAM.DELETE.KV_DIN_KEYS"):
            assert allowed(perms.publish, f"$JS.factory.API.{call}") == (inst.service == "keymanager"), inst.name
    for reader in (rules.tenant(TOPOLOGY, "acme"), rules.leaf(TOPOLOGY, "factory"),
                   rules.executor(TOPOLOGY, "factory", "factory-1")):
        assert not allowed(reader.publish, "$JS.cloud.API.CONSUMER.DELETE.KV_DIN_KEYS.MIRROR_factory")
        assert not allowed(reader.publish, "$JS.API.CONSUMER.DELETE.KV_DIN_KEYS.MIRROR_factory")
    keeper = rules.keymanager(TOPOLOGY, "cloud", "keymanager", None)
    assert allowed(keeper.publish, "$JS.cloud.API.CONSUMER.DELETE.KV_DIN_KEYS.MIRROR_factory")
    for subject in ("$JS.factory.API.STREAM.CREATE.OTHER", "$JS.factory.API.STREAM.PURGE.KV_DIN_KEYS",
                    "$JS.factory.API.STREAM.DELETE.KV_DIN_NONCES_FACTORY", "$KV.DIN_KEYS_X.pub.x"):
        assert not allowed(keeper.publish, subject), subject


def test_a_leaf_carries_only_its_own_sites_mirror_feed():
    factory = rules.leaf(TOPOLOGY, "factory")
    assert allowed(factory.publish, "$JS.cloud.API.CONSUMER.RESET.KV_DIN_KEYS.MIRROR_factory")
    assert allowed(factory.publish, "$JS.FC.KV_DIN_KEYS.MIRROR_factory.1.2.3")
    assert allowed(factory.subscribe, "$JS.M.factory.KV_DIN_KEYS")
    assert allowed(factory.subscribe, "$JSC.R.abc123")
    for subject in ("$JS.M.branch.KV_DIN_KEYS", "$JS.M.abc123", "$JS.branch.API.STREAM.INFO.KV_DIN_KEYS"):
        assert not allowed(factory.subscribe, subject), subject
    for subject in ("$JS.cloud.API.STREAM.CREATE.KV_DIN_KEYS", "$JS.cloud.API.CONSUMER.CREATE.KV_OTHER",
                    "$JS.cloud.API.CONSUMER.RESET.KV_DIN_KEYS.MIRROR_branch"):
        assert not allowed(factory.publish, subject), subject


class _JetStream:
    def __init__(self, buckets: set[str | None], domain: str | None, asked: list) -> None:
        self.buckets, self.domain, self.asked = buckets, domain, asked

    async def key_value(self, bucket: str):
        self.asked.append(self.domain)
        if self.domain not in self.buckets:
            raise BucketNotFoundError
        return self.domain


class _Connection:
    """Stands for a NATS connection whose server's JetStream (domain None) or the hub's may hold the bucket."""

    def __init__(self, *buckets: str | None) -> None:
        self.buckets, self.asked = set(buckets), []

    def jetstream(self, domain: str | None = None) -> _JetStream:
        return _JetStream(self.buckets, domain, self.asked)


def _agent() -> KeyAgent:
    keymanager = Identity.generate("keymanager")
    return KeyAgent(PrincipalKeys(Identity.generate("site-factory"), keymanager.public, "DIN_KEYS", "cloud"))


@pytest.mark.parametrize(("held", "site_first", "source", "asked"), [
    ((None, "cloud"), True, SITE_SOURCE, [None]),
    (("cloud",), True, HUB_SOURCE, [None, "cloud"]),
    ((None, "cloud"), False, HUB_SOURCE, ["cloud"]),
], ids=["own-site-first", "no-mirror-yet", "hub-only"])
async def test_an_agent_reads_its_sites_mirror_before_the_hub(held, site_first, source, asked):
    nc = _Connection(*held)
    assert await _agent()._open_bucket(nc, site_first, deadline=0.0, timeout_s=0.0) == (source, asked[-1])
    assert nc.asked == asked


class _Watcher:
    """Yields nats.py's end-of-content marker at once (as it may, before any entry), then whatever is put;
    ``stop`` ends it."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue = asyncio.Queue()
        self.queue.put_nowait(None)
        self.stopped = False

    def __aiter__(self):
        return self

    async def __anext__(self):
        item = await self.queue.get()
        if item is StopAsyncIteration:
            raise StopAsyncIteration
        return item

    async def stop(self) -> None:
        self.stopped = True
        self.queue.put_nowait(StopAsyncIteration)


class _Bucket:
    """A bucket whose content ends at stream sequence ``end`` (0: empty)."""

    def __init__(self, end: int = 0) -> None:
        self.watchers: list[_Watcher] = []
        self.end = end

    async def status(self):
        return SimpleNamespace(stream_info=SimpleNamespace(
            state=SimpleNamespace(messages=self.end, last_seq=self.end)))

    async def watchall(self) -> _Watcher:
        self.watchers.append(_Watcher())
        return self.watchers[-1]


class _WatchedConnection(_Connection):
    def __init__(self, **buckets: _Bucket) -> None:
        super().__init__()
        self.by_domain = buckets

    def jetstream(self, domain: str | None = None):
        connection = self

        class _Js:
            async def key_value(self, bucket: str):
                found = connection.by_domain.get(domain or "local")
                if found is None:
                    raise BucketNotFoundError
                return found

        return _Js()


async def test_an_agent_on_the_hubs_bucket_moves_to_its_sites_mirror_once_there(monkeypatch):
    monkeypatch.setattr(agent_module, "SITE_LOOK_S", 0.01)
    hub, mirror = _Bucket(), _Bucket()
    nc = _WatchedConnection(cloud=hub)
    agent = _agent()
    await agent.watch(nc, timeout_s=1.0, unanchored=True)  # an empty bucket: no manifest to wait for
    assert agent.source == HUB_SOURCE
    nc.by_domain["local"] = mirror
    await wait_for(lambda: agent.source == SITE_SOURCE, 5.0, "the agent moving to the site's mirror")
    assert len(mirror.watchers) == 1 and hub.watchers[0].stopped
    await agent.stop()
    assert mirror.watchers[0].stopped


async def test_an_agent_reads_the_bucket_up_to_the_end_of_its_content_not_up_to_the_first_marker():
    """nats.py may say "no more" before the first entry; the agent waits for the entry at the content's end."""
    bucket = _Bucket(end=2)
    agent = _agent()
    watching = asyncio.create_task(agent.watch(_WatchedConnection(cloud=bucket), timeout_s=5.0, unanchored=True))
    await wait_for(lambda: bucket.watchers, 2.0, "the agent watching")
    for revision in (1, 2):
        await asyncio.sleep(0.05)
        assert not watching.done(), f"the agent took the content as read before entry {revision}"
        bucket.watchers[0].queue.put_nowait(
            SimpleNamespace(key=f"pub.x{revision}", value=b"not an entry", operation=None, revision=revision))
    await asyncio.wait_for(watching, 2.0)
    assert agent.refused + sum(agent.refusals.values()) >= 2
    await agent.stop()


async def test_an_agent_with_neither_mirror_nor_hub_says_where_it_looked():
    with pytest.raises(TimeoutError, match=r"site: BucketNotFoundError, hub: BucketNotFoundError"):
        await _agent()._open_bucket(_Connection(), True, deadline=0.0, timeout_s=0.0)
