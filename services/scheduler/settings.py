"""Settings of the scheduler service (``DIN_SCHEDULER_*``)."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import SettingsConfigDict

from din.shared.lifecycle import DEADLINE_MARGIN_MS
from din.shared.security import SecuredServiceSettings


class SchedulingMode(StrEnum):
    """The draft's two scheduling modes."""

    CENTRALIZED = "centralized"
    DISTRIBUTED = "distributed"


class SchedulerSettings(SecuredServiceSettings):
    """Scheduling mode, the timings of probes, pressure reports and the deadline watchdog, and its key file."""

    model_config = SettingsConfigDict(env_prefix="DIN_SCHEDULER_", extra="ignore", populate_by_name=True)

    topology: Path = Field(
        validation_alias=AliasChoices("DIN_TOPOLOGY"), description="Topology file (sites, links, tenants)."
    )
    model_repo: Path = Field(
        validation_alias=AliasChoices("DIN_MODEL_REPO"),
        description="Model repository whose configs name each model's parts (split heads and tails, prefill).",
    )
    own_site_only: bool = Field(
        default=False,
        description="Whether this scheduler places on its own site's executors only (a control plane per site): "
        "it then hears only that site's heartbeats. The launcher sets it from the topology.",
    )
    rosters: bool = Field(
        default=False,
        description="Whether this scheduler learns other sites' executors from their schedulers' rosters (a few "
        "per model, and the lost ones) instead of every executor's heartbeat: the hub's scheduler with a control "
        "plane per site. The launcher sets it from the topology.",
    )
    mode: SchedulingMode = Field(
        default=SchedulingMode.CENTRALIZED,
        description="centralized: assign each job to an executor; distributed: queue it at a site for its "
        "executors to pull.",
    )
    deadline_margin_ms: float = Field(
        default=DEADLINE_MARGIN_MS,
        description="A job arriving this close to its deadline is answered deadline_exceeded instead of placed, "
        "and an executor's death this close to it is not dispatched again."
    )
    watchdog_interval_ms: float = Field(
        default=5.0, description="How often open jobs and executor liveness are checked."
    )
    probe_interval_s: float = Field(default=1.0, description="How often each site's link is probed.")
    pressure_interval_s: float = Field(default=0.1, description="How often load is reported to admission.")
    summary_interval_s: float = Field(
        default=0.5, gt=0, description="How often a site's scheduler publishes its summary to the other sites."
    )
