"""An admitted request on its way through classifier, scheduler and executor.

Between stages the request body travels untouched; everything a stage needs
to decide travels in ``Din-Job-*`` headers described by ``JobV1``. A stage
reads the headers, adds its part and forwards, so no stage re-parses tensors.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from din.shared.contracts.inference import SlaClass
from din.shared.contracts.options import ServingOptionsV1

HEADER_PREFIX = "Din-Job-"
STAGE_DONE_HEADER = "Din-Stage-Done"
"""On a completion event of a stage that handed its output on: the request id (the job stays open)."""
FENCED_HEADER = "Din-Fenced"
"""On a completion event of a job its executor may no longer answer (it stalled or lost its connection while
holding it): ``<request id>;<dispatch>`` (``shared.lifecycle.dispatch_key``), the job handed back unanswered."""


DEPRECATED_PROTECTION = "protection"
"""Old name of the job's ``split_protection``: still accepted when a job is built or decoded."""


def _deprecated_protection_schema(schema: dict[str, Any]) -> None:
    schema.setdefault("properties", {})[DEPRECATED_PROTECTION] = {
        "anyOf": [{"type": "string"}, {"type": "null"}],
        "default": None,
        "deprecated": True,
        "description": "Deprecated: the old name of split_protection, accepted on input and no longer sent.",
        "title": "Protection",
    }


class WorkloadClassV1(BaseModel):
    """The classifier's verdict on a request."""

    task: str = Field(description="Task type of the requested model, e.g. image-classification.")
    sla_class: SlaClass = Field(description="Service class.")
    input_bytes: int = Field(description="Size of the request body in bytes.")
    size_class: str = Field(description="small, medium or large, from input_bytes.")
    sensitive: bool = Field(description="True when the data may run only at the tenant's allowed sites.")
    allowed_sites: list[str] | None = Field(
        default=None, description="Sites the request may run at; None means any site."
    )
    candidates: list[str] = Field(
        description="Model variants that may answer, preferred first (the requested model first)."
    )


class StageKind(StrEnum):
    """What one stage of a multi-stage job does."""

    SPLIT_HEAD = "split-head"
    SPLIT_TAIL = "split-tail"
    PREFILL = "prefill"
    DECODE = "decode"


class StageV1(BaseModel):
    """One stage of a multi-stage job's plan: the model (or part of one) it runs, where, and what it hands on.

    The scheduler fills ``site`` and, in centralized mode, ``executor`` for every stage before the first one
    runs; each stage's executor seals its output to the next stage's site and sends it there.
    """

    kind: StageKind = Field(description="What the stage does.")
    model: str = Field(description="Model, or part of one, that the stage runs.")
    sites: list[str] | None = Field(default=None, description="Sites the stage may run at; None means any site.")
    site: str | None = Field(default=None, description="Site the scheduler placed the stage at.")
    executor: str | None = Field(default=None, description="Executor placed on (centralized mode).")
    output: str = Field(
        description="What the stage produces: the tensor handed to the next stage, 'answer' or 'stream'."
    )
    predicted_ms: float | None = Field(default=None, description="The scheduler's predicted latency of the stage.")


class JobV1(ServingOptionsV1):
    """Routing metadata of one admitted request, carried in headers between stages.

    The request's serving options (SLA class, labels, degradation, accuracy floor, version, cascade, max tokens,
    split and split protection) are inherited from ``ServingOptionsV1``, so the job carries every one of them.
    ``protection`` is the deprecated name of ``split_protection``: accepted on input, readable, no longer sent.
    """

    model_config = ConfigDict(json_schema_extra=_deprecated_protection_schema)

    request_id: str = Field(description="Request id, unique per request.")
    tenant: str = Field(description="Tenant that sent the request.")
    model: str = Field(description="Model the client asked for.")
    deadline_ms: int = Field(description="Absolute deadline, Unix epoch milliseconds.")
    reply_to: str = Field(description="Subject where the single answer must go.")
    content_type: str = Field(description="Content type of the body: JSON or the binary tensor form.")
    escalate_to: str | None = Field(
        default=None, description="Cascade: the large variant a low-confidence answer escalates to (classifier)."
    )
    cascade_stage: int | None = Field(
        default=None, description="Cascade: 1 while the small variant runs, 2 once escalated to the large one."
    )
    prompt_tokens: int | None = Field(default=None, description="Generation: the prompt's length in tokens.")
    split_chosen: str | None = Field(
        default=None, description="Split inference: the scheduler's choice, a split point, 'local' or 'no-split'."
    )
    plan: list[StageV1] = Field(
        default_factory=list, description="Multi-stage jobs: the stages, in order, as the scheduler placed them."
    )
    stage: int = Field(default=0, description="Multi-stage jobs: index in ``plan`` of the stage now running.")
    traceparent: str | None = Field(default=None, description="W3C trace context of the request.")
    received_ms: float = Field(description="When admission received the request, epoch ms.")
    workload: WorkloadClassV1 | None = Field(default=None, description="Set by the classifier.")
    model_chosen: str | None = Field(default=None, description="Variant the scheduler assigned.")
    site_chosen: str | None = Field(default=None, description="Site the scheduler assigned.")
    scheduler_site: str | None = Field(
        default=None,
        description="Site whose scheduler placed the job and keeps it to one answer; an executor hands the job "
        "back there. None: the hub's (networks with one control plane).",
    )
    forwarded_from: str | None = Field(
        default=None,
        description="Federated placement: the site whose scheduler forwarded the job here because it could not "
        "serve it in time itself; a forwarded job is placed at the receiving site only, never forwarded again.",
    )
    executor_chosen: str | None = Field(default=None, description="Executor assigned (centralized mode).")
    attempt: int = Field(default=1, description="1 for the first dispatch, more after a retry.")
    avoid: list[str] = Field(
        default_factory=list, description="Executors that gave this job back because they were full."
    )
    stamps_ms: dict[str, float] = Field(
        default_factory=dict, description="Epoch ms at which each stage handed the job on."
    )

    @model_validator(mode="before")
    @classmethod
    def _accept_deprecated_protection(cls, data: Any) -> Any:
        if isinstance(data, dict) and DEPRECATED_PROTECTION in data:
            data = dict(data)
            old = data.pop(DEPRECATED_PROTECTION)
            data.setdefault("split_protection", old)
        return data

    @property
    def protection(self) -> str | None:
        """Deprecated name of ``split_protection`` (the split intermediate's protection, not the crypto level)."""
        return self.split_protection

    def to_headers(self) -> dict[str, str]:
        """Encode as one compact JSON header (header values must be single-line strings)."""
        return {HEADER_PREFIX + "V1": self.model_dump_json(exclude_none=True)}

    @classmethod
    def from_headers(cls, headers: dict[str, str] | None) -> JobV1:
        """Decode from headers written by ``to_headers``; raises ``ValueError`` if absent or invalid."""
        raw = (headers or {}).get(HEADER_PREFIX + "V1")
        if raw is None:
            raise ValueError("missing job header")
        return cls.model_validate_json(raw)
