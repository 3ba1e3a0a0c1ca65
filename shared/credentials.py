"""Per-tenant credentials: short signed tokens that admission verifies.

A token is ``din1.<tenant>.<expiry>.<signature>``: HMAC-SHA256 under the
tenant's secret over the first three parts. Tenants' secrets live in a
credentials file (JSON ``{"tenants": {"<name>": "<hex secret>"}}``, mode 0600)
written by ``din up`` or by the operator.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import time
from pathlib import Path

from din.shared.naming import token as subject_token

TOKEN_VERSION = "din1"


class InvalidCredential(Exception):
    """A token that does not authenticate; deliberately says nothing about which check failed."""


def new_secret() -> str:
    return secrets.token_hex(32)


def issue_token(tenant: str, secret: str, ttl_s: float = 3600.0, now: float | None = None) -> str:
    """Sign a token for ``tenant`` valid for ``ttl_s`` seconds."""
    expiry = int((time.time() if now is None else now) + ttl_s)
    body = f"{TOKEN_VERSION}.{subject_token(tenant, what='tenant')}.{expiry}"
    mac = hmac.new(bytes.fromhex(secret), body.encode(), hashlib.sha256).hexdigest()
    return f"{body}.{mac}"


def token_tenant(presented: str | None) -> str | None:
    """The tenant a token names (unverified: admission checks it), or None when it is not shaped like a token."""
    parts = (presented or "").split(".")
    if len(parts) != 4 or parts[0] != TOKEN_VERSION or not parts[1]:
        return None
    return parts[1]


class TenantVerifier:
    """Verifies tokens against the tenants' secrets."""

    def __init__(self, secrets_by_tenant: dict[str, str]) -> None:
        self._keys = {name: bytes.fromhex(secret) for name, secret in secrets_by_tenant.items()}

    def knows(self, tenant: str) -> bool:
        return tenant in self._keys

    def verify(self, tenant: str, presented: str | None, now: float | None = None) -> None:
        """Return if ``presented`` is a valid, unexpired token of ``tenant``; else raise ``InvalidCredential``."""
        key = self._keys.get(tenant)
        if key is None or not presented:
            raise InvalidCredential()
        parts = presented.split(".")
        if len(parts) != 4 or parts[0] != TOKEN_VERSION or parts[1] != tenant:
            raise InvalidCredential()
        body = ".".join(parts[:3])
        expected = hmac.new(key, body.encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected.encode(), parts[3].encode(errors="replace")):
            raise InvalidCredential()
        try:
            expiry = int(parts[2])
        except ValueError:
            raise InvalidCredential() from None
        if expiry < (time.time() if now is None else now):
            raise InvalidCredential()


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
