"""Base64url without padding: how key files and bucket entries carry wrapped keys as JSON text."""

from __future__ import annotations

import base64


def encode(data: bytes) -> str:
    """``data`` as base64url text without padding."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def decode(text: str) -> bytes:
    """Inverse of ``encode``; raises ``ValueError`` on text that is not base64url."""
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
