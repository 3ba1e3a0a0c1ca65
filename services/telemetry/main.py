"""Telemetry's front door: records events to Kafka, aggregates them into Prometheus metrics, raises SLA alerts.

* Completions and heartbeats arrive on NATS (``hot_path``): each is decoded
  once, counted into the metrics and relayed unchanged to its Kafka topic. A
  message that is not a valid event is dead-lettered, not relayed.
* Admission and scheduling decisions are already in Kafka (their services
  write them); a consumer reads them for the reject and placement metrics. A
  record that does not decode is counted and skipped.
* ``/metrics`` is served over HTTP on ``metrics_host:metrics_port``.
* Every ``alert_interval_s`` each SLA class's windowed quantile is compared
  with its target; a class that starts or stops violating it is published as
  an ``SlaViolationV1`` on NATS (``Subjects.ALERTS``) and Kafka (``Topics.ALERTS``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from aiokafka import AIOKafkaConsumer
from nats.aio.msg import Msg
from pydantic import ValidationError

from services.telemetry.httpd import MetricsServer
from services.telemetry.metrics import TelemetryMetrics
from services.telemetry.settings import TelemetrySettings
from services.telemetry.topics import ensure_topics, scoped, topic_plan
from shared.contracts.events import AdmissionDecisionV1, CompletionV1, HeartbeatV1, SchedulingDecisionV1
from shared.eventlog import event_type
from shared.naming import Subjects, Topics
from shared.runtime import ServiceRuntime

COMPLETION_TYPE = f"din.v1.{CompletionV1.__name__}"
HEARTBEAT_TYPE = f"din.v1.{HeartbeatV1.__name__}"
KAFKA_RETRY_S = 2.0
TOPICS_TIMEOUT_S = 10.0

DECISION_TOPICS = {
    Topics.ADMISSION_DECISIONS: (AdmissionDecisionV1, "admission"),
    Topics.SCHEDULING_DECISIONS: (SchedulingDecisionV1, "scheduling"),
}


def create_runtime(settings: TelemetrySettings) -> ServiceRuntime:
    """Build the telemetry service."""
    runtime = ServiceRuntime("telemetry", settings)
    metrics = TelemetryMetrics(
        settings.sla_targets_ms(),
        sla_window_s=settings.sla_window_s,
        sla_quantile=settings.sla_quantile,
        sla_min_samples=settings.sla_min_samples,
        recorded=lambda: (runtime.events.sent, runtime.events.dropped),
    )
    server = MetricsServer(metrics.exposition, settings.metrics_host, settings.metrics_port)
    counts = {"completions": 0, "heartbeats": 0, "decisions": 0, "invalid": 0, "alerts": 0}
    decisions = {"consumer": "waiting"}
    runtime.detail = lambda: {**counts, "metrics": server.url, "decision_consumer": decisions["consumer"]}

    @runtime.hot_path(Subjects.COMPLETED_ALL, queue="telemetry")
    async def on_completed(msg: Msg) -> None:
        try:
            event = CompletionV1.model_validate_json(msg.data)
        except ValidationError:
            counts["invalid"] += 1
            metrics.invalid("completion")
            runtime.dead_letter(msg, "not a CompletionV1")
            return
        counts["completions"] += 1
        metrics.observe_completion(event)
        runtime.events.emit_encoded(Topics.COMPLETIONS, COMPLETION_TYPE, msg.data, key=event.site)

    @runtime.hot_path(Subjects.HEARTBEAT_ALL, queue="telemetry")
    async def on_heartbeat(msg: Msg) -> None:
        try:
            heartbeat = HeartbeatV1.model_validate_json(msg.data)
        except ValidationError:
            counts["invalid"] += 1
            metrics.invalid("heartbeat")
            runtime.dead_letter(msg, "not a HeartbeatV1")
            return
        counts["heartbeats"] += 1
        metrics.observe_heartbeat(heartbeat)
        runtime.events.emit_encoded(Topics.HEARTBEATS, HEARTBEAT_TYPE, msg.data, key=heartbeat.executor)

    topics_ready = {"done": False}

    async def prepare_topics() -> None:
        plan = topic_plan(settings)
        while not topics_ready["done"]:
            try:
                await asyncio.wait_for(
                    ensure_topics(settings.kafka_bootstrap, plan, scope=settings.topic_scope,
                                  client_id=f"din-telemetry-{runtime.instance}-admin"),
                    TOPICS_TIMEOUT_S,
                )
                topics_ready["done"] = True
            except Exception as exc:  # Kafka not up yet: keep serving NATS, retry
                runtime.log.warning("could not prepare Kafka topics yet (%s); retrying", exc)
                await asyncio.sleep(KAFKA_RETRY_S)

    async def consume_decisions() -> None:
        await prepare_topics()
        by_topic = {scoped(base, settings.topic_scope): spec for base, spec in DECISION_TOPICS.items()}
        group = "din-telemetry" + (f"-{settings.topic_scope}" if settings.topic_scope else "")
        while True:
            consumer = AIOKafkaConsumer(
                *by_topic,
                bootstrap_servers=settings.kafka_bootstrap,
                group_id=group,
                client_id=f"din-telemetry-{runtime.instance}",
                auto_offset_reset=settings.decisions_from,
                enable_auto_commit=True,
            )
            try:
                await consumer.start()
                while True:
                    batches = await consumer.getmany(timeout_ms=500, max_records=2000)
                    decisions["consumer"] = "assigned" if consumer.assignment() else "waiting"
                    for tp, records in batches.items():
                        model, source = by_topic[tp.topic]
                        for record in records:
                            try:
                                decision = model.model_validate_json(record.value or b"")
                            except ValidationError:
                                counts["invalid"] += 1
                                metrics.invalid(source)
                                continue
                            counts["decisions"] += 1
                            if source == "admission":
                                metrics.observe_admission(decision)
                            else:
                                metrics.observe_scheduling(decision)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                runtime.log.warning("decision consumer stopped (%s); reconnecting", exc)
                await asyncio.sleep(KAFKA_RETRY_S)
            finally:
                with contextlib.suppress(Exception):
                    await consumer.stop()

    async def evaluate_slas() -> None:
        while True:
            await asyncio.sleep(settings.alert_interval_s)
            for alert in metrics.sla.evaluate(metrics.clock(), time.time() * 1000.0):
                counts["alerts"] += 1
                state = "firing" if alert.firing else "resolved"
                runtime.log.warning("SLA %s %s: p%g %.1f ms vs target %.1f ms over %d requests (worst site %s)",
                                    alert.sla_class.value, state, alert.quantile * 100, alert.observed_ms,
                                    alert.target_ms, alert.samples, alert.worst_site)
                body = alert.model_dump_json().encode()
                runtime.events.emit_encoded(Topics.ALERTS, event_type(alert), body, key=alert.sla_class.value)
                try:
                    await runtime.nc.publish(Subjects.ALERTS, body)
                except Exception as exc:  # NATS reconnecting: the alert is still recorded in Kafka
                    runtime.log.warning("could not publish the SLA alert on %s: %s", Subjects.ALERTS, exc)

    @runtime.on_start
    async def start() -> None:
        # Create the topics before the first relayed event would auto-create them with broker defaults.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(prepare_topics(), TOPICS_TIMEOUT_S)
        await server.start()
        runtime.log.info("metrics at %s", server.url)
        for loop in (consume_decisions, evaluate_slas):
            runtime.spawn(loop(), name=loop.__name__)

    @runtime.on_drain
    async def stop_metrics() -> None:
        await server.stop()

    return runtime
