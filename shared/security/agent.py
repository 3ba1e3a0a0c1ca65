"""The key agent: one principal's view of the ``DIN_KEYS`` bucket, fed by a JetStream watch.

An agent reads the bucket where its own server keeps it: at the hub the bucket itself, at any other site that
site's mirror of it (kept by the key manager), so a process started while its site is cut off from the hub still
gets its keys. While a site has no mirror yet, the agent reads the hub's bucket across the leaf, and moves to the
mirror once there is one. Either way every entry must verify under the key manager's key and be no older than what
the agent holds.

A process that just started holds nothing yet, so the bucket's signed ``manifest`` (``Manifest``) is its floor: the
agent applies no other entry before it holds a manifest read at the stream sequence it was signed for, then refuses
any entry older than the manifest lists for its key, or absent from a manifest newer than it (a deleted DEK
re-published), and takes every manifest's revocations, so neither an old entry nor an old manifest written back
into the bucket undoes a revocation or a rotation. Each refusal is counted by reason (``refusals``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum

from din.shared import envelope
from din.shared.envelope import InvalidToken, Keyring, PathPolicy, PublicIdentity
from din.shared.security import b64url
from din.shared.security.bucket import EntryKeys, Manifest, read_entry, read_manifest, watch_content
from din.shared.security.keyfiles import PrincipalKeys
from din.shared.security.principals import TenantSites

log = logging.getLogger(__name__)

AGENT_GRACE_S = 24 * 3600.0
"""A keyring's default grace; the key manager's ``not_after`` normally retires old versions much sooner."""
SITE_SOURCE = "site"
HUB_SOURCE = "hub"
SITE_LOOK_S = 2.0
"""How often an agent reading the hub's bucket looks for its site's mirror (created after the agent started)."""


class Refused(StrEnum):
    """Why the agent refused a bucket entry (its ``refusals`` counter keys)."""

    INVALID = "invalid"
    """Does not verify under the key manager's key (garbage, unsigned, forged, or a manifest off its sequence)."""
    STALE = "stale"
    """Older than what the agent holds, or than the manifest lists for that key."""
    WITHDRAWN = "withdrawn"
    """Absent from a manifest newer than it: the key manager deleted that entry."""


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
        self.sites: TenantSites | None = None
        """A tenant's agent: where its requests may be served (None until the key manager says)."""
        self.deks: dict[tuple[str, int], DekState] = {}
        self.applied = 0
        self.refused = 0
        self.refusals: Counter[str] = Counter()
        self.manifest: Manifest | None = None
        """The newest manifest read (None until one verified: nothing else is applied before)."""
        self._issued: dict[str, int] = {}
        self._pending: dict[str, tuple[bytes, int | None]] = {}
        self._unanchored = False
        self._changed: asyncio.Condition | None = None
        self._watcher = None
        self._task: asyncio.Task | None = None
        self._mover: asyncio.Task | None = None
        self._initial = False
        self.source: str | None = None

    # -- pure logic

    def apply(self, key: str, value: bytes, *, deleted: bool = False, revision: int | None = None) -> bool:
        """Apply one bucket entry read at stream sequence ``revision``; return True when it changed what this agent
        knows. Before the first manifest, entries are kept and applied once it arrives."""
        if deleted:
            return False
        if key == EntryKeys.MANIFEST:
            return self._apply_manifest(value, revision)
        kind, _, rest = key.partition(".")
        if kind in ("dek", "sites") and rest.split(".", 1)[0] != self.principal:
            return False
        manifest = self.manifest
        if manifest is None and not self._unanchored:
            self._pending.pop(key, None)
            self._pending[key] = (value, revision)
            return False
        try:
            body = read_entry(value, key, self.keys.keymanager)
            issued = body["issued_ms"]
            listed = manifest.floor(key) if manifest is not None else None
            if issued < self._issued.get(key, -1) or (listed is not None and issued < listed):
                return self._refuse(key, Refused.STALE)
            if manifest is not None and listed is None and issued <= manifest.issued_ms:
                return self._refuse(key, Refused.WITHDRAWN)
            if kind == "pub":
                self._apply_public(rest, body)
            elif kind == "dek":
                self._apply_dek(rest, body)
            elif kind == "sites":
                self.sites = TenantSites.from_dict(body)
            elif key == EntryKeys.REVOKED:
                self._apply_revoked(body["principals"])
            elif key == EntryKeys.POLICY:
                self.policy = PathPolicy(integrity_only=frozenset(str(s) for s in body["integrity_only"]))
                self.plaintext_ingress = frozenset(str(t) for t in body["plaintext_ingress"])
            else:
                return False
        except (InvalidToken, ValueError, KeyError, TypeError, IndexError) as exc:
            return self._refuse(key, Refused.INVALID, getattr(exc, "reason", exc.__class__.__name__))
        self._issued[key] = issued
        self.applied += 1
        self.keyring.prune()
        return True

    def _apply_manifest(self, value: bytes, revision: int | None) -> bool:
        try:
            manifest = read_manifest(value, revision, self.keys.keymanager)
        except InvalidToken as exc:
            return self._refuse(EntryKeys.MANIFEST, Refused.INVALID, exc.reason)
        if self.manifest is not None and manifest.issued_ms <= self.manifest.issued_ms:
            return manifest.issued_ms == self.manifest.issued_ms or self._refuse(EntryKeys.MANIFEST, Refused.STALE)
        self.manifest = manifest
        self._apply_revoked(manifest.revoked)
        self.applied += 1
        pending, self._pending = self._pending, {}
        for key, (held, at) in pending.items():
            self.apply(key, held, revision=at)
        return True

    def _refuse(self, key: str, reason: str, detail: object = None) -> bool:
        self.refused += 1
        self.refusals[reason] += 1
        log.warning("key entry %s refused (%s%s)", key, reason, f": {detail}" if detail else "")
        return False

    def apply_unanchored(self) -> None:
        """Apply the entries kept for want of a manifest, checked only against their signatures and each other,
        and so every later one until a manifest arrives (the key manager recovering from a bucket that holds no
        manifest: its first start, or a bucket emptied while it was down)."""
        self._unanchored = True
        pending, self._pending = self._pending, {}
        for key, (held, at) in pending.items():
            self.apply(key, held, revision=at)

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

    def _apply_revoked(self, listed: Iterable[str]) -> None:
        principals = frozenset(str(p) for p in listed)
        for principal in principals - self.revoked:
            self.keyring.revoke(principal)
        self.revoked = self.revoked | principals

    def latest_issued_ms(self) -> int:
        """The newest ``issued_ms`` this agent applied (manifest included); -1 before any."""
        held = max(self._issued.values(), default=-1)
        return max(held, self.manifest.issued_ms if self.manifest is not None else -1)

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
        self, nc, *, ready: Callable[[KeyAgent], bool] | None = None, timeout_s: float = 60.0,
        site_first: bool = True, unanchored: bool = False,
    ) -> None:
        """Watch the bucket and return once its current content is applied and ``ready(self)`` holds.

        With ``site_first`` (the default) the bucket is read from the JetStream of the server ``nc`` is connected
        to when it holds one (its site's mirror), else from the hub's domain; without, from the hub's only (the
        key manager recovering what it wrote). ``source`` says which: ``site`` or ``hub``. Raises
        ``TimeoutError`` with a one-line message when either does not happen in ``timeout_s``. An agent that
        starts on the hub's bucket with ``site_first`` moves to its site's mirror when one appears.

        The current content is applied once it holds a verified manifest; with ``unanchored`` (the key manager
        recovering), a bucket without one is applied on signatures alone (``apply_unanchored``).
        """
        self._changed = asyncio.Condition()
        deadline = time.monotonic() + timeout_s
        self.source, bucket = await self._open_bucket(nc, site_first, deadline, timeout_s)
        await self._follow_bucket(bucket)
        if site_first and self.source == HUB_SOURCE and self.keys.kv_domain is not None:
            self._mover = asyncio.create_task(self._move_to_site(nc), name=f"keys-{self.principal}-site")
        try:
            await asyncio.wait_for(self._wait(lambda: self._initial), max(0.1, deadline - time.monotonic()))
            if unanchored and self.manifest is None:
                self.apply_unanchored()
            await asyncio.wait_for(
                self._wait(lambda: (self.manifest is not None or self._unanchored) and (ready is None or ready(self))),
                max(0.1, deadline - time.monotonic()))
        except TimeoutError:
            raise TimeoutError(
                f"{self.principal}: keys not distributed within {timeout_s:.0f}s: is the key manager running?"
            ) from None

    async def _open_bucket(self, nc, site_first: bool, deadline: float, timeout_s: float):
        """The first place holding the bucket, site before hub, retried until ``deadline``."""
        places = [(SITE_SOURCE, None)] if site_first and self.keys.kv_domain is not None else []
        places.append((HUB_SOURCE, self.keys.kv_domain))
        while True:
            failures = []
            for source, domain in places:
                try:
                    return source, await nc.jetstream(domain=domain).key_value(self.keys.bucket)
                except Exception as exc:  # noqa: BLE001 - no bucket (mirror) or no JetStream there: next place
                    failures.append(f"{source}: {exc.__class__.__name__}")
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"keys bucket {self.keys.bucket} not reachable within {timeout_s:.0f}s"
                    f" ({', '.join(failures)}): is the key manager running?"
                )
            await asyncio.sleep(0.2)

    async def _wait(self, predicate: Callable[[], bool]) -> None:
        async with self._changed:
            await self._changed.wait_for(predicate)

    async def wait_until(self, predicate: Callable[[KeyAgent], bool], timeout_s: float) -> None:
        """Wait until ``predicate(self)`` holds (e.g. a new version arrived); raise ``TimeoutError`` otherwise."""
        await asyncio.wait_for(self._wait(lambda: predicate(self)), timeout_s)

    async def _follow_bucket(self, bucket) -> None:
        """Watch ``bucket`` from now on (stopping the watch of another), keeping everything already applied."""
        watcher, end = await watch_content(bucket)
        old_watcher, old_task = self._watcher, self._task
        self._watcher = watcher
        self._task = asyncio.create_task(self._follow(watcher, end), name=f"keys-{self.principal}")
        if old_watcher is not None:
            with contextlib.suppress(Exception):
                await old_watcher.stop()
        if old_task is not None:
            old_task.cancel()
            await asyncio.gather(old_task, return_exceptions=True)

    async def _move_to_site(self, nc) -> None:
        """Look for the site's mirror every ``SITE_LOOK_S``; once there, watch it instead of the hub's bucket."""
        while True:
            await asyncio.sleep(SITE_LOOK_S)
            try:
                bucket = await nc.jetstream().key_value(self.keys.bucket)
            except Exception:  # noqa: BLE001 - no mirror yet
                continue
            await self._follow_bucket(bucket)
            self.source = SITE_SOURCE
            log.info("%s: keys now read from this site's mirror", self.principal)
            return

    async def _follow(self, watcher, end: int) -> None:
        """Apply every entry ``watcher`` delivers; the bucket's content is in once the entry at ``end`` is."""
        if not end:
            self._initial = True
        async for entry in watcher:
            if entry is None:
                continue
            try:
                self.apply(entry.key, entry.value or b"", deleted=entry.operation in ("DEL", "PURGE"),
                           revision=entry.revision)
            except Exception:  # noqa: BLE001 - one bad entry must not stop key distribution
                self.refused += 1
                log.exception("key entry %s could not be applied", entry.key)
            if entry.revision >= end:
                self._initial = True
            async with self._changed:
                self._changed.notify_all()

    async def stop(self) -> None:
        """Stop watching; the keys already installed stay usable."""
        if self._mover is not None:
            self._mover.cancel()
            await asyncio.gather(self._mover, return_exceptions=True)
        if self._watcher is not None:
            with contextlib.suppress(Exception):
                await self._watcher.stop()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._watcher = self._task = self._mover = None
