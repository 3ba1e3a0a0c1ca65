"""What the HTTP gateway says that the NATS request path does not: OIP metadata, HTTP errors, OpenAI completions.

The gateway (``services/gateway``) serves the Open Inference Protocol's REST API (KServe v2 / Triton) and an
OpenAI-style ``/v1/completions`` at each site with a control plane. Its inference bodies are the request path's own
(``shared.contracts.inference``); the models here are the rest of its HTTP surface.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from din.shared.contracts.inference import Datatype


class ServerMetadataV1(BaseModel):
    """``GET /v2``: the server's name, version and protocol extensions."""

    name: str = Field(description="Server name ('din').")
    version: str = Field(description="DIN's version.")
    extensions: list[str] = Field(description="Open Inference Protocol extensions served (binary_tensor_data).")


class ServerLiveV1(BaseModel):
    """``GET /v2/health/live``: the OIP liveness body (Triton's clients read only the status, KServe's the body)."""

    live: bool = Field(description="Whether the gateway answers.")


class ServerReadyV1(BaseModel):
    """``GET /v2/health/ready``: the OIP readiness body, with status 200 when ready and 503 when not."""

    ready: bool = Field(description="Whether the gateway can send requests on (its NATS connection is up).")


class ModelReadyV1(BaseModel):
    """``GET /v2/models/{name}[/versions/{version}]/ready``: the OIP model readiness body (200 ready)."""

    name: str = Field(description="Model name.")
    ready: bool = Field(description="Whether the network serves the model (and version).")


class TensorMetadataV1(BaseModel):
    """One input or output of a model, as the model's config declares it (``-1``: any size)."""

    name: str = Field(description="Tensor name.")
    datatype: Datatype = Field(description="Element type.")
    shape: list[int] = Field(description="Dimensions, -1 where any size is accepted.")


class ModelMetadataV1(BaseModel):
    """``GET /v2/models/{model}[/versions/{version}]``: a model's versions and tensors."""

    name: str = Field(description="Model name.")
    versions: list[str] = Field(description="Versions DIN serves.")
    platform: str = Field(description="Runtime ('onnxruntime_onnx').")
    inputs: list[TensorMetadataV1] = Field(description="Input tensors.")
    outputs: list[TensorMetadataV1] = Field(description="Output tensors.")
    parameters: dict[str, Any] = Field(default_factory=dict, description="DIN's extras: task, description.")


class HttpErrorV1(BaseModel):
    """Any HTTP error of the gateway: the message in ``error`` (where OIP clients read it), and DIN's structured
    error (code, retriable, retry hint, request id) beside it; the HTTP status is the error's ``status``."""

    error: str = Field(description="Human-readable message ('<code>: <message>').")
    code: str = Field(description="DIN's stable error code (shared.errors.ErrorCode).")
    retriable: bool = Field(description="True when the same request may succeed if sent again later.")
    request_id: str | None = Field(default=None, description="Id of the request this error answers.")
    retry_after_ms: int | None = Field(default=None, description="Overload and rate limits: wait before retrying.")


class CompletionRequestV1(BaseModel):
    """``POST /v1/completions`` (OpenAI-style) for a generation model. DIN decodes greedily: sampling parameters
    (temperature, top_p, ...) are accepted and have no effect; more than one choice is refused."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(description="Generation model, e.g. charlm.")
    prompt: str | list[str] = Field(description="Prompt text (one; a list of exactly one is accepted).")
    max_tokens: int = Field(default=16, ge=1, description="Tokens to generate.")
    stream: bool = Field(default=False, description="Stream the tokens as server-sent events.")
    n: int = Field(default=1, description="Choices to make; only 1 is served.")
    user: str | None = Field(default=None, description="Caller's end-user id; not used.")


class CompletionChoiceV1(BaseModel):
    """One choice of a completion (DIN makes one)."""

    index: int = Field(description="Choice index (0).")
    text: str = Field(description="Generated text (of this chunk, when streaming).")
    finish_reason: str | None = Field(default=None, description="'length' on the last chunk; None before.")
    logprobs: None = Field(default=None, description="Not served.")


class CompletionUsageV1(BaseModel):
    """Token counts of a completion."""

    prompt_tokens: int = Field(description="Tokens in the prompt.")
    completion_tokens: int = Field(description="Tokens generated.")
    total_tokens: int = Field(description="Both.")


class CompletionV1(BaseModel):
    """A completion (``object: text_completion``), whole or one server-sent event of a stream."""

    id: str = Field(description="Request id.")
    object: str = Field(default="text_completion", description="Always 'text_completion'.")
    created: int = Field(description="Unix time the request arrived.")
    model: str = Field(description="Model that generated.")
    choices: list[CompletionChoiceV1] = Field(description="The one choice.")
    usage: CompletionUsageV1 | None = Field(default=None, description="Whole completions and a stream's last event.")
