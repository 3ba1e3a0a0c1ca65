"""What each hop's seal binds (its AAD): a request, a multi-stage hand-off, a result.

A payload sealed under one binding does not open under another, so a sealed body cannot be moved to another
request, tenant, model, reply subject, stage or site.
"""

from __future__ import annotations

from collections.abc import Mapping

from din.shared.contracts.inference import RequestHeaders
from din.shared.contracts.options import RequestOptionsV1, wire_options
from din.shared.envelope import InvalidToken, Reason

BOUND_HEADER_PREFIXES = ("Din-Tensor-", "Content-Type")
"""Request headers that change how the body is read: bound into the AAD."""
OPTION_HEADERS = frozenset(wire.header for _, wire in wire_options(RequestOptionsV1)) - {
    RequestHeaders.REQUEST_ID, RequestHeaders.TRACEPARENT, RequestHeaders.TOKEN}
"""Request headers that ask for an option (labels, SLA class, deadline, ...): bound into the AAD of the client's
seal, so admission refuses a request whose options were changed, added or removed after sealing. Past
admission the options travel in the job header, authenticated by its tag (``jobfacts``), so later hops leave
them out of the comparison (``check_binding``)."""
ANSWER_FIELD = "answer"
ANSWER_PLAIN = "plain"
ANSWER_KEY_FIELD = "answer_key"
"""The client's answer key (``payload.answer_keys``), bound in its request and carried by every hop's seal: the
answer is sealed to it, so no site but the client's opens it."""


def request_binding(request_id: str, tenant: str, model: str, reply: str,
                    headers: Mapping[str, str] | None) -> dict[str, str]:
    """The AAD of a request: its id, tenant, model, reply subject, and the headers that say how to read the body."""
    aad = {"rid": request_id, "tenant": tenant, "model": model, "reply": reply}
    for name, value in (headers or {}).items():
        if name.startswith(BOUND_HEADER_PREFIXES) or name in OPTION_HEADERS:
            aad[name] = value
    return aad


def stage_binding(request_id: str, tenant: str, stage: int, site: str, reply: str,
                  headers: Mapping[str, str] | None, *, plain_answer: bool = False,
                  answer_key: str | None = None) -> dict[str, str]:
    """The AAD of what a multi-stage job hands to stage ``stage`` at ``site``: the request, the stage, the site, the
    reply subject and the headers that say how to read the body; ``plain_answer`` when the client may be answered
    in clear, else the client's ``answer_key``."""
    aad = request_binding(request_id, tenant, f"stage-{stage}", reply, headers)
    aad["site"] = site
    if plain_answer:
        aad[ANSWER_FIELD] = ANSWER_PLAIN
    if answer_key is not None:
        aad[ANSWER_KEY_FIELD] = answer_key
    return aad


def check_binding(aad: Mapping[str, str], expected: Mapping[str, str]) -> None:
    """Refuse (``InvalidToken``) unless ``aad`` is ``expected``, give or take the answer mode, the answer key and
    the option headers the client bound (admission checked those; the job header carries the options on)."""
    bound = {k: v for k, v in aad.items() if k not in (ANSWER_FIELD, ANSWER_KEY_FIELD) and k not in OPTION_HEADERS}
    if bound != dict(expected) or (ANSWER_FIELD in aad and aad[ANSWER_FIELD] != ANSWER_PLAIN):
        raise InvalidToken(Reason.AAD_MISMATCH)


def result_binding(request_id: str, tenant: str, seq: int | None = None) -> dict[str, str]:
    """The AAD of a result: the request it answers and its tenant; for a token stream's chunk, its position."""
    aad = {"rid": request_id, "tenant": tenant}
    if seq is not None:
        aad["seq"] = str(seq)
    return aad
