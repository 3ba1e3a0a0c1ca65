"""Key distribution without NATS: the key manager's entries applied by holders' agents, rotation, revocation, expiry.

``deliver`` plays the bucket: every entry goes to every agent, as a watcher would
hand it over (without the manifest: ``test_keys_rollback`` covers it). The clock is
injected, so grace windows are exact.
"""

from __future__ import annotations

import pytest

from din.services.keymanager.authority import KeyAuthority
from din.shared import envelope
from din.shared.envelope import DataKey, InvalidToken, Keyring, Reason, ReplayGuard, SealRefused
from din.shared.security import (
    AUDIT,
    KEYMANAGER,
    KEYSTORE_FILE,
    EntryKeys,
    KeyAgent,
    KeyStore,
    PrincipalKeys,
    key_file,
    sign_entry,
    site_principal,
)
from tests.support import T0
from tests.unit.conftest import ACME, BRANCH, FACTORY, HUB, INITECH

AAD = {"rid": "r1", "tenant": "acme"}


def deliver(entries, agents) -> None:
    for key, value in entries:
        for agent in agents.values():
            agent.apply(key, value)


def seal(agent: KeyAgent, reader: str, payload: bytes = b"tensor") -> envelope.Sealed:
    return envelope.seal(payload, reader=reader, aad=AAD, keyring=agent.keyring, sender=agent.principal)


def opens(agent: KeyAgent, sealed: envelope.Sealed, reader: str) -> bytes:
    return envelope.open(sealed, keyring=agent.keyring, expected_reader=reader, allow_integrity_only=True)


def test_each_holder_gets_exactly_the_keys_it_needs(authority, agents):
    deliver(authority.publication(), agents)
    assert agents[HUB].ready_for([HUB, FACTORY, BRANCH, ACME, INITECH, AUDIT])
    assert set(agents[FACTORY].versions()) == {FACTORY, ACME, "audit-factory"}
    assert set(agents[BRANCH].versions()) == {BRANCH, ACME, INITECH, "audit-branch"}
    assert set(agents[ACME].versions()) == {ACME}
    assert set(agents[AUDIT].versions()) == {AUDIT, "audit-factory", "audit-branch"}
    assert agents[FACTORY].policy.integrity_only == {"factory"}
    assert agents[ACME].integrity_allowed("factory") and not agents[ACME].integrity_allowed("branch")
    assert set(agents[ACME].publics) >= {HUB, FACTORY, BRANCH, KEYMANAGER}
    with pytest.raises(SealRefused):
        seal(agents[FACTORY], INITECH)


def test_a_request_travels_sealed_hop_by_hop(authority, agents):
    deliver(authority.publication(), agents)
    request = seal(agents[ACME], ACME, b"pixels")
    assert b"pixels" not in request.body
    assert opens(agents[HUB], request, ACME) == b"pixels"
    job = seal(agents[HUB], FACTORY, b"pixels")
    assert opens(agents[FACTORY], job, FACTORY) == b"pixels"
    with pytest.raises(InvalidToken):
        opens(agents[BRANCH], job, FACTORY)
    result = seal(agents[FACTORY], ACME, b"label 7")
    assert opens(agents[ACME], result, ACME) == b"label 7"


def test_rotation_is_two_phase_and_loses_nothing_in_flight(authority, agents, clock):
    deliver(authority.publication(), agents)
    in_flight = seal(agents[ACME], ACME)
    version, pending = authority.begin_rotation(ACME)
    assert version == 2
    deliver(pending, agents)
    # Pending: everyone can open v2, nobody seals with it yet.
    assert agents[ACME].keyring.current_version(ACME) == 1
    assert seal(agents[ACME], ACME).key_version == 1
    # The sender learns of the activation before a receiver does: the receiver opens v2 anyway.
    activation = authority.activate(ACME, version)
    deliver(activation, {ACME: agents[ACME]})
    fresh = seal(agents[ACME], ACME)
    assert fresh.key_version == 2
    assert opens(agents[HUB], fresh, ACME) == b"tensor"
    deliver(activation, agents)
    assert agents[HUB].keyring.current_version(ACME) == 2
    # The old version opens for the grace window, then is refused.
    clock.now += 59
    assert opens(agents[HUB], in_flight, ACME) == b"tensor"
    clock.now += 2
    with pytest.raises(InvalidToken) as retired:
        opens(agents[HUB], in_flight, ACME)
    assert retired.value.reason == Reason.RETIRED_KEY
    gone = authority.expire()
    assert EntryKeys.dek(HUB, ACME, 1) in gone and authority.versions()[ACME] == 2
    assert authority.rotations == 1


def test_a_holder_starting_after_a_rotation_gets_the_same_state(authority, agents, keys_dir, clock):
    deliver(authority.publication(), agents)
    version, pending = authority.begin_rotation(FACTORY)
    deliver(pending, agents)
    deliver(authority.activate(FACTORY, version, grace_s=10), agents)
    late = KeyAgent(PrincipalKeys.load(key_file(keys_dir, FACTORY)), clock=clock)
    late.apply_unanchored()
    deliver(authority.publication(), {"late": late})
    assert late.keyring.current_version(FACTORY) == 2
    old = envelope.seal(b"x", reader=FACTORY, aad=AAD, keyring=_ring(authority, FACTORY, 1), sender=HUB)
    assert opens(late, old, FACTORY) == b"x"
    clock.now += 11
    late_after = KeyAgent(PrincipalKeys.load(key_file(keys_dir, FACTORY)), clock=clock)
    late_after.apply_unanchored()
    deliver(authority.publication(), {"late": late_after})
    with pytest.raises(InvalidToken) as info:
        opens(late_after, old, FACTORY)
    assert info.value.reason == Reason.UNKNOWN_KEY


def _ring(authority: KeyAuthority, reader: str, version: int) -> Keyring:
    ring = Keyring()
    ring.install(authority.records[reader][version].dek)
    return ring


def test_revocation_refuses_the_site_and_rotates_what_it_held(authority, agents, clock):
    deliver(authority.publication(), agents)
    before = seal(agents[BRANCH], ACME, b"result from branch")
    entries, held, gone = authority.revoke(BRANCH)
    assert set(held) == {BRANCH, ACME, INITECH, "audit-branch"}
    assert EntryKeys.dek(BRANCH, ACME, 1) in gone
    deliver(entries, agents)
    assert BRANCH in agents[ACME].revoked
    with pytest.raises(InvalidToken) as refused:
        opens(agents[ACME], before, ACME)
    assert refused.value.reason == Reason.REVOKED
    with pytest.raises(SealRefused):
        seal(agents[BRANCH], ACME)
    for reader in held:
        version, pending = authority.begin_rotation(reader)
        assert all(not key.startswith(f"dek.{BRANCH}.") for key, _ in pending)
        deliver(pending, agents)
        deliver(authority.activate(reader, version, grace_s=authority.revoke_grace_s), agents)
    assert agents[BRANCH].keyring.current_version(ACME) == 1, "branch never receives the new version"
    assert agents[ACME].keyring.current_version(ACME) == 2
    with pytest.raises(KeyError):
        authority.revoke(KEYMANAGER)
    with pytest.raises(KeyError):
        authority.revoke("site-nowhere")


def test_forged_moved_and_rolled_back_entries_are_refused(authority, agents, keys_dir):
    agent = agents[FACTORY]
    deliver(authority.publication(), {"f": agent})
    applied = agent.applied
    key, value = next(e for e in authority.publication() if e[0] == EntryKeys.dek(FACTORY, FACTORY, 1))
    tampered = value.replace(b'\\"active\\":true', b'\\"active\\":false')
    assert tampered != value
    assert not agent.apply(key, tampered)
    assert not agent.apply(EntryKeys.dek(FACTORY, ACME, 1), value)
    other = PrincipalKeys.load(key_file(keys_dir, site_principal("cloud"))).identity
    assert not agent.apply(EntryKeys.REVOKED, sign_entry(other, EntryKeys.REVOKED,
                                                         {"principals": [FACTORY], "issued_ms": 10**15}))
    assert FACTORY not in agent.revoked
    assert agent.refused == 3 and agent.applied == applied
    # Another holder's entry is not for this agent: ignored, not counted.
    branch_key, branch_value = next(e for e in authority.publication() if e[0].startswith(f"dek.{BRANCH}."))
    assert not agent.apply(branch_key, branch_value)
    assert agent.refused == 3
    # An older revocation list cannot replace a newer one.
    old_list = authority.revoked_entry()
    authority.revoked.add(BRANCH)
    deliver([authority.revoked_entry()], {"f": agent})
    authority.revoked.discard(BRANCH)
    assert not agent.apply(*old_list)
    assert BRANCH in agent.revoked


def test_the_key_manager_recovers_its_versions_from_the_bucket(authority, restart_authority, keys_dir, clock):
    authority.begin_rotation(ACME)
    version, pending = authority.begin_rotation(FACTORY)
    activation = authority.activate(FACTORY, version)
    store = KeyStore.load(keys_dir / KEYSTORE_FILE)
    issuer = authority.issuer
    own = KeyAgent(PrincipalKeys(issuer, issuer.public, store.bucket, store.kv_domain), clock=clock)
    own.apply_unanchored()
    deliver(authority.publication() + activation, {"km": own})
    restarted = restart_authority()
    restarted.recover(own)
    assert restarted.versions() == authority.versions()
    assert restarted.pending() == [(ACME, 2)]
    assert restarted.ensure_current() == []
    assert restarted.records[FACTORY][1].dek == authority.records[FACTORY][1].dek


def test_keyring_pending_versions_and_replay_release():
    ring = Keyring(grace_s=30, clock=lambda: T0)
    ring.install(DataKey("site-a", 1, bytes(32)))
    ring.install(DataKey("site-a", 2, bytes([1]) * 32), activate=False)
    assert ring.current_version("site-a") == 1
    sealed_v1 = envelope.seal(b"p", reader="site-a", aad={}, keyring=ring, sender="s")
    assert sealed_v1.key_version == 1
    ring.install(DataKey("site-a", 2, bytes([1]) * 32))
    assert ring.current_version("site-a") == 2
    assert envelope.open(sealed_v1, keyring=ring, expected_reader="site-a", now=T0 + 29) == b"p"
    with pytest.raises(ValueError):
        ring.activate("site-a", 1)
    ring.install(DataKey("site-a", 4, bytes([4]) * 32), activate=False)
    ring.install(DataKey("site-a", 3, bytes([3]) * 32), activate=False)
    ring.activate("site-a", 4)
    with pytest.raises(ValueError):
        ring.activate("site-a", 3)
    assert ring.get("site-a", 3).version == 3 and ring.get("site-a", 9) is None

    guard = ReplayGuard(30, lambda: T0)
    guard.check("n1", T0)
    with pytest.raises(InvalidToken):
        guard.check("n1", T0)
    guard.release("n1")
    guard.check("n1", T0)
