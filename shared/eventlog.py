"""The Kafka event log services write decisions and completions to.

Recording must never slow or break the request path: ``emit`` only puts the
event on a bounded in-memory queue, and a background task hands events to an
idempotent aiokafka producer (``acks=all``). When Kafka is unreachable the
queue absorbs a burst; past its bound events are counted as dropped, never
blocking a request. Each record's Kafka timestamp is the time it was emitted,
not the time it was finally sent, so a time window over an outage still finds
what happened during it. On a secure broker the log connects with the process's
Kafka login (``client_kwargs``, see ``shared.bus.kafka``); an event the broker
refuses (a topic this user may not write, a failed login) is counted in
``refused`` and logged once per topic, never raised.

With a ``signer`` (``shared.security.records.RecordSigner``, set once the process has its identity) every
record is signed in the background task, so readers can tell DIN's records from planted ones.

A caller that must know a record is in Kafka before it lets go of its source
(telemetry acknowledging a completion in JetStream) uses ``produce`` instead:
it waits for the producer and returns the record's acknowledgement to await.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    AuthenticationFailedError,
    ClusterAuthorizationFailedError,
    KafkaError,
    SaslAuthenticationFailed,
    TopicAuthorizationFailedError,
)
from pydantic import BaseModel

from din.shared.naming import Topics

log = logging.getLogger(__name__)

QueuedEvent = tuple[str, bytes | None, bytes | BaseModel, list[tuple[str, bytes]], int]
"""One event waiting to be produced: topic, key, value (encoded or a contract), headers, epoch ms it was emitted."""

EVENT_TYPE_HEADER = "din-event-type"
REFUSALS = (TopicAuthorizationFailedError, ClusterAuthorizationFailedError, SaslAuthenticationFailed,
            AuthenticationFailedError)
"""What the broker answers a client it does not let in or let write."""


SEND_BATCH = 512
"""At most this many queued events are encoded, signed and handed to the producer at once."""


def _type_of(headers: list[tuple[str, bytes]]) -> bytes:
    return next((value for name, value in headers if name == EVENT_TYPE_HEADER), b"")


def event_type(model: BaseModel) -> str:
    """Versioned type name of an event, e.g. ``din.v1.SchedulingDecisionV1``."""
    return f"din.v1.{type(model).__name__}"


class EventLog:
    """Fire-and-forget writer of contract events to Kafka topics."""

    def __init__(
        self,
        bootstrap: str,
        *,
        client_id: str,
        topic_scope: str | None = None,
        max_buffered: int = 50_000,
        linger_ms: int = 5,
        client_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        self._bootstrap = bootstrap
        self._client_kwargs = dict(client_kwargs or {})
        self._client_id = client_id
        self._scope = topic_scope
        self._queue: asyncio.Queue[QueuedEvent] = asyncio.Queue(maxsize=max_buffered)
        self._linger_ms = linger_ms
        self._producer: AIOKafkaProducer | None = None
        self._connected = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.sent = 0
        self.dropped = 0
        self.failed = 0
        self.refused = 0
        self._refused_topics: set[str] = set()
        self.signer = None
        """Signs each record (``RecordSigner``); None: records go unsigned (security off)."""

    def topic(self, base: str) -> str:
        """The concrete topic for ``base``, with this log's scope applied."""
        return Topics.scoped(base, self._scope) if self._scope else base

    async def start(self) -> None:
        self._task = asyncio.create_task(self._pump(), name=f"eventlog-{self._client_id}")

    def emit(self, base_topic: str, event: BaseModel, key: str | None = None) -> None:
        """Queue ``event`` for ``base_topic``; never blocks, never raises.

        Encoding happens later, in the background task, so it never delays the message a handler has
        just published.
        """
        self._put((self.topic(base_topic), key.encode() if key else None, event, [(EVENT_TYPE_HEADER, b"")]))

    def emit_encoded(self, base_topic: str, type_name: str, value: bytes, key: str | None = None) -> None:
        """Queue an already-encoded event of type ``type_name`` (e.g. relayed from NATS unchanged)."""
        self._put((self.topic(base_topic), key.encode() if key else None, value,
                   [(EVENT_TYPE_HEADER, type_name.encode())]))

    def emit_record(self, base_topic: str, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]]) -> None:
        """Queue a record whose headers the caller built (they include ``din-event-type``), e.g. a recorded request."""
        self._put((self.topic(base_topic), key, value, headers))

    async def produce(self, base_topic: str, type_name: str, value: bytes, *, key: str | None,
                      timestamp_ms: int) -> asyncio.Future:
        """Hand one encoded event to Kafka now (waiting for the producer to connect) and return the future of its
        acknowledgement; awaiting it raises when Kafka did not take the record. ``timestamp_ms`` is when the
        event happened."""
        await self._connected.wait()
        topic = self.topic(base_topic)
        raw_key = key.encode() if key else None
        headers = self._signed(topic, raw_key, [(EVENT_TYPE_HEADER, type_name.encode())], value, timestamp_ms)
        future = await self._producer.send(topic, value, key=raw_key, headers=headers, timestamp_ms=timestamp_ms)
        future.add_done_callback(lambda done: self._count(done, topic))
        return future

    def _put(self, item: tuple) -> None:
        try:
            self._queue.put_nowait((*item, int(time.time() * 1000)))
        except asyncio.QueueFull:
            self.dropped += 1

    async def _connect(self) -> AIOKafkaProducer:
        delay = 0.2
        while True:
            producer = AIOKafkaProducer(
                bootstrap_servers=self._bootstrap,
                client_id=self._client_id,
                enable_idempotence=True,
                acks="all",
                linger_ms=self._linger_ms,
                **self._client_kwargs,
            )
            try:
                await producer.start()
                return producer
            except KafkaError as exc:
                await producer.stop()
                if isinstance(exc, REFUSALS):
                    self.refused += 1
                    log.warning("event log: Kafka at %s refused %s (%s); retrying", self._bootstrap,
                                self._client_kwargs.get("sasl_plain_username", "an anonymous client"), exc)
                else:
                    log.warning("event log: Kafka at %s unreachable (%s); retrying", self._bootstrap, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _pump(self) -> None:
        self._producer = await self._connect()
        self._connected.set()
        while True:
            batch = [await self._queue.get()]
            while len(batch) < SEND_BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await self._send_batch(batch)
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _send_batch(self, batch: list[QueuedEvent]) -> None:
        """Encode, sign (one signature for the batch) and hand to the producer what the queue held."""
        encoded = []
        for topic, key, value, headers, emitted_ms in batch:
            if isinstance(value, BaseModel):
                headers = [(EVENT_TYPE_HEADER, event_type(value).encode())]
                value = value.model_dump_json().encode()
            encoded.append((topic, key, value, headers, emitted_ms))
        for topic, key, value, headers, emitted_ms in self._signed_all(encoded):
            try:
                future = await self._producer.send(topic, value, key=key, headers=headers, timestamp_ms=emitted_ms)
                future.add_done_callback(lambda done, topic=topic: self._count(done, topic))
            except REFUSALS as exc:
                self._refuse(topic, exc)
            except KafkaError as exc:
                self.failed += 1
                log.warning("event log: could not send to %s: %s", topic, exc)

    def _signed_all(self, encoded: list[tuple]) -> list[tuple]:
        if self.signer is None:
            return encoded
        leaves = [(topic, key, _type_of(headers), emitted_ms, value)
                  for topic, key, value, headers, emitted_ms in encoded]
        return [(topic, key, value, [*headers, signature], emitted_ms)
                for (topic, key, value, headers, emitted_ms), signature in zip(encoded, self.signer.headers(leaves),
                                                                              strict=True)]

    def _signed(self, topic: str, key: bytes | None, headers: list[tuple[str, bytes]], value: bytes,
                timestamp_ms: int) -> list[tuple[str, bytes]]:
        """``headers`` of one record sent on its own, signed when there is a signer."""
        return self._signed_all([(topic, key, value, headers, timestamp_ms)])[0][3]

    def _refuse(self, topic: str, exc: BaseException) -> None:
        self.refused += 1
        if topic not in self._refused_topics:
            self._refused_topics.add(topic)
            log.warning("event log: Kafka refused writing to %s (%s); further refusals there are only counted",
                        topic, type(exc).__name__)

    def _count(self, future: asyncio.Future, topic: str) -> None:
        if future.cancelled():
            self.failed += 1
        elif isinstance(future.exception(), REFUSALS):
            self._refuse(topic, future.exception())
        elif future.exception() is not None:
            self.failed += 1
        else:
            self.sent += 1

    async def flush(self, timeout_s: float = 5.0) -> None:
        """Wait until queued events are handed to Kafka and acknowledged."""
        try:
            await asyncio.wait_for(self._queue.join(), timeout_s)
            if self._producer is not None:
                await asyncio.wait_for(self._producer.flush(), timeout_s)
        except TimeoutError:
            log.warning("event log: %d events not flushed within %.1fs", self._queue.qsize(), timeout_s)

    async def stop(self) -> None:
        if self._producer is not None:
            await self.flush()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None
            self._connected.clear()
