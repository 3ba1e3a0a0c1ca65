"""The key manager's operator commands: rotate data keys, revoke a principal, report status.

A command travels as JSON on ``din.v1.control.keymanager.keymanager`` signed by the
``operator`` principal (``Din-Sig`` header, Ed25519 over the body); the key manager
refuses unsigned, stale or replayed commands with ``unauthenticated``.
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, Field


class KeyAction(StrEnum):
    """What an operator asks the key manager to do."""

    ROTATE = "rotate"
    REVOKE = "revoke"
    STATUS = "status"


class KeyCommandV1(BaseModel):
    """An operator's signed command to the key manager."""

    action: KeyAction = Field(description="rotate: new data keys now; revoke: refuse a principal from now on; status.")
    reader: str | None = Field(
        default=None, description="rotate: the one reader whose data key to rotate; None rotates every reader."
    )
    principal: str | None = Field(default=None, description="revoke: the principal to revoke, e.g. site-branch.")
    grace_s: float | None = Field(
        default=None, ge=0, description="rotate: how long old versions stay accepted; None uses the configured grace."
    )
    issued_ms: int = Field(description="When the operator signed it, Unix epoch ms; stale commands are refused.")
    nonce: str = Field(min_length=8, max_length=64, description="Random, unique per command; replays are refused.")


class KeyCommandResultV1(BaseModel):
    """The key manager's answer to a command: what the keys look like now."""

    action: KeyAction = Field(description="The command answered.")
    versions: dict[str, int] = Field(description="Current (sealing) data key version of every reader.")
    revoked: list[str] = Field(description="Revoked principals.")
    rotations: int = Field(description="Rotations done since the key manager started.")
    message: str = Field(default="", description="What was done, for people.")
    bucket: str = Field(
        default="unchecked",
        description=("What the key manager's last look at the DIN_KEYS bucket found: 'intact', or the damaged entries "
                     "by reason ('missing:1,stale:2'; repaired at that look, checked again at the next). While it "
                     "is not 'intact', a process starting now may not see these versions and revocations."),
    )
    bucket_repairs: int = Field(default=0, description="Repairs of the bucket since the key manager started.")
