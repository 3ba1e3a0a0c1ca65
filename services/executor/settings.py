"""Settings of an executor (``DIN_EXECUTOR_*``)."""

from pathlib import Path
from typing import Annotated

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from din.shared.lifecycle import DEADLINE_MARGIN_MS
from din.shared.naming import token
from din.shared.security import SecuredServiceSettings
from din.shared.topology import load_topology


class ExecutorSettings(SecuredServiceSettings):
    """Which executor this is, what it serves, how it batches, and its site's key file."""

    model_config = SettingsConfigDict(env_prefix="DIN_EXECUTOR_", extra="ignore", populate_by_name=True)

    id: str = Field(description="Executor id, unique in the network.")
    models: Annotated[list[str], NoDecode] = Field(description="Models to serve, comma-separated.")
    model_repo: Path = Field(description="Model repository folder (``<model>/<version>/model.onnx``).")
    capacity: int = Field(default=256, ge=1, description="Jobs queued before new ones are refused as overloaded.")
    max_queue_delay_ms: float = Field(default=2.0, ge=0, description="Longest wait for a batch to fill.")
    inline_below_ms: float = Field(
        default=0.3, ge=0, description="Run batches on the event loop when they recently took less than this."
    )
    heartbeat_interval_s: float = Field(default=0.5, gt=0, description="Seconds between heartbeats.")
    deadline_margin_ms: float = Field(
        default=DEADLINE_MARGIN_MS,
        description="A job this close to its deadline is answered deadline_exceeded instead of being run."
    )
    pull: bool = Field(default=False, description="Pull work from the site's JetStream queue (distributed mode).")
    topology: Path | None = Field(
        default=None, validation_alias=AliasChoices("DIN_TOPOLOGY"),
        description="Topology file, read for the tenants' weights (their shares of the batcher's queue); without "
        "one every tenant weighs 1.",
    )

    @field_validator("id")
    @classmethod
    def _id_token(cls, value: str) -> str:
        return token(value, what="executor id")

    @field_validator("models", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str):
            return [token(part.strip(), what="model") for part in value.split(",") if part.strip()]
        return value

    def tenant_weights(self) -> dict[str, float]:
        """Each tenant's ``TenantSpec.weight`` from the topology; empty without a topology."""
        if self.topology is None:
            return {}
        return load_topology(self.topology).tenant_weights()
