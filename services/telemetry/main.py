"""Telemetry's front door: records events to Kafka, aggregates them into Prometheus metrics, raises SLA alerts.

* Completions and heartbeats arrive on NATS: each is decoded once, counted into
  the metrics and relayed unchanged to its Kafka topic. A message that is not a
  valid event is dead-lettered, not relayed. With a control plane per site only
  the hub's executors' heartbeats come to telemetry (at the hub): every site's
  scheduler summary does, for per-site capacity gauges, so the hub's message
  rate does not grow with the executors at other sites.
* Admission and scheduling decisions are already in Kafka (their services
  write them); ``DecisionFeed`` reads them for the reject and placement metrics.
* ``/metrics`` is served over HTTP on ``metrics_host:metrics_port``.
* Every ``alert_interval_s`` each SLA class's windowed quantile is compared
  with its target; a class that starts or stops violating it is published as
  an ``SlaViolationV1`` on NATS (``Subjects.ALERTS``) and Kafka (``Topics.ALERTS``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TypeVar

from nats.aio.msg import Msg
from pydantic import BaseModel

from services.telemetry.alerts import describe
from services.telemetry.decisions import DecisionFeed
from services.telemetry.httpd import MetricsServer
from services.telemetry.metrics import TelemetryMetrics
from services.telemetry.settings import TelemetrySettings
from services.telemetry.topics import ensure_topics, missing_topics, scoped, topic_plan
from shared.bus.kafka import READS, WRITES, kafka_client_kwargs
from shared.contracts.events import CompletionV1, HeartbeatV1
from shared.contracts.federation import SiteSummaryV1
from shared.contracts.telemetry import SlaViolationV1
from shared.eventlog import event_type
from shared.naming import Subjects, Topics
from shared.runtime import Service, endpoint
from shared.security import ControlRefused, ControlVerifier, PayloadSecurity, Refusal

COMPLETION_TYPE = f"din.v1.{CompletionV1.__name__}"
HEARTBEAT_TYPE = f"din.v1.{HeartbeatV1.__name__}"
KAFKA_RETRY_S = 2.0
TOPICS_TIMEOUT_S = 10.0

Event = TypeVar("Event", bound=BaseModel)


def heartbeats_heard(settings: TelemetrySettings) -> str:
    """Every site's heartbeats, or only ``settings.heartbeat_site``'s (a control plane per site)."""
    site = settings.heartbeat_site
    return Subjects.HEARTBEAT_ALL if site is None else Subjects.heartbeat_site(site)


class Telemetry(Service):
    """Relays completions and heartbeats to Kafka, keeps the Prometheus metrics, and raises SLA alerts."""

    name = "telemetry"
    publishes = ("alerts", Topics.ALERTS)
    consumes = (Topics.ADMISSION_DECISIONS, Topics.SCHEDULING_DECISIONS)

    def __init__(self, settings: TelemetrySettings) -> None:
        super().__init__(settings)
        events = self.runtime.events
        self.metrics = TelemetryMetrics(
            settings.sla_targets_ms(),
            sla_window_s=settings.sla_window_s,
            sla_quantile=settings.sla_quantile,
            sla_min_samples=settings.sla_min_samples,
            recorded=lambda: (events.sent, events.dropped),
        )
        self.server = MetricsServer(self.metrics.exposition, settings.metrics_host, settings.metrics_port)
        self.decisions = DecisionFeed(self.metrics, settings, client_id=f"din-telemetry-{self.runtime.instance}")
        self.counts = {"completions": 0, "heartbeats": 0, "summaries": 0, "invalid": 0, "alerts": 0}
        self.topics_ready = False
        self.security = PayloadSecurity.from_settings(settings)
        self.verifier = ControlVerifier(self.security.agent)
        self.runtime.on_start(self.start_keys)
        self.runtime.on_start(self.start)
        self.runtime.on_drain(self.security.stop)
        self.runtime.on_drain(self.server.stop)

    def detail(self) -> dict[str, object]:
        return {
            **self.counts, "decisions": self.decisions.decisions,
            "invalid": self.counts["invalid"] + self.decisions.invalid,
            "metrics": self.server.url, "decision_consumer": self.decisions.consumer_state,
            **self.verifier.detail(),
        }

    async def start_keys(self) -> None:
        """Follow the keys bucket for the public identities and revocations the signature checks need."""
        await self.security.start(self.nc, timeout_s=self.settings.keys_wait_s)

    async def start(self) -> None:
        """Create the topics before the first relayed event would auto-create them with broker defaults, serve
        ``/metrics``, and start the decision consumer and the SLA evaluation."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.prepare_topics(), TOPICS_TIMEOUT_S)
        await self.server.start()
        self.log.info("metrics at %s", self.server.url)
        self.runtime.spawn(self.decisions.follow(self.prepare_topics), name="consume_decisions")
        self.runtime.spawn(self.evaluate_slas(), name="evaluate_slas")

    @endpoint("completed", Subjects.COMPLETED_ALL, queue="telemetry",
              publishes=(Topics.COMPLETIONS, Topics.DEAD_LETTER))
    async def on_completed(self, msg: Msg) -> None:
        """A job's completion: counted, and relayed to the completions topic."""
        event = self._decode(msg, "completed", CompletionV1, "completion")
        if event is not None:
            self.counts["completions"] += 1
            self.metrics.observe_completion(event)
            self.runtime.events.emit_encoded(Topics.COMPLETIONS, COMPLETION_TYPE, msg.data, key=event.site)

    @endpoint("heartbeat", heartbeats_heard, queue="telemetry",
              publishes=(Topics.HEARTBEATS, Topics.DEAD_LETTER))
    async def on_heartbeat(self, msg: Msg) -> None:
        """An executor's heartbeat: kept for the utilisation gauges, and relayed to the heartbeats topic."""
        heartbeat = self._decode(msg, "heartbeat", HeartbeatV1, "heartbeat")
        if heartbeat is not None:
            self.counts["heartbeats"] += 1
            self.metrics.observe_heartbeat(heartbeat)
            self.runtime.events.emit_encoded(Topics.HEARTBEATS, HEARTBEAT_TYPE, msg.data, key=heartbeat.executor)

    @endpoint("summary", Subjects.SUMMARY_ALL, queue="telemetry", publishes=(Topics.DEAD_LETTER,))
    async def on_summary(self, msg: Msg) -> None:
        """A site scheduler's summary: kept for the per-site capacity gauges (every site's, also where telemetry
        does not hear the executors' heartbeats)."""
        summary = self._decode(msg, "summary", SiteSummaryV1, "summary")
        if summary is not None:
            self.counts["summaries"] += 1
            self.metrics.observe_summary(summary)

    def _decode(self, msg: Msg, channel: str, model: type[Event], source: str) -> Event | None:
        """The event ``msg`` carries once its signature, signer and claims check out; else None: an event that
        does not decode is counted invalid and dead-lettered, any other refusal counted by the verifier."""
        try:
            return self.verifier.open_message(channel, msg, model)
        except ControlRefused as refused:
            if refused.reason == Refusal.MALFORMED:
                self.counts["invalid"] += 1
                self.metrics.invalid(source)
                self.runtime.dead_letter(msg, f"not a {model.__name__}")
            return None

    async def prepare_topics(self) -> None:
        """Make sure the recorded topics exist; retry until Kafka answers, serving NATS meanwhile.

        On a secure broker the operator created them (``din up``) and telemetry, which may not, waits for the ones
        it reads and writes; on an insecure one it creates (or re-configures) them itself.
        """
        plan = topic_plan(self.settings)
        kwargs = kafka_client_kwargs(self.settings)
        client_id = f"din-telemetry-{self.runtime.instance}-admin"
        while not self.topics_ready:
            try:
                if kwargs:
                    own = [scoped(base, self.settings.topic_scope) for base in (*READS[self.name], *WRITES[self.name])]
                    missing = await asyncio.wait_for(
                        missing_topics(self.settings.kafka_bootstrap, own, client_id=client_id, client_kwargs=kwargs),
                        TOPICS_TIMEOUT_S)
                    if missing:
                        raise LookupError(f"topics {', '.join(missing)} not created yet (the operator creates them)")
                else:
                    await asyncio.wait_for(
                        ensure_topics(self.settings.kafka_bootstrap, plan, scope=self.settings.topic_scope,
                                      client_id=client_id),
                        TOPICS_TIMEOUT_S,
                    )
                self.topics_ready = True
            except Exception as exc:  # Kafka not up yet: keep serving NATS, retry
                self.log.warning("could not prepare Kafka topics yet (%s); retrying", exc)
                await asyncio.sleep(KAFKA_RETRY_S)

    async def evaluate_slas(self) -> None:
        """Every ``alert_interval_s``, raise or resolve each SLA class's violation alert."""
        while True:
            await asyncio.sleep(self.settings.alert_interval_s)
            for alert in self.metrics.sla.evaluate(self.metrics.clock(), time.time() * 1000.0):
                await self.raise_alert(alert)

    async def raise_alert(self, alert: SlaViolationV1) -> None:
        """Record ``alert`` in Kafka and publish it on NATS (a NATS failure leaves it recorded)."""
        self.counts["alerts"] += 1
        self.log.warning("SLA %s", describe(alert))
        body = alert.model_dump_json().encode()
        self.runtime.events.emit_encoded(Topics.ALERTS, event_type(alert), body, key=alert.sla_class.value)
        try:
            await self.nc.publish(Subjects.ALERTS, body)
        except Exception as exc:  # NATS reconnecting: the alert is still recorded in Kafka
            self.log.warning("could not publish the SLA alert on %s: %s", Subjects.ALERTS, exc)


def create_runtime(settings: TelemetrySettings):
    """Build the telemetry service (its runtime, for launchers that start runtimes)."""
    return Telemetry(settings).runtime
