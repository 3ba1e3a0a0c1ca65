"""Reading a raw request: who sent it, for what, under which SLA and deadline, and is the body well formed.

Metadata comes from ``Din-*`` headers, or from the JSON body's ``parameters``
for clients that cannot set headers; headers win. Nothing here knows NATS.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from pydantic import ValidationError

from shared.contracts.inference import (
    JSON_CONTENT_TYPE,
    TENSOR_CONTENT_TYPE,
    InferRequestV1,
    RequestHeaders,
    SlaClass,
)
from shared.cascade import parse_cascade
from shared.errors import DinError, ErrorCode
from shared.privacy import parse_protection

DEFAULT_TIMEOUT_MS = {SlaClass.REALTIME: 1_000, SlaClass.INTERACTIVE: 5_000, SlaClass.BATCH: 60_000}
MAX_TIMEOUT_MS = 600_000
MAX_TOKENS_LIMIT = 512
SPLIT_AUTO = "auto"
SPLIT_NONE = "none"


@dataclass
class Intake:
    """What admission learned from one request."""

    request_id: str
    token: str | None
    sla_class: SlaClass
    deadline_ms: int
    content_type: str
    labels: list[str]
    allow_degrade: bool
    min_accuracy: float | None
    model_version: str | None
    traceparent: str | None
    cascade_threshold: float | None = None
    cascade_target_rate: float | None = None
    max_tokens: int | None = None
    split: str | None = None
    protection: str | None = None


def _flag(value: object) -> bool:
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() in ("1", "true", "yes", "on")


def read_intake(headers: dict[str, str] | None, body: bytes, now_ms: float, max_payload: int) -> Intake:
    """Validate the body against the contract and collect the request's metadata; raise ``DinError``."""
    headers = headers or {}
    if len(body) > max_payload:
        raise DinError(ErrorCode.PAYLOAD_TOO_LARGE, f"payload of {len(body)} bytes exceeds the limit of {max_payload}")
    content_type = headers.get(RequestHeaders.CONTENT_TYPE, JSON_CONTENT_TYPE).split(";")[0].strip()
    params: dict = {}
    body_id: str | None = None
    if content_type == JSON_CONTENT_TYPE:
        try:
            request = InferRequestV1.model_validate_json(body)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "body"
            if first["type"] == "json_invalid":
                raise DinError(ErrorCode.BAD_REQUEST, "body is not valid JSON") from None
            raise DinError(ErrorCode.SCHEMA_VIOLATION, f"{where}: {first['msg']}") from None
        params = request.parameters or {}
        body_id = request.id
    elif content_type != TENSOR_CONTENT_TYPE:
        raise DinError(
            ErrorCode.BAD_REQUEST,
            f"unsupported content type {content_type!r}: use {JSON_CONTENT_TYPE} or {TENSOR_CONTENT_TYPE}",
        )

    def pick(header: str, param: str) -> object | None:
        value = headers.get(header)
        return value if value is not None else params.get(param)

    raw_sla = pick(RequestHeaders.SLA_CLASS, "sla_class") or SlaClass.INTERACTIVE.value
    try:
        sla = SlaClass(str(raw_sla))
    except ValueError:
        raise DinError(ErrorCode.BAD_REQUEST, f"unknown SLA class {raw_sla!r}: use realtime, interactive or batch") from None

    deadline_raw = pick(RequestHeaders.DEADLINE_MS, "deadline_ms")
    timeout_raw = pick(RequestHeaders.TIMEOUT_MS, "timeout_ms")
    try:
        if deadline_raw is not None:
            deadline_ms = int(deadline_raw)
        else:
            timeout_ms = int(timeout_raw) if timeout_raw is not None else DEFAULT_TIMEOUT_MS[sla]
            if not 0 < timeout_ms <= MAX_TIMEOUT_MS:
                raise DinError(ErrorCode.BAD_REQUEST, f"timeout_ms must be in 1..{MAX_TIMEOUT_MS}")
            deadline_ms = int(now_ms) + timeout_ms
    except (TypeError, ValueError):
        raise DinError(ErrorCode.BAD_REQUEST, "timeout_ms and deadline_ms must be whole numbers") from None
    if deadline_ms <= now_ms:
        raise DinError(ErrorCode.DEADLINE_EXCEEDED, "the request's deadline has already passed")

    labels_raw = pick(RequestHeaders.LABELS, "labels") or []
    labels = [s.strip() for s in labels_raw.split(",")] if isinstance(labels_raw, str) else list(labels_raw)
    min_acc_raw = pick(RequestHeaders.MIN_ACCURACY, "min_accuracy")
    try:
        min_accuracy = float(min_acc_raw) if min_acc_raw is not None else None
    except (TypeError, ValueError):
        raise DinError(ErrorCode.BAD_REQUEST, "min_accuracy must be a number between 0 and 1") from None
    version = pick(RequestHeaders.MODEL_VERSION, "model_version")
    cascade_raw = pick(RequestHeaders.CASCADE, "cascade")
    cascade = parse_cascade(cascade_raw) if cascade_raw is not None else None
    cascade_threshold = cascade.threshold if cascade else None
    if cascade is not None and version is not None:
        raise DinError(ErrorCode.BAD_REQUEST, "a cascade picks its own model variants: do not pin a model version")
    max_tokens = _max_tokens(pick(RequestHeaders.MAX_TOKENS, "max_tokens"))
    split_raw = pick(RequestHeaders.SPLIT, "split")
    if split_raw is not None and not isinstance(split_raw, str):
        raise DinError(ErrorCode.BAD_REQUEST, "split must be 'auto', 'none' or a split point name")
    split = split_raw.strip() if split_raw is not None else None
    if split is not None and (not split or not split.isprintable() or len(split) > 64):
        raise DinError(ErrorCode.BAD_REQUEST, "split must be 'auto', 'none' or a split point name")
    protection_raw = pick(RequestHeaders.SPLIT_PROTECTION, "split_protection")
    protection = None
    if protection_raw is not None:
        parse_protection(str(protection_raw))
        protection = str(protection_raw).strip()
        if split is None:
            raise DinError(ErrorCode.BAD_REQUEST, "split_protection applies only to split inference: set split too")
    if sum(x is not None for x in (cascade, max_tokens, split if split != SPLIT_NONE else None)) > 1:
        raise DinError(ErrorCode.BAD_REQUEST, "cascade, max_tokens and split cannot be combined in one request")
    token = pick(RequestHeaders.TOKEN, "token")
    request_id = headers.get(RequestHeaders.REQUEST_ID) or body_id or uuid.uuid4().hex
    if not request_id.isprintable() or len(request_id) > 128:
        raise DinError(ErrorCode.BAD_REQUEST, "request id must be printable and at most 128 characters")
    return Intake(
        request_id=request_id,
        token=str(token) if token is not None else None,
        sla_class=sla,
        deadline_ms=deadline_ms,
        content_type=content_type,
        labels=[label for label in labels if label],
        allow_degrade=_flag(pick(RequestHeaders.ALLOW_DEGRADE, "allow_degrade") or False),
        min_accuracy=min_accuracy,
        model_version=str(version) if version is not None else None,
        traceparent=headers.get(RequestHeaders.TRACEPARENT),
        cascade_threshold=cascade_threshold,
        cascade_target_rate=cascade.target_rate if cascade else None,
        max_tokens=max_tokens,
        split=split,
        protection=protection,
    )


def _max_tokens(raw: object | None) -> int | None:
    if raw is None:
        return None
    try:
        value = int(str(raw).strip())
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_TOKENS_LIMIT:
        raise DinError(ErrorCode.BAD_REQUEST, f"max_tokens must be a whole number from 1 to {MAX_TOKENS_LIMIT}, "
                                              f"not {raw!r}")
    return value


def peek_request_id(headers: dict[str, str] | None, body: bytes) -> str | None:
    """Best-effort request id of a request that failed validation, to put in its error."""
    if headers and headers.get(RequestHeaders.REQUEST_ID):
        return headers[RequestHeaders.REQUEST_ID]
    try:
        value = json.loads(body).get("id")
        return value if isinstance(value, str) else None
    except (ValueError, AttributeError, UnicodeDecodeError):
        return None
