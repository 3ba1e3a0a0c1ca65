"""Fixtures shared by the unit tests: a key store for the security tests, with an injected clock."""

from __future__ import annotations

import pytest

from din.services.keymanager.authority import KeyAuthority
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
    return {p: KeyAgent(PrincipalKeys.load(key_file(keys_dir, p)), clock=clock)
            for p in (HUB, FACTORY, BRANCH, ACME, INITECH, AUDIT)}
