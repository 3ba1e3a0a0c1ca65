"""Reading a raw request: who sent it, for what, under which SLA and deadline, and is the body well formed.

The options (``shared.contracts.options.RequestOptionsV1``) come from ``Din-*``
headers, or from the JSON body's ``parameters`` for clients that cannot set
headers; headers win. Nothing here knows NATS.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from pydantic import ValidationError

from din.shared.contracts.inference import (
    JSON_CONTENT_TYPE,
    TENSOR_CONTENT_TYPE,
    InferRequestV1,
    RequestHeaders,
)
from din.shared.contracts.job import JobV1
from din.shared.contracts.options import (
    DEFAULT_TIMEOUT_MS,
    MAX_TIMEOUT_MS,
    RequestOptionsV1,
    check_options,
    check_timeout,
    lookup_in,
    parse_request_id,
    read_options,
)
from din.shared.credentials import Presented
from din.shared.errors import DinError, ErrorCode


@dataclass(frozen=True)
class Intake:
    """What admission learned from one request: its options, resolved, and its body's content type.

    ``options.request_id`` and ``options.deadline_ms`` are always set here (a given or assigned id, an absolute
    deadline); ``request_id`` and ``deadline_ms`` read them typed.
    """

    options: RequestOptionsV1
    content_type: str
    credential: Presented | None = None
    """The token or proof that authenticated it (set by the gate)."""

    @property
    def request_id(self) -> str:
        return self.options.request_id or ""

    @property
    def deadline_ms(self) -> int:
        return self.options.deadline_ms or 0


def read_intake(headers: dict[str, str] | None, body: bytes, now_ms: float, max_payload: int) -> Intake:
    """Validate the body against the contract and collect the request's options; raise ``DinError``."""
    headers = headers or {}
    if len(body) > max_payload:
        raise DinError(ErrorCode.PAYLOAD_TOO_LARGE, f"payload of {len(body)} bytes exceeds the limit of {max_payload}")
    content_type = headers.get(RequestHeaders.CONTENT_TYPE, JSON_CONTENT_TYPE).split(";")[0].strip()
    request = _body(content_type, body)
    params = (request.parameters if request else None) or {}
    if request is not None and request.model_version is not None and "model_version" not in params:
        params = {**params, "model_version": request.model_version}
    asked = read_options(lookup_in(headers, params), RequestOptionsV1)
    check_options(asked)
    resolved = asked.model_copy(update={
        "deadline_ms": _deadline_ms(asked, now_ms),
        "request_id": asked.request_id or _body_request_id(request) or uuid.uuid4().hex,
    })
    return Intake(options=resolved, content_type=content_type)


def _body(content_type: str, body: bytes) -> InferRequestV1 | None:
    """The JSON request (``None`` for the binary form); ``DinError`` when it breaks the contract."""
    if content_type == TENSOR_CONTENT_TYPE:
        return None
    if content_type != JSON_CONTENT_TYPE:
        raise DinError(
            ErrorCode.BAD_REQUEST,
            f"unsupported content type {content_type!r}: use {JSON_CONTENT_TYPE} or {TENSOR_CONTENT_TYPE}",
        )
    try:
        return InferRequestV1.model_validate_json(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        if first["type"] == "json_invalid":
            raise DinError(ErrorCode.BAD_REQUEST, "body is not valid JSON") from None
        raise DinError(ErrorCode.SCHEMA_VIOLATION, f"{where}: {first['msg']}") from None


def _body_request_id(request: InferRequestV1 | None) -> str | None:
    """The JSON body's own id, held to the same rule as the header's."""
    if request is None or request.id is None:
        return None
    return parse_request_id(request.id)


def _deadline_ms(asked: RequestOptionsV1, now_ms: float) -> int:
    """The absolute deadline: the one asked for (the client's clock: time spent before admission counts) and
    receipt plus the timeout, whichever comes first (a client clock running ahead gains nothing); receipt plus
    the timeout (or the SLA class's default) when no deadline was asked for."""
    if asked.deadline_ms is not None:
        deadline_ms = asked.deadline_ms
        if deadline_ms - now_ms > MAX_TIMEOUT_MS:
            raise DinError(ErrorCode.BAD_REQUEST,
                           f"deadline_ms must be at most {MAX_TIMEOUT_MS} ms after the request arrives")
        if asked.timeout_ms is not None:
            check_timeout(asked.timeout_ms)
            deadline_ms = min(deadline_ms, int(now_ms) + asked.timeout_ms)
    else:
        timeout_ms = asked.timeout_ms if asked.timeout_ms is not None else DEFAULT_TIMEOUT_MS[asked.sla_class]
        check_timeout(timeout_ms)
        deadline_ms = int(now_ms) + timeout_ms
    if deadline_ms <= now_ms:
        raise DinError(ErrorCode.DEADLINE_EXCEEDED, "the request's deadline has already passed")
    return deadline_ms


def admitted_job(intake: Intake, *, tenant: str, model: str, reply_to: str, traceparent: str | None,
                 received_ms: float, admitted_ms: float) -> JobV1:
    """The job of an admitted request: every serving option it asked for, its id, deadline and reply subject."""
    return JobV1(
        **intake.options.serving_options(),
        request_id=intake.request_id,
        tenant=tenant,
        model=model,
        deadline_ms=intake.deadline_ms,
        reply_to=reply_to,
        content_type=intake.content_type,
        traceparent=traceparent,
        received_ms=received_ms,
        stamps_ms={"admitted": admitted_ms},
    )


def peek_request_id(headers: dict[str, str] | None, body: bytes) -> str | None:
    """Best-effort request id of a request that failed validation, to put in its error."""
    if headers and headers.get(RequestHeaders.REQUEST_ID):
        return headers[RequestHeaders.REQUEST_ID]
    try:
        value = json.loads(body).get("id")
        return value if isinstance(value, str) else None
    except (ValueError, AttributeError, UnicodeDecodeError):
        return None
