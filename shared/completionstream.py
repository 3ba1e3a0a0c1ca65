"""The JetStream stream that keeps a site's completion events until telemetry has them in Kafka.

Executors publish completions on core NATS (``Subjects.completed``), which the
scheduler hears as before; each site's own JetStream domain also captures them
in ``DIN_COMPLETIONS_<SITE>``, bounded by age and size. Telemetry reads the
stream with a durable pull consumer per site and acknowledges a message only
once Kafka has acknowledged its record, so a stopped telemetry (or an
unreachable Kafka) leaves the completions waiting in the stream, and a
restarted one resumes where it stopped. Telemetry and ``din up`` create it
(whoever comes first); this module defines it once for both.
"""

from __future__ import annotations

from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, DiscardPolicy, RetentionPolicy, StreamConfig

from din.shared.naming import Subjects, completions_stream, token

MIB = 1024 * 1024
RELAY_DURABLE = "telemetry"
"""The durable consumer telemetry relays each site's stream with."""
RELAY_ACK_WAIT_S = 5.0
"""A delivered completion not acknowledged this long (telemetry died holding it) is delivered again; telemetry
keeps claiming what it holds while Kafka has not taken it."""
RELAY_MAX_ACK_PENDING = 4096
"""Most completions delivered to telemetry and not yet acknowledged, per site."""


def completions_stream_config(site: str, *, max_age_s: float, max_bytes: int, replicas: int = 1) -> StreamConfig:
    """``site``'s completion stream: its completion subject, limits retention (the oldest go first once
    ``max_age_s`` or ``max_bytes`` is reached), kept ``replicas`` times (``ServiceSettings.replicas_in``)."""
    return StreamConfig(
        name=completions_stream(site),
        description=f"completion events of {site}, kept until telemetry has relayed them to Kafka",
        subjects=[Subjects.completed(site)],
        retention=RetentionPolicy.LIMITS,
        discard=DiscardPolicy.OLD,
        max_age=max_age_s,
        max_bytes=max_bytes,
        num_replicas=replicas,
    )


def relay_durable(scope: str | None = None) -> str:
    """The relay consumer's name: ``telemetry``, or ``telemetry_<scope>`` for a telemetry writing scoped topics (a
    test's or a run's), so it neither takes nor acknowledges another telemetry's completions."""
    return RELAY_DURABLE if scope is None else f"{RELAY_DURABLE}_{token(scope, what='scope')}"


def relay_consumer_config(durable: str, *, from_start: bool) -> ConsumerConfig:
    """The relay's durable pull consumer: explicit acks; a new one starts at the stream's first message
    (``from_start``) or at the next one."""
    return ConsumerConfig(
        durable_name=durable,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL if from_start else DeliverPolicy.NEW,
        ack_wait=RELAY_ACK_WAIT_S,
        max_ack_pending=RELAY_MAX_ACK_PENDING,
    )
