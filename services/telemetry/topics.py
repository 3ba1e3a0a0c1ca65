"""The Kafka topics DIN records to: names, keys, partitions and retention, and their creation.

``topic_plan`` is the single table of what is kept where (docs/telemetry.md
prints the same table). ``ensure_topics`` creates missing topics with their
partitions and retention and re-applies the retention of existing ones, so
what the docs promise is what the broker does. On a secure broker only the
``operator`` Kafka user may do that (``din up`` does, at start); services
then wait for the topics instead (``missing_topics``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from din.services.telemetry.settings import HOUR_MS, TelemetrySettings
from din.shared.naming import Topics

log = logging.getLogger(__name__)

TOPIC_ALREADY_EXISTS = 36


@dataclass(frozen=True)
class TopicSpec:
    """One recorded topic."""

    base: str
    key: str
    writer: str
    retention_ms: int
    partitions: int
    retention_bytes: int = -1
    """Most each partition keeps, bytes (-1: no size bound)."""

    def configs(self) -> dict[str, str]:
        """The topic's retention as Kafka configs."""
        return {"retention.ms": str(self.retention_ms), "retention.bytes": str(self.retention_bytes)}


def topic_plan(settings: TelemetrySettings) -> list[TopicSpec]:
    """Every recorded topic with its key, writer, retention and partitions."""
    p = settings.topic_partitions

    def hours(h: float) -> int:
        return int(h * HOUR_MS)

    events = hours(settings.retention_events_h)
    size = settings.retention_partition_mb * 1024 * 1024
    return [replace(spec, retention_bytes=size) for spec in [
        TopicSpec(Topics.REQUESTS, "tenant", "admission", hours(settings.retention_requests_h), p),
        TopicSpec(Topics.ADMISSION_DECISIONS, "tenant", "admission", events, p),
        TopicSpec(Topics.CLASSIFICATIONS, "tenant", "classifier", events, p),
        TopicSpec(Topics.SCHEDULING_DECISIONS, "tenant", "scheduler", events, p),
        TopicSpec(Topics.COMPLETIONS, "site", "telemetry (relayed from executors)", events, p),
        TopicSpec(Topics.HEARTBEATS, "executor id", "telemetry (relayed from executors)",
                  hours(settings.retention_heartbeats_h), p),
        TopicSpec(Topics.ALERTS, "SLA class", "telemetry", hours(settings.retention_alerts_h), p),
        TopicSpec(Topics.DEAD_LETTER, "service", "any service", hours(settings.retention_dead_letter_h), p),
        TopicSpec(Topics.SPANS, "trace id", "every service (sampled spans)", events, p),
        TopicSpec(Topics.SCALING_DECISIONS, "site", "autoscaler", events, p),
    ]]


class TopicsError(RuntimeError):
    """The broker refused to create or configure a recorded topic."""


def scoped(base: str, scope: str | None) -> str:
    """The concrete topic name of ``base`` under an optional run/test scope."""
    return Topics.scoped(base, scope) if scope else base


async def ensure_topics(bootstrap: str, plan: list[TopicSpec], *, scope: str | None, client_id: str,
                        client_kwargs: Mapping[str, Any] | None = None) -> None:
    """Create missing topics of ``plan`` and (re)apply every topic's retention (``client_kwargs``: the login)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id=client_id, **(client_kwargs or {}))
    await admin.start()
    try:
        new = [
            NewTopic(scoped(t.base, scope), num_partitions=t.partitions, replication_factor=1,
                     topic_configs=t.configs())
            for t in plan
        ]
        response = await admin.create_topics(new)
        existing = {name for name, code, *_ in response.topic_errors if code == TOPIC_ALREADY_EXISTS}
        failed = [(name, code) for name, code, *_ in response.topic_errors if code not in (0, TOPIC_ALREADY_EXISTS)]
        if failed:
            raise TopicsError(f"could not create topics: {failed}")
        if existing:
            responses = await admin.alter_configs(
                [
                    ConfigResource(ConfigResourceType.TOPIC, scoped(t.base, scope),
                                   configs=t.configs())
                    for t in plan
                    if scoped(t.base, scope) in existing
                ]
            )
            refused = [(name, code) for r in responses for code, _, _, name in r.resources if code]
            if refused:
                raise TopicsError(f"could not set the retention of topics: {refused}")
    finally:
        await admin.close()


async def missing_topics(bootstrap: str, names: Iterable[str], *, client_id: str,
                         client_kwargs: Mapping[str, Any] | None = None) -> list[str]:
    """Which of ``names`` the broker does not show this login (absent, or not visible to it)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id=client_id, **(client_kwargs or {}))
    await admin.start()
    try:
        present = set(await admin.list_topics())
    finally:
        await admin.close()
    return [name for name in names if name not in present]
