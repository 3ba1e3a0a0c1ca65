"""Telemetry's front door: records events to Kafka, aggregates them into Prometheus metrics, raises SLA alerts.

* Completions are read from each site's completion stream (JetStream, in the
  site's own domain: ``shared.completionstream``) with a durable pull consumer
  per site; each is acknowledged there only once Kafka acknowledged its record,
  so nothing is lost while telemetry or Kafka is down, and the relay's backlog
  per site is reported in health and on ``/metrics`` (``relay.py``).
* Heartbeats arrive on NATS. Each event is decoded once, counted into the
  metrics and relayed unchanged to its Kafka topic. A message that is not a
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
from nats.errors import TimeoutError as NatsTimeout
from nats.js.errors import BadRequestError
from pydantic import BaseModel

from din.services.telemetry.alerts import describe
from din.services.telemetry.decisions import DecisionFeed
from din.services.telemetry.httpd import MetricsServer
from din.services.telemetry.metrics import TelemetryMetrics
from din.services.telemetry.relay import RelayLedger, RelayState
from din.services.telemetry.settings import TelemetrySettings
from din.services.telemetry.topics import ensure_topics, missing_topics, scoped, topic_plan
from din.shared.bus.kafka import READS, WRITES, kafka_client_kwargs
from din.shared.completionstream import (
    MIB,
    RELAY_ACK_WAIT_S,
    completions_stream_config,
    relay_consumer_config,
    relay_durable,
)
from din.shared.contracts.events import CompletionV1, HeartbeatV1
from din.shared.contracts.federation import SiteSummaryV1
from din.shared.contracts.telemetry import SlaViolationV1
from din.shared.eventlog import event_type
from din.shared.naming import Subjects, Topics, completions_stream
from din.shared.runtime import Service, endpoint
from din.shared.security import ControlRefused, ControlVerifier, PayloadSecurity, Refusal
from din.shared.security.records import RecordVerifier

COMPLETION_TYPE = f"din.v1.{CompletionV1.__name__}"
HEARTBEAT_TYPE = f"din.v1.{HeartbeatV1.__name__}"
KAFKA_RETRY_S = 2.0
TOPICS_TIMEOUT_S = 10.0
RELAY_CALL_TIMEOUT_S = 2.0
RELAY_PULL_WAIT_S = 1.0
RELAY_DRAIN_S = 5.0
"""How long a stopping telemetry goes on relaying the completions still waiting in the sites' streams."""
RELAY_RETRY_S = 1.0
RELAY_CLAIM_EVERY_S = RELAY_ACK_WAIT_S / 3

Event = TypeVar("Event", bound=BaseModel)


def heartbeats_heard(settings: TelemetrySettings) -> str:
    """Every site's heartbeats, or only ``settings.heartbeat_site``'s (a control plane per site)."""
    site = settings.heartbeat_site
    return Subjects.HEARTBEAT_ALL if site is None else Subjects.heartbeat_site(site)


class Telemetry(Service):
    """Relays completions and heartbeats to Kafka, keeps the Prometheus metrics, and raises SLA alerts."""

    name = "telemetry"
    publishes = ("alerts", Topics.ALERTS, Topics.COMPLETIONS)
    consumes = (Topics.ADMISSION_DECISIONS, Topics.SCHEDULING_DECISIONS, Topics.SCALING_DECISIONS)

    def __init__(self, settings: TelemetrySettings) -> None:
        super().__init__(settings)
        events = self.runtime.events
        self.relay = RelayLedger(settings.relay_sites(), settings.relay_lag_alert_s)
        self.relay_consumer = relay_durable(settings.topic_scope)
        self.relay_tasks: list[asyncio.Task] = []
        self.relaying = True
        self.draining = False
        self.metrics = TelemetryMetrics(
            settings.sla_targets_ms(),
            sla_window_s=settings.sla_window_s,
            sla_quantile=settings.sla_quantile,
            sla_min_samples=settings.sla_min_samples,
            recorded=lambda: (events.sent, events.dropped),
            relay=self.relay,
        )
        self.server = MetricsServer(self.metrics.exposition, settings.metrics_host, settings.metrics_port)
        self.security = PayloadSecurity.from_settings(settings)
        self.runtime.sign_with(self.security)
        self.decisions = DecisionFeed(
            self.metrics, settings, client_id=f"din-telemetry-{self.runtime.instance}",
            verifier=RecordVerifier.of_agent(self.security.agent) if self.security.enabled else None)
        self.counts = {"completions": 0, "heartbeats": 0, "summaries": 0, "invalid": 0, "alerts": 0}
        self.topics_ready = False
        self.topics_prepared = asyncio.Event()
        self.verifier = ControlVerifier(self.security.agent)
        self.stored_s = dict.fromkeys(self.relay.sites, 0.0)
        self.stream_verifiers = {site: self._stream_verifier(site) for site in self.relay.sites}
        self.runtime.on_start(self.start_keys)
        self.runtime.on_start(self.start)
        self.runtime.on_drain(self.stop_relays)
        self.runtime.on_drain(self.security.stop)
        self.runtime.on_drain(self.server.stop)

    def detail(self) -> dict[str, object]:
        return {
            **self.counts, "decisions": self.decisions.decisions,
            "invalid": self.counts["invalid"] + self.decisions.invalid,
            "metrics": self.server.url, "decision_consumer": self.decisions.consumer_state,
            **self.relay.detail(), **self.verifier.detail(),
            **(self.decisions.verifier.detail() if self.decisions.verifier is not None else {}),
        }

    def _stream_verifier(self, site: str) -> ControlVerifier:
        """A verifier of ``site``'s stored completions whose clock is the time the stream stored the one being
        checked: a completion relayed late is as fresh as when it was published. It counts its refusals with the
        service's verifier."""
        verifier = ControlVerifier(self.security.agent, clock=lambda: self.stored_s[site])
        verifier.refusals = self.verifier.refusals
        return verifier

    async def start_keys(self) -> None:
        """Follow the keys bucket for the public identities and revocations the signature checks need."""
        await self.security.start(self.nc, timeout_s=self.settings.keys_wait_s)

    async def start(self) -> None:
        """Create the topics before the first relayed event would auto-create them with broker defaults, open
        every reachable site's completion relay, serve ``/metrics``, and start the relays, the decision consumer
        and the SLA evaluation."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.prepare_topics(), TOPICS_TIMEOUT_S)
        opened = await asyncio.gather(*(self.open_relay(site) for site in self.relay.sites), return_exceptions=True)
        await self.server.start()
        self.log.info("metrics at %s", self.server.url)
        for site, subscription in zip(self.relay.sites, opened, strict=True):
            ready = None if isinstance(subscription, BaseException) else subscription
            self.relay_tasks.append(self.runtime.spawn(self.relay_completions(site, ready), name=f"relay_{site}"))
        self.runtime.spawn(self.watch_relays(), name="watch_relays")
        self.runtime.spawn(self.decisions.follow(self.prepare_topics), name="consume_decisions")
        self.runtime.spawn(self.evaluate_slas(), name="evaluate_slas")

    async def open_relay(self, site: str):
        """``site``'s completion stream, created or brought to the configured limits, and the relay's pull
        subscription to it (its durable consumer created the first time)."""
        js = self.nc.jetstream(domain=site, timeout=RELAY_CALL_TIMEOUT_S)
        config = completions_stream_config(site, max_age_s=self.settings.relay_max_age_h * 3600.0,
                                           max_bytes=self.settings.relay_max_mb * MIB,
                                           replicas=self.settings.replicas_in(site))
        try:
            await js.add_stream(config)
        except BadRequestError:  # it exists with other limits
            await js.update_stream(config)
        return await js.pull_subscribe(
            Subjects.completed(site), durable=self.relay_consumer, stream=completions_stream(site),
            config=relay_consumer_config(self.relay_consumer, from_start=self.settings.relay_from == "earliest"))

    async def relay_completions(self, site: str, subscription) -> None:
        """Relay ``site``'s stored completions to Kafka batch by batch until telemetry stops; while the site's
        JetStream does not answer, try again every ``RELAY_RETRY_S``."""
        await self.topics_prepared.wait()
        while subscription is None and self.relaying:
            try:
                subscription = await self.open_relay(site)
            except Exception as exc:  # the site is cut off or its server is down: its completions wait there
                self._note_relay(site, self.relay.unreachable(site), str(exc))
                await asyncio.sleep(RELAY_RETRY_S)
        try:
            while self.relaying:
                try:
                    msgs = await subscription.fetch(self.settings.relay_batch, timeout=RELAY_PULL_WAIT_S)
                except (TimeoutError, NatsTimeout):
                    if self.draining:
                        break
                    continue
                except Exception as exc:  # leaderless consumer, reconnecting connection: the messages wait
                    self.log.debug("relay of %s: %s", site, exc)
                    await asyncio.sleep(RELAY_RETRY_S)
                    continue
                await self.relay_batch(site, msgs)
        finally:
            if subscription is not None:
                with contextlib.suppress(Exception):
                    await subscription.unsubscribe()

    async def relay_batch(self, site: str, msgs: list[Msg]) -> None:
        """Count each valid completion once (first delivery), hand them all to Kafka, and acknowledge each in the
        stream once Kafka took it; what Kafka did not take is offered to Kafka again, kept claimed meanwhile. An
        invalid or refused completion is acknowledged without being relayed (dead-lettered or counted)."""
        held: list[tuple[Msg, CompletionV1]] = []
        for msg in msgs:
            self.stored_s[site] = msg.metadata.timestamp.timestamp()
            event = self._decode(msg, "completed", CompletionV1, "completion", self.stream_verifiers[site])
            if event is None:
                await msg.ack()
                continue
            if msg.metadata.num_delivered == 1:
                self.counts["completions"] += 1
                self.metrics.observe_completion(event)
            held.append((msg, event))
        claim = asyncio.create_task(keep_claimed([msg for msg, _ in held]))
        try:
            while held:
                results = await asyncio.gather(*(self.record_completion(msg, event) for msg, event in held),
                                               return_exceptions=True)
                failed = []
                for (msg, event), result in zip(held, results, strict=True):
                    if isinstance(result, BaseException):
                        failed.append((msg, event))
                    else:
                        await msg.ack()
                        self.relay.relayed(site)
                if failed:
                    self.log.warning("Kafka did not take %d completions of %s (%s); offering them again",
                                     len(failed), site, next(r for r in results if isinstance(r, BaseException)))
                    await asyncio.sleep(KAFKA_RETRY_S)
                held = failed
        finally:
            claim.cancel()

    async def record_completion(self, msg: Msg, event: CompletionV1) -> None:
        """Produce a stored completion unchanged to the completions topic, timestamped when it was stored, and
        wait for Kafka's acknowledgement."""
        stored_ms = int(msg.metadata.timestamp.timestamp() * 1000)
        acknowledged = await self.runtime.events.produce(Topics.COMPLETIONS, COMPLETION_TYPE, msg.data,
                                                         key=event.site, timestamp_ms=stored_ms)
        await acknowledged

    async def stop_relays(self) -> None:
        """Relay what each site's stream still holds until a pull finds nothing (at most ``RELAY_DRAIN_S``: what
        is left then waits in the stream for the next telemetry), then let each relay finish the batch it holds
        (its acknowledgements included) and stop pulling."""
        self.draining = True
        pending = set(self.relay_tasks)
        if pending:
            _, pending = await asyncio.wait(pending, timeout=RELAY_DRAIN_S)
        self.relaying = False
        if pending:
            await asyncio.wait(pending, timeout=RELAY_PULL_WAIT_S + TOPICS_TIMEOUT_S)

    async def watch_relays(self) -> None:
        """Every ``relay_check_interval_s``, look at every site's relay backlog."""
        while True:
            await asyncio.gather(*(self.look_at_relay(site) for site in self.relay.sites))
            await asyncio.sleep(self.settings.relay_check_interval_s)

    async def look_at_relay(self, site: str) -> None:
        """Ask ``site``'s JetStream how many completions the relay has not acknowledged yet, and how old the oldest
        of them is (the first stored after the consumer's acknowledgement floor)."""
        js = self.nc.jetstream(domain=site, timeout=RELAY_CALL_TIMEOUT_S)
        stream = completions_stream(site)
        try:
            info = await js.consumer_info(stream, self.relay_consumer)
            pending = (info.num_pending or 0) + (info.num_ack_pending or 0)
            oldest_s = None
            if pending:
                first = await js.get_msg(stream, seq=info.ack_floor.stream_seq + 1, subject=Subjects.completed(site),
                                         next=True)
                oldest_s = max(0.0, time.time() - first.time.timestamp())
            change = self.relay.seen(site, pending, oldest_s)
        except Exception as exc:  # no answer: cut off, server down, or no consumer yet
            self._note_relay(site, self.relay.unreachable(site), str(exc))
            return
        self._note_relay(site, change, f"{pending} completions not relayed yet")

    def _note_relay(self, site: str, change: RelayState | None, why: str) -> None:
        if change is None:
            return
        if change is RelayState.RELAYING:
            self.log.info("completion relay of %s: %s", site, change.value)
        else:
            self.log.warning("completion relay of %s: %s (%s)", site, change.value, why)

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

    def _decode(self, msg: Msg, channel: str, model: type[Event], source: str,
                verifier: ControlVerifier | None = None) -> Event | None:
        """The event ``msg`` carries once its signature, signer and claims check out; else None: an event that
        does not decode is counted invalid and dead-lettered, any other refusal counted by the verifier."""
        try:
            return (verifier or self.verifier).open_message(channel, msg, model)
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
                self.topics_prepared.set()
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


async def keep_claimed(msgs: list[Msg]) -> None:
    """Tell JetStream the relay still holds ``msgs`` (Kafka has not taken them yet), until cancelled."""
    while True:
        await asyncio.sleep(RELAY_CLAIM_EVERY_S)
        for msg in msgs:
            with contextlib.suppress(Exception):
                await msg.in_progress()


def create_runtime(settings: TelemetrySettings):
    """Build the telemetry service (its runtime, for launchers that start runtimes)."""
    return Telemetry(settings).runtime
