"""An admitted request on its way through classifier, scheduler and executor.

Between stages the request body travels untouched; everything a stage needs
to decide travels in ``Din-Job-*`` headers described by ``JobV1``. A stage
reads the headers, adds its part and forwards, so no stage re-parses tensors.
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, Field

from shared.contracts.inference import SlaClass

HEADER_PREFIX = "Din-Job-"
STAGE_DONE_HEADER = "Din-Stage-Done"
"""On a completion event of a stage that handed its output on: the request id (the job stays open)."""


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


class JobV1(BaseModel):
    """Routing metadata of one admitted request, carried in headers between stages."""

    request_id: str = Field(description="Request id, unique per request.")
    tenant: str = Field(description="Tenant that sent the request.")
    model: str = Field(description="Model the client asked for.")
    model_version: str | None = Field(default=None, description="Version asked for; None means latest.")
    sla_class: SlaClass = Field(description="Service class.")
    deadline_ms: int = Field(description="Absolute deadline, Unix epoch milliseconds.")
    reply_to: str = Field(description="Subject where the single answer must go.")
    content_type: str = Field(description="Content type of the body: JSON or the binary tensor form.")
    labels: list[str] = Field(default_factory=list, description="Sensitivity labels given by the client.")
    allow_degrade: bool = Field(default=False, description="A smaller model variant may answer.")
    min_accuracy: float | None = Field(default=None, description="Lowest accuracy acceptable.")
    cascade_threshold: float | None = Field(
        default=None,
        description="Large-small cascade: the small variant answers, and an answer whose confidence (top class "
        "probability) is below this threshold escalates to the large one. None: no cascade.",
    )
    cascade_target_rate: float | None = Field(
        default=None,
        description="Large-small cascade by target: escalate about this fraction of requests, the least confident, "
        "calibrated on the small variant's recent answers at its executor. None: a fixed threshold or no cascade.",
    )
    escalate_to: str | None = Field(
        default=None, description="Cascade: the large variant a low-confidence answer escalates to (classifier)."
    )
    cascade_stage: int | None = Field(
        default=None, description="Cascade: 1 while the small variant runs, 2 once escalated to the large one."
    )
    max_tokens: int | None = Field(
        default=None, description="Generation: tokens to stream back (prefill, then decode). None: one answer."
    )
    prompt_tokens: int | None = Field(default=None, description="Generation: the prompt's length in tokens.")
    split: str | None = Field(
        default=None,
        description="Split inference: 'auto' (the scheduler picks the split point per request), a split point "
        "name, or 'none'. None: the model runs whole.",
    )
    split_chosen: str | None = Field(
        default=None, description="Split inference: the scheduler's choice, a split point, 'local' or 'no-split'."
    )
    protection: str | None = Field(
        default=None, description="Split inference: protection of the intermediate, e.g. 'quantize:4', 'noise:0.1'."
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
    executor_chosen: str | None = Field(default=None, description="Executor assigned (centralized mode).")
    attempt: int = Field(default=1, description="1 for the first dispatch, more after a retry.")
    avoid: list[str] = Field(
        default_factory=list, description="Executors that gave this job back because they were full."
    )
    stamps_ms: dict[str, float] = Field(
        default_factory=dict, description="Epoch ms at which each stage handed the job on."
    )

    def to_headers(self) -> dict[str, str]:
        """Encode as one compact JSON header (header values must be single-line strings)."""
        return {HEADER_PREFIX + "V1": self.model_dump_json(exclude_none=True)}

    @classmethod
    def from_headers(cls, headers: dict[str, str] | None) -> "JobV1":
        """Decode from headers written by ``to_headers``; raises ``ValueError`` if absent or invalid."""
        raw = (headers or {}).get(HEADER_PREFIX + "V1")
        if raw is None:
            raise ValueError("missing job header")
        return cls.model_validate_json(raw)
