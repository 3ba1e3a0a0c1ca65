"""Admission, scheduling and scaling decisions from Kafka into the metrics (their services record them there).

``DecisionFeed.observe`` decodes one record and counts it (pure, testable without
Kafka); ``DecisionFeed.follow`` is the consumer loop that feeds it and reconnects
when Kafka goes away. A record that does not decode is counted and skipped; with a ``verifier``
(``shared.security.records``) so is one its producer did not sign.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from aiokafka import AIOKafkaConsumer
from pydantic import BaseModel, ValidationError

from din.services.telemetry.metrics import TelemetryMetrics
from din.services.telemetry.settings import TelemetrySettings
from din.services.telemetry.topics import scoped
from din.shared.bus.kafka import kafka_client_kwargs
from din.shared.contracts.events import AdmissionDecisionV1, SchedulingDecisionV1
from din.shared.contracts.scaling import ScalingDecisionV1
from din.shared.naming import Topics
from din.shared.security.records import ForgedRecord, RecordVerifier

log = logging.getLogger("din.telemetry")

RECONNECT_S = 2.0
POLL_MS = 500
MAX_RECORDS = 2000
FETCH_MIN_BYTES = 64 * 1024
FETCH_MAX_WAIT_MS = 250

DECISION_TOPICS: dict[str, tuple[type[BaseModel], str]] = {
    Topics.ADMISSION_DECISIONS: (AdmissionDecisionV1, "admission"),
    Topics.SCHEDULING_DECISIONS: (SchedulingDecisionV1, "scheduling"),
    Topics.SCALING_DECISIONS: (ScalingDecisionV1, "autoscaler"),
}
"""Each decision topic's contract and its event source (the ``source`` label of the telemetry metrics)."""


class DecisionFeed:
    """Reads the decision topics (under the run's topic scope) into ``metrics``."""

    def __init__(self, metrics: TelemetryMetrics, settings: TelemetrySettings, *, client_id: str,
                 verifier: RecordVerifier | None = None) -> None:
        self.metrics = metrics
        self.verifier = verifier
        self.settings = settings
        self.client_id = client_id
        self.by_topic = {scoped(base, settings.topic_scope): spec for base, spec in DECISION_TOPICS.items()}
        self.group = "din-telemetry" + (f"-{settings.topic_scope}" if settings.topic_scope else "")
        self.consumer_state = "waiting"
        self.decisions = 0
        self.invalid = 0

    def observe(self, topic: str, value: bytes | None) -> None:
        """Count one record of decision topic ``topic`` (a scoped name), or count it invalid."""
        model, source = self.by_topic[topic]
        try:
            decision = model.model_validate_json(value or b"")
        except ValidationError:
            self.invalid += 1
            self.metrics.invalid(source)
            return
        self.decisions += 1
        if source == "admission":
            self.metrics.observe_admission(decision)
        elif source == "autoscaler":
            self.metrics.observe_scaling(decision)
        else:
            self.metrics.observe_scheduling(decision)

    async def follow(self, ready: Callable[[], Awaitable[None]]) -> None:
        """Await ``ready()`` (the topics exist), then consume for ever, reconnecting after a Kafka failure."""
        await ready()
        while True:
            consumer = AIOKafkaConsumer(
                *self.by_topic,
                bootstrap_servers=self.settings.kafka_bootstrap,
                group_id=self.group,
                client_id=self.client_id,
                auto_offset_reset=self.settings.decisions_from,
                enable_auto_commit=True,
                fetch_min_bytes=FETCH_MIN_BYTES,
                fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
                **kafka_client_kwargs(self.settings),
            )
            try:
                await consumer.start()
                await self._consume(consumer)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("decision consumer stopped (%s); reconnecting", exc)
                await asyncio.sleep(RECONNECT_S)
            finally:
                with contextlib.suppress(Exception):
                    await consumer.stop()

    async def _consume(self, consumer: AIOKafkaConsumer) -> None:
        while True:
            batches = await consumer.getmany(timeout_ms=POLL_MS, max_records=MAX_RECORDS)
            self.consumer_state = "assigned" if consumer.assignment() else "waiting"
            for records in batches.values():
                for record in records:
                    self.take(record)

    def take(self, record) -> None:
        """Observe one consumed record, unless its signature does not verify (counted invalid and by reason)."""
        if self.verifier is not None:
            try:
                self.verifier.check(record)
            except ForgedRecord:
                self.invalid += 1
                self.metrics.invalid(self.by_topic[record.topic][1])
                return
        self.observe(record.topic, record.value)
