"""What site schedulers tell each other for federated placement: one compact summary per site.

Per-executor heartbeats stay inside their site; through the hub travel only
``SiteSummaryV1``, whose size depends on the number of models and sites, never on
the number of executors, and, for the hub's scheduler alone, ``SiteRosterV1``, a
bounded sample of each site's executors (a few per model).
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from din.shared.contracts.events import HeartbeatV1


class ModelSummaryV1(BaseModel):
    """One model as a site can serve it right now."""

    model: str = Field(description="Model name.")
    versions: list[str] = Field(description="Versions served at the site.")
    executors: int = Field(description="Live executors at the site serving the model (not draining).")
    free_slots: dict[str, int] = Field(
        description="Per SLA class: jobs the site's executors of the model could still take before refusing that "
        "class (capacity minus load, summed)."
    )
    queue_depth: int = Field(description="Jobs queued or in flight on the site's executors of the model.")
    compute_ms_per_item: float = Field(description="Median compute per batch item the executors report, ms.")
    best_ms: dict[str, float | None] = Field(
        description="Per SLA class: the site's best predicted queueing plus compute for a new job (jobs ahead of "
        "it times compute per item, plus its own compute) on an executor with room; None: none has room."
    )
    cost_per_1k: float = Field(description="The site's relative cost of 1,000 requests (from the topology).")
    accuracy: float | None = Field(default=None, description="Best held-out accuracy of the served versions.")


class LinkSummaryV1(BaseModel):
    """A link as measured by probes from the summarizing site."""

    site: str = Field(description="The other site.")
    rtt_ms: float = Field(description="Expected round trip to it, ms, with jitter and loss priced in.")
    up: bool = Field(description="False once its probes have gone unanswered for a while.")


class SiteSummaryV1(BaseModel):
    """A site scheduler's periodic account of what its site can serve and how it sees the other sites."""

    site: str = Field(description="Site summarized.")
    instance: str = Field(description="Scheduler instance that sent it.")
    sent_ms: float = Field(description="Epoch ms when sent.")
    interval_s: float = Field(description="Seconds until the next summary; missing three means the site is stale.")
    models: list[ModelSummaryV1] = Field(description="Every model the site serves.")
    links: list[LinkSummaryV1] = Field(default_factory=list, description="Links from the site to every other site.")

    def model_summary(self, model: str) -> ModelSummaryV1 | None:
        """The summary of ``model``, or None when the site does not serve it."""
        return next((m for m in self.models if m.model == model), None)


class SiteRosterV1(BaseModel):
    """A site scheduler's periodic sample of its executors for the hub's scheduler, which places plans that cross
    sites on named executors: the latest heartbeat of the few executors with the most room per model (never the
    whole fleet), and the executors the site's scheduler lost lately. The site's scheduler owns its executors'
    liveness; the hub's treats an executor missing from the sample as unknown, not dead."""

    site: str = Field(description="Site whose executors these are.")
    instance: str = Field(description="Scheduler instance that sent it.")
    sent_ms: float = Field(description="Epoch ms when sent.")
    interval_s: float = Field(description="Seconds until the next roster; missing three means the site is stale.")
    executors: list[HeartbeatV1] = Field(
        description="Latest heartbeats of the executors with the most room, at most a few per model."
    )
    lost: list[str] = Field(
        default_factory=list,
        description="Executors the site's scheduler dropped lately (missed heartbeats or revoked): their jobs must "
        "be dispatched again.",
    )
