"""Settings every service shares: where the brokers are and which site it runs at.

Each service has one settings class deriving from ``ServiceSettings`` with its
own ``DIN_<SERVICE>_`` prefix; the shared broker fields keep their plain
``DIN_`` names (``DIN_NATS_URL``, ``DIN_KAFKA_BOOTSTRAP``, ``DIN_SITE``) so one
environment serves every process. Nothing outside settings classes reads
``os.environ``.
"""

from __future__ import annotations

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from din.shared.naming import token


def _plain(name: str) -> AliasChoices:
    return AliasChoices(name)


class ServiceSettings(BaseSettings):
    """Broker addresses and identity shared by all services."""

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    nats_url: str = Field(
        validation_alias=_plain("DIN_NATS_URL"),
        description="NATS server this process connects to (its own site's leaf or the hub).",
    )
    kafka_bootstrap: str = Field(
        validation_alias=_plain("DIN_KAFKA_BOOTSTRAP"),
        description="Kafka bootstrap servers for the event log, host:port[,host:port].",
    )
    site: str = Field(
        validation_alias=_plain("DIN_SITE"),
        description="Name of the site this process runs at.",
    )
    instance: str | None = Field(
        default=None,
        validation_alias=_plain("DIN_INSTANCE"),
        description="Instance id of a service that runs more than once in the network (a site's control plane, "
        "a replica); it answers din.v1.health.<service>.<instance> too. Executors use their own id.",
    )
    trace_sample_ratio: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        validation_alias=_plain("DIN_TRACE_SAMPLE_RATIO"),
        description="Share of requests without a sampled traceparent that start a trace.",
    )
    otlp_endpoint: str | None = Field(
        default=None,
        validation_alias=_plain("DIN_OTLP_ENDPOINT"),
        description="OTLP/HTTP traces endpoint of a collector; traces are exported there when set.",
    )
    nats_creds_file: str | None = Field(
        default=None,
        validation_alias=_plain("DIN_NATS_CREDS"),
        description="NATS credentials file (user JWT and nkey seed) this process connects with; unset only "
        "against an --insecure stack.",
    )
    bus_ca_file: str | None = Field(
        default=None,
        validation_alias=_plain("DIN_BUS_CA_FILE"),
        description="DIN's CA certificate (ca.pem): brokers reached over TLS (tls:// NATS URLs, Kafka) are "
        "verified against it.",
    )
    bus_sites: str | None = Field(
        default=None,
        validation_alias=_plain("DIN_BUS_SITES"),
        description="Comma-separated sites of the network: a subscriber of every site's heartbeats, completions "
        "or summaries subscribes site by site, as a closed bus's leaf connections require. Set by the launcher.",
    )
    kafka_user: str | None = Field(
        default=None,
        validation_alias=_plain("DIN_KAFKA_USER"),
        description="Kafka SCRAM user of this process; unset only against an --insecure stack.",
    )
    kafka_password_file: str | None = Field(
        default=None,
        validation_alias=_plain("DIN_KAFKA_PASSWORD_FILE"),
        description="File holding the Kafka SCRAM user's password.",
    )
    jetstream_replicas: dict[str, int] = Field(
        default_factory=dict,
        validation_alias=_plain("DIN_JETSTREAM_REPLICAS"),
        description="Replicas of the streams and buckets a process creates, per JetStream domain (a site), as "
        'JSON (\'{"cloud": 3}\' for a clustered hub); a domain not named gets 1. Set by the launcher.',
    )
    topic_scope: str | None = Field(
        default=None,
        validation_alias=_plain("DIN_TOPIC_SCOPE"),
        description="Optional suffix for every Kafka topic, isolating one run or test.",
    )

    def replicas_in(self, domain: str) -> int:
        """Replicas of a stream or bucket this process creates in JetStream domain ``domain``."""
        return self.jetstream_replicas.get(domain, 1)

    @field_validator("site")
    @classmethod
    def _site_is_token(cls, value: str) -> str:
        return token(value, what="site")
