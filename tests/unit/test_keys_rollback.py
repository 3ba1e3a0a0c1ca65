"""Key distribution that cannot be rolled back, without NATS (issue 13, item 6).

``MemoryBucket`` plays the JetStream bucket (one value a key, stream sequences); the
attacker writes into it like anyone holding a JetStream credential could. A new
process is a fresh ``KeyAgent`` fed the bucket's current content in stream order.
"""

from __future__ import annotations

import pytest

from din.services.keymanager.distribution import KeyDistribution
from din.services.keymanager.integrity import BucketReport, Damage, Seen, judge_bucket
from din.shared.envelope import Identity
from din.shared.security import KEYMANAGER, EntryKeys, Manifest, read_manifest, sign_entry, sign_manifest
from din.shared.security.agent import Refused
from tests.unit.conftest import ACME, BRANCH, FACTORY, HUB, MemoryBucket, build_authority, new_agent


@pytest.fixture
async def keys(keys_dir, clock) -> KeyDistribution:
    distribution = KeyDistribution(build_authority(keys_dir, clock), MemoryBucket(), activation_delay_s=0.0)
    await distribution.publish_all()
    return distribution


def fresh(keys: KeyDistribution, keys_dir, clock, principal: str = ACME):
    agent = new_agent(keys_dir, principal, clock)
    keys.bucket.feed(agent)
    return agent


async def test_a_new_process_is_anchored_by_the_manifest_at_its_sequence(keys, keys_dir, clock):
    agent = fresh(keys, keys_dir, clock)
    assert agent.manifest is not None and agent.manifest.seq == keys.manifest_seq == keys.bucket.seq
    assert agent.ready_for([ACME]) and agent.policy is not None and not agent.refusals
    assert set(agent.manifest.entries) == set(keys.bucket.values) - {EntryKeys.MANIFEST}
    assert (await keys.check()).intact and keys.health.ready


async def test_entries_before_the_manifest_wait_for_it(keys, keys_dir, clock):
    agent = new_agent(keys_dir, ACME, clock)
    live = sorted(keys.bucket.live.items(), key=lambda item: item[1].revision)
    for key, seen in live[:-1]:
        assert not agent.apply(key, seen.value, revision=seen.revision)
    assert agent.applied == 0 and agent.policy is None
    key, seen = live[-1]
    assert key == EntryKeys.MANIFEST and agent.apply(key, seen.value, revision=seen.revision)
    assert agent.ready_for([ACME])


async def test_an_old_signed_revocation_list_written_back_does_not_undo_a_revocation(keys, keys_dir, clock):
    old_revoked = keys.bucket.values[EntryKeys.REVOKED]
    old_manifest = keys.bucket.values[EntryKeys.MANIFEST]
    await keys.revoke(BRANCH, 5.0)
    await keys.bucket.put(EntryKeys.REVOKED, old_revoked)
    agent = fresh(keys, keys_dir, clock)
    assert BRANCH in agent.revoked and agent.refusals[Refused.STALE] == 1 and agent.ready_for([ACME])
    # The old manifest written back too: it is read at another sequence than it was signed for.
    await keys.bucket.put(EntryKeys.MANIFEST, old_manifest)
    agent = fresh(keys, keys_dir, clock)
    assert agent.manifest is None and agent.refusals[Refused.INVALID] == 1
    assert agent.applied == 0 and not agent.ready_for([ACME])
    report = await keys.check()
    assert report.damage == {EntryKeys.REVOKED: Damage.STALE, EntryKeys.MANIFEST: Damage.STALE}
    assert not keys.health.ready and keys.health.repairs == 1
    agent = fresh(keys, keys_dir, clock)
    assert BRANCH in agent.revoked and agent.ready_for([ACME]) and not agent.refusals
    assert (await keys.check()).intact and keys.health.ready


async def test_a_running_agent_keeps_its_newer_manifest_and_revocations(keys, keys_dir, clock):
    agent = fresh(keys, keys_dir, clock)
    old = keys.bucket.values[EntryKeys.MANIFEST]
    await keys.revoke(BRANCH, 5.0)
    keys.bucket.feed(agent)
    assert BRANCH in agent.revoked
    held = agent.manifest
    # Even signed for the sequence it is read at, an older manifest is refused by an agent holding a newer one.
    body = read_manifest(old, None, keys.authority.issuer.public)
    replay = sign_manifest(keys.authority.issuer, Manifest(body.issued_ms, 999, body.entries, body.revoked))
    assert not agent.apply(EntryKeys.MANIFEST, replay, revision=999)
    assert agent.manifest is held and agent.refusals[Refused.STALE] == 1 and BRANCH in agent.revoked


async def test_a_deleted_dek_written_back_is_withdrawn_and_an_older_one_is_stale(keys, keys_dir, clock):
    branch_key = EntryKeys.dek(BRANCH, ACME, 1)
    branch_value = keys.bucket.values[branch_key]
    acme_key = EntryKeys.dek(ACME, ACME, 1)
    active_v1 = keys.bucket.values[acme_key]
    await keys.revoke(BRANCH, 5.0)
    assert branch_key not in keys.bucket.values
    assert keys.bucket.values[acme_key] != active_v1, "the rotation retired version 1"
    await keys.bucket.put(branch_key, branch_value)
    await keys.bucket.put(acme_key, active_v1)
    branch = fresh(keys, keys_dir, clock, BRANCH)
    assert branch.refusals[Refused.WITHDRAWN] >= 1 and (ACME, 1) not in branch.deks
    acme = fresh(keys, keys_dir, clock)
    assert acme.refusals[Refused.STALE] == 1 and acme.keyring.current_version(ACME) == 2
    report = await keys.check()
    assert report.damage == {branch_key: Damage.UNEXPECTED, acme_key: Damage.STALE}
    assert branch_key not in keys.bucket.values and (await keys.check()).intact


async def test_an_entry_newer_than_the_manifest_is_a_rotation_in_flight(keys, keys_dir, clock):
    agent = fresh(keys, keys_dir, clock)
    version, entries = keys.authority.begin_rotation(ACME)
    for key, value in entries:
        await keys.bucket.put(key, value)
    keys.bucket.feed(agent)
    assert (ACME, version) in agent.deks and not agent.refusals


async def test_garbage_and_forgeries_are_refused_then_written_back(keys, keys_dir, clock):
    forger = Identity.generate(KEYMANAGER)
    policy = keys.bucket.values[EntryKeys.POLICY]
    await keys.bucket.put(EntryKeys.dek(ACME, ACME, 1), b"\x00garbage")
    await keys.bucket.put(EntryKeys.POLICY, sign_entry(forger, EntryKeys.POLICY,
                                                       {"integrity_only": [], "plaintext_ingress": [],
                                                        "issued_ms": 2**62}))
    agent = fresh(keys, keys_dir, clock)
    assert agent.refusals[Refused.INVALID] == 2 and not agent.ready_for([ACME]) and agent.policy is None
    report = await keys.check()
    assert report.counts() == {"invalid": 2} and keys.bucket.values[EntryKeys.POLICY] == policy
    agent = fresh(keys, keys_dir, clock)
    assert agent.ready_for([ACME]) and not agent.refusals


async def test_a_deleted_entry_is_written_back_and_readiness_waits_for_a_clean_look(keys, keys_dir, clock):
    await keys.bucket.delete(EntryKeys.dek(FACTORY, FACTORY, 1))
    report = await keys.check()
    assert report.damage == {EntryKeys.dek(FACTORY, FACTORY, 1): Damage.MISSING}
    assert not keys.health.ready and keys.health.detail()["bucket"] == "missing:1"
    assert fresh(keys, keys_dir, clock, FACTORY).ready_for([FACTORY])
    assert (await keys.check()).intact and keys.health.ready
    assert keys.health.detail()["bucket_damage_missing"] == 1


async def test_a_deleted_bucket_is_created_again_with_everything(keys, keys_dir, clock):
    before = keys.bucket.values
    keys.bucket.live = None
    report = await keys.check()
    assert report.bucket_missing and keys.health.repairs == 1 and not keys.health.ready
    after = keys.bucket.values
    assert {k: v for k, v in after.items() if k != EntryKeys.MANIFEST} == \
        {k: v for k, v in before.items() if k != EntryKeys.MANIFEST}
    agent = fresh(keys, keys_dir, clock, HUB)
    assert agent.ready_for([HUB, ACME]) and not agent.refusals
    assert (await keys.check()).intact and keys.health.ready


async def test_an_unreadable_bucket_or_a_failed_repair_keeps_the_key_manager_not_ready(keys):
    async def no_answer():
        raise TimeoutError("no JetStream")

    keys.bucket.snapshot = no_answer
    assert (await keys.check()).damage == {"": Damage.UNREADABLE} and not keys.health.ready
    del keys.bucket.snapshot
    keys.bucket.live = None

    async def refused():
        raise RuntimeError("stream name already in use")

    keys.bucket.recreate = refused
    await keys.check()
    assert not keys.health.ready and keys.health.repair_failures == 1 and keys.health.repairs == 0
    del keys.bucket.recreate
    await keys.check()
    assert (await keys.check()).intact and keys.health.ready


async def test_the_manifest_moved_byte_for_byte_is_damage(keys):
    manifest = keys.bucket.values[EntryKeys.MANIFEST]
    seen = {**keys.bucket.live, EntryKeys.MANIFEST: Seen(manifest, keys.manifest_seq + 5)}
    report = judge_bucket(keys.written, keys.manifest_seq, seen, keys.authority.issuer.public)
    assert report.damage == {EntryKeys.MANIFEST: Damage.STALE}
    assert report.rewrite(keys.written) == [] and BucketReport().summary() == "intact"


async def test_the_status_answer_flags_a_damaged_bucket(keys):
    from din.services.keymanager.commands import command_result
    from din.shared.contracts.keys import KeyAction
    from din.shared.security import new_key_command

    await keys.bucket.delete(EntryKeys.REVOKED)
    await keys.check()
    result = command_result(new_key_command(KeyAction.STATUS), keys.authority, "status", keys.health)
    assert result.bucket == "missing:1" and result.bucket_repairs == 1


@pytest.mark.parametrize(("bucket", "action", "code"), [("intact", "status", 0), ("bucket_missing:1", "status", 1),
                                                        ("missing:1", "rotate", 0)])
def test_din_keys_warns_when_the_bucket_does_not_hold_what_it_reports(monkeypatch, capsys, bucket, action, code):
    import argparse

    from din.commands import keys as keys_command
    from din.shared.contracts.keys import KeyCommandResultV1

    async def answer(url, operator, sent, options=None, **fields):
        return KeyCommandResultV1(action=sent, versions={ACME: 2}, revoked=[BRANCH], rotations=1, bucket=bucket,
                                  bucket_repairs=3)

    monkeypatch.setattr(keys_command, "_running", lambda args: ("/keys", "nats://hub", {}))
    monkeypatch.setattr(keys_command.PrincipalKeys, "load", staticmethod(lambda path: None))
    monkeypatch.setattr(keys_command, "send_command", answer)
    args = argparse.Namespace(keys_command=action, reader=None, grace=None)
    assert keys_command.cmd_command(args) == code
    out = capsys.readouterr().out
    assert f"revoked: {BRANCH}" in out
    assert ("WARNING: keys bucket damaged" in out) == (bucket != "intact")
