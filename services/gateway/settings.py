"""Settings of the HTTP gateway (``DIN_GATEWAY_*``)."""

from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import SettingsConfigDict

from din.shared.settings import ServiceSettings


class GatewaySettings(ServiceSettings):
    """Where the gateway listens, where the model configs are, and how long it waits past a deadline."""

    model_config = SettingsConfigDict(env_prefix="DIN_GATEWAY_", extra="ignore", populate_by_name=True)

    model_repo: Path = Field(
        validation_alias=AliasChoices("DIN_MODEL_REPO"), description="Model repository whose configs list the models."
    )
    http_port: int = Field(description="TCP port of the HTTP API (OIP v2 and /v1/completions).")
    http_host: str = Field(default="127.0.0.1", description="Address the HTTP and gRPC APIs listen on.")
    grpc_port: int | None = Field(
        default=None, description="TCP port of the OIP v2 gRPC API (inference.GRPCInferenceService); off when unset."
    )
    max_body_bytes: int = Field(
        default=8 * 1024 * 1024,
        description="Largest HTTP request body read (admission applies its own payload limit after that).",
    )
    grace_ms: int = Field(
        default=500,
        description="How long past a request's deadline the gateway waits for DIN's answer before it answers 504.",
    )
