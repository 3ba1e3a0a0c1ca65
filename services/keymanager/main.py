"""Key manager's front door: identities and data keys out through the ``DIN_KEYS`` bucket, rotation, revocation.

At start it unwraps its own identity from the key store with the master key,
creates the bucket at the hub's JetStream, recovers the DEK versions it wrapped to
itself there, gives every reader without one a first version and publishes
everything (``KeyAuthority.publication``), then a manifest of it signed for its
stream sequence. It keeps a mirror of the bucket in
every other site's JetStream domain (``mirrors``: created before it reports ready,
looked at on schedule, recreated when missing). Then it rotates every DEK on
schedule, deletes versions whose grace has passed, looks at its bucket every
``bucket_check_interval_s`` (``integrity``: not ready while damaged, what was
changed written back, a deleted bucket created again), and answers signed operator
commands (rotate, revoke, status) on ``din.v1.control.keymanager.keymanager``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    ExternalStream,
    StorageType,
    StreamConfig,
    StreamConsumerSource,
    StreamInfo,
    StreamSource,
)
from nats.js.errors import BadRequestError, BucketNotFoundError, NotFoundError
from nats.js.kv import KeyValue

from din.services.keymanager.authority import KeyAuthority
from din.services.keymanager.commands import command_result, run_command
from din.services.keymanager.distribution import KeyDistribution
from din.services.keymanager.integrity import Seen
from din.services.keymanager.mirrors import (
    MirrorAction,
    MirrorLedger,
    MirrorSeen,
    MirrorSpec,
    MirrorState,
    judge,
    mirror_specs,
)
from din.services.keymanager.settings import KeyManagerSettings
from din.shared.contracts.keys import KeyAction
from din.shared.envelope import Identity, InvalidToken, ReplayGuard
from din.shared.errors import DinError, ErrorCode
from din.shared.naming import Subjects, Topics
from din.shared.runtime import Service, endpoint
from din.shared.security import (
    KEYMANAGER,
    OPERATOR,
    KeyAgent,
    KeyStore,
    PrincipalKeys,
    principals_of,
    read_master_key,
    verify_key_command,
)
from din.shared.security.bucket import keys_stream, watch_content
from din.shared.topology import Topology, load_topology

EXPIRY_INTERVAL_S = 1.0
RECOVERY_TIMEOUT_S = 30.0
KEYS_HISTORY = 1
MIRROR_CALL_TIMEOUT_S = 2.0
MIRROR_HEARTBEAT_S = 1.0
BUCKET_CALL_TIMEOUT_S = 5.0
WRONG_LAST_SEQUENCE = 10071
"""JetStream's error code for a publish whose ``Nats-Expected-Last-Sequence`` is not the stream's last."""
SEQUENCED_TRIES = 5
MIRROR_START_WAIT_S = 5.0
"""How long start-up waits for new mirrors to catch up before the key manager reports ready anyway."""
KEYS_BUCKET_CHANNEL = "keysBucket"
"""The channel of the ``DIN_KEYS`` JetStream key-value bucket (public identities, wrapped DEKs, revocations,
policy), which the key manager alone writes."""


def control_subject(settings: KeyManagerSettings) -> str:
    """The key manager's command subject (one instance, named like the service)."""
    return Subjects.control(KeyManager.name, KeyManager.name)


class KeyManager(Service):
    """The key authority: distributes identities and data keys, rotates and revokes them on command or schedule."""

    name = "keymanager"
    publishes = (KEYS_BUCKET_CHANNEL,)

    def __init__(self, settings: KeyManagerSettings) -> None:
        super().__init__(settings)
        self.topology = load_topology(settings.topology)
        self.guard = ReplayGuard(settings.command_window_s)
        self.keys: KeyDistribution | None = None
        self.mirrors = MirrorLedger()
        self.mirror_specs: list[MirrorSpec] = []
        self.counts = {"commands": 0, "commands_refused": 0}
        self.runtime.on_start(self.start_keys)
        self.runtime.readiness = self.bucket_intact

    def bucket_intact(self) -> bool:
        """False while the last look at the keys bucket found it damaged (health reports not ready)."""
        return self.keys is None or self.keys.health.ready

    def detail(self) -> dict[str, object]:
        keys = self.keys
        out: dict[str, object] = {
            "security": "on" if self.settings.security else "off", **self.counts,
            "published": keys.published if keys else 0, "deleted": keys.deleted if keys else 0,
        }
        if keys is not None:
            auth = keys.authority
            out.update(
                identities=len(auth.publics),
                rotations=auth.rotations,
                revoked=",".join(sorted(auth.revoked)),
                versions=",".join(f"{r}:{v}" for r, v in auth.versions().items()),
                **self.mirrors.detail(), **keys.health.detail(),
            )
        return out

    async def start_keys(self) -> None:
        """Recover the keys from the bucket, publish everything, then rotate and expire on schedule."""
        if not self.settings.security:
            return
        issuer, store = load_issuer(self.settings, self.topology)
        bucket = KeysBucket(self.nc, store, self.settings.replicas_in(store.kv_domain))
        await bucket.open()
        authority = KeyAuthority(
            issuer, store.publics, self.topology, self.settings.policy,
            grace_s=self.settings.grace_s, revoke_grace_s=self.settings.revoke_grace_s,
        )
        authority.recover(await read_own_keys(self.nc, issuer, store))
        keys = KeyDistribution(authority, bucket, activation_delay_s=self.settings.activation_delay_s)
        created = await keys.publish_all()
        self.keys = keys
        self.log.info(
            "keys published: %d identities, %d readers (%d new), revoked: %s",
            len(authority.publics), len(authority.readers()), len(created),
            ", ".join(sorted(authority.revoked)) or "none",
        )
        self.mirror_specs = mirror_specs(self.topology, store.bucket)
        await self.start_mirrors()
        self.runtime.spawn(self.scheduled_rotation(), name="rotation")
        self.runtime.spawn(self.expiry(), name="expiry")
        self.runtime.spawn(self.mirror_upkeep(), name="mirrors")
        self.runtime.spawn(self.bucket_upkeep(), name="bucket")

    async def start_mirrors(self) -> None:
        """Give every reachable site its mirror, and give new ones a few seconds to catch up."""
        await self.keep_mirrors()
        deadline = time.monotonic() + MIRROR_START_WAIT_S
        catching_up = (MirrorState.CREATED, MirrorState.REPLACED, MirrorState.SYNCING)
        while any(s in catching_up for s in self.mirrors.states.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            await self.keep_mirrors()

    async def scheduled_rotation(self) -> None:
        """Rotate every reader's DEK each ``rotate_interval_s``."""
        while True:
            await asyncio.sleep(self.settings.rotate_interval_s)
            await self.keys.rotate(self.keys.authority.readers(), None)

    async def expiry(self) -> None:
        """Delete versions past their grace, checked each ``EXPIRY_INTERVAL_S``."""
        while True:
            await asyncio.sleep(EXPIRY_INTERVAL_S)
            await self.keys.expire()

    async def mirror_upkeep(self) -> None:
        """Look at every site's mirror each ``mirror_check_interval_s``."""
        while True:
            await asyncio.sleep(self.settings.mirror_check_interval_s)
            await self.keep_mirrors()

    async def bucket_upkeep(self) -> None:
        """Look at the keys bucket each ``bucket_check_interval_s``; repair what someone else changed."""
        while True:
            await asyncio.sleep(self.settings.bucket_check_interval_s)
            before = self.keys.health.last
            try:
                report = await self.keys.check()
            except Exception:  # noqa: BLE001 - one failed look must not end the upkeep
                self.log.exception("keys bucket look failed")
                continue
            if report.summary() != before:
                self.log.info("keys bucket: %s", report.summary())

    async def keep_mirrors(self) -> None:
        """Look at every site's mirror at once; create missing ones, replace foreign ones, record what was seen."""
        states = await asyncio.gather(*(self.keep_mirror(spec) for spec in self.mirror_specs))
        for spec, state in zip(self.mirror_specs, states, strict=True):
            before = self.mirrors.states.get(spec.site)
            self.mirrors.record(spec.site, state)
            if state != before:
                self.log.info("keys mirror at %s: %s", spec.site, state.value)

    async def keep_mirror(self, spec: MirrorSpec) -> MirrorState:
        """One site's mirror: look, then create or replace it (and its consumer at the hub) when ``judge`` says so."""
        site = self.nc.jetstream(domain=spec.site, timeout=MIRROR_CALL_TIMEOUT_S)
        hub = self.nc.jetstream(domain=self.topology.hub.name, timeout=MIRROR_CALL_TIMEOUT_S)
        seen = await look_at_mirror(site, hub, spec)
        state, action = judge(spec, seen)
        if action is MirrorAction.KEEP:
            return state
        try:
            if seen.exists:
                await site.delete_stream(spec.stream)
            with contextlib.suppress(NotFoundError):
                await hub.delete_consumer(spec.stream, spec.consumer)
            await hub.add_consumer(spec.stream, mirror_consumer_config(spec))
            await site.add_stream(mirror_config(spec, self.settings.replicas_in(spec.site)))
        except Exception as exc:  # noqa: BLE001 - reported in the health detail, tried again next look
            self.log.warning("keys mirror at %s: %s failed (%s)", spec.site, action.value, exc)
            return MirrorState.FAILED
        return state

    @endpoint("control", control_subject, publishes=("controlReply", KEYS_BUCKET_CHANNEL, Topics.DEAD_LETTER))
    async def on_control(self, msg: Msg) -> None:
        """An operator's signed key command: verify it, carry it out, answer with the keys now."""
        if not msg.reply:
            self.runtime.dead_letter(msg, "key command without a reply subject")
            return
        keys = self.keys
        if keys is None:
            await self.runtime.answer_error(msg.reply, DinError(ErrorCode.INTERNAL, "security is off: no keys"), None)
            return
        try:
            command = verify_key_command(msg.data, msg.headers, keys.authority.publics[OPERATOR], self.guard)
        except InvalidToken as refused:
            self.counts["commands_refused"] += 1
            self.log.warning("key command refused (%s)", refused.reason.value)
            await self.runtime.answer_error(msg.reply, refused, None)
            return
        self.counts["commands"] += 1
        try:
            if command.action == KeyAction.STATUS:
                await keys.check()
            message = await run_command(command, keys, revoke_grace_s=self.settings.revoke_grace_s)
        except DinError as error:
            await self.runtime.answer_error(msg.reply, error, None)
            return
        if command.action == KeyAction.REVOKE:
            self.log.warning("revoked %s", command.principal)
        result = command_result(command, keys.authority, message, keys.health)
        await self.nc.publish(msg.reply, result.model_dump_json().encode())



def load_issuer(settings: KeyManagerSettings, topology: Topology) -> tuple[Identity, KeyStore]:
    """The key manager's own identity, unwrapped from the key store with the master key, and the store."""
    master = read_master_key(settings.master_key_file)
    store = KeyStore.load(settings.keystore)
    missing = [p for p in principals_of(topology) if p not in store.publics]
    if missing:
        raise ValueError(f"keystore {settings.keystore} has no identity for {missing[0]}: rerun `din keys init`")
    return store.identity(KEYMANAGER, master), store


class KeysBucket:
    """The keys bucket at the hub's JetStream, as ``KeyDistribution`` writes and looks at it (``Bucket``)."""

    def __init__(self, nc: NatsClient, store: KeyStore, replicas: int = 1) -> None:
        self.js = nc.jetstream(domain=store.kv_domain, timeout=BUCKET_CALL_TIMEOUT_S)
        self.name = store.bucket
        self.stream = keys_stream(store.bucket)
        self.replicas = replicas
        self.kv: KeyValue | None = None
        self.last_seq = 0

    async def open(self) -> KeyValue:
        """The bucket, created on first start (``replicas`` times in a clustered hub)."""
        try:
            self.kv = await self.js.key_value(self.name)
        except BucketNotFoundError:
            await self.recreate()
        return self.kv

    async def recreate(self) -> None:
        """Create the bucket, its sequence going on after the last one written (a watch that outlived the old
        bucket resumes past what it saw, so it must find the new entries there)."""
        await self.js.add_stream(keys_bucket_config(self.name, self.replicas, first_seq=self.last_seq + 1))
        self.kv = await self.js.key_value(self.name)

    async def put(self, key: str, value: bytes) -> int:
        seq = await self.kv.put(key, value)
        self.last_seq = max(self.last_seq, seq)
        return seq

    async def delete(self, key: str) -> None:
        await self.kv.delete(key)

    async def put_sequenced(self, key: str, value_at: Callable[[int], bytes]) -> tuple[int, bytes]:
        """Publish ``value_at(n)`` with ``Nats-Expected-Last-Sequence: n - 1``: stored at ``n`` or not at all
        (tried again, a few times, when another write came in between)."""
        for _ in range(SEQUENCED_TRIES):
            last = (await self.js.stream_info(self.stream)).state.last_seq
            value = value_at(last + 1)
            try:
                ack = await self.js.publish(f"$KV.{self.name}.{key}", value,
                                            headers={"Nats-Expected-Last-Sequence": str(last)})
            except BadRequestError as exc:
                if exc.err_code != WRONG_LAST_SEQUENCE:
                    raise
                continue
            self.last_seq = max(self.last_seq, ack.seq)
            return ack.seq, value
        raise RuntimeError(f"{key}: the keys bucket kept moving under {SEQUENCED_TRIES} sequenced writes")

    async def snapshot(self) -> Mapping[str, Seen] | None:
        """Every live entry, read through one ordered consumer up to the end of the content (None: no bucket)."""
        try:
            self.kv = await self.js.key_value(self.name)
        except BucketNotFoundError:
            return None
        watcher, end = await watch_content(self.kv)
        seen: dict[str, Seen] = {}
        try:
            while end:
                entry = await watcher.updates(timeout=BUCKET_CALL_TIMEOUT_S)
                if entry is None:
                    continue
                if entry.operation in ("DEL", "PURGE"):
                    seen.pop(entry.key, None)
                else:
                    seen[entry.key] = Seen(entry.value or b"", entry.revision)
                if entry.revision >= end:
                    break
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()
        return seen


def keys_bucket_config(bucket: str, replicas: int = 1, first_seq: int | None = None) -> StreamConfig:
    """The keys bucket's stream, as nats.py's ``create_key_value`` makes one (``KEYS_HISTORY`` values a key),
    starting at ``first_seq``."""
    return StreamConfig(
        name=keys_stream(bucket), subjects=[f"$KV.{bucket}.>"],
        description="DIN public identities, wrapped data keys, revocations, crypto policy, manifest",
        max_msgs_per_subject=KEYS_HISTORY, discard=DiscardPolicy.NEW, allow_rollup_hdrs=True, deny_delete=True,
        allow_direct=True, storage=StorageType.FILE, num_replicas=replicas, first_seq=first_seq,
    )


def mirror_consumer_config(spec: MirrorSpec) -> ConsumerConfig:
    """The durable consumer of the hub's keys stream that feeds ``spec``'s site: every entry from the start, on
    the site's own subject, acknowledged by the mirror's flow control; the site's server resets it after a cut."""
    return ConsumerConfig(
        name=spec.consumer, durable_name=spec.consumer, deliver_subject=spec.deliver_subject,
        deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.FLOW_CONTROL, idle_heartbeat=MIRROR_HEARTBEAT_S,
        description=f"feeds the keys mirror at {spec.site}",
    )


def mirror_config(spec: MirrorSpec, replicas: int = 1) -> StreamConfig:
    """A site's mirror: a stream named like the hub's keys stream, fed by the site's consumer there across the
    leaf, read like a key-value bucket (one value per key, as the origin keeps)."""
    return StreamConfig(
        name=spec.stream,
        description="DIN keys bucket mirrored from the hub (written only there, by the key manager)",
        mirror=StreamSource(name=spec.stream, external=ExternalStream(api=spec.origin_api),
                            consumer=StreamConsumerSource(name=spec.consumer, deliver_subject=spec.deliver_subject)),
        max_msgs_per_subject=KEYS_HISTORY, discard=DiscardPolicy.NEW, allow_rollup_hdrs=True, deny_delete=True,
        allow_direct=True, storage=StorageType.FILE, num_replicas=replicas,
    )


async def look_at_mirror(site, hub, spec: MirrorSpec) -> MirrorSeen:
    """Ask ``spec``'s site's JetStream about its mirror, and the hub's about the site's consumer (False when it
    is gone or no longer delivers to the site's subject as the key manager made it)."""
    try:
        info = await site.stream_info(spec.stream)
    except NotFoundError:
        return MirrorSeen(reachable=True)
    except Exception:  # noqa: BLE001 - no answer from that site's JetStream: cut off or down
        return MirrorSeen(reachable=False)
    try:
        feed = (await hub.consumer_info(spec.stream, spec.consumer)).config
        consumer = (feed.deliver_subject, feed.ack_policy) == (spec.deliver_subject, AckPolicy.FLOW_CONTROL)
    except NotFoundError:
        consumer = False
    except Exception:  # noqa: BLE001 - the hub did not say: leave the mirror be
        consumer = None
    return mirror_seen(info, consumer)


def mirror_seen(info: StreamInfo, consumer: bool | None = True) -> MirrorSeen:
    """What a site's stream info (and whether the hub holds the site's consumer) says about it as a mirror."""
    source = info.config.mirror
    external = source.external if source else None
    feed = source.consumer if source else None
    state = info.mirror
    active = state.active if state is not None else None
    return MirrorSeen(
        reachable=True, exists=True, source=source.name if source else None,
        origin_api=external.api if external else None, consumer_name=feed.name if feed else None,
        deliver_subject=feed.deliver_subject if feed else None, lag=(state.lag or 0) if state is not None else 0,
        idle_s=None if active is None or active < 0 else active / 1e9, consumer=consumer,
    )


async def read_own_keys(nc: NatsClient, issuer: Identity, store: KeyStore) -> KeyAgent:
    """What the bucket holds, read as the key manager's own agent (the DEKs it wrapped to itself)."""
    own = KeyAgent(PrincipalKeys(issuer, issuer.public, store.bucket, store.kv_domain))
    await own.watch(nc, timeout_s=RECOVERY_TIMEOUT_S, site_first=False, unanchored=True)
    await own.stop()
    return own


def create_runtime(settings: KeyManagerSettings):
    """Build the key manager service (its runtime, for launchers that start runtimes)."""
    return KeyManager(settings).runtime
