"""Keys out through the bucket: rotation, revocation and expiry carried out as bucket writes.

``KeyDistribution`` puts what ``KeyAuthority`` decides into the keys bucket, one
operation at a time (a lock keeps a scheduled rotation, an operator's command,
the expiry sweep and the bucket check from interleaving), and ends every operation
with a new manifest, signed for the stream sequence it is stored at. It remembers
the last value it wrote under each key, so ``check`` can tell what someone else
changed and write it back. The bucket is a ``Bucket`` (a JetStream key-value bucket
in the service), so this module knows no NATS.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Protocol

from din.services.keymanager.authority import Entry, KeyAuthority
from din.services.keymanager.integrity import BucketHealth, BucketReport, Damage, Seen, judge_bucket
from din.shared.security import EntryKeys
from din.shared.security.bucket import entry_issued_ms

log = logging.getLogger(__name__)


class Bucket(Protocol):
    """The part of a key-value bucket the distribution writes with and looks at."""

    async def put(self, key: str, value: bytes) -> object: ...

    async def delete(self, key: str) -> object: ...

    async def put_sequenced(self, key: str, value_at: Callable[[int], bytes]) -> tuple[int, bytes]:
        """Store ``value_at(seq)`` under ``key`` as stream sequence ``seq`` (the next one); return both."""
        ...

    async def snapshot(self) -> Mapping[str, Seen] | None:
        """Every live entry (None: there is no bucket)."""
        ...

    async def recreate(self) -> None:
        """Create the bucket again, empty."""
        ...


class KeyDistribution:
    """The key manager's writes: every entry ``authority`` returns goes to ``bucket``, in order."""

    def __init__(self, authority: KeyAuthority, bucket: Bucket, *, activation_delay_s: float) -> None:
        self.authority = authority
        self.bucket = bucket
        self.activation_delay_s = activation_delay_s
        self.published = 0
        self.deleted = 0
        self.written: dict[str, bytes] = {}
        """The last value written under each live key, in the order written (the manifest's included)."""
        self.manifest_seq: int | None = None
        self.health = BucketHealth()
        self._lock = asyncio.Lock()

    async def publish_all(self) -> list[str]:
        """Finish rotations a restart cut short, give every reader a first version, publish everything.

        Returns the readers that got a first version.
        """
        for reader, version in self.authority.pending():
            self.authority.activate(reader, version)
        created = self.authority.ensure_current()
        async with self._lock:
            await self._put(self.authority.publication())
            await self._seal()
        return created

    async def rotate(self, readers: list[str], grace_s: float | None) -> None:
        """Two-phase rotation of ``readers``: distribute new versions, wait, then seal with them."""
        async with self._lock:
            started = []
            for reader in readers:
                version, entries = self.authority.begin_rotation(reader)
                await self._put(entries)
                started.append((reader, version))
            await self._seal()
            await asyncio.sleep(self.activation_delay_s)
            for reader, version in started:
                await self._put(self.authority.activate(reader, version, grace_s))
            await self._seal()

    async def revoke(self, principal: str, grace_s: float) -> None:
        """Refuse ``principal``, delete its wrapped keys, and rotate what it held (raises ``KeyError`` if unknown)."""
        async with self._lock:
            entries, held, gone = self.authority.revoke(principal)
            await self._put(entries)
            await self._delete(gone)
            await self._seal()
        await self.rotate(held, grace_s)

    async def expire(self) -> None:
        """Delete the versions whose grace has passed."""
        async with self._lock:
            gone = self.authority.expire()
            if gone:
                await self._delete(gone)
                await self._seal()

    async def check(self) -> BucketReport:
        """Look at the bucket; when it is not what was written, write back what is missing or overwritten, delete
        what was never written, and seal a new manifest (recreating the bucket first when it is gone). The
        finding goes to ``health``; a look that cannot read the bucket counts as damage (``unreadable``)."""
        async with self._lock:
            try:
                seen = await self.bucket.snapshot()
            except Exception as exc:  # noqa: BLE001 - the bucket's JetStream did not answer: damaged until it does
                log.warning("keys bucket could not be read (%s)", exc)
                report = BucketReport({"": Damage.UNREADABLE})
                self.health.record(report)
                return report
            report = judge_bucket(self.written, self.manifest_seq, seen, self.authority.issuer.public)
            self.health.record(report)
            if report.intact:
                return report
            log.warning("keys bucket damaged (%s): repairing", report.summary())
            try:
                if report.bucket_missing:
                    await self.bucket.recreate()
                for key in report.rewrite(self.written):
                    await self.bucket.put(key, self.written[key])
                for key in report.remove():
                    await self.bucket.delete(key)
                await self._seal()
            except Exception as exc:  # noqa: BLE001 - stays damaged (not ready); tried again at the next look
                log.warning("keys bucket repair failed (%s)", exc)
                self.health.repaired(False)
            else:
                self.health.repaired(True)
            return report

    def listing(self) -> dict[str, int]:
        """Each live entry's ``issued_ms``, as the manifest lists them."""
        return {key: entry_issued_ms(value) for key, value in self.written.items() if key != EntryKeys.MANIFEST}

    async def _seal(self) -> None:
        """Write a new manifest of what the bucket holds now (under the lock, after the entries it lists)."""
        listing = self.listing()
        seq, value = await self.bucket.put_sequenced(
            EntryKeys.MANIFEST, lambda at: self.authority.manifest_value(listing, at))
        self._wrote(EntryKeys.MANIFEST, value)
        self.manifest_seq = seq

    def _wrote(self, key: str, value: bytes) -> None:
        self.written.pop(key, None)
        self.written[key] = value

    async def _put(self, entries: list[Entry]) -> None:
        for key, value in entries:
            await self.bucket.put(key, value)
            self._wrote(key, value)
        self.published += len(entries)

    async def _delete(self, keys: list[str]) -> None:
        for key in keys:
            await self.bucket.delete(key)
            self.written.pop(key, None)
        self.deleted += len(keys)
