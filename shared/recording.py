"""Recorded requests: how an admitted request becomes a Kafka record on ``Topics.REQUESTS``, and back.

Admission calls ``request_record`` once per admitted request (or
``record_request`` to queue it on its event log in one call). The record is

* key: the tenant (so one tenant's requests keep their order in a partition),
* value: the request body exactly as received (sealed by the security work
  once recordings are encrypted; then the ``Din-Env-*`` headers travel too),
* headers: ``din-event-type`` = ``din.v1.RecordedRequestV1`` and the request's
  metadata as ASCII ``din-*`` headers (see ``RECORD_HEADERS``): every serving
  option that is set, as its request header in lower case with the same text
  (``din-cascade: rate:0.2``), plus the ``Din-Tensor-*`` headers of a binary-form body.

``parse_request_record`` is the inverse for replay: it raises ``CorruptRecord``
for anything that is not a well-formed recorded request, so a reader can skip
and count it. Building a record costs a few microseconds and parses nothing.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pydantic import ValidationError

from din.shared import envelope
from din.shared.contracts.job import JobV1
from din.shared.contracts.options import ServingOptionsV1, lookup_in, option_headers, read_options, wire_options
from din.shared.contracts.telemetry import RecordedRequestV1
from din.shared.errors import DinError
from din.shared.eventlog import EVENT_TYPE_HEADER

REQUEST_EVENT_TYPE = f"din.v1.{RecordedRequestV1.__name__}"

H_REQUEST_ID = "din-request-id"
H_TENANT = "din-tenant"
H_MODEL = "din-model"
H_CONTENT_TYPE = "din-content-type"
H_RECEIVED_MS = "din-received-ms"
H_TIMEOUT_MS = "din-timeout-ms"


def option_record_header(request_header: str) -> str:
    """The record header of a serving option: its request header in lower case (``din-sla-class``)."""
    return request_header.lower()


OPTION_RECORD_HEADERS = tuple(dict.fromkeys(option_record_header(wire.header)
                                            for _, wire in wire_options(ServingOptionsV1)))
"""The record headers of the serving options, each written only when the option is set."""

RECORD_HEADERS = (
    EVENT_TYPE_HEADER,
    H_REQUEST_ID,
    H_TENANT,
    H_MODEL,
    H_CONTENT_TYPE,
    H_RECEIVED_MS,
    H_TIMEOUT_MS,
    *OPTION_RECORD_HEADERS,
)
"""Every ``din-*`` header a recorded request may carry (the options only when set)."""

TENSOR_HEADER_PREFIX = "Din-Tensor-"
ENVELOPE_HEADER_PREFIX = "Din-Env-"

_EVENT_TYPE_VALUE = REQUEST_EVENT_TYPE.encode()


class CorruptRecord(ValueError):
    """A record on the requests topic that is not a well-formed recorded request."""


class KafkaRecord(Protocol):
    """What ``parse_request_record`` reads: an aiokafka ``ConsumerRecord`` or anything shaped like one."""

    key: bytes | None
    value: bytes | None
    headers: Any


def request_record(
    job: JobV1, body: bytes, passthrough_headers: Mapping[str, str] | None
) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    """The ``(key, value, headers)`` of the Kafka record that keeps ``job`` and its ``body`` for replay."""
    headers = [
        (EVENT_TYPE_HEADER, _EVENT_TYPE_VALUE),
        (H_REQUEST_ID, job.request_id.encode()),
        (H_TENANT, job.tenant.encode()),
        (H_MODEL, job.model.encode()),
        (H_CONTENT_TYPE, job.content_type.encode()),
        (H_RECEIVED_MS, repr(round(job.received_ms, 3)).encode()),
        (H_TIMEOUT_MS, str(max(1, int(job.deadline_ms - job.received_ms))).encode()),
    ]
    headers.extend((option_record_header(name), value.encode()) for name, value in option_headers(job).items())
    if passthrough_headers:
        for name, value in passthrough_headers.items():
            if name.startswith((TENSOR_HEADER_PREFIX, ENVELOPE_HEADER_PREFIX)):
                headers.append((name, value.encode()))
    return job.tenant.encode(), bytes(body), headers


def record_request(
    events: Any, base_topic: str, job: JobV1, body: bytes, passthrough_headers: Mapping[str, str]
) -> None:
    """Queue ``job``'s record on an ``EventLog`` (needs ``EventLog.emit_record``); never blocks, never raises."""
    key, value, headers = request_record(job, body, passthrough_headers)
    events.emit_record(base_topic, key, value, headers)


@dataclass(slots=True)
class RecordedRequest:
    """A recorded request read back from Kafka: its metadata, its body and where it was stored.

    ``sealed`` is True while ``body`` is still an envelope (``envelope`` holds its
    ``Din-Env-*`` headers); ``open_recorded`` turns it into the plaintext body.
    """

    meta: RecordedRequestV1
    body: bytes
    sealed: bool = False
    envelope: dict[str, str] = field(default_factory=dict)
    topic: str = ""
    partition: int = -1
    offset: int = -1
    timestamp_ms: int = -1


def _header_pairs(raw: Any) -> Iterable[tuple[str, bytes]]:
    if raw is None:
        return ()
    if isinstance(raw, Mapping):
        return raw.items()
    return raw


def parse_request_record(record: KafkaRecord) -> RecordedRequest:
    """Decode a record written by ``request_record``; raise ``CorruptRecord`` when it is not one."""
    try:
        values: dict[str, str] = {}
        tensor: dict[str, str] = {}
        sealed: dict[str, str] = {}
        for name, raw in _header_pairs(record.headers):
            text = raw.decode("ascii") if isinstance(raw, (bytes, bytearray)) else str(raw)
            if name.startswith(TENSOR_HEADER_PREFIX):
                tensor[name] = text
            elif name.startswith(ENVELOPE_HEADER_PREFIX):
                sealed[name] = text
            else:
                values[name] = text
    except (UnicodeDecodeError, TypeError, ValueError, AttributeError):
        raise CorruptRecord("headers are not ASCII name/value pairs") from None
    if values.get(EVENT_TYPE_HEADER) != REQUEST_EVENT_TYPE:
        raise CorruptRecord(f"event type {values.get(EVENT_TYPE_HEADER)!r} is not {REQUEST_EVENT_TYPE}")
    if record.value is None:
        raise CorruptRecord("record has no value")
    try:
        options = read_options(lookup_in(values, header_name=option_record_header), ServingOptionsV1)
        meta = RecordedRequestV1(
            **options.serving_options(),
            request_id=values[H_REQUEST_ID],
            tenant=values[H_TENANT],
            model=values[H_MODEL],
            content_type=values[H_CONTENT_TYPE],
            received_ms=float(values[H_RECEIVED_MS]),
            timeout_ms=int(values[H_TIMEOUT_MS]),
            tensor_headers=tensor,
        )
    except KeyError as exc:
        raise CorruptRecord(f"missing header {exc.args[0]}") from None
    except DinError as exc:
        raise CorruptRecord(f"invalid option header: {exc.message}") from None
    except (ValueError, ValidationError) as exc:
        raise CorruptRecord(f"invalid header value: {str(exc).splitlines()[0]}") from None
    if record.key is not None and record.key != meta.tenant.encode():
        raise CorruptRecord("record key does not match its tenant header")
    return RecordedRequest(
        meta=meta,
        body=bytes(record.value),
        sealed=bool(sealed),
        envelope=sealed,
        topic=getattr(record, "topic", ""),
        partition=getattr(record, "partition", -1),
        offset=getattr(record, "offset", -1),
        timestamp_ms=getattr(record, "timestamp", -1),
    )


def open_recorded(recorded: RecordedRequest, keyring: envelope.Keyring) -> RecordedRequest:
    """The plaintext form of a sealed recording; raises ``envelope.InvalidToken`` when it cannot be opened."""
    if not recorded.sealed:
        return recorded
    sealed = envelope.Sealed.from_headers(recorded.body, recorded.envelope)
    plaintext = envelope.open(
        sealed,
        keyring=keyring,
        expected_reader=sealed.headers.get(envelope.H_READER, ""),
        allow_integrity_only=True,
    )
    return RecordedRequest(
        meta=recorded.meta,
        body=plaintext,
        sealed=False,
        envelope={},
        topic=recorded.topic,
        partition=recorded.partition,
        offset=recorded.offset,
        timestamp_ms=recorded.timestamp_ms,
    )


REPLAY_KEY_GRACE_S = 100 * 365 * 24 * 3600.0
"""Replay opens old recordings: keys it is given stay accepted however long ago they were retired."""


def load_replay_keys(path: Path) -> envelope.Keyring:
    """A keyring from an SRE's key file: ``{"keys": [{"reader", "version", "key" (base64url)}]}``.

    Raises ``ValueError`` with a one-line message when the file cannot be used.
    """
    try:
        document = json.loads(Path(path).read_text())
        entries = document["keys"]
        keyring = envelope.Keyring(grace_s=REPLAY_KEY_GRACE_S)
        for entry in entries:
            text = entry["key"]
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
            keyring.install(envelope.DataKey(entry["reader"], int(entry["version"]), raw))
    except FileNotFoundError:
        raise ValueError(f"key file {path} not found") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"key file {path} is not a DIN replay key file ({exc.__class__.__name__})") from None
    if not entries:
        raise ValueError(f"key file {path} holds no keys")
    return keyring


def write_replay_keys(path: Path, keys: Iterable[envelope.DataKey]) -> None:
    """Write a key file ``load_replay_keys`` reads (mode 0600)."""
    document = {
        "keys": [
            {"reader": k.reader, "version": k.version, "key": base64.urlsafe_b64encode(k.key).rstrip(b"=").decode()}
            for k in keys
        ]
    }
    target = Path(path)
    target.touch(mode=0o600, exist_ok=True)
    target.write_text(json.dumps(document, indent=2) + "\n")
