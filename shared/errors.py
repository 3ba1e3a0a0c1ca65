"""Errors as values with stable codes.

Every request-reply endpoint answers a failure with ``ErrorV1`` in the body
and the NATS micro error headers (``Nats-Service-Error``,
``Nats-Service-Error-Code``), so any NATS client can tell a failure from a
result without parsing the body.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from enum import StrEnum

from pydantic import BaseModel, Field


class ErrorCode(StrEnum):
    """Stable error codes. Never renumber or reuse one."""

    BAD_REQUEST = "bad_request"
    SCHEMA_VIOLATION = "schema_violation"
    BAD_TENSOR = "bad_tensor"
    UNAUTHENTICATED = "unauthenticated"
    UNKNOWN_TENANT = "unknown_tenant"
    UNKNOWN_MODEL = "unknown_model"
    FORBIDDEN = "forbidden"
    """The tenant may not call this model (the topology's ``models`` for it, or an internal part of a model)."""
    PAYLOAD_TOO_LARGE = "payload_too_large"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    RATE_LIMITED = "rate_limited"
    OVERLOADED = "overloaded"
    NO_ELIGIBLE_EXECUTOR = "no_eligible_executor"
    EXECUTOR_LOST = "executor_lost"
    INFERENCE_FAILED = "inference_failed"
    INTERNAL = "internal"
    UNAVAILABLE = "unavailable"
    """A DIN service the request must pass through is not running at that site (or cannot be reached)."""


_HTTP_LIKE = {
    ErrorCode.BAD_REQUEST: 400,
    ErrorCode.SCHEMA_VIOLATION: 400,
    ErrorCode.BAD_TENSOR: 400,
    ErrorCode.UNAUTHENTICATED: 401,
    ErrorCode.UNKNOWN_TENANT: 401,
    ErrorCode.UNKNOWN_MODEL: 404,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.PAYLOAD_TOO_LARGE: 413,
    ErrorCode.DEADLINE_EXCEEDED: 504,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.OVERLOADED: 503,
    ErrorCode.NO_ELIGIBLE_EXECUTOR: 503,
    ErrorCode.EXECUTOR_LOST: 503,
    ErrorCode.INFERENCE_FAILED: 500,
    ErrorCode.INTERNAL: 500,
    ErrorCode.UNAVAILABLE: 503,
}

_RETRIABLE = {
    ErrorCode.RATE_LIMITED,
    ErrorCode.OVERLOADED,
    ErrorCode.NO_ELIGIBLE_EXECUTOR,
    ErrorCode.EXECUTOR_LOST,
    ErrorCode.UNAVAILABLE,
}


class ErrorV1(BaseModel):
    """A failed request's answer: a stable code, a human message and whether a retry may help."""

    code: ErrorCode = Field(description="Stable machine-readable error code.")
    message: str = Field(description="Human-readable explanation, safe to show to the caller.")
    retriable: bool = Field(description="True when the same request may succeed if sent again later.")
    request_id: str | None = Field(default=None, description="Id of the request this error answers.")
    retry_after_ms: int | None = Field(
        default=None, description="For overload and rate limits: how long to wait before retrying."
    )
    status: int = Field(description="HTTP-like status number, as in NATS micro's error code header.")


class DinError(Exception):
    """Raised inside services; turned into an ``ErrorV1`` answer at the edge of a handler."""

    def __init__(self, code: ErrorCode, message: str, *, retry_after_ms: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_ms = retry_after_ms

    @property
    def retriable(self) -> bool:
        return self.code in _RETRIABLE

    def to_model(self, request_id: str | None = None) -> ErrorV1:
        return ErrorV1(
            code=self.code,
            message=self.message,
            retriable=self.retriable,
            request_id=request_id,
            retry_after_ms=self.retry_after_ms,
            status=_HTTP_LIKE[self.code],
        )


class ErrorReplyV1(BaseModel):
    """Body of an error answer: ``{"error": {...}}``."""

    error: ErrorV1 = Field(description="What went wrong.")


ERROR_HEADER = "Nats-Service-Error"
ERROR_CODE_HEADER = "Nats-Service-Error-Code"
DIN_ERROR_HEADER = "Din-Error"


error_observer: ContextVar[Callable[[ErrorV1], None] | None] = ContextVar("din_error_observer", default=None)
"""Told of every error ``error_reply`` encodes in this context (a subscription's counter: ``shared.micro``)."""


def error_reply(error: DinError, request_id: str | None) -> tuple[bytes, dict[str, str]]:
    """Encode ``error`` as a reply body and headers."""
    model = error.to_model(request_id)
    observer = error_observer.get()
    if observer is not None:
        observer(model)
    body = ErrorReplyV1(error=model).model_dump_json(exclude_none=True).encode()
    headers = {
        ERROR_HEADER: model.message[:200],
        ERROR_CODE_HEADER: str(model.status),
        DIN_ERROR_HEADER: model.code.value,
    }
    return body, headers
