"""Recorded requests: building the Kafka record at admission and reading it back for replay."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from din.shared import envelope
from din.shared.contracts.inference import SlaClass
from din.shared.contracts.job import JobV1
from din.shared.recording import (
    REQUEST_EVENT_TYPE,
    CorruptRecord,
    load_replay_keys,
    open_recorded,
    parse_request_record,
    request_record,
    write_replay_keys,
)
from tests.support import make_job

RECEIVED_MS = 1_700_000_000_123.456


def recorded_job(**overrides) -> JobV1:
    """A realtime digits-small job received at ``RECEIVED_MS`` (not a whole millisecond); ``overrides`` win."""
    return make_job(**({"request_id": "req-1", "model": "digits-small", "sla_class": SlaClass.REALTIME,
                        "deadline_ms": int(RECEIVED_MS) + 1000, "received_ms": RECEIVED_MS} | overrides))


def as_record(key, value, headers, offset=7):
    return SimpleNamespace(key=key, value=value, headers=headers, topic="din.v1.admission.requests",
                           partition=1, offset=offset, timestamp=int(RECEIVED_MS))


def test_json_request_round_trips_with_every_option():
    job = recorded_job(labels=["pii", "eu"], allow_degrade=True, min_accuracy=0.9, model_version="2",
                   sla_class=SlaClass.BATCH, deadline_ms=int(RECEIVED_MS) + 60_000)
    body = b'{"inputs":[{"name":"input","shape":[1,2],"datatype":"FP32","data":[1,2]}]}'
    key, value, headers = request_record(job, body, {"Content-Type": "application/json"})
    assert key == b"acme" and value == body
    names = [n for n, _ in headers]
    assert names[0] == "din-event-type" and dict(headers)["din-event-type"] == REQUEST_EVENT_TYPE.encode()
    assert "Content-Type" not in names, "the content type travels once, as din-content-type"
    assert all(isinstance(v, bytes) and v.isascii() for _, v in headers)

    recorded = parse_request_record(as_record(key, value, headers))
    meta = recorded.meta
    assert (meta.request_id, meta.tenant, meta.model, meta.model_version) == ("req-1", "acme", "digits-small", "2")
    assert meta.sla_class == SlaClass.BATCH
    assert meta.received_ms == pytest.approx(RECEIVED_MS, abs=1e-3)
    assert meta.timeout_ms == 59_999  # deadline is whole ms, receipt is not
    assert meta.labels == ["pii", "eu"] and meta.allow_degrade and meta.min_accuracy == 0.9
    assert recorded.body == body and not recorded.sealed
    assert (recorded.partition, recorded.offset) == (1, 7)


def test_binary_request_keeps_its_tensor_headers_and_nothing_else():
    job = recorded_job(content_type="application/vnd.din.tensor")
    passthrough = {"Din-Tensor-Name": "input", "Din-Tensor-Shape": "1,64", "Din-Tensor-Datatype": "FP32",
                   "Content-Type": "application/vnd.din.tensor", "Din-Token": "secret-token"}
    key, value, headers = request_record(job, b"\x00" * 256, passthrough)
    names = [n for n, _ in headers]
    assert "Din-Token" not in names, "credentials must never be recorded"
    recorded = parse_request_record(as_record(key, value, headers))
    assert recorded.meta.tensor_headers == {
        "Din-Tensor-Name": "input", "Din-Tensor-Shape": "1,64", "Din-Tensor-Datatype": "FP32"}
    assert recorded.meta.labels == [] and recorded.meta.allow_degrade is False and recorded.meta.min_accuracy is None


def _good():
    return request_record(recorded_job(), b"{}", {})


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda k, v, h: (k, v, [(n, b"din.v1.Other") if n == "din-event-type" else (n, x) for n, x in h]),
         "event type"),
        (lambda k, v, h: (k, v, [(n, x) for n, x in h if n != "din-model"]), "missing header din-model"),
        (lambda k, v, h: (k, v, [(n, b"gold") if n == "din-sla-class" else (n, x) for n, x in h]), "invalid"),
        (lambda k, v, h: (k, v, [(n, b"soon") if n == "din-received-ms" else (n, x) for n, x in h]), "invalid"),
        (lambda k, v, h: (k, v, [(n, "é".encode()) if n == "din-tenant" else (n, x) for n, x in h]), "ASCII"),
        (lambda k, v, h: (b"globex", v, h), "key does not match"),
        (lambda k, v, h: (k, None, h), "no value"),
        (lambda k, v, h: (k, v, None), "event type"),
    ],
)
def test_corrupt_records_are_refused_with_a_reason(mutate, message):
    key, value, headers = mutate(*_good())
    with pytest.raises(CorruptRecord, match=message):
        parse_request_record(as_record(key, value, headers))


def _sealed_record(keyring: envelope.Keyring, body: bytes):
    sealed = envelope.seal(body, reader="sre", aad={"request_id": "req-1"}, keyring=keyring, sender="admission")
    return request_record(recorded_job(), sealed.body, sealed.to_headers())


def test_sealed_request_opens_only_with_the_sre_key(tmp_path):
    keyring = envelope.Keyring()
    keyring.rotate("sre")
    body = b'{"inputs":[]}'
    key, value, headers = _sealed_record(keyring, body)
    recorded = parse_request_record(as_record(key, value, headers))
    assert recorded.sealed and recorded.body != body
    assert recorded.meta.tenant == "acme", "metadata stays readable without the key"

    key_file = tmp_path / "sre.keys.json"
    write_replay_keys(key_file, [keyring.current_key("sre")])
    assert key_file.stat().st_mode & 0o777 == 0o600
    opened = open_recorded(recorded, load_replay_keys(key_file))
    assert opened.body == body and not opened.sealed

    other = envelope.Keyring()
    other.rotate("sre")
    with pytest.raises(envelope.InvalidToken):
        open_recorded(recorded, other)


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "not found"), ("not json", "not a DIN replay key file"), (json.dumps({"keys": []}), "holds no keys"),
     (json.dumps({"keys": [{"reader": "sre", "version": 1, "key": "c2hvcnQ"}]}), "not a DIN replay key file")],
)
def test_unusable_key_files_are_one_clear_error(tmp_path, content, message):
    path = tmp_path / "keys.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_replay_keys(path)
