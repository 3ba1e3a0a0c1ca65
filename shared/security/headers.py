"""The security headers on a message: the envelope (``Din-Env-*``) and a result's signer and signature."""

from __future__ import annotations

from collections.abc import Mapping

from din.shared import envelope

SIGNER_HEADER = "Din-Signer"
"""Principal that signed a result (``Din-Sig`` carries the signature)."""
ENVELOPE_PREFIX = "Din-Env-"
_AEAD_TAG_BYTES = 16


def is_sealed(headers: Mapping[str, str] | None) -> bool:
    """True when a message carries an envelope."""
    return bool(headers) and envelope.H_VERSION in headers


def without_envelope(headers: Mapping[str, str] | None) -> dict[str, str]:
    """``headers`` minus any envelope and signature headers."""
    return {k: v for k, v in (headers or {}).items()
            if not k.startswith(ENVELOPE_PREFIX) and k not in (SIGNER_HEADER, envelope.SIGNATURE_HEADER)}


def payload_size(body: bytes, headers: Mapping[str, str] | None) -> int:
    """Size of the plaintext a (possibly sealed) body carries."""
    if headers and headers.get(envelope.H_MODE) == envelope.MODE_AEAD:
        return max(0, len(body) - _AEAD_TAG_BYTES)
    return len(body)


def signed_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The headers a result signature covers: the envelope and the signer."""
    return {k: v for k, v in headers.items() if k.startswith(ENVELOPE_PREFIX) or k == SIGNER_HEADER}
