"""Settings of the autoscaler (``DIN_AUTOSCALER_*``)."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import SettingsConfigDict

from din.shared.security import SecuredServiceSettings


class ProviderKind(StrEnum):
    """Who starts and stops the executors the autoscaler asks for."""

    LOCAL = "local"
    """Processes on this machine, what ``din up`` runs (``providers.LocalProcesses``)."""
    KUBERNETES = "kubernetes"
    """Kubernetes: KEDA scales each pool's StatefulSet on ``din_pool_desired_executors`` (``ops/kubernetes``);
    the autoscaler decides and records only."""


class AutoscalerSettings(SecuredServiceSettings):
    """The topology it sizes pools of, the provider that acts, and (local provider) where executors' settings and
    logs are."""

    model_config = SettingsConfigDict(env_prefix="DIN_AUTOSCALER_", extra="ignore", populate_by_name=True)

    topology: Path = Field(validation_alias=AliasChoices("DIN_TOPOLOGY"),
                           description="Topology file: the pools, their bounds and the scaling policy.")
    provider: ProviderKind = Field(default=ProviderKind.LOCAL, description="local or kubernetes.")
    pool_environments: Path | None = Field(
        default=None, description="Local provider: JSON file mapping every pool executor id to its environment "
        "(the launcher writes it, as it would start a fixed executor).")
    state_dir: Path | None = Field(
        default=None, description="Local provider: where it keeps the pid of each executor it started (adopted "
        "after a restart of the autoscaler) and their logs.")
    log_dir: Path | None = Field(default=None, description="Local provider: where its executors log "
                                 "(``executor-<id>.log``); default the state folder.")
    health_timeout_s: float = Field(default=0.5, gt=0, description="How long an executor's health answer may "
                                    "take.")
    drain_timeout_s: float = Field(default=30.0, gt=0, description="How long a draining executor may take to "
                                   "finish its work and exit before it is killed.")
    decisions_from: str = Field(default="latest", description="Where a new consumer group starts reading the "
                                "traffic topics: latest (now) or earliest.")
