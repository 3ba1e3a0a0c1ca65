"""The key agent: one principal's view of the ``DIN_KEYS`` bucket, fed by a JetStream watch."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from shared import envelope
from shared.envelope import InvalidToken, Keyring, PathPolicy, PublicIdentity
from shared.security import b64url
from shared.security.bucket import EntryKeys, read_entry
from shared.security.keyfiles import PrincipalKeys

log = logging.getLogger(__name__)

AGENT_GRACE_S = 24 * 3600.0
"""A keyring's default grace; the key manager's ``not_after`` normally retires old versions much sooner."""


@dataclass
class DekState:
    """What a holder knows of one DEK version: whether it seals yet and until when it opens."""

    active: bool
    not_after: float | None


class KeyAgent:
    """One principal's view of the keys bucket: its DEKs (in a ``Keyring``), public identities, revocations, policy.

    ``apply`` is the whole logic and knows no NATS; ``watch`` feeds it from the
    bucket. Entries that do not verify are counted in ``refused`` and ignored.
    """

    def __init__(self, keys: PrincipalKeys, *, clock: Callable[[], float] = time.time) -> None:
        self.keys = keys
        self.principal = keys.principal
        self.keyring = Keyring(grace_s=AGENT_GRACE_S, clock=clock)
        self.clock = clock
        self.publics: dict[str, PublicIdentity] = {keys.keymanager.name: keys.keymanager}
        self.revoked: frozenset[str] = frozenset()
        self.policy: PathPolicy | None = None
        self.plaintext_ingress: frozenset[str] = frozenset()
        self.deks: dict[tuple[str, int], DekState] = {}
        self.applied = 0
        self.refused = 0
        self._issued: dict[str, int] = {}
        self._changed: asyncio.Condition | None = None
        self._watcher = None
        self._task: asyncio.Task | None = None
        self._initial = False

    # -- pure logic

    def apply(self, key: str, value: bytes, *, deleted: bool = False) -> bool:
        """Apply one bucket entry; return True when it changed what this agent knows."""
        if deleted:
            return False
        kind, _, rest = key.partition(".")
        if kind == "dek" and rest.split(".", 1)[0] != self.principal:
            return False
        try:
            body = read_entry(value, key, self.keys.keymanager)
            issued = body["issued_ms"]
            if issued < self._issued.get(key, -1):
                return False
            if kind == "pub":
                self._apply_public(rest, body)
            elif kind == "dek":
                self._apply_dek(rest, body)
            elif key == EntryKeys.REVOKED:
                self._apply_revoked(body)
            elif key == EntryKeys.POLICY:
                self.policy = PathPolicy(integrity_only=frozenset(str(s) for s in body["integrity_only"]))
                self.plaintext_ingress = frozenset(str(t) for t in body["plaintext_ingress"])
            else:
                return False
        except (InvalidToken, ValueError, KeyError, TypeError, IndexError) as exc:
            self.refused += 1
            log.warning("key entry %s refused (%s)", key, getattr(exc, "reason", exc.__class__.__name__))
            return False
        self._issued[key] = issued
        self.applied += 1
        self.keyring.prune()
        return True

    def _apply_public(self, principal: str, body: dict) -> None:
        public = PublicIdentity.from_dict(body["identity"])
        if public.name != principal:
            raise ValueError("public identity under another name")
        self.publics[principal] = public

    def _apply_dek(self, rest: str, body: dict) -> None:
        _, reader, version_text = rest.split(".")
        wrapped = b64url.decode(body["wrapped"])
        dek = envelope.unwrap_dek(self.keys.identity, wrapped, issuer_public=self.keys.keymanager)
        if dek.reader != reader or dek.version != int(version_text):
            raise ValueError("wrapped key under another name")
        active = bool(body["active"])
        not_after = body.get("not_after")
        now = self.clock()
        if not_after is not None and now > float(not_after):
            self.deks.pop((reader, dek.version), None)
            with contextlib.suppress(KeyError):
                self.keyring.retire(reader, dek.version, grace_s=0, now=float(not_after))
            return
        self.keyring.install(dek, activate=active and not_after is None)
        if not_after is not None:
            self.keyring.retire(reader, dek.version, now=now, grace_s=float(not_after) - now)
        self.deks[(reader, dek.version)] = DekState(active, None if not_after is None else float(not_after))

    def _apply_revoked(self, body: dict) -> None:
        principals = frozenset(str(p) for p in body["principals"])
        for principal in principals - self.revoked:
            self.keyring.revoke(principal)
        self.revoked = self.revoked | principals

    def ready_for(self, readers: Iterable[str]) -> bool:
        """True once the policy is known and every one of ``readers`` has a DEK that seals."""
        return self.policy is not None and all(self.keyring.current_version(r) is not None for r in readers)

    def integrity_allowed(self, site: str | None) -> bool:
        """True when the policy lets the link between the hub and ``site`` carry integrity-only payloads."""
        return site is not None and self.policy is not None and not self.policy.confidential(site)

    def sign(self, payload: bytes, headers: Mapping[str, str]) -> str:
        """This principal's Ed25519 signature over ``payload`` and ``headers``."""
        return envelope.sign_result(self.keys.identity, payload, headers)

    def versions(self) -> dict[str, int]:
        """The sealing version of each reader held."""
        readers = {reader for reader, _ in self.deks}
        return {r: v for r in sorted(readers) if (v := self.keyring.current_version(r)) is not None}

    # -- NATS

    async def watch(
        self, nc, *, ready: Callable[[KeyAgent], bool] | None = None, timeout_s: float = 60.0
    ) -> None:
        """Watch the bucket and return once its current content is applied and ``ready(self)`` holds.

        Raises ``TimeoutError`` with a one-line message when either does not happen in ``timeout_s``.
        """
        self._changed = asyncio.Condition()
        deadline = time.monotonic() + timeout_s
        js = nc.jetstream(domain=self.keys.kv_domain)
        while True:
            try:
                bucket = await js.key_value(self.keys.bucket)
                break
            except Exception as exc:  # noqa: BLE001 - no bucket or no JetStream yet: retry until the deadline
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"keys bucket {self.keys.bucket} not reachable within {timeout_s:.0f}s"
                        f" ({exc.__class__.__name__}): is the key manager running?"
                    ) from None
                await asyncio.sleep(0.2)
        self._watcher = await bucket.watchall()
        self._task = asyncio.create_task(self._follow(), name=f"keys-{self.principal}")
        try:
            await asyncio.wait_for(self._wait(lambda: self._initial and (ready is None or ready(self))),
                                   max(0.1, deadline - time.monotonic()))
        except TimeoutError:
            raise TimeoutError(
                f"{self.principal}: keys not distributed within {timeout_s:.0f}s: is the key manager running?"
            ) from None

    async def _wait(self, predicate: Callable[[], bool]) -> None:
        async with self._changed:
            await self._changed.wait_for(predicate)

    async def wait_until(self, predicate: Callable[[KeyAgent], bool], timeout_s: float) -> None:
        """Wait until ``predicate(self)`` holds (e.g. a new version arrived); raise ``TimeoutError`` otherwise."""
        await asyncio.wait_for(self._wait(lambda: predicate(self)), timeout_s)

    async def _follow(self) -> None:
        async for entry in self._watcher:
            if entry is not None:
                try:
                    self.apply(entry.key, entry.value or b"", deleted=entry.operation in ("DEL", "PURGE"))
                except Exception:  # noqa: BLE001 - one bad entry must not stop key distribution
                    self.refused += 1
                    log.exception("key entry %s could not be applied", entry.key)
            else:
                self._initial = True
            async with self._changed:
                self._changed.notify_all()

    async def stop(self) -> None:
        """Stop watching; the keys already installed stay usable."""
        if self._watcher is not None:
            with contextlib.suppress(Exception):
                await self._watcher.stop()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._watcher = self._task = None
