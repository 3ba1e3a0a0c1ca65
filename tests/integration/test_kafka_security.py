"""Attacks on the secure Kafka, each with the refusal it must meet, while legitimate traffic keeps flowing.

The session broker runs SASL_SSL with SCRAM users and DIN's ACLs (``shared.bus.kafka``). A client without
credentials, with a wrong password or not trusting DIN's CA gets nothing; a service's user may not create,
delete or reconfigure topics, nor write another service's topic; the replay and report users read but never
write. Refused writes are counted and logged by DIN's event log, failed logins by the broker, and an admission
producer writing the audit topic throughout sees no error.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError, TopicAuthorizationFailedError

from din.replay.reader import RecordRange, ReplayError, TopicReader
from din.replay.recorded import read_requests
from din.shared.bus.kafka import OPERATOR, KafkaAccess
from din.shared.contracts.telemetry import SlaViolationV1
from din.shared.eventlog import EventLog
from din.shared.naming import Topics
from din.shared.recording import request_record
from tests.support import make_job, wait_for

pytestmark = pytest.mark.integration

TOPIC_AUTHORIZATION_FAILED = 29
CONNECT_S = 15.0


@pytest.fixture
def secure(kafka_access) -> KafkaAccess:
    if not kafka_access.secure:
        pytest.skip("the session's Kafka is an external insecure one (DIN_KAFKA_BOOTSTRAP)")
    return kafka_access


@pytest.fixture
async def scope(secure, recorded_topics, unique) -> str:
    """Every recorded topic under this test's scope, created by the operator."""
    await recorded_topics(unique)
    return unique


class AuditWriter:
    """Admission's legitimate traffic: recorded requests written to the audit topic until stopped."""

    def __init__(self, kafka: KafkaAccess, scope: str) -> None:
        self.kafka = kafka
        self.topic = Topics.scoped(Topics.REQUESTS, scope)
        self.acked = 0
        self.errors: list[BaseException] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> AuditWriter:
        producer = AIOKafkaProducer(bootstrap_servers=self.kafka.bootstrap, enable_idempotence=True, acks="all",
                                    **self.kafka.client_kwargs("admission"))
        await producer.start()
        self._task = asyncio.create_task(self._run(producer))
        await wait_for(lambda: self.acked > 0, 15, "the first legitimate record acknowledged")
        return self

    async def _run(self, producer: AIOKafkaProducer) -> None:
        try:
            i = 0
            while not self._stop.is_set():
                key, value, headers = request_record(make_job(request_id=f"legit-{i}"), b"{}", {})
                try:
                    await producer.send_and_wait(self.topic, value, key=key, headers=headers)
                    self.acked += 1
                except KafkaError as exc:
                    self.errors.append(exc)
                i += 1
                await asyncio.sleep(0.005)
        finally:
            await producer.stop()

    async def __aexit__(self, *exc) -> None:
        self._stop.set()
        await self._task


async def refused(start) -> BaseException:
    """The error ``start()`` (a client's start) fails with, within a bounded time."""
    with pytest.raises((KafkaError, OSError, ssl.SSLError)) as caught:
        async with asyncio.timeout(CONNECT_S):
            await start()
    return caught.value


async def outsider_gets_nothing(bootstrap: str, **kwargs) -> None:
    """A client with ``kwargs`` can neither list/delete topics, nor produce, nor consume."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=3000, **kwargs)
    try:
        await refused(admin.start)
    finally:
        with contextlib.suppress(Exception):
            await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, request_timeout_ms=3000, **kwargs)
    await refused(producer.start)
    await producer.stop()
    consumer = AIOKafkaConsumer(Topics.REQUESTS, bootstrap_servers=bootstrap, request_timeout_ms=3000, **kwargs)
    await refused(consumer.start)
    await consumer.stop()


@contextlib.asynccontextmanager
async def admin_as(kafka: KafkaAccess, user: str):
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap, **kafka.client_kwargs(user))
    await admin.start()
    try:
        yield admin
    finally:
        await admin.close()


async def write_refused(kafka: KafkaAccess, user: str, topic: str) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, **kafka.client_kwargs(user))
    await producer.start()
    try:
        with pytest.raises(TopicAuthorizationFailedError):
            async with asyncio.timeout(CONNECT_S):
                await producer.send_and_wait(topic, b"forged")
    finally:
        await producer.stop()


def broker_says(session_kafka, *needles: str) -> bool:
    text = session_kafka.log.read_text(errors="replace") if session_kafka.log else ""
    return all(needle in text for needle in needles)


async def test_clients_without_valid_credentials_cannot_read_write_list_or_delete(secure, scope, session_kafka):
    login = secure.client_kwargs("admission")
    async with AuditWriter(secure, scope) as legit:
        await outsider_gets_nothing(secure.bootstrap)
        await outsider_gets_nothing(secure.bootstrap, **{**login, "sasl_plain_password": "not-the-password"})
        await outsider_gets_nothing(secure.bootstrap, **{**login, "sasl_plain_username": "mallory"})
        await outsider_gets_nothing(secure.bootstrap, **{**login, "ssl_context": ssl.create_default_context()})
        in_clear = {k: v for k, v in login.items() if k != "ssl_context"} | {"security_protocol": "SASL_PLAINTEXT"}
        await outsider_gets_nothing(secure.bootstrap, **in_clear)
        before = legit.acked
        await wait_for(lambda: legit.acked > before + 20, 15, "legitimate records still acknowledged")
    assert legit.errors == [], "the attacks did not disturb admission's writes"
    await wait_for(lambda: broker_says(session_kafka, "Failed authentication", "invalid credentials"), 10,
                   "the broker logging the failed logins")


async def test_a_service_user_cannot_delete_create_or_reconfigure_topics(secure, scope):
    requests = Topics.scoped(Topics.REQUESTS, scope)
    async with AuditWriter(secure, scope) as legit:
        for user in ("executor", "admission", "telemetry", "replay"):
            async with admin_as(secure, user) as admin:
                deleted = await admin.delete_topics([requests])
                assert [code for _, code in deleted.topic_error_codes] == [TOPIC_AUTHORIZATION_FAILED], user
                created = await admin.create_topics([NewTopic(f"{requests}-{user}", 1, 1)])
                assert [code for _, code, *_ in created.topic_errors] == [TOPIC_AUTHORIZATION_FAILED], user
                (altered,) = await admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, requests,
                                                                       configs={"retention.ms": "1"})])
                assert [code for code, *_ in altered.resources] == [TOPIC_AUTHORIZATION_FAILED], user
        before = legit.acked
        await wait_for(lambda: legit.acked > before + 20, 15, "legitimate records still acknowledged")
    assert legit.errors == []
    async with admin_as(secure, OPERATOR) as admin:
        assert requests in await admin.list_topics(), "the audit topic survived every attempt"
        (described,) = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, requests)])
        configs = {name: value for name, value, *_ in described.resources[0][4]}
        assert configs["retention.ms"] != "1"


async def test_a_service_user_cannot_write_or_read_another_services_topics(secure, scope):
    async with AuditWriter(secure, scope) as legit:
        await write_refused(secure, "executor", Topics.scoped(Topics.REQUESTS, scope))
        await write_refused(secure, "executor", Topics.scoped(Topics.COMPLETIONS, scope))
        await write_refused(secure, "classifier", Topics.scoped(Topics.SCHEDULING_DECISIONS, scope))
        await write_refused(secure, "telemetry", Topics.scoped(Topics.ADMISSION_DECISIONS, scope))
        consumer = AIOKafkaConsumer(bootstrap_servers=secure.bootstrap, auto_offset_reset="earliest",
                                    **secure.client_kwargs("executor"))
        await consumer.start()
        try:
            consumer.assign([TopicPartition(Topics.scoped(Topics.REQUESTS, scope), p) for p in range(3)])
            read = [r for _ in range(3) for records in (await consumer.getmany(timeout_ms=1000)).values()
                    for r in records]
            assert read == [], "the executor read the audit topic"
        finally:
            await consumer.stop()
        assert legit.acked > 0, "the audit topic holds records the executor could have read"
        before = legit.acked
        await wait_for(lambda: legit.acked > before + 20, 15, "legitimate records still acknowledged")
    assert legit.errors == []


async def test_replay_and_report_users_read_the_record_but_cannot_write_it(secure, scope):
    async with AuditWriter(secure, scope) as legit:
        for user in ("replay", "report"):
            reader = TopicReader(secure.bootstrap, client_kwargs=secure.client_kwargs(user))
            async with reader:
                window = await read_requests(reader, RecordRange(since_ms=0), scope=scope, keyring=None)
            assert len(window.requests) >= 1, user
            await write_refused(secure, user, Topics.scoped(Topics.REQUESTS, scope))
            await write_refused(secure, user, Topics.scoped(Topics.ADMISSION_DECISIONS, scope))
    assert legit.errors == []
    wrong = {**secure.client_kwargs("replay"), "sasl_plain_password": "guess"}
    with pytest.raises(ReplayError, match="refused user replay"):
        async with asyncio.timeout(30):
            await TopicReader(secure.bootstrap, client_kwargs=wrong, connect_attempts=1).connect()


async def test_the_event_log_counts_refused_writes_and_keeps_sending_what_it_may(secure, scope):
    log = EventLog(secure.bootstrap, client_id="din-executor-attack", topic_scope=scope,
                   client_kwargs=secure.client_kwargs("executor"))
    await log.start()
    try:
        alert = SlaViolationV1(sla_class="realtime", firing=True, target_ms=5.0, observed_ms=50.0, quantile=0.99,
                               samples=10, window_s=30.0, worst_site="factory", at_ms=0.0)
        for _ in range(3):
            log.emit(Topics.ALERTS, alert)
            log.emit_record(Topics.REQUESTS, b"acme", b"forged", [("din-event-type", b"din.v1.RecordedRequestV1")])
        log.emit_encoded(Topics.DEAD_LETTER, "din.v1.DeadLetterV1", b"{}")
        await log.flush(10)
        await wait_for(lambda: log.refused == 6 and log.sent == 1, 15,
                       lambda: f"6 refusals and 1 dead letter sent (refused {log.refused}, sent {log.sent})")
        assert log.failed == 0 and log.dropped == 0
    finally:
        await log.stop()
