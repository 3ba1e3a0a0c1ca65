"""Replay protection shared by the admissions of one site: each envelope nonce is claimed once in the site's
JetStream key-value bucket, so a captured request replayed to another instance of the queue group is refused too.

Each instance's in-memory ``ReplayGuard`` catches replays to itself; with one admission per site that is
enough and this is not used. A claim is a KV ``create`` (atomic: it fails when the key exists) in the site's
own JetStream domain, kept for the replay window (the bucket's TTL), so it costs one site-local round trip
per sealed request and keeps working while the site is cut off from the hub.
"""

from __future__ import annotations

from nats.aio.client import Client as NatsClient
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import KeyWrongLastSequenceError

from din.shared.naming import token


def nonce_bucket(site: str) -> str:
    """The bucket of ``site``'s claimed request nonces."""
    return f"DIN_NONCES_{token(site, what='site').upper().replace('-', '_')}"


class SharedNonces:
    """Claims request nonces for every admission at one site."""

    def __init__(self, site: str, window_s: float, replicas: int = 1) -> None:
        self.site = site
        self.window_s = window_s
        self.replicas = replicas
        self._kv = None

    async def start(self, nc: NatsClient) -> None:
        js = nc.jetstream(domain=self.site)
        config = KeyValueConfig(bucket=nonce_bucket(self.site), ttl=self.window_s * 2, history=1,
                                storage=StorageType.MEMORY, replicas=self.replicas)
        try:
            self._kv = await js.create_key_value(config)
        except Exception:
            self._kv = await js.key_value(nonce_bucket(self.site))

    async def claim(self, nonce: str) -> bool:
        """True the first time ``nonce`` is claimed at this site, False for a replay."""
        try:
            await self._kv.create(nonce, b"")
        except KeyWrongLastSequenceError:
            return False
        return True
