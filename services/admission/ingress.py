"""The ingress hop: a tenant's sealed request opened at admission, or a plaintext one the policy lets in. No NATS here.

A client seals its request for its entry site alone (the pairwise key of its
tenant and this site); it travels on to the classifier and scheduler here as it
came (ciphertext and envelope headers), once its binding holds the client's answer
key (every answer is sealed to it). A request sealed for another site's admission
does not open here (``wrong_reader``). A plaintext request from a tenant in the
policy's ``plaintext_ingress`` is sealed here for this site, before it goes any
further, and marked so the executor answers it unsealed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from din.shared.contracts.inference import RequestHeaders
from din.shared.envelope import H_AAD, InvalidToken, Reason
from din.shared.errors import DinError, ErrorCode
from din.shared.security import (
    ANSWER_FIELD,
    ANSWER_KEY_FIELD,
    ANSWER_PLAIN,
    ENVELOPE_PREFIX,
    PayloadProtection,
    PayloadSecurity,
    decode_answer_key,
    is_sealed,
    request_binding,
    tenant_principal,
)

AEAD_OVERHEAD = 16


def claimed_answer_key(headers: dict[str, str] | None) -> str | None:
    """The answer key a sealed request's binding names, as its headers claim it (the seal then proves it); None
    when there is none or it is no X25519 public key."""
    try:
        claimed = json.loads((headers or {})[H_AAD]).get(ANSWER_KEY_FIELD)
        decode_answer_key(claimed)
    except (KeyError, ValueError, TypeError, AttributeError, InvalidToken):
        return None
    return claimed


@dataclass
class Unsealed:
    """A request after the ingress hop: its plaintext, and the envelope it travels on in (if it came sealed)."""

    plaintext: bytes
    envelope: dict[str, str] = field(default_factory=dict)
    protection: PayloadProtection = PayloadProtection.ENCRYPTED


class RequestOpener:
    """Opens requests for admission and seals the ones that arrive in clear."""

    def __init__(self, security: PayloadSecurity, max_payload: int) -> None:
        self.security = security
        self.max_payload = max_payload

    def unseal(self, tenant: str, model: str, reply: str, headers: dict[str, str] | None, body: bytes) -> Unsealed:
        """The request's plaintext; raise ``InvalidToken`` when it cannot be authenticated.

        Raises ``DinError`` (payload too large) before any crypto for an oversized body.
        """
        if not self.security.enabled:
            return Unsealed(body, protection=PayloadProtection.OFF)
        if not is_sealed(headers):
            if tenant in self.security.agent.plaintext_ingress:
                return Unsealed(body, protection=PayloadProtection.CLIENT_PLAINTEXT)
            raise InvalidToken(Reason.MALFORMED)
        if len(body) > self.max_payload + AEAD_OVERHEAD:
            raise DinError(ErrorCode.PAYLOAD_TOO_LARGE,
                           f"payload of {len(body)} bytes exceeds the limit of {self.max_payload}")
        sender = tenant_principal(tenant)
        expected = request_binding((headers or {}).get(RequestHeaders.REQUEST_ID, ""), tenant, model, reply, headers)
        answer_key = claimed_answer_key(headers)
        if answer_key is not None:
            expected[ANSWER_KEY_FIELD] = answer_key
        opened = self.security.open_to_me(body, headers, senders=lambda name: name == sender, expected_aad=expected)
        if answer_key is None:
            raise DinError(ErrorCode.BAD_REQUEST, "a sealed request must bind the client's answer key "
                           f"({ANSWER_KEY_FIELD}): answers are sealed to it")
        sealed_headers = {k: v for k, v in (headers or {}).items() if k.startswith(ENVELOPE_PREFIX)}
        return Unsealed(opened.plaintext, sealed_headers)

    def forward(
        self, unsealed: Unsealed, *, request_id: str, tenant: str, model: str, reply: str,
        passthrough: dict[str, str], body: bytes,
    ) -> tuple[bytes, dict[str, str]]:
        """The body and envelope headers the request travels on with."""
        if not self.security.enabled:
            return body, {}
        if unsealed.envelope:
            return body, unsealed.envelope
        aad = request_binding(request_id, tenant, model, reply, passthrough) | {ANSWER_FIELD: ANSWER_PLAIN}
        sealed = self.security.seal_to(unsealed.plaintext, to=self.security.principal, aad=aad)
        return sealed.body, sealed.to_headers()
