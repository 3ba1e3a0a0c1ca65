"""Operator key commands (rotate, revoke, status): signed by the operator principal, checked by the key manager."""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping

from din.shared import envelope
from din.shared.contracts.keys import KeyAction, KeyCommandV1
from din.shared.envelope import InvalidToken, PublicIdentity, Reason, ReplayGuard
from din.shared.security.keyfiles import PrincipalKeys

_COMMAND_CONTEXT = {"Din-Keys-Command": "v1"}


def sign_key_command(operator: PrincipalKeys, command: KeyCommandV1) -> tuple[bytes, dict[str, str]]:
    """Body and headers of a key command signed by the operator principal."""
    body = command.model_dump_json().encode()
    return body, {envelope.SIGNATURE_HEADER: envelope.sign_result(operator.identity, body, _COMMAND_CONTEXT)}


def verify_key_command(
    body: bytes, headers: Mapping[str, str] | None, operator: PublicIdentity, guard: ReplayGuard,
    *, now: float | None = None,
) -> KeyCommandV1:
    """The command in a message signed by ``operator``, fresh and never seen; raises ``InvalidToken``."""
    signature = (headers or {}).get(envelope.SIGNATURE_HEADER)
    if not signature:
        raise InvalidToken(Reason.MALFORMED)
    envelope.verify_result(operator, body, _COMMAND_CONTEXT, signature)
    try:
        command = KeyCommandV1.model_validate_json(body)
    except ValueError:
        raise InvalidToken(Reason.MALFORMED) from None
    guard.check(command.nonce, command.issued_ms / 1000.0, now=now)
    return command


def new_key_command(action: KeyAction, **fields: object) -> KeyCommandV1:
    """A command stamped now with a fresh nonce."""
    return KeyCommandV1(action=action, issued_ms=int(time.time() * 1000), nonce=secrets.token_hex(12), **fields)
