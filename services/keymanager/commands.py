"""What an operator's key command does (rotate, revoke, status) and the answer it gets. No NATS here."""

from __future__ import annotations

from din.services.keymanager.authority import KeyAuthority
from din.services.keymanager.distribution import KeyDistribution
from din.services.keymanager.integrity import BucketHealth
from din.shared.contracts.keys import KeyAction, KeyCommandResultV1, KeyCommandV1
from din.shared.errors import DinError, ErrorCode


async def run_command(command: KeyCommandV1, keys: KeyDistribution, *, revoke_grace_s: float) -> str:
    """Carry out a verified command; return the answer's message or raise ``DinError`` (bad request)."""
    authority = keys.authority
    if command.action == KeyAction.ROTATE:
        readers = [command.reader] if command.reader else authority.readers()
        if any(r not in authority.records for r in readers):
            raise DinError(ErrorCode.BAD_REQUEST, f"unknown reader {command.reader!r}")
        await keys.rotate(readers, command.grace_s)
        return f"rotated {len(readers)} data keys"
    if command.action == KeyAction.REVOKE:
        if not command.principal:
            raise DinError(ErrorCode.BAD_REQUEST, "revoke needs a principal")
        try:
            await keys.revoke(command.principal, revoke_grace_s)
        except KeyError:
            raise DinError(ErrorCode.BAD_REQUEST, f"unknown principal {command.principal!r}") from None
        return f"revoked {command.principal}"
    return "status"


def command_result(command: KeyCommandV1, authority: KeyAuthority, message: str,
                   bucket: BucketHealth | None = None) -> KeyCommandResultV1:
    """The answer to ``command``: the keys as they are now, and what the last look at the bucket found."""
    bucket = bucket or BucketHealth()
    return KeyCommandResultV1(action=command.action, versions=authority.versions(), revoked=sorted(authority.revoked),
                              rotations=authority.rotations, message=message, bucket=bucket.last,
                              bucket_repairs=bucket.repairs)
