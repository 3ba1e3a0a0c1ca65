"""The key manager's writes and operator commands without NATS: ``MemoryBucket`` plays the keys bucket."""

from __future__ import annotations

import pytest

from din.services.keymanager.commands import command_result, run_command
from din.services.keymanager.distribution import KeyDistribution
from din.shared.contracts.keys import KeyAction
from din.shared.errors import DinError, ErrorCode
from din.shared.security import EntryKeys, new_key_command
from tests.unit.conftest import ACME, BRANCH, HUB, MemoryBucket, build_authority


@pytest.fixture
def keys(keys_dir, clock) -> KeyDistribution:
    return KeyDistribution(build_authority(keys_dir, clock), MemoryBucket(), activation_delay_s=0.0)


async def test_start_publishes_a_first_version_of_every_reader(keys, agents):
    created = await keys.publish_all()
    assert sorted(created) == keys.authority.readers()
    assert keys.published == len(keys.bucket.values) - 1  # and the manifest
    for key, value in keys.bucket.values.items():
        for agent in agents.values():
            agent.apply(key, value)
    assert agents[HUB].ready_for([ACME, BRANCH])
    assert await keys.publish_all() == []


async def test_rotate_command_distributes_and_activates_new_versions(keys):
    await keys.publish_all()
    message = await run_command(new_key_command(KeyAction.ROTATE, reader=ACME), keys, revoke_grace_s=5.0)
    assert message == "rotated 1 data keys"
    assert keys.authority.versions()[ACME] == 2 and keys.authority.rotations == 1
    assert EntryKeys.dek(HUB, ACME, 2) in keys.bucket.values
    everything = await run_command(new_key_command(KeyAction.ROTATE), keys, revoke_grace_s=5.0)
    assert everything == f"rotated {len(keys.authority.readers())} data keys"


async def test_revoke_command_deletes_the_wrapped_keys_and_rotates_what_was_held(keys):
    await keys.publish_all()
    command = new_key_command(KeyAction.REVOKE, principal=BRANCH)
    assert await run_command(command, keys, revoke_grace_s=5.0) == f"revoked {BRANCH}"
    assert not [k for k in keys.bucket.values if k.startswith(f"dek.{BRANCH}.")]
    assert keys.deleted > 0
    result = command_result(command, keys.authority, "done")
    assert result.revoked == [BRANCH] and result.versions[BRANCH] == 2 and result.message == "done"


@pytest.mark.parametrize(
    ("fields", "text"),
    [
        ({"action": KeyAction.ROTATE, "reader": "tenant-nobody"}, "unknown reader"),
        ({"action": KeyAction.REVOKE}, "revoke needs a principal"),
        ({"action": KeyAction.REVOKE, "principal": "site-nowhere"}, "unknown principal"),
    ],
)
async def test_bad_commands_are_refused_as_bad_requests(keys, fields, text):
    await keys.publish_all()
    action = fields.pop("action")
    with pytest.raises(DinError) as refused:
        await run_command(new_key_command(action, **fields), keys, revoke_grace_s=5.0)
    assert refused.value.code == ErrorCode.BAD_REQUEST and text in str(refused.value)
    assert keys.authority.rotations == 0


async def test_expiry_deletes_versions_past_their_grace(keys, clock):
    await keys.publish_all()
    await run_command(new_key_command(KeyAction.ROTATE, reader=ACME, grace_s=10.0), keys, revoke_grace_s=5.0)
    await keys.expire()
    assert EntryKeys.dek(HUB, ACME, 1) in keys.bucket.values
    clock.now += 11.0
    await keys.expire()
    assert EntryKeys.dek(HUB, ACME, 1) not in keys.bucket.values
    assert await run_command(new_key_command(KeyAction.STATUS), keys, revoke_grace_s=5.0) == "status"
