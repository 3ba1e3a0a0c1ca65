"""The real brokers DIN runs on: NATS hub and leaves route between sites, JetStream works at a leaf, Kafka keeps
headers."""

from __future__ import annotations

import asyncio
import json

import pytest
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import RetentionPolicy
from nats.js.errors import NotFoundError

from din.shared.bus.permissions import service_inbox
from din.shared.naming import Subjects, Topics
from din.shared.workqueue import work_stream_config
from tests.support import wait_for

pytestmark = pytest.mark.integration


async def _deliver(publisher, subscriber, subject: str, payload: bytes, timeout_s: float = 5.0):
    """Publish until the subscriber sees the message: interest crosses a leaf link asynchronously."""
    box: asyncio.Queue = asyncio.Queue()

    async def on_msg(msg) -> None:
        await box.put(msg)

    async def delivered():
        await publisher.publish(subject, payload, headers={"Din-Test": "1"})
        await publisher.flush()
        try:
            return await asyncio.wait_for(box.get(), 0.2)
        except TimeoutError:
            return None

    sub = await subscriber.subscribe(subject, cb=on_msg)
    await subscriber.flush()
    try:
        return await wait_for(delivered, timeout_s, f"{subject} reaching the subscriber", interval=0.01)
    finally:
        await sub.unsubscribe()


@pytest.mark.parametrize(("pub_site", "sub_site"), [("factory", "cloud"), ("cloud", "factory"), ("factory", "branch")])
async def test_message_crosses_between_sites(nats_network, unique, pub_site, sub_site):
    publisher = await nats_network.connect(pub_site)
    subscriber = await nats_network.connect(sub_site)
    try:
        # A subject addressed to the subscriber's site: the leaf links let only those into a site.
        subject = f"{service_inbox(sub_site, unique)}.probe"
        payload = json.dumps({"from": pub_site, "to": sub_site}).encode()
        msg = await _deliver(publisher, subscriber, subject, payload)
        assert msg.data == payload
        assert msg.headers == {"Din-Test": "1"}
    finally:
        await publisher.close()
        await subscriber.close()


async def test_leaf_servers_are_distinct_from_the_hub(nats_network):
    if nats_network.single:
        pytest.skip("one external server stands for every site")
    hub = await nats_network.connect()
    leaf = await nats_network.connect("factory")
    try:
        assert hub._server_info["server_name"] == "din-cloud"
        assert leaf._server_info["server_name"] == "din-factory"
    finally:
        await hub.close()
        await leaf.close()


async def test_work_queue_stream_on_a_leaf_domain(nats_network, unique):
    """Create the factory's work-queue stream in its leaf's domain from the hub, publish at the hub, consume at
    the leaf (the leaf lets only the factory's own work subjects in, so the stream is the factory's own, as
    schedulers create it; a test's job goes under a model name private to it)."""
    hub = await nats_network.connect()
    leaf = await nats_network.connect("factory")
    config = work_stream_config("factory")
    stream = config.name
    subject = Subjects.work("factory", unique)
    hub_js_factory = hub.jetstream(domain=nats_network.domain("factory"))
    leaf_js = leaf.jetstream()
    try:
        await leaf_js.stream_info(stream)
        existed = True  # an earlier test's scheduler or pull executor created it: it stays
    except NotFoundError:
        existed = False
    try:
        info = await hub_js_factory.add_stream(config)
        assert info.config.name == stream

        # The stream's own domain serves its API at the leaf; the hub's domain does not hold it.
        assert (await leaf_js.stream_info(stream)).config.retention == RetentionPolicy.WORK_QUEUE
        if not nats_network.single:
            with pytest.raises(NotFoundError):
                await hub.jetstream().stream_info(stream)

        # Publish at the hub; the ack comes from the leaf's stream once its interest has crossed the link.
        hub_js = hub.jetstream()
        ack = await wait_for(lambda: hub_js.publish(subject, b"job-1", timeout=1), 5,
                             "the leaf's stream acknowledging a publish at the hub", interval=0.1,
                             retry_on=(NoRespondersError, NatsTimeout))
        assert ack.stream == stream
        if not nats_network.single:
            assert ack.domain == "factory"

        consumer = await leaf_js.pull_subscribe(subject, durable=f"w{unique}", stream=stream)
        msgs = await consumer.fetch(1, timeout=5)
        assert [m.data for m in msgs] == [b"job-1"]
        await msgs[0].ack_sync()

        async def job_gone() -> bool:
            try:
                await leaf_js.get_last_msg(stream, subject)
            except NotFoundError:
                return True
            return False

        await wait_for(job_gone, 5, "the acknowledged job leaving the work queue (work-queue retention)")
    finally:
        try:
            if existed:
                await leaf_js.delete_consumer(stream, f"w{unique}")
            else:
                await leaf_js.delete_stream(stream)
        except Exception:  # noqa: BLE001 - the assertion above is what matters
            pass
        await hub.close()
        await leaf.close()


async def smoke_topic(bootstrap: str, login: dict, unique: str) -> str:
    """A one-partition smoke topic of this test's own."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    topic = Topics.scoped(Topics.SMOKE, unique)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **login)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
    finally:
        await admin.close()
    return topic


async def first_record(bootstrap: str, login: dict, topic: str):
    """The first record of ``topic``."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False, **login)
    await consumer.start()
    try:
        return await asyncio.wait_for(consumer.getone(), timeout=30)
    finally:
        await consumer.stop()


async def test_kafka_event_round_trip_with_headers(kafka_bootstrap, kafka_operator, unique):
    from aiokafka import AIOKafkaProducer

    topic = await smoke_topic(kafka_bootstrap, kafka_operator, unique)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, enable_idempotence=True, acks="all",
                                **kafka_operator)
    await producer.start()
    try:
        meta = await asyncio.wait_for(
            producer.send_and_wait(
                topic,
                value=b'{"ok": true}',
                key=b"req-1",
                headers=[("din-type", b"din.v1.smoke"), ("din-run", unique.encode())],
            ),
            timeout=30,
        )
        assert meta.topic == topic and meta.offset == 0
    finally:
        await producer.stop()

    record = await first_record(kafka_bootstrap, kafka_operator, topic)
    assert record.key == b"req-1"
    assert record.value == b'{"ok": true}'
    assert dict(record.headers) == {"din-type": b"din.v1.smoke", "din-run": unique.encode()}


async def test_an_event_kept_while_kafka_was_out_of_reach_keeps_the_time_it_happened(kafka_bootstrap, kafka_operator,
                                                                                    unique):
    """The event log's records carry the time they were emitted as their Kafka timestamp, not the time they were
    finally sent: here the log starts (as when Kafka comes back) a while after the event was emitted."""
    import time

    from din.shared.contracts.events import ProbeV1
    from din.shared.eventlog import EventLog

    topic = await smoke_topic(kafka_bootstrap, kafka_operator, unique)
    log = EventLog(kafka_bootstrap, client_id=f"din-test-{unique}", topic_scope=unique, client_kwargs=kafka_operator)
    before_ms = int(time.time() * 1000)
    log.emit(Topics.SMOKE, ProbeV1(from_site="cloud", to_site="factory", sent_ms=before_ms, seq=1), key="k")
    after_ms = int(time.time() * 1000)
    await asyncio.sleep(0.5)
    started_ms = int(time.time() * 1000)
    await log.start()
    try:
        await log.flush()
    finally:
        await log.stop()
    record = await first_record(kafka_bootstrap, kafka_operator, topic)
    assert before_ms <= record.timestamp <= after_ms < started_ms
