"""A recorded window: the requests of a range and every event recorded about them, decoded and counted.

``load_window`` reads the requests topic for the range the SRE asked for,
then the decision, completion, heartbeat, alert and autoscaler topics over the time those
requests were alive (from the first receipt to the last deadline). Records
that do not decode are skipped and counted per topic; sealed requests are
opened with the SRE's keyring when one is given, counted as undecryptable when
they do not open, and kept as metadata only when no keyring is given. With a ``RecordVerifier``
(``shared.security.records``) a record its producer did not sign, or that was changed, is skipped and counted by
topic and reason before it is decoded.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError

from din.replay.reader import ReadStats, RecordRange, ReplayError, TopicReader
from din.shared import envelope
from din.shared.contracts.events import (
    AdmissionDecisionV1,
    ClassificationV1,
    CompletionV1,
    HeartbeatV1,
    SchedulingDecisionV1,
)
from din.shared.contracts.scaling import ScalingDecisionV1
from din.shared.contracts.telemetry import SlaViolationV1
from din.shared.naming import Topics
from din.shared.recording import CorruptRecord, RecordedRequest, open_recorded, parse_request_record
from din.shared.security.records import ForgedRecord, RecordVerifier

OUTCOME_SLACK_MS = 2_000.0
HEARTBEAT_LEAD_MS = 5_000.0

EVENT_TOPICS: dict[str, type[BaseModel]] = {
    Topics.ADMISSION_DECISIONS: AdmissionDecisionV1,
    Topics.CLASSIFICATIONS: ClassificationV1,
    Topics.SCHEDULING_DECISIONS: SchedulingDecisionV1,
    Topics.COMPLETIONS: CompletionV1,
    Topics.HEARTBEATS: HeartbeatV1,
    Topics.ALERTS: SlaViolationV1,
    Topics.SCALING_DECISIONS: ScalingDecisionV1,
}


def topic_name(base: str, scope: str | None) -> str:
    """The concrete topic of ``base`` under an optional scope (see ``Topics.scoped``)."""
    return Topics.scoped(base, scope) if scope else base


@dataclass
class RecordedWindow:
    """Everything recorded about one range of requests."""

    rng: RecordRange
    requests: list[RecordedRequest] = field(default_factory=list)
    admissions: list[AdmissionDecisionV1] = field(default_factory=list)
    classifications: list[ClassificationV1] = field(default_factory=list)
    schedulings: list[SchedulingDecisionV1] = field(default_factory=list)
    completions: list[CompletionV1] = field(default_factory=list)
    heartbeats: list[HeartbeatV1] = field(default_factory=list)
    alerts: list[SlaViolationV1] = field(default_factory=list)
    scalings: list[ScalingDecisionV1] = field(default_factory=list)
    """The autoscaler's changes to its pools."""
    corrupt: Counter = field(default_factory=Counter)
    corrupt_examples: dict[str, str] = field(default_factory=dict)
    sealed: int = 0
    undecryptable: int = 0
    forged: Counter = field(default_factory=Counter)
    """Records refused by the verifier, per topic."""
    forged_reasons: Counter = field(default_factory=Counter)
    unverified: bool = False
    """True when records were read without a verifier (no public keys at hand)."""
    missing_topics: list[str] = field(default_factory=list)
    stats: list[ReadStats] = field(default_factory=list)
    since_ms: float = 0.0
    until_ms: float = 0.0

    @property
    def metadata_only(self) -> bool:
        """True when some requests are still sealed: their payloads cannot be replayed."""
        return any(r.sealed for r in self.requests)

    def read_rate(self) -> float:
        """Records read and decoded per second over every topic read."""
        records = sum(s.records for s in self.stats)
        seconds = sum(s.seconds for s in self.stats)
        return records / seconds if seconds > 0 else 0.0

    def skipped_summary(self) -> list[str]:
        """One line per kind of skipped record, for reports."""
        lines = [f"{n} corrupt record(s) skipped on {topic} (e.g. {self.corrupt_examples.get(topic, '?')})"
                 for topic, n in sorted(self.corrupt.items())]
        lines += [f"{n} record(s) not signed by a DIN site skipped on {topic}"
                  for topic, n in sorted(self.forged.items())]
        if self.forged_reasons:
            lines.append("refused records by reason: " + ", ".join(
                f"{reason} {n}" for reason, n in sorted(self.forged_reasons.items())))
        if self.unverified:
            lines.append("records not verified: no public keys of the sites at hand (pass --keys-dir)")
        if self.undecryptable:
            lines.append(f"{self.undecryptable} sealed request(s) could not be decrypted with the key given: skipped")
        if self.missing_topics:
            lines.append(f"not recorded (topic absent): {', '.join(self.missing_topics)}")
        return lines


def authentic(record, window: RecordedWindow, verifier: RecordVerifier | None, topic: str) -> bool:
    """Whether ``record`` may be read: signed by a DIN site (always, without a ``verifier``); else counted."""
    if verifier is None:
        return True
    try:
        verifier.check(record)
    except ForgedRecord as refused:
        window.forged[topic] += 1
        window.forged_reasons[refused.reason.value] += 1
        return False
    return True


def decode_requests(
    records, window: RecordedWindow, keyring: envelope.Keyring | None, topic: str,
    verifier: RecordVerifier | None = None,
) -> list[RecordedRequest]:
    """Parse request records into ``window``'s counters; return the usable ones."""
    kept = []
    for record in records:
        if not authentic(record, window, verifier, topic):
            continue
        try:
            recorded = parse_request_record(record)
        except CorruptRecord as exc:
            window.corrupt[topic] += 1
            window.corrupt_examples.setdefault(topic, f"offset {record.offset}: {exc}")
            continue
        if recorded.sealed:
            window.sealed += 1
            if keyring is not None:
                try:
                    recorded = open_recorded(recorded, keyring)
                except envelope.InvalidToken:
                    window.undecryptable += 1
                    continue
        kept.append(recorded)
    return kept


async def read_requests(
    reader: TopicReader, rng: RecordRange, *, scope: str | None, keyring: envelope.Keyring | None,
    window: RecordedWindow | None = None, limit: int | None = None, verifier: RecordVerifier | None = None,
) -> RecordedWindow:
    """Read and decode the recorded requests of ``rng`` into a window (no other topics)."""
    window = window or RecordedWindow(rng=rng)
    topic = topic_name(Topics.REQUESTS, scope)
    stats = ReadStats(topic)
    async for batch in reader.read(topic, rng, stats=stats):
        window.requests.extend(decode_requests(batch, window, keyring, topic, verifier))
        if limit is not None and len(window.requests) >= limit:
            del window.requests[limit:]
            break
    window.stats.append(stats)
    if not window.requests:
        extra = "; ".join(window.skipped_summary())
        raise ReplayError(
            f"no usable recorded requests in {rng.describe()} on {topic}" + (f" ({extra})" if extra else "")
        )
    window.requests.sort(key=lambda r: r.meta.received_ms)
    window.since_ms = window.requests[0].meta.received_ms
    window.until_ms = max(r.meta.received_ms + r.meta.timeout_ms for r in window.requests) + OUTCOME_SLACK_MS
    return window


async def read_events(
    reader: TopicReader, window: RecordedWindow, *, scope: str | None, bases: tuple[str, ...] = tuple(EVENT_TOPICS),
    since_ms: float | None = None, until_ms: float | None = None, verifier: RecordVerifier | None = None,
) -> RecordedWindow:
    """Add the events of ``bases`` recorded between ``since_ms`` and ``until_ms`` (default: the window's span)."""
    since = window.since_ms if since_ms is None else since_ms
    until = window.until_ms if until_ms is None else until_ms
    for base in bases:
        model = EVENT_TOPICS[base]
        topic = topic_name(base, scope)
        if not reader.has_topic(topic):
            window.missing_topics.append(topic)
            continue
        lead = HEARTBEAT_LEAD_MS if base == Topics.HEARTBEATS else 0.0
        rng = RecordRange(since_ms=since - lead, until_ms=until)
        stats = ReadStats(topic)
        target = _target(window, base)
        async for batch in reader.read(topic, rng, stats=stats, require_records=False):
            for record in batch:
                if not authentic(record, window, verifier, topic):
                    continue
                try:
                    target.append(model.model_validate_json(record.value or b""))
                except ValidationError as exc:
                    window.corrupt[topic] += 1
                    window.corrupt_examples.setdefault(
                        topic, f"offset {record.offset}: not a {model.__name__} ({exc.errors()[0]['type']})")
        window.stats.append(stats)
    return window


def _target(window: RecordedWindow, base: str) -> list:
    return {
        Topics.ADMISSION_DECISIONS: window.admissions,
        Topics.CLASSIFICATIONS: window.classifications,
        Topics.SCHEDULING_DECISIONS: window.schedulings,
        Topics.COMPLETIONS: window.completions,
        Topics.HEARTBEATS: window.heartbeats,
        Topics.ALERTS: window.alerts,
        Topics.SCALING_DECISIONS: window.scalings,
    }[base]


async def load_window(
    bootstrap: str, rng: RecordRange, *, scope: str | None = None, keyring: envelope.Keyring | None = None,
    requests: bool = True, limit: int | None = None, bases: tuple[str, ...] = tuple(EVENT_TOPICS),
    client_kwargs: Mapping[str, Any] | None = None, verifier: RecordVerifier | None = None,
) -> RecordedWindow:
    """Requests of ``rng`` (when ``requests``) and the events about them, from the Kafka at ``bootstrap``
    (``client_kwargs``: the reader's login), each record checked by ``verifier`` when one is given.

    Without ``requests`` (a report over a time range), the events of ``rng``'s
    time span are read directly.
    """
    async with TopicReader(bootstrap, client_kwargs=client_kwargs) as reader:
        if requests:
            window = await read_requests(reader, rng, scope=scope, keyring=keyring, limit=limit,
                                         window=RecordedWindow(rng=rng, unverified=verifier is None),
                                         verifier=verifier)
            return await read_events(reader, window, scope=scope, bases=bases, verifier=verifier)
        window = RecordedWindow(rng=rng, unverified=verifier is None)
        window.since_ms = rng.since_ms if rng.since_ms is not None else 0.0
        window.until_ms = rng.until_ms if rng.until_ms is not None else time.time() * 1000.0 + 1.0
        await read_events(reader, window, scope=scope, bases=bases, verifier=verifier)
        if not (window.completions or window.admissions or window.schedulings):
            raise ReplayError(f"no decisions or completions recorded in {rng.describe()}"
                              + (f" (scope {scope})" if scope else ""))
        return window
