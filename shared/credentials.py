"""Per-tenant credentials: signed tokens a client keeps, and the request-bound proofs it sends instead.

A token is ``din1.<tenant>.<expiry>.<signature>``: HMAC-SHA256 under the
tenant's secret over the first three parts. Tenants' secrets live in a
credentials file (JSON ``{"tenants": {"<name>": "<hex secret>"}}``, mode 0600)
written by ``din up`` or by the operator.

A token is a credential, not something to put on the bus: anyone who captured it could send requests for an hour.
What travels with a request is a *proof* made from it (``request_proof``):
``din2.<tenant>.<expiry>.<issued_ms>.<scope>.<mac>``, HMAC-SHA256 keyed with the token's signature (which only
the token's holder and admission, from the tenant's secret, can compute) over those parts, the model, the request
id and, with scope ``r``, the reply subject (scope ``a``: any reply, for clients such as the nats CLI that pick
their inbox themselves). Admission accepts a proof only for that model and request id (and reply), within
``window_s`` of ``issued_ms``, and once: captured, it is good for nothing else.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from din.shared.naming import token as subject_token

TOKEN_VERSION = "din1"
PROOF_VERSION = "din2"
REPLY_BOUND = "r"
ANY_REPLY = "a"


class CredentialRefusal(StrEnum):
    """Why a presented credential was refused (counted by admission, never told to the sender)."""

    MISSING = "missing"
    MALFORMED = "malformed"
    SIGNATURE = "signature"
    """The MAC does not verify: a forged token, or a proof for another model, request id or reply subject."""
    EXPIRED = "expired"
    STALE = "stale"
    """A proof issued outside the window around now."""
    REPLAY = "replay"
    """A proof already used."""
    BEARER = "bearer"
    """A bare token where a request-bound proof is required."""


class InvalidCredential(Exception):
    """A token or proof that does not authenticate; its message deliberately says nothing about which check
    failed (``reason`` is for counting)."""

    def __init__(self, reason: CredentialRefusal = CredentialRefusal.MALFORMED) -> None:
        super().__init__(reason.value)
        self.reason = reason


@dataclass(frozen=True)
class Presented:
    """A credential that verified: a bare token (``nonce`` None), or a proof to be used once (``nonce``, its
    MAC) issued at ``issued_s``."""

    nonce: str | None = None
    issued_s: float = 0.0


def new_secret() -> str:
    return secrets.token_hex(32)


def issue_token(tenant: str, secret: str, ttl_s: float = 3600.0, now: float | None = None) -> str:
    """Sign a token for ``tenant`` valid for ``ttl_s`` seconds."""
    expiry = int((time.time() if now is None else now) + ttl_s)
    body = f"{TOKEN_VERSION}.{subject_token(tenant, what='tenant')}.{expiry}"
    mac = hmac.new(bytes.fromhex(secret), body.encode(), hashlib.sha256).hexdigest()
    return f"{body}.{mac}"


def token_tenant(presented: str | None) -> str | None:
    """The tenant a token or proof names (unverified: admission checks it), or None when it is shaped like
    neither."""
    parts = (presented or "").split(".")
    if not ((len(parts) == 4 and parts[0] == TOKEN_VERSION) or (len(parts) == 6 and parts[0] == PROOF_VERSION)):
        return None
    return parts[1] or None


def _proof_mac(key: bytes, body: str, model: str, request_id: str, reply: str) -> str:
    message = "\n".join((body, model, request_id, reply)).encode("utf-8", "surrogateescape")
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def request_proof(token: str, model: str, request_id: str, reply: str | None = None,
                  now: float | None = None) -> str:
    """The proof to send, instead of ``token``, with one request: bound to ``model``, ``request_id`` and, when
    given, the ``reply`` subject (else any reply), issued now. A value that is not a token is returned as is
    (admission refuses it)."""
    parts = token.split(".")
    if len(parts) != 4 or parts[0] != TOKEN_VERSION:
        return token
    try:
        key = bytes.fromhex(parts[3])
    except ValueError:
        return token
    issued_ms = int((time.time() if now is None else now) * 1000)
    body = f"{PROOF_VERSION}.{parts[1]}.{parts[2]}.{issued_ms}.{REPLY_BOUND if reply else ANY_REPLY}"
    return f"{body}.{_proof_mac(key, body, model, request_id, reply or '')}"


class TenantVerifier:
    """Verifies tokens against the tenants' secrets."""

    def __init__(self, secrets_by_tenant: dict[str, str]) -> None:
        self._keys = {name: bytes.fromhex(secret) for name, secret in secrets_by_tenant.items()}

    def knows(self, tenant: str) -> bool:
        return tenant in self._keys

    def verify(self, tenant: str, presented: str | None, now: float | None = None, *, model: str | None = None,
               request_id: str | None = None, reply: str | None = None, window_s: float = 30.0,
               bearer: bool = True) -> Presented:
        """What ``presented`` is, when it authenticates ``tenant``: an unexpired token (only with ``bearer``), or
        an unexpired proof for ``model``, ``request_id`` and ``reply`` issued within ``window_s`` of now (single
        use is the caller's to enforce, with ``Presented.nonce``); else raise ``InvalidCredential``."""
        now = time.time() if now is None else now
        key = self._keys.get(tenant)
        if key is None or not presented:
            raise InvalidCredential(CredentialRefusal.MISSING)
        parts = presented.split(".")
        if len(parts) == 4 and parts[0] == TOKEN_VERSION and parts[1] == tenant:
            self._check_token(key, parts, now)
            if not bearer:
                raise InvalidCredential(CredentialRefusal.BEARER)
            return Presented()
        if len(parts) != 6 or parts[0] != PROOF_VERSION or parts[1] != tenant or parts[4] not in (REPLY_BOUND,
                                                                                                  ANY_REPLY):
            raise InvalidCredential(CredentialRefusal.MALFORMED)
        if model is None or request_id is None:
            raise InvalidCredential(CredentialRefusal.MALFORMED)
        expiry, issued_s = _whole(parts[2]), _whole(parts[3]) / 1000.0
        token_mac = hmac.new(key, ".".join((TOKEN_VERSION, *parts[1:3])).encode(), hashlib.sha256).digest()
        body = ".".join(parts[:5])
        bound_reply = (reply or "") if parts[4] == REPLY_BOUND else ""
        expected = _proof_mac(token_mac, body, model, request_id, bound_reply)
        if not hmac.compare_digest(expected.encode(), parts[5].encode(errors="replace")):
            raise InvalidCredential(CredentialRefusal.SIGNATURE)
        if expiry < now:
            raise InvalidCredential(CredentialRefusal.EXPIRED)
        if abs(now - issued_s) > window_s:
            raise InvalidCredential(CredentialRefusal.STALE)
        return Presented(nonce=parts[5], issued_s=issued_s)

    @staticmethod
    def _check_token(key: bytes, parts: list[str], now: float) -> None:
        expected = hmac.new(key, ".".join(parts[:3]).encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected.encode(), parts[3].encode(errors="replace")):
            raise InvalidCredential(CredentialRefusal.SIGNATURE)
        if _whole(parts[2]) < now:
            raise InvalidCredential(CredentialRefusal.EXPIRED)


def _whole(text: str) -> int:
    """A non-negative decimal integer of at most 16 digits, else ``InvalidCredential``."""
    if not (text.isascii() and text.isdigit() and len(text) <= 16):
        raise InvalidCredential(CredentialRefusal.MALFORMED)
    return int(text)


def write_credentials(path: Path, tenants: list[str], existing: dict[str, str] | None = None) -> dict[str, str]:
    """Write a credentials file holding a secret per tenant, keeping secrets already present."""
    keys = {name: (existing or {}).get(name) or new_secret() for name in tenants}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump({"tenants": keys}, out, indent=2)
    return keys


def read_credentials(path: Path) -> dict[str, str]:
    """Read a credentials file; raises ``ValueError`` with the path when it is unusable."""
    try:
        data = json.loads(Path(path).read_text())
        tenants = data["tenants"]
        if not isinstance(tenants, dict):
            raise TypeError
        for secret in tenants.values():
            bytes.fromhex(secret)
        return {str(k): str(v) for k, v in tenants.items()}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(
            f"credentials file {path} unusable ({exc.__class__.__name__}): rerun `din up` or fix it"
        ) from None
