"""Fixtures shared by the unit tests: a key store for the security tests, with an injected clock, and a keys bucket
played in memory with JetStream's sequences."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from din.services.keymanager.authority import KeyAuthority
from din.services.keymanager.integrity import Seen
from din.shared.security import (
    AUDIT,
    KEYMANAGER,
    KEYSTORE_FILE,
    MASTER_KEY_FILE,
    CryptoPolicy,
    KeyAgent,
    KeyStore,
    PrincipalKeys,
    init_keys,
    key_file,
    read_master_key,
    site_principal,
    tenant_principal,
)
from tests.support import ManualClock
from tests.unit.test_security_keys import TOPOLOGY

HUB, FACTORY, BRANCH = site_principal("cloud"), site_principal("factory"), site_principal("branch")
ACME, INITECH = tenant_principal("acme"), tenant_principal("initech")


@pytest.fixture(scope="module")
def keys_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("keys")
    init_keys(path, TOPOLOGY)
    return path


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


def build_authority(keys_dir, clock, **kw) -> KeyAuthority:
    """A key authority over ``keys_dir``'s store; also what a restarted key manager does."""
    store = KeyStore.load(keys_dir / KEYSTORE_FILE)
    issuer = store.identity(KEYMANAGER, read_master_key(keys_dir / MASTER_KEY_FILE))
    options = {"grace_s": 60.0, "revoke_grace_s": 5.0} | kw
    return KeyAuthority(issuer, store.publics, TOPOLOGY, CryptoPolicy(paths={"dedicated": "integrity"}),
                        clock=clock, **options)


@pytest.fixture
def restart_authority(keys_dir, clock):
    """Builds a fresh authority over the same store, as after a key manager restart."""
    return lambda **kw: build_authority(keys_dir, clock, **kw)


@pytest.fixture
def authority(keys_dir, clock) -> KeyAuthority:
    auth = build_authority(keys_dir, clock)
    auth.ensure_current()
    return auth


@pytest.fixture
def agents(keys_dir, clock) -> dict[str, KeyAgent]:
    """One agent per principal, fed entries directly (no manifest: signatures and their own floor only)."""
    out = {p: KeyAgent(PrincipalKeys.load(key_file(keys_dir, p)), clock=clock)
           for p in (HUB, FACTORY, BRANCH, ACME, INITECH, AUDIT)}
    for agent in out.values():
        agent.apply_unanchored()
    return out


def new_agent(keys_dir, principal: str, clock) -> KeyAgent:
    """An agent as a process that just started makes it."""
    return KeyAgent(PrincipalKeys.load(key_file(keys_dir, principal)), clock=clock)


class MemoryBucket:
    """The keys bucket as JetStream keeps it, in memory: one value a key, each stored at the next stream
    sequence; ``Nats-Expected-Last-Sequence`` for ``put_sequenced``. Anyone may ``put`` (the attacker too)."""

    def __init__(self) -> None:
        self.live: dict[str, Seen] | None = {}
        self.seq = 0

    @property
    def values(self) -> dict[str, bytes]:
        return {key: seen.value for key, seen in (self.live or {}).items()}

    async def put(self, key: str, value: bytes) -> int:
        if self.live is None:
            raise RuntimeError("no bucket")
        self.seq += 1
        self.live.pop(key, None)
        self.live[key] = Seen(value, self.seq)
        return self.seq

    async def delete(self, key: str) -> None:
        if self.live is None:
            raise RuntimeError("no bucket")
        self.seq += 1
        self.live.pop(key, None)

    async def put_sequenced(self, key: str, value_at: Callable[[int], bytes]) -> tuple[int, bytes]:
        value = value_at(self.seq + 1)
        return await self.put(key, value), value

    async def snapshot(self) -> dict[str, Seen] | None:
        return None if self.live is None else dict(self.live)

    async def recreate(self) -> None:
        self.live = {}

    def feed(self, agent: KeyAgent) -> None:
        """Hand ``agent`` every live entry in stream order, as a new watch does."""
        for key, seen in sorted((self.live or {}).items(), key=lambda item: item[1].revision):
            agent.apply(key, seen.value, revision=seen.revision)
