"""Settings of the telemetry service (``DIN_TELEMETRY_*``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import SettingsConfigDict

from din.shared.contracts.inference import SlaClass
from din.shared.security import SecuredServiceSettings
from din.shared.topology import load_topology

HOUR_MS = 3_600_000
DEFAULT_SLA_TARGETS_MS = {SlaClass.REALTIME: 50.0, SlaClass.INTERACTIVE: 500.0, SlaClass.BATCH: 5000.0}
"""Default latency target of each SLA class's p99, ms (the settings below override them)."""


class TelemetrySettings(SecuredServiceSettings):
    """Where telemetry serves its metrics, the SLA targets it alerts on, and how its Kafka topics are kept.

    Its key file (the hub site's) lets it check the signatures on the heartbeats, summaries and completions it
    hears; it seals and opens nothing. Unlike the services that seal, security follows the key file when
    ``DIN_SECURITY`` is not set (the launcher always sets it)."""

    model_config = SettingsConfigDict(env_prefix="DIN_TELEMETRY_", extra="ignore", populate_by_name=True)

    metrics_port: int = Field(default=9464, description="HTTP port of the Prometheus /metrics endpoint.")
    metrics_host: str = Field(
        default="127.0.0.1",
        description="Address the /metrics endpoint binds; 0.0.0.0 lets a containerised Prometheus scrape it.",
    )

    security: bool | None = Field(
        default=None,
        validation_alias=AliasChoices("DIN_SECURITY"),
        description="on: control messages must be signed (needs the key file); off: accepted unsigned; "
        "unset: on exactly when a key file is given.",
    )

    heartbeat_site: str | None = Field(
        default=None,
        description="The one site whose executors' heartbeats telemetry hears (unset: every site's). With a control "
        "plane per site the launcher sets the hub's: other sites' executors are seen through their schedulers' "
        "summaries (the din_site_* gauges), so no per-executor message crosses into the hub.",
    )

    sla_target_realtime_ms: float = Field(
        default=DEFAULT_SLA_TARGETS_MS[SlaClass.REALTIME], gt=0, description="Latency target of realtime, ms."
    )
    sla_target_interactive_ms: float = Field(
        default=DEFAULT_SLA_TARGETS_MS[SlaClass.INTERACTIVE], gt=0, description="Latency target of interactive, ms."
    )
    sla_target_batch_ms: float = Field(
        default=DEFAULT_SLA_TARGETS_MS[SlaClass.BATCH], gt=0, description="Latency target of batch, ms."
    )
    sla_quantile: float = Field(default=0.99, gt=0, lt=1, description="Quantile compared with the targets.")
    sla_window_s: float = Field(default=60.0, gt=0, description="Sliding window the quantile covers, seconds.")
    sla_min_samples: int = Field(
        default=20, ge=1, description="Completions a class needs in the window before its SLA can be violated."
    )
    alert_interval_s: float = Field(default=5.0, gt=0, description="How often the SLA targets are evaluated.")

    decisions_from: str = Field(
        default="latest",
        pattern="^(latest|earliest)$",
        description="Where a new consumer group starts reading the decision topics: latest or earliest.",
    )
    topic_partitions: int = Field(default=3, ge=1, description="Partitions of each topic telemetry creates.")
    retention_requests_h: float = Field(
        default=72.0, gt=0, description="Retention of recorded requests (payloads), hours."
    )
    retention_events_h: float = Field(
        default=168.0, gt=0, description="Retention of decisions, classifications and completions, hours."
    )
    retention_heartbeats_h: float = Field(default=24.0, gt=0, description="Retention of heartbeats, hours.")
    retention_alerts_h: float = Field(default=720.0, gt=0, description="Retention of SLA alerts, hours.")
    retention_dead_letter_h: float = Field(default=336.0, gt=0, description="Retention of dead letters, hours.")
    retention_partition_mb: int = Field(
        default=4096, ge=1,
        description="Most each partition of every recorded topic keeps, MiB (Kafka's retention.bytes); the oldest "
        "records go when either this or the topic's time is reached.",
    )

    topology: Path | None = Field(
        default=None, validation_alias=AliasChoices("DIN_TOPOLOGY"),
        description="Topology file: the sites whose completion streams telemetry relays (unset: DIN_BUS_SITES, "
        "else its own site).",
    )
    relay_from: str = Field(
        default="earliest",
        pattern="^(latest|earliest)$",
        description="Where a new relay consumer starts in a site's completion stream: earliest (everything it "
        "still holds) or latest. An existing consumer always resumes where it stopped.",
    )
    relay_max_age_h: float = Field(
        default=24.0, gt=0, description="Longest a site's completion stream keeps a completion telemetry has not "
        "relayed (nor any other), hours: how long an outage of telemetry or Kafka may last without a loss.",
    )
    relay_max_mb: int = Field(
        default=1024, ge=1, description="Most each site's completion stream holds, MiB; past it the oldest go first.",
    )
    relay_batch: int = Field(default=256, ge=1, le=4096, description="Completions relayed per pull.")
    relay_lag_alert_s: float = Field(
        default=30.0, gt=0, description="A site whose oldest unrelayed completion is older than this is lagging "
        "(health, din_completion_relay_lagging, the DinCompletionRelayLagging alert).",
    )
    relay_check_interval_s: float = Field(
        default=2.0, gt=0, description="How often each site's relay backlog is looked at.",
    )

    def relay_sites(self) -> list[str]:
        """The sites whose completion streams telemetry relays."""
        if self.topology is not None:
            return [site.name for site in load_topology(self.topology).sites]
        return [site for site in (self.bus_sites or "").split(",") if site] or [self.site]

    def sla_targets_ms(self) -> dict[SlaClass, float]:
        """Each SLA class's latency target, ms."""
        return {
            SlaClass.REALTIME: self.sla_target_realtime_ms,
            SlaClass.INTERACTIVE: self.sla_target_interactive_ms,
            SlaClass.BATCH: self.sla_target_batch_ms,
        }

    @model_validator(mode="after")
    def _security_follows_key_file(self) -> TelemetrySettings:
        if self.security is None:
            self.security = self.key_file is not None
        return self
