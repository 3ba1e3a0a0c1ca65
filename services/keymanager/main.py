"""Key manager's front door: identities and data keys out through the ``DIN_KEYS`` bucket, rotation, revocation.

At start it unwraps its own identity from the key store with the master key,
creates the bucket at the hub's JetStream, recovers the DEK versions it wrapped to
itself there, gives every reader without one a first version and publishes
everything (``KeyAuthority.publication``). Then it rotates every DEK on schedule,
deletes versions whose grace has passed, and answers signed operator commands
(rotate, revoke, status) on ``din.v1.control.keymanager.keymanager``.
"""

from __future__ import annotations

import asyncio

from nats.aio.msg import Msg
from nats.js.api import KeyValueConfig, StorageType

from services.keymanager.authority import Entry, KeyAuthority
from services.keymanager.settings import KeyManagerSettings
from shared.contracts.keys import KeyAction, KeyCommandResultV1, KeyCommandV1
from shared.envelope import InvalidToken, ReplayGuard
from shared.errors import DinError, ErrorCode
from shared.naming import Subjects
from shared.runtime import ServiceRuntime
from shared.security import (
    KEYMANAGER,
    OPERATOR,
    KeyAgent,
    KeyStore,
    PrincipalKeys,
    principals_of,
    read_master_key,
    verify_key_command,
)
from shared.topology import load_topology

EXPIRY_INTERVAL_S = 1.0


def create_runtime(settings: KeyManagerSettings) -> ServiceRuntime:
    """Build the key manager service."""
    runtime = ServiceRuntime("keymanager", settings)
    topology = load_topology(settings.topology)
    state: dict[str, object] = {"authority": None, "bucket": None}
    counts = {"commands": 0, "commands_refused": 0, "published": 0, "deleted": 0}
    guard = ReplayGuard(settings.command_window_s)
    lock = asyncio.Lock()

    def authority() -> KeyAuthority:
        return state["authority"]

    def detail() -> dict[str, object]:
        out: dict[str, object] = {"security": "on" if settings.security else "off", **counts}
        if state["authority"] is not None:
            auth = authority()
            out.update(
                identities=len(auth.publics),
                rotations=auth.rotations,
                revoked=",".join(sorted(auth.revoked)),
                versions=",".join(f"{r}:{v}" for r, v in auth.versions().items()),
            )
        return out

    runtime.detail = detail

    async def put(entries: list[Entry]) -> None:
        bucket = state["bucket"]
        for key, value in entries:
            await bucket.put(key, value)
        counts["published"] += len(entries)

    async def delete(keys: list[str]) -> None:
        bucket = state["bucket"]
        for key in keys:
            await bucket.delete(key)
        counts["deleted"] += len(keys)

    async def rotate(readers: list[str], grace_s: float | None) -> None:
        """Two-phase rotation of ``readers``: distribute new versions, wait, then seal with them."""
        async with lock:
            started = []
            for reader in readers:
                version, entries = authority().begin_rotation(reader)
                await put(entries)
                started.append((reader, version))
            await asyncio.sleep(settings.activation_delay_s)
            for reader, version in started:
                await put(authority().activate(reader, version, grace_s))

    async def revoke(principal: str) -> None:
        async with lock:
            entries, held, gone = authority().revoke(principal)
            await put(entries)
            await delete(gone)
        await rotate(held, settings.revoke_grace_s)

    @runtime.on_start
    async def start_keys() -> None:
        if not settings.security:
            return
        master = read_master_key(settings.master_key_file)
        store = KeyStore.load(settings.keystore)
        missing = [p for p in principals_of(topology) if p not in store.publics]
        if missing:
            raise ValueError(f"keystore {settings.keystore} has no identity for {missing[0]}: rerun `din keys init`")
        issuer = store.identity(KEYMANAGER, master)
        js = runtime.nc.jetstream(domain=store.kv_domain)
        try:
            bucket = await js.key_value(store.bucket)
        except Exception:  # noqa: BLE001 - first start: create it
            bucket = await js.create_key_value(
                KeyValueConfig(bucket=store.bucket, history=1, storage=StorageType.FILE,
                               description="DIN public identities, wrapped data keys, revocations, crypto policy")
            )
        state["bucket"] = bucket
        auth = KeyAuthority(
            issuer, store.publics, topology, settings.policy,
            grace_s=settings.grace_s, revoke_grace_s=settings.revoke_grace_s,
        )
        own = KeyAgent(PrincipalKeys(issuer, issuer.public, store.bucket, store.kv_domain))
        await own.watch(runtime.nc, timeout_s=30.0)
        await own.stop()
        auth.recover(own)
        state["authority"] = auth
        for reader, version in auth.pending():
            auth.activate(reader, version)
        created = auth.ensure_current()
        await put(auth.publication())
        runtime.log.info(
            "keys published: %d identities, %d readers (%d new), revoked: %s",
            len(auth.publics), len(auth.readers()), len(created), ", ".join(sorted(auth.revoked)) or "none",
        )
        runtime.spawn(scheduled_rotation(), name="rotation")
        runtime.spawn(expiry(), name="expiry")

    async def scheduled_rotation() -> None:
        while True:
            await asyncio.sleep(settings.rotate_interval_s)
            await rotate(authority().readers(), None)

    async def expiry() -> None:
        while True:
            await asyncio.sleep(EXPIRY_INTERVAL_S)
            async with lock:
                await delete(authority().expire())

    def result(command: KeyCommandV1, message: str) -> KeyCommandResultV1:
        auth = authority()
        return KeyCommandResultV1(action=command.action, versions=auth.versions(), revoked=sorted(auth.revoked),
                                  rotations=auth.rotations, message=message)

    @runtime.hot_path(Subjects.control("keymanager", runtime.instance))
    async def on_command(msg: Msg) -> None:
        if not msg.reply:
            runtime.dead_letter(msg, "key command without a reply subject")
            return
        if state["authority"] is None:
            await runtime.answer_error(msg.reply, DinError(ErrorCode.INTERNAL, "security is off: no keys"), None)
            return
        try:
            command = verify_key_command(msg.data, msg.headers, authority().publics[OPERATOR], guard)
        except InvalidToken as refused:
            counts["commands_refused"] += 1
            runtime.log.warning("key command refused (%s)", refused.reason.value)
            await runtime.answer_error(msg.reply, refused, None)
            return
        counts["commands"] += 1
        try:
            if command.action == KeyAction.ROTATE:
                readers = [command.reader] if command.reader else authority().readers()
                if any(r not in authority().records for r in readers):
                    raise DinError(ErrorCode.BAD_REQUEST, f"unknown reader {command.reader!r}")
                await rotate(readers, command.grace_s)
                message = f"rotated {len(readers)} data keys"
            elif command.action == KeyAction.REVOKE:
                if not command.principal:
                    raise DinError(ErrorCode.BAD_REQUEST, "revoke needs a principal")
                try:
                    await revoke(command.principal)
                except KeyError:
                    raise DinError(ErrorCode.BAD_REQUEST, f"unknown principal {command.principal!r}") from None
                runtime.log.warning("revoked %s", command.principal)
                message = f"revoked {command.principal}"
            else:
                message = "status"
        except DinError as error:
            await runtime.answer_error(msg.reply, error, None)
            return
        await runtime.nc.publish(msg.reply, result(command, message).model_dump_json().encode())

    return runtime
