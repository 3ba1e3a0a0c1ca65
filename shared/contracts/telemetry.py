"""Telemetry's own contracts: the metadata of a recorded request and the SLA violation alert.

A recorded request is a Kafka record on ``Topics.REQUESTS`` whose value is the
request body exactly as the client sent it (sealed once the security work
seals recordings) and whose metadata travels in headers; ``RecordedRequestV1``
is that metadata. ``shared.recording`` writes and reads it.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from din.shared.contracts.inference import SlaClass
from din.shared.contracts.options import ServingOptionsV1


class RecordedRequestV1(ServingOptionsV1):
    """Metadata of one admitted request recorded for replay (carried in ``din-*`` record headers).

    Every serving option (``ServingOptionsV1``) is recorded, so a replay asks for exactly what the original did.
    """

    request_id: str = Field(description="Request id given at admission.")
    tenant: str = Field(description="Tenant that sent it; also the record key.")
    model: str = Field(description="Model the client asked for.")
    content_type: str = Field(description="Content type of the body (JSON or the binary tensor form).")
    received_ms: float = Field(description="When admission received it, Unix epoch ms: replay paces by it.")
    timeout_ms: int = Field(description="Deadline minus receipt, ms: replay gives each request the same budget.")
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


class SpanV1(BaseModel):
    """One finished, sampled trace span, as recorded in the Kafka event log."""

    trace_id: str = Field(description="W3C trace id, 32 hex characters; the same across every hop of a request.")
    span_id: str = Field(description="This span's id, 16 hex characters.")
    parent_span_id: str | None = Field(default=None, description="The span this one is a child of.")
    name: str = Field(description="What the hop did, e.g. 'admission admit'.")
    service: str = Field(description="Service that recorded it (din-<service>).")
    instance: str = Field(description="Instance id, e.g. the executor id.")
    site: str = Field(description="Site of the instance.")
    start_ms: float = Field(description="Start, Unix epoch ms.")
    end_ms: float = Field(description="End, Unix epoch ms.")
    attributes: dict[str, str] = Field(default_factory=dict, description="Request id, tenant, model and the like.")
