"""Settings of the telemetry service (``DIN_TELEMETRY_*``)."""

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from shared.settings import ServiceSettings


class TelemetrySettings(ServiceSettings):
    """Where telemetry serves its metrics."""

    model_config = SettingsConfigDict(env_prefix="DIN_TELEMETRY_", extra="ignore", populate_by_name=True)

    metrics_port: int = Field(default=9464, description="HTTP port of the Prometheus /metrics endpoint.")
