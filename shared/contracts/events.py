"""Events services publish: heartbeats, health, decisions and completions.

Decisions and completions land in Kafka (``shared.naming.Topics``) so SREs can
replay them; heartbeats and health travel on NATS.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from din.shared.contracts.inference import SlaClass
from din.shared.contracts.job import StageV1, WorkloadClassV1


class ModelLoadedV1(BaseModel):
    """A model an executor serves right now."""

    name: str = Field(description="Model name.")
    version: str = Field(description="Version being served.")
    max_batch_size: int = Field(description="Largest batch the executor forms for it.")
    compute_ms_per_item: float = Field(description="Recent mean compute time per batch item, ms.")
    accuracy: float | None = Field(default=None, description="Held-out accuracy from the model's config.")


class HeartbeatV1(BaseModel):
    """An executor's periodic announcement of itself and its load."""

    executor: str = Field(description="Executor id, unique in the network.")
    site: str = Field(description="Site the executor runs at.")
    models: list[ModelLoadedV1] = Field(description="Models it serves.")
    capacity: int = Field(description="Jobs it can hold in its queues before it sheds.")
    capacity_by_class: dict[str, int] = Field(
        default_factory=dict,
        description="Queued jobs at which it refuses each SLA class (lower classes may fill less of the queue).",
    )
    queue_depth: dict[str, int] = Field(description="Queued jobs per SLA class.")
    inflight: int = Field(description="Jobs taken and not yet answered.")
    recent_latency_ms: float = Field(description="Recent mean time from receipt to answer, ms.")
    draining: bool = Field(default=False, description="True once it stopped taking new work.")
    interval_s: float = Field(description="Seconds until the next heartbeat.")
    sent_ms: float = Field(description="Epoch ms when sent.")


class HealthV1(BaseModel):
    """Answer on a health subject."""

    service: str = Field(description="Service name.")
    instance: str = Field(description="Instance id (the executor id for executors).")
    version: str = Field(description="Software version.")
    site: str = Field(description="Site the instance runs at.")
    ready: bool = Field(description="True when the instance serves traffic.")
    detail: dict[str, str] = Field(default_factory=dict, description="Service-specific facts.")


class AdmissionDecisionV1(BaseModel):
    """Admission's verdict on one request, with its reason."""

    request_id: str = Field(description="Request id.")
    tenant: str = Field(description="Tenant, or the raw token from the subject when unknown.")
    model: str = Field(description="Model asked for.")
    sla_class: SlaClass | None = Field(default=None, description="Service class, when it could be read.")
    admitted: bool = Field(description="True when the request went on to classification.")
    reason: str = Field(description="Error code when refused, 'ok' when admitted.")
    detail: str = Field(default="", description="Human-readable explanation.")
    input_bytes: int = Field(description="Size of the body (of every request it stands for).")
    at_ms: float = Field(description="Epoch ms of the decision (of the last request it stands for).")
    count: int = Field(default=1, ge=1, description="How many requests the record stands for: 1, except for "
                       "requests shed under overload, recorded together (one record per tenant, model and reason "
                       "each second, ``request_id`` the first of them), so refusing costs far less than serving.")


class ClassificationV1(BaseModel):
    """The workload class the classifier gave one request."""

    request_id: str = Field(description="Request id.")
    tenant: str = Field(description="Tenant.")
    workload: WorkloadClassV1 = Field(description="The class.")
    at_ms: float = Field(description="Epoch ms of the decision.")


class AlternativeV1(BaseModel):
    """One placement the scheduler considered."""

    executor: str = Field(description="Executor id.")
    site: str = Field(description="Its site.")
    model: str = Field(description="Model variant.")
    predicted_ms: float | None = Field(description="Predicted completion time; None when excluded.")
    excluded_by: str | None = Field(default=None, description="Constraint that excluded it, if any.")


class PlacementCountsV1(BaseModel):
    """How much of the fleet one placement looked at, so a record stays small at any fleet size."""

    candidates: int = Field(default=0, description="Live executors serving the job's candidate models.")
    considered: int = Field(default=0, description="Executors whose prediction or refusal was evaluated one by one.")
    feasible: int = Field(default=0, description="Considered executors that could take the job.")
    excluded: dict[str, int] = Field(
        default_factory=dict,
        description="Executors left out by reason (sovereignty, cost, capacity, gave_back, deadline; site-wide "
        "reasons count every executor at the site), and 'outranked': executors at sites not looked at because "
        "none of them could beat the choice.",
    )


class SchedulingDecisionV1(BaseModel):
    """Where the scheduler sent one request, why, and what else it considered."""

    request_id: str = Field(description="Request id.")
    tenant: str = Field(description="Tenant.")
    mode: str = Field(description="centralized or distributed.")
    sla_class: SlaClass = Field(description="Service class.")
    model: str | None = Field(default=None, description="Model the job asked for (None from schedulers that "
                              "predate it).")
    chosen_executor: str | None = Field(description="Executor chosen (centralized mode).")
    chosen_site: str | None = Field(description="Site chosen; None when refused.")
    chosen_model: str | None = Field(description="Model variant chosen.")
    degraded: bool = Field(description="True when a smaller variant was chosen.")
    predicted_ms: float | None = Field(description="Predicted completion time of the choice.")
    reason: str = Field(description="Why this choice, or the error code when refused.")
    alternatives: list[AlternativeV1] = Field(description="Placements considered.")
    counts: PlacementCountsV1 | None = Field(
        default=None, description="How many executors were candidates, considered, feasible and refused by reason."
    )
    attempt: int = Field(description="1 for a first dispatch, more for a retry.")
    at_ms: float = Field(description="Epoch ms of the decision.")
    plan: list[StageV1] = Field(
        default_factory=list, description="Multi-stage jobs: every stage with the site and executor placed on."
    )
    scheduler_site: str | None = Field(
        default=None,
        description="Site of the scheduler that decided (whose executors and link measurements it used); None "
        "from schedulers that predate it.",
    )
    link_rtt_ms: dict[str, float] = Field(
        default_factory=dict,
        description="The link round trip the scheduler priced to each site of the topology when it decided, ms "
        "(its probes' mean round trip with jitter and loss priced in; 0.1 for its own site): the network part of "
        "every prediction in alternatives, so an offline what-if can price the links as the scheduler did. Empty "
        "from schedulers that predate it.",
    )
    forwarded_to: str | None = Field(
        default=None,
        description="Set when the job was not placed here but handed to that site's scheduler (local first: this "
        "one could not serve it in time), whose own decision follows; None otherwise.",
    )


class CompletionV1(BaseModel):
    """An executor finished (or failed) one job."""

    request_id: str = Field(description="Request id.")
    tenant: str = Field(description="Tenant.")
    site: str = Field(description="Site of the executor.")
    executor: str = Field(description="Executor id.")
    model: str = Field(description="Model that ran.")
    model_version: str = Field(description="Its version.")
    sla_class: SlaClass = Field(description="Service class.")
    ok: bool = Field(description="True when a result was returned.")
    error_code: str | None = Field(default=None, description="Error code when not ok.")
    batch_size: int = Field(description="Size of the batch it ran in.")
    items: int | None = Field(default=None, description="Rows of that batch that were this job's (a request may "
                              "carry several inputs); its share of the batch's compute is items / batch_size. "
                              "None from executors that predate it (count 1).")
    degraded: bool = Field(description="True when a smaller variant answered.")
    timings_ms: dict[str, float] = Field(description="Latency breakdown, ms.")
    at_ms: float = Field(description="Epoch ms of completion.")
    stage: int | None = Field(
        default=None,
        description="Deprecated: read plan_stage or cascade_step. Multi-stage jobs: the plan stage index (as "
        "plan_stage); cascade jobs: the cascade step (as cascade_step); else None.",
    )
    plan_stage: int | None = Field(
        default=None, description="Multi-stage jobs: index in the job's plan of the stage that ran here; else None."
    )
    cascade_step: int | None = Field(
        default=None, description="Cascade jobs: 1 for the small variant's step, 2 for the large one's; else None."
    )
    escalated: bool = Field(
        default=False,
        description="Cascade jobs: on step 1, True when the answer was not confident enough and the job went on "
        "to step 2 (the client was not answered by this step); on step 2, always True.",
    )
    stage_kind: str | None = Field(
        default=None, description="Multi-stage jobs: the kind of stage that ran here (split-head, prefill, ...)."
    )
    handed_on_to: str | None = Field(
        default=None,
        description="Multi-stage jobs: the site this stage sealed and sent its output to (the job stays open); "
        "None on the stage that answered.",
    )
    output_bytes: int | None = Field(
        default=None, description="Multi-stage jobs: size of the intermediate (tensor or state) handed on."
    )
    protection: str | None = Field(
        default=None,
        description="Crypto protection the request used on its way to and from the executor: 'encrypted' "
        "(AES-256-GCM envelopes), 'integrity' (HMAC envelopes, readable; only on links the policy allows), "
        "'client-plaintext' (sent unsealed by a tenant the policy lets in; sealed inside DIN, answered unsealed) "
        "or 'off' (security off); results are signed unless 'off'. None from executors that predate it.",
    )


class ProbeV1(BaseModel):
    """A link probe and its echo."""

    from_site: str = Field(description="Site that sent the probe.")
    to_site: str = Field(description="Site that echoed it.")
    sent_ms: float = Field(description="Epoch ms when sent.")
    seq: int = Field(description="Sequence number, to count losses.")


class PressureV1(BaseModel):
    """The scheduler's periodic view of network load, used by admission to shed early."""

    inflight: int = Field(description="Jobs dispatched and not yet completed, network-wide.")
    capacity: int = Field(description="Jobs the live executors can hold in total.")
    fastest_ms: float = Field(description="Lowest predicted completion time over live executors, ms.")
    executors: int = Field(description="Live executors.")
    at_ms: float = Field(description="Epoch ms when sent.")
    queued: int = Field(default=0, description="Jobs received by the scheduler and not yet placed (its own input "
                        "buffer).")
    completed_per_s: float = Field(default=0.0, description="Jobs completed per second over the last second: the "
                                   "rate the path is serving at.")
    waited_ms: float = Field(default=0.0, description="Mean time the jobs completed over the last second spent "
                             "before their compute (admission, classification, placement, the executor's queue), "
                             "ms; 0 when none completed.")


class DeadLetterV1(BaseModel):
    """A message a service could not process, kept for inspection instead of dropped."""

    service: str = Field(description="Service that gave up on it.")
    subject: str = Field(description="Subject it arrived on.")
    reason: str = Field(description="Why it could not be processed.")
    headers: dict[str, str] = Field(description="Its headers.")
    body_b64: str = Field(description="Its body, base64.")
    at_ms: float = Field(description="Epoch ms.")


class LoadModelV1(BaseModel):
    """Operator command: serve ``version`` of ``model`` from now on, without failing requests in flight."""

    model: str = Field(description="Model name.")
    version: str | None = Field(default=None, description="Version to serve; the newest when absent.")
