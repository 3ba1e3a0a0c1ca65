"""Inference request and response, in the Open Inference Protocol (KServe v2 / Triton) tensor format.

A request is JSON (``InferRequestV1``) or, for large tensors, one raw tensor in
the body with its name, shape and datatype in headers (see ``shared.tensors``).
DIN's own metadata (SLA class, deadline, credentials, labels) travels in
``Din-*`` headers or, for clients that cannot set headers, in ``parameters``.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Datatype(StrEnum):
    """Tensor element types of the Open Inference Protocol that DIN serves (every fixed-size one ONNX Runtime
    takes; not BYTES, BF16)."""

    FP32 = "FP32"
    FP64 = "FP64"
    FP16 = "FP16"
    INT64 = "INT64"
    INT32 = "INT32"
    INT16 = "INT16"
    INT8 = "INT8"
    UINT64 = "UINT64"
    UINT32 = "UINT32"
    UINT16 = "UINT16"
    UINT8 = "UINT8"
    BOOL = "BOOL"


class SlaClass(StrEnum):
    """Service class of a request; realtime is isolated from batch floods."""

    REALTIME = "realtime"
    INTERACTIVE = "interactive"
    BATCH = "batch"


class TensorV1(BaseModel):
    """One named tensor: shape, datatype and row-major flattened data."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Tensor name, as in the model's config.")
    shape: list[int] = Field(description="Dimensions; the first is the batch dimension.")
    datatype: Datatype = Field(description="Element type.")
    data: list[Any] = Field(
        default_factory=list,
        description="Elements in row-major order, flattened (or nested). Absent only where the Open Inference "
        "Protocol's binary tensor extension carries them after the JSON (HTTP gateway).",
    )
    parameters: dict[str, Any] | None = Field(
        default=None,
        exclude_if=lambda value: value is None,
        description="Per-tensor parameters of the Open Inference Protocol (e.g. binary_data_size, binary_data); "
        "accepted, and read only by the HTTP gateway's binary extension.",
    )


class RequestedOutputV1(BaseModel):
    """An output the caller wants back."""

    name: str = Field(description="Output tensor name.")
    parameters: dict[str, Any] | None = Field(
        default=None, exclude_if=lambda value: value is None,
        description="Per-output parameters of the Open Inference Protocol (e.g. binary_data).",
    )


class InferRequestV1(BaseModel):
    """An inference request (Open Inference Protocol)."""

    model_config = ConfigDict(extra="forbid")

    id: str | None = Field(default=None, description="Caller's request id; DIN assigns one when absent.")
    model_name: str | None = Field(
        default=None,
        description="Model the body is meant for (KServe's client sends it). The request subject names the model "
        "that serves it (this field is not checked over NATS); the HTTP gateway refuses a name other than its "
        "URL's (bad_request).",
    )
    model_version: str | None = Field(
        default=None,
        description="Model version the body is meant for; where the model_version option is not set otherwise, "
        "it asks for that version.",
    )
    inputs: list[TensorV1] = Field(min_length=1, description="Input tensors.")
    outputs: list[RequestedOutputV1] | None = Field(
        default=None, description="Outputs to return; all when absent."
    )
    parameters: dict[str, Any] | None = Field(
        default=None,
        description="Free-form parameters; DIN reads its request options here when headers are not used: "
        "sla_class, timeout_ms, deadline_ms, token, labels, allow_degrade, min_accuracy, model_version, cascade, "
        "max_tokens, split and split_protection (shared.contracts.options).",
    )


class ServedByV1(BaseModel):
    """Where and by what a request was served."""

    site: str = Field(description="Site of the executor that answered.")
    executor: str = Field(description="Executor id.")
    model: str = Field(description="Model that answered.")
    model_version: str = Field(description="Version of the model that answered.")
    degraded: bool = Field(description="True when a smaller variant answered instead of the one asked for.")
    batch_size: int = Field(description="Size of the batch this request was computed in.")
    escalated: bool = Field(
        default=False,
        description="Cascade requests: True when the small variant was not confident enough and the large one "
        "answered; False when the small one answered (and for requests without a cascade).",
    )
    split_point: str | None = Field(
        default=None, description="Split inference: where the model was cut ('local' or 'no-split' when it was not)."
    )
    stages: list[str] = Field(
        default_factory=list,
        description="Multi-stage jobs: every stage as '<kind>:<model>@<site>/<executor>', in order.",
    )


class InferResponseV1(BaseModel):
    """A successful inference answer (Open Inference Protocol) plus where it was served."""

    model_name: str = Field(description="Model that answered.")
    model_version: str = Field(description="Version of that model.")
    id: str = Field(description="Request id.")
    outputs: list[TensorV1] = Field(description="Output tensors.")
    served_by: ServedByV1 = Field(description="Site, executor and model that served the request.")
    timings_ms: dict[str, float] = Field(
        default_factory=dict,
        description="Latency breakdown in milliseconds: admission, classify, schedule, queue, compute, total.",
    )


class StreamChunkV1(BaseModel):
    """One message of a token stream: a generated token, or the last message with the stream's summary.

    A generation request gets chunks ``seq`` 0, 1, 2, ... on its reply subject, the last with ``done``;
    or, at any point, one error reply (``Nats-Service-Error`` headers) that ends the stream.
    """

    id: str = Field(description="Request id.")
    seq: int = Field(description="Position of this chunk in the stream, from 0.")
    text: str = Field(description="The generated text of this chunk (empty on the last one).")
    token: int | None = Field(default=None, description="The generated token id.")
    done: bool = Field(default=False, description="True on the last chunk of the stream.")
    finish_reason: str | None = Field(default=None, description="Last chunk: 'length' when max_tokens were made.")
    served_by: ServedByV1 | None = Field(default=None, description="Last chunk: where prefill and decode ran.")
    prompt_tokens: int | None = Field(default=None, description="Last chunk: the prompt's length in tokens.")
    completion_tokens: int | None = Field(default=None, description="Last chunk: tokens generated.")
    timings_ms: dict[str, float] = Field(
        default_factory=dict,
        description="Last chunk: ttft (time to first token), tpot (mean time per output token after the first), "
        "prefill, state_transfer and total, in milliseconds.",
    )


STREAM_SEQ_HEADER = "Din-Stream-Seq"
"""On every token-stream message: the chunk's ``seq`` (its seal binds it too)."""


class RequestHeaders:
    """Header names a client may set on a request (all optional but the token).

    Each but ``CONTENT_TYPE`` carries an option of ``shared.contracts.options.RequestOptionsV1``, which declares
    its value, default, ``parameters`` fallback and description (``request_header_docs``).
    """

    TOKEN = "Din-Token"
    SLA_CLASS = "Din-Sla-Class"
    TIMEOUT_MS = "Din-Timeout-Ms"
    DEADLINE_MS = "Din-Deadline-Ms"
    LABELS = "Din-Labels"
    ALLOW_DEGRADE = "Din-Allow-Degrade"
    MIN_ACCURACY = "Din-Min-Accuracy"
    MODEL_VERSION = "Din-Model-Version"
    CASCADE = "Din-Cascade"
    MAX_TOKENS = "Din-Max-Tokens"
    SPLIT = "Din-Split"
    SPLIT_PROTECTION = "Din-Split-Protection"
    REQUEST_ID = "Din-Request-Id"
    CONTENT_TYPE = "Content-Type"
    TRACEPARENT = "traceparent"


JSON_CONTENT_TYPE = "application/json"
TENSOR_CONTENT_TYPE = "application/vnd.din.tensor"
