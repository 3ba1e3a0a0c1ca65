"""Reading a time or offset range of a recorded Kafka topic, with clear errors.

``TopicReader.read`` resolves the range to per-partition offsets, reads each
partition from its first to its last offset in the range and yields batches
of records. Every failure an SRE can meet becomes one ``ReplayError`` line:
Kafka unreachable (after retrying), Kafka refusing the login, a topic that does
not exist (or that the login may not read), a range with no records, Kafka going
away in the middle of a read (after waiting for it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from din.shared.eventlog import REFUSALS

CONNECT_ATTEMPTS = 5
CONNECT_DELAY_S = 1.0
STALL_TIMEOUT_S = 15.0
_RELATIVE = re.compile(r"^-?(\d+(?:\.\d+)?)(ms|s|m|h|d)$")
_UNIT_MS = {"ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0, "d": 86_400_000.0}


def quiet_kafka_client() -> None:
    """Keep aiokafka's own retry chatter off an SRE's terminal; failures surface as one ``ReplayError`` line."""
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)


class ReplayError(Exception):
    """A replay, what-if or report that cannot go on; the message says why and what to do."""


def parse_time(text: str, now_ms: float | None = None) -> float:
    """Epoch ms from ``now``, a duration ago (``15m`` or ``-15m``; ms, s, m, h, d), epoch s or ms, or ISO-8601."""
    now_ms = time.time() * 1000.0 if now_ms is None else now_ms
    text = text.strip()
    if text == "now":
        return now_ms
    match = _RELATIVE.match(text)
    if match:
        return now_ms - float(match.group(1)) * _UNIT_MS[match.group(2)]
    try:
        number = float(text)
    except ValueError:
        pass
    else:
        return number * 1000.0 if number < 1e11 else number
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ReplayError(
            f"cannot read time {text!r}: use now, a duration ago like 15m, epoch seconds or ms, "
            "or ISO-8601 like 2025-01-31T12:00:00Z"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp() * 1000.0


def parse_offsets(text: str) -> dict[int | None, tuple[int, int]]:
    """``START-END`` for every partition, or ``P:START-END[,P:START-END...]``; END is exclusive, may be empty."""
    ranges: dict[int | None, tuple[int, int]] = {}
    for part in text.split(","):
        part = part.strip()
        match = re.fullmatch(r"(?:(\d+):)?(\d+)-(\d*)", part)
        if not match:
            raise ReplayError(f"cannot read offset range {part!r}: use START-END or PARTITION:START-END")
        partition = int(match.group(1)) if match.group(1) is not None else None
        start = int(match.group(2))
        end = int(match.group(3)) if match.group(3) else 2**62
        if end <= start:
            raise ReplayError(f"offset range {part!r} is empty: END must be greater than START")
        ranges[partition] = (start, end)
    return ranges


@dataclass(frozen=True)
class RecordRange:
    """Which records to read: a time range (epoch ms, end exclusive) and/or offsets per partition."""

    since_ms: float | None = None
    until_ms: float | None = None
    offsets: dict[int | None, tuple[int, int]] | None = None

    def describe(self) -> str:
        parts = []
        if self.offsets:
            parts.append("offsets " + ",".join(
                f"{'*' if p is None else p}:{s}-{'' if e >= 2**62 else e}" for p, (s, e) in self.offsets.items()))
        if self.since_ms is not None or self.until_ms is not None:
            parts.append(f"{_fmt(self.since_ms)} .. {_fmt(self.until_ms)}")
        return " and ".join(parts) or "everything retained"


def _fmt(ms: float | None) -> str:
    if ms is None:
        return "(open)"
    return datetime.fromtimestamp(ms / 1000.0, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")[:-4] + "Z"


@dataclass
class ReadStats:
    """What one read covered."""

    topic: str
    partitions: dict[int, tuple[int, int]] = field(default_factory=dict)
    records: int = 0
    seconds: float = 0.0


class TopicReader:
    """Reads ranges of topics from one Kafka cluster; one connection, reused for several topics."""

    def __init__(
        self,
        bootstrap: str,
        *,
        client_id: str = "din-replay",
        connect_attempts: int = CONNECT_ATTEMPTS,
        connect_delay_s: float = CONNECT_DELAY_S,
        stall_timeout_s: float = STALL_TIMEOUT_S,
        client_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        self.bootstrap = bootstrap
        self._client_kwargs = dict(client_kwargs or {})
        self._client_id = client_id
        self._attempts = connect_attempts
        self._delay = connect_delay_s
        self._stall = stall_timeout_s
        self._consumer: AIOKafkaConsumer | None = None
        self._admin: AIOKafkaAdminClient | None = None
        self._topics: set[str] = set()

    async def __aenter__(self) -> TopicReader:
        await self.connect()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def connect(self) -> None:
        """Connect, retrying; raise ``ReplayError`` when Kafka stays unreachable."""
        last: Exception | None = None
        for attempt in range(self._attempts):
            consumer = AIOKafkaConsumer(
                bootstrap_servers=self.bootstrap,
                client_id=self._client_id,
                group_id=None,
                enable_auto_commit=False,
                fetch_max_bytes=64 * 1024 * 1024,
                max_partition_fetch_bytes=16 * 1024 * 1024,
                request_timeout_ms=10_000,
                connections_max_idle_ms=60_000,
                **self._client_kwargs,
            )
            admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, client_id=f"{self._client_id}-admin",
                                        request_timeout_ms=10_000, **self._client_kwargs)
            try:
                await consumer.start()
                await admin.start()
                self._topics = set(await admin.list_topics())
                self._consumer, self._admin = consumer, admin
                return
            except (KafkaError, OSError) as exc:
                last = exc
                for client in (consumer, admin):
                    with contextlib.suppress(Exception):
                        await (client.stop() if client is consumer else client.close())
                if isinstance(exc, REFUSALS):
                    raise ReplayError(f"Kafka at {self.bootstrap} refused {self._who()} ({exc}): check the "
                                      "stack's key folder (--bus-dir) and its Kafka users") from None
                if attempt + 1 < self._attempts:
                    await asyncio.sleep(self._delay * (attempt + 1))
        if self._client_kwargs:
            # aiokafka reports a refused login as a failed bootstrap, like an absent broker.
            raise ReplayError(
                f"Kafka at {self.bootstrap} is unreachable or refused {self._who()} after {self._attempts} attempts "
                f"({last}): is the stack running (`din status`), or pass --kafka; are its users in --bus-dir"
            )
        raise ReplayError(
            f"Kafka at {self.bootstrap} is unreachable after {self._attempts} attempts ({last}): "
            "is the stack running (`din status`), or pass --kafka"
        )

    def _who(self) -> str:
        user = self._client_kwargs.get("sasl_plain_username")
        return f"user {user}" if user else "a client without credentials"

    async def close(self) -> None:
        if self._consumer is not None:
            with contextlib.suppress(Exception):
                await self._consumer.stop()
            self._consumer = None
        if self._admin is not None:
            with contextlib.suppress(Exception):
                await self._admin.close()
            self._admin = None

    async def _partitions(self, topic: str) -> set[int]:
        assert self._admin is not None
        (described,) = await self._admin.describe_topics([topic])
        return {p["partition"] for p in described.get("partitions", [])}

    def has_topic(self, topic: str) -> bool:
        return topic in self._topics

    def topics(self) -> set[str]:
        return set(self._topics)

    async def _bounds(self, topic: str, rng: RecordRange) -> dict[TopicPartition, tuple[int, int]]:
        consumer = self._consumer
        assert consumer is not None
        partitions = await self._partitions(topic)
        if not partitions:
            raise ReplayError(f"topic {topic} has no partitions on {self.bootstrap}")
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        first = await consumer.beginning_offsets(tps)
        last = await consumer.end_offsets(tps)
        bounds = {tp: (first[tp], last[tp]) for tp in tps}
        if rng.offsets:
            unknown = [p for p in rng.offsets if p is not None and p not in partitions]
            if unknown:
                raise ReplayError(f"topic {topic} has no partition {unknown[0]} (it has {sorted(partitions)})")
            for tp in tps:
                chosen = rng.offsets.get(tp.partition, rng.offsets.get(None))
                if chosen is None:
                    bounds[tp] = (0, 0)
                    continue
                lo, hi = bounds[tp]
                bounds[tp] = (max(lo, chosen[0]), min(hi, chosen[1]))
        if rng.since_ms is not None:
            found = await consumer.offsets_for_times({tp: int(rng.since_ms) for tp in tps})
            for tp in tps:
                lo, hi = bounds[tp]
                at = found.get(tp)
                bounds[tp] = (max(lo, at.offset) if at is not None else hi, hi)
        if rng.until_ms is not None:
            found = await consumer.offsets_for_times({tp: int(rng.until_ms) for tp in tps})
            for tp in tps:
                lo, hi = bounds[tp]
                at = found.get(tp)
                bounds[tp] = (lo, min(hi, at.offset) if at is not None else hi)
        return bounds

    async def read(
        self, topic: str, rng: RecordRange, *, stats: ReadStats | None = None, require_records: bool = True
    ) -> AsyncIterator[list]:
        """Yield batches of the records of ``topic`` in ``rng``; raise ``ReplayError`` on the failures above."""
        consumer = self._consumer
        if consumer is None:
            raise ReplayError("reader is not connected")
        if topic not in self._topics:
            self._topics = set(await self._admin.list_topics())
        if topic not in self._topics:
            din = sorted(t for t in self._topics if t.startswith("din."))
            hint = f"; DIN topics there: {', '.join(din[:8])}{' ...' if len(din) > 8 else ''}" if din else ""
            raise ReplayError(f"topic {topic} does not exist on {self.bootstrap}, or {self._who()} may not read "
                              f"it{hint}")
        bounds = await self._bounds(topic, rng)
        wanted = {tp: (lo, hi) for tp, (lo, hi) in bounds.items() if hi > lo}
        if stats is not None:
            stats.partitions = {tp.partition: b for tp, b in bounds.items()}
        if not wanted:
            if require_records:
                raise ReplayError(f"no records in {rng.describe()} on topic {topic}")
            return
        consumer.assign(list(wanted))
        for tp, (lo, _) in wanted.items():
            consumer.seek(tp, lo)
        remaining = dict(wanted)
        began = time.perf_counter()
        last_progress = time.monotonic()
        since, until = rng.since_ms, rng.until_ms
        while remaining:
            batches = await consumer.getmany(*remaining, timeout_ms=500, max_records=5000)
            for tp, records in batches.items():
                bound = remaining.get(tp)
                if bound is None:
                    continue
                hi = bound[1]
                kept = [
                    r for r in records
                    if r.offset < hi
                    and (since is None or r.timestamp >= since)
                    and (until is None or r.timestamp < until)
                ]
                if kept:
                    if stats is not None:
                        stats.records += len(kept)
                    yield kept
            for tp in list(remaining):
                if await consumer.position(tp) >= remaining[tp][1]:
                    del remaining[tp]
                    consumer.pause(tp)
            if batches:
                last_progress = time.monotonic()
            elif remaining and time.monotonic() - last_progress > self._stall:
                read = stats.records if stats else 0
                raise ReplayError(
                    f"Kafka at {self.bootstrap} stopped answering while reading {topic} "
                    f"({read} records read; waited {self._stall:.0f}s): check the broker and run again"
                )
        if stats is not None:
            stats.seconds += time.perf_counter() - began
        consumer.unsubscribe()
