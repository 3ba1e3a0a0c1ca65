"""The telemetry service over real NATS and Kafka: relays, metrics over HTTP, SLA alerts, garbage, topics."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from prometheus_client.parser import text_string_to_metric_families

from din.services.telemetry.main import create_runtime
from din.services.telemetry.settings import TelemetrySettings
from din.shared.contracts.events import AdmissionDecisionV1, CompletionV1
from din.shared.contracts.federation import ModelSummaryV1, SiteSummaryV1
from din.shared.contracts.telemetry import SlaViolationV1
from din.shared.naming import Subjects, Topics
from tests.support import free_port, make_heartbeat, wait_for

pytestmark = pytest.mark.integration



async def http_get(port: int, path: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    raw = await reader.read()
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def samples(text: bytes) -> dict[str, list]:
    found: dict[str, list] = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            found.setdefault(sample.name, []).append(sample)
    return found


def total(found, name, **labels) -> float:
    return sum(s.value for s in found.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items()))


async def read_topic(bootstrap: str, topic: str, client_kwargs: dict) -> list:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **client_kwargs)
    await admin.start()
    try:
        (described,) = await admin.describe_topics([topic])
    finally:
        await admin.close()
    tps = [TopicPartition(topic, p["partition"]) for p in described["partitions"]]
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, **client_kwargs)
    await consumer.start()
    try:
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        records = []

        async def read_to_the_end() -> bool:
            pending = [tp for tp in tps if await consumer.position(tp) < ends[tp]]
            if pending:
                for batch in (await consumer.getmany(*pending, timeout_ms=300)).values():
                    records.extend(batch)
            return not pending

        await wait_for(read_to_the_end, 10, lambda: f"{topic} read to its end offsets {ends} ({len(records)} read)",
                       interval=0.01)
        return records
    finally:
        await consumer.stop()


async def test_telemetry_relays_aggregates_alerts_and_survives_garbage(
    nats_network, kafka_access, kafka_operator, recorded_topics, unique
):
    kafka_bootstrap = kafka_access.bootstrap
    port = free_port()
    await recorded_topics(unique)
    settings = TelemetrySettings(
        nats_url=nats_network.hub_url, site="cloud", topic_scope=unique,
        # the session Kafka has its own CA (bus_ca_file); the session NATS takes plain client connections
        **(nats_network.service_login("telemetry", "cloud") | kafka_access.settings("telemetry")),
        metrics_port=port, sla_target_realtime_ms=5.0, sla_min_samples=5, sla_window_s=30.0, alert_interval_s=0.2,
        decisions_from="earliest", heartbeat_site="cloud", relay_from="latest",
    )
    runtime = create_runtime(settings)
    await runtime.app.start()
    nc = await nats_network.connect()
    factory = await nats_network.connect("factory")
    alerts: asyncio.Queue = asyncio.Queue()
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, **kafka_access.client_kwargs("admission"))
    await producer.start()
    try:
        async def on_alert(msg) -> None:
            await alerts.put(SlaViolationV1.model_validate_json(msg.data))

        await nc.subscribe(Subjects.ALERTS, cb=on_alert)
        heartbeat = make_heartbeat("cloud-1", "cloud", ["digits-small"], compute_ms_per_item=0.4, capacity=10,
                                   queue_depth={"realtime": 3}, inflight=2, recent_latency_ms=4.0, interval_s=30.0,
                                   sent_ms=time.time() * 1000)
        await nc.publish(Subjects.heartbeat("cloud", "cloud-1"), heartbeat.model_dump_json().encode())
        summary = SiteSummaryV1(site="factory", instance="factory", sent_ms=time.time() * 1000, interval_s=30.0,
                                models=[ModelSummaryV1(model="digits-small", versions=["1"], executors=2,
                                                       free_slots={"realtime": 5}, queue_depth=3,
                                                       compute_ms_per_item=0.4, best_ms={"realtime": 1.0},
                                                       cost_per_1k=0.1)])
        await nc.publish(Subjects.summary("factory"), summary.model_dump_json().encode())
        for i in range(12):
            event = CompletionV1(
                request_id=f"r{i}", tenant="acme", site="factory", executor="factory-1", model="digits-small",
                model_version="1", sla_class="realtime", ok=True, batch_size=2, degraded=False,
                timings_ms={"queue": 1.0, "compute": 0.5, "total": 20.0 + i}, at_ms=time.time() * 1000,
            )
            await factory.publish(Subjects.completed("factory"), event.model_dump_json().encode())
        # garbage on every subject telemetry consumes, and on its Kafka input
        await nc.publish(Subjects.completed("cloud"), b"\xff\x00 not json")
        await nc.publish(Subjects.completed("cloud"), b'{"request_id": 1}')
        await nc.publish(Subjects.heartbeat("cloud", "x"), b"[]")
        await nc.publish(Subjects.summary("branch"), b"{}")
        await nc.flush()
        await factory.flush()
        decisions = Topics.scoped(Topics.ADMISSION_DECISIONS, unique)
        await producer.send_and_wait(decisions, b"garbage")
        for reason in ("rate_limited", "rate_limited", "unauthenticated"):
            decision = AdmissionDecisionV1(request_id="x", tenant="globex", model="digits-small", admitted=False,
                                           reason=reason, input_bytes=5, at_ms=time.time() * 1000)
            await producer.send_and_wait(decisions, decision.model_dump_json().encode(), key=b"globex")

        alert = await asyncio.wait_for(alerts.get(), 15)
        assert alert.firing and alert.sla_class.value == "realtime" and alert.worst_site == "factory"
        assert alert.observed_ms > 5.0 and alert.samples == 12

        key = dict(tenant="acme", model="digits-small", site="factory", sla_class="realtime")
        scraped: list[dict] = []

        async def everything_sent_is_counted() -> bool:
            status, body = await http_get(port, "/metrics")
            assert status == 200
            scraped[:] = [samples(body)]
            return (total(scraped[0], "din_requests_total", **key) >= 12
                    and total(scraped[0], "din_rejects_total", stage="admission") >= 3
                    and total(scraped[0], "din_telemetry_invalid_events_total") >= 5)

        await wait_for(everything_sent_is_counted, 20, "12 completions, 3 rejects and 5 invalid events on /metrics",
                       interval=0.3)
        found = scraped[0]
        assert total(found, "din_requests_total", outcome="ok", **key) == 12
        assert total(found, "din_request_duration_seconds_count", **key) == 12
        assert total(found, "din_rejects_total", stage="admission", reason="rate_limited", tenant="globex") == 2
        assert total(found, "din_rejects_total", stage="admission", reason="unauthenticated") == 1
        assert total(found, "din_executor_utilization_ratio", executor="cloud-1") == pytest.approx(0.5)
        assert total(found, "din_site_executors", site="factory", model="digits-small") == 2
        assert total(found, "din_site_free_slots", site="factory", sla_class="realtime") == 5
        assert total(found, "din_sla_violation_active", sla_class="realtime") == 1
        assert total(found, "din_telemetry_invalid_events_total", source="completion") == 2
        assert total(found, "din_telemetry_invalid_events_total", source="heartbeat") == 1
        assert total(found, "din_telemetry_invalid_events_total", source="summary") == 1
        assert total(found, "din_telemetry_invalid_events_total", source="admission") == 1
        assert (await http_get(port, "/nope"))[0] == 404

        health = json.loads((await nc.request(Subjects.health("telemetry"), b"", timeout=5)).data)
        assert health["ready"] is True, "garbage did not take telemetry down"

        await runtime.events.flush()
        completions = await read_topic(kafka_bootstrap, Topics.scoped(Topics.COMPLETIONS, unique), kafka_operator)
        assert len(completions) == 12, "only valid completions are relayed"
        assert all(dict(r.headers)["din-event-type"] == b"din.v1.CompletionV1" and r.key == b"factory"
                   for r in completions)
        dead = await read_topic(kafka_bootstrap, Topics.scoped(Topics.DEAD_LETTER, unique), kafka_operator)
        assert len(dead) == 4, "every invalid NATS message is dead-lettered"
        recorded_alerts = await read_topic(kafka_bootstrap, Topics.scoped(Topics.ALERTS, unique), kafka_operator)
        assert [SlaViolationV1.model_validate_json(r.value).firing for r in recorded_alerts][:1] == [True]
        assert recorded_alerts[0].key == b"realtime"

        admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap, **kafka_operator)
        await admin.start()
        try:
            (response,) = await admin.describe_configs(
                [ConfigResource(ConfigResourceType.TOPIC, Topics.scoped(Topics.REQUESTS, unique),
                                configs={"retention.ms": None, "retention.bytes": None})])
            configs = {name: value for name, value, *_ in response.resources[0][4]}
            assert configs["retention.ms"] == str(72 * 3_600_000)
            assert configs["retention.bytes"] == str(4096 * 1024 * 1024), "bounded by size as well as time"
            described = await admin.describe_topics([Topics.scoped(Topics.REQUESTS, unique)])
            assert len(described[0]["partitions"]) == 3
        finally:
            await admin.close()
    finally:
        await producer.stop()
        await factory.close()
        await nc.close()
        await runtime.app.stop()
