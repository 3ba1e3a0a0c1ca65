"""Telemetry's own contracts: the metadata of a recorded request and the SLA violation alert.

A recorded request is a Kafka record on ``Topics.REQUESTS`` whose value is the
request body exactly as the client sent it (sealed once the security work
seals recordings) and whose metadata travels in headers; ``RecordedRequestV1``
is that metadata. ``shared.recording`` writes and reads it.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from shared.contracts.inference import SlaClass


class RecordedRequestV1(BaseModel):
    """Metadata of one admitted request recorded for replay (carried in ``din-*`` record headers)."""

    request_id: str = Field(description="Request id given at admission.")
    tenant: str = Field(description="Tenant that sent it; also the record key.")
    model: str = Field(description="Model the client asked for.")
    model_version: str | None = Field(default=None, description="Version asked for; None means latest.")
    sla_class: SlaClass = Field(description="Service class.")
    content_type: str = Field(description="Content type of the body (JSON or the binary tensor form).")
    received_ms: float = Field(description="When admission received it, Unix epoch ms: replay paces by it.")
    timeout_ms: int = Field(description="Deadline minus receipt, ms: replay gives each request the same budget.")
    labels: list[str] = Field(default_factory=list, description="Sensitivity labels the client set.")
    allow_degrade: bool = Field(default=False, description="Whether a smaller variant may answer.")
    min_accuracy: float | None = Field(default=None, description="Lowest acceptable accuracy, if set.")
    tensor_headers: dict[str, str] = Field(
        default_factory=dict, description="The Din-Tensor-* headers of a binary-form request."
    )


class SlaViolationV1(BaseModel):
    """An SLA class's latency quantile crossed its target over the evaluation window (or came back under it)."""

    sla_class: SlaClass = Field(description="Service class whose target was crossed.")
    firing: bool = Field(description="True when the violation starts, False when it has resolved.")
    quantile: float = Field(description="Quantile compared with the target, e.g. 0.99.")
    observed_ms: float = Field(description="That quantile of end-to-end latency over the window, ms.")
    target_ms: float = Field(description="The class's target for that quantile, ms.")
    window_s: float = Field(description="Length of the sliding window the quantile covers, s.")
    samples: int = Field(description="Completions of the class in the window.")
    worst_site: str | None = Field(default=None, description="Site with the highest quantile in the window.")
    at_ms: float = Field(description="Epoch ms of the evaluation.")
