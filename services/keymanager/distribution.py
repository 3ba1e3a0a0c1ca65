"""Keys out through the bucket: rotation, revocation and expiry carried out as bucket writes.

``KeyDistribution`` puts what ``KeyAuthority`` decides into the keys bucket, one
operation at a time (a lock keeps a scheduled rotation, an operator's command and
the expiry sweep from interleaving). The bucket is anything with async ``put(key,
value)`` and ``delete(key)`` (a JetStream key-value bucket in the service), so this
module knows no NATS.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from din.services.keymanager.authority import Entry, KeyAuthority


class Bucket(Protocol):
    """The part of a key-value bucket the distribution writes with."""

    async def put(self, key: str, value: bytes) -> object: ...

    async def delete(self, key: str) -> object: ...


class KeyDistribution:
    """The key manager's writes: every entry ``authority`` returns goes to ``bucket``, in order."""

    def __init__(self, authority: KeyAuthority, bucket: Bucket, *, activation_delay_s: float) -> None:
        self.authority = authority
        self.bucket = bucket
        self.activation_delay_s = activation_delay_s
        self.published = 0
        self.deleted = 0
        self._lock = asyncio.Lock()

    async def publish_all(self) -> list[str]:
        """Finish rotations a restart cut short, give every reader a first version, publish everything.

        Returns the readers that got a first version.
        """
        for reader, version in self.authority.pending():
            self.authority.activate(reader, version)
        created = self.authority.ensure_current()
        await self._put(self.authority.publication())
        return created

    async def rotate(self, readers: list[str], grace_s: float | None) -> None:
        """Two-phase rotation of ``readers``: distribute new versions, wait, then seal with them."""
        async with self._lock:
            started = []
            for reader in readers:
                version, entries = self.authority.begin_rotation(reader)
                await self._put(entries)
                started.append((reader, version))
            await asyncio.sleep(self.activation_delay_s)
            for reader, version in started:
                await self._put(self.authority.activate(reader, version, grace_s))

    async def revoke(self, principal: str, grace_s: float) -> None:
        """Refuse ``principal``, delete its wrapped keys, and rotate what it held (raises ``KeyError`` if unknown)."""
        async with self._lock:
            entries, held, gone = self.authority.revoke(principal)
            await self._put(entries)
            await self._delete(gone)
        await self.rotate(held, grace_s)

    async def expire(self) -> None:
        """Delete the versions whose grace has passed."""
        async with self._lock:
            await self._delete(self.authority.expire())

    async def _put(self, entries: list[Entry]) -> None:
        for key, value in entries:
            await self.bucket.put(key, value)
        self.published += len(entries)

    async def _delete(self, keys: list[str]) -> None:
        for key in keys:
            await self.bucket.delete(key)
        self.deleted += len(keys)
