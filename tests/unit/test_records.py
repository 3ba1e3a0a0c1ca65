"""Signed records (issue 13 item 7): what the event log signs and what readers accept, without Kafka."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from din.shared.envelope import Identity
from din.shared.eventlog import EVENT_TYPE_HEADER, EventLog
from din.shared.security.records import (
    RECORD_SIG_HEADER,
    ForgedRecord,
    RecordRefusal,
    RecordSigner,
    RecordVerifier,
)

SITE = Identity.generate("site-cloud")
TENANT = Identity.generate("tenant-acme")
TYPE = b"din.v1.CompletionV1"


def record(signer: Identity | None = SITE, *, topic="din.v1.events.completions", key=b"acme", value=b'{"x": 1}',
           timestamp=1_700_000_000_000):
    headers = [(EVENT_TYPE_HEADER, TYPE)]
    if signer is not None:
        headers.append(RecordSigner(signer).header(topic, key, TYPE, timestamp, value))
    return SimpleNamespace(topic=topic, key=key, value=value, headers=headers, timestamp=timestamp)


def verifier(**kw) -> RecordVerifier:
    return RecordVerifier({SITE.name: SITE.public, TENANT.name: TENANT.public}, **kw)


def refusal(rec, check: RecordVerifier | None = None) -> RecordRefusal:
    check = check or verifier()
    with pytest.raises(ForgedRecord) as caught:
        check.check(rec)
    assert check.refused[caught.value.reason] == 1
    return caught.value.reason


def test_a_record_signed_by_a_known_site_verifies():
    assert verifier().check(record()) == "site-cloud"
    assert verifier().check(record(key=None)) == "site-cloud"


@pytest.mark.parametrize("change", [{"topic": "din.v1.events.heartbeats"}, {"key": b"globex"},
                                    {"value": b'{"x": 2}'}, {"timestamp": 1_700_000_000_001}])
def test_a_record_changed_or_moved_does_not_verify(change):
    assert refusal(SimpleNamespace(**{**vars(record()), **change})) is RecordRefusal.BAD_SIGNATURE


def test_a_changed_event_type_does_not_verify():
    changed = record()
    changed.headers = [(EVENT_TYPE_HEADER, b"din.v1.HeartbeatV1"), changed.headers[1]]
    assert refusal(changed) is RecordRefusal.BAD_SIGNATURE


def test_unsigned_malformed_foreign_and_revoked_records_are_refused_by_reason():
    assert refusal(record(None)) is RecordRefusal.UNSIGNED
    garbled = record()
    garbled.headers = [garbled.headers[0], (RECORD_SIG_HEADER, b"\xff\xfe")]
    assert refusal(garbled) is RecordRefusal.MALFORMED
    garbled.headers = [garbled.headers[0], (RECORD_SIG_HEADER, b"x" * 600)]
    assert refusal(garbled) is RecordRefusal.MALFORMED
    assert refusal(record(TENANT)) is RecordRefusal.UNKNOWN_SIGNER, "only sites write records"
    assert refusal(record(Identity.generate("site-elsewhere"))) is RecordRefusal.UNKNOWN_SIGNER
    assert refusal(record(), verifier(revoked={"site-cloud"})) is RecordRefusal.REVOKED


def test_a_verifier_of_an_agent_reads_its_keys_at_each_check():
    agent = SimpleNamespace(publics={}, revoked=set())
    check = RecordVerifier.of_agent(agent)
    assert refusal(record(), check) is RecordRefusal.UNKNOWN_SIGNER
    agent.publics[SITE.name] = SITE.public
    assert check.check(record()) == "site-cloud"
    agent.revoked = {"site-cloud"}
    with pytest.raises(ForgedRecord):
        check.check(record())
    assert check.detail()["records_refused_revoked"] == 1


def test_the_event_log_signs_what_it_sends_when_it_has_a_signer():
    log = EventLog("127.0.0.1:9", client_id="t")
    plain = [(EVENT_TYPE_HEADER, TYPE)]
    assert log._signed("t", b"k", plain, b"v", 5) == plain
    log.signer = RecordSigner(SITE)
    signed = log._signed("t", b"k", plain, b"v", 5)
    rec = SimpleNamespace(topic="t", key=b"k", value=b"v", headers=signed, timestamp=5)
    assert verifier().check(rec) == "site-cloud"


def test_the_record_signatures_bench_writes_its_tables(tmp_path):
    import json

    from din.bench import record_signatures

    assert record_signatures.main(["--records", "20", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "record_signatures.json").read_text())
    assert set(report["per_record"]) == {"encode_us", "sign_alone_us", "sign_batched_us", "verify_alone_us",
                                         "verify_batched_us"}


def test_records_of_an_earlier_run_verify_under_its_identities():
    earlier = Identity.generate("site-cloud")
    check = RecordVerifier({SITE.name: SITE.public}, former=[{earlier.name: earlier.public}])
    assert check.check(record(earlier)) == "site-cloud" == check.check(record())
    assert refusal(record(Identity.generate("site-cloud")), check) is RecordRefusal.BAD_SIGNATURE


def test_a_report_finds_the_key_stores_of_the_runs_beside_its_own(tmp_path):
    from din.replay.endpoints import Endpoints
    from din.shared.security.keyfiles import KEYSTORE_FILE, KeyStore

    for run, identity in (("20260101T000000Z", Identity.generate("site-cloud")), ("20260102T000000Z", SITE)):
        (tmp_path / run / "keys").mkdir(parents=True)
        store = KeyStore({identity.name: identity.public}, {identity.name: b"wrapped"})
        store.save(tmp_path / run / "keys" / KEYSTORE_FILE)
    (tmp_path / "20260103T000000Z" / "keys").mkdir(parents=True)
    (tmp_path / "20260103T000000Z" / "keys" / KEYSTORE_FILE).write_text("{not a key store")
    endpoints = Endpoints(kafka="k", nats=None, credentials=None, topology=None,
                          keys_dir=tmp_path / "20260102T000000Z" / "keys")
    check = endpoints.record_verifier()
    assert check is not None and len(check.former) == 1 and check.check(record()) == "site-cloud"
    assert Endpoints(kafka="k", nats=None, credentials=None, topology=None, keys_dir=None).record_verifier() is None


def _batch(n: int):
    leaves = [("din.v1.events.completions", b"acme", TYPE, 1_700_000_000_000 + i, f'{{"i": {i}}}'.encode())
              for i in range(n)]
    headers = RecordSigner(SITE).headers(leaves)
    return [SimpleNamespace(topic=t, key=k, value=v, timestamp=ts, headers=[(EVENT_TYPE_HEADER, ty), h])
            for (t, k, ty, ts, v), h in zip(leaves, headers, strict=True)]


@pytest.mark.parametrize("n", [1, 2, 3, 7, 8, 33])
def test_a_batch_is_signed_once_and_every_record_of_it_verifies_alone(n, monkeypatch):
    records = _batch(n)
    assert len({r.headers[1][1].split(b";")[1] for r in records}) == 1, "one signature for the batch"
    from din.shared import envelope

    calls = []
    real = envelope.verify_result
    monkeypatch.setattr(envelope, "verify_result", lambda *a: calls.append(1) or real(*a))
    check = verifier()
    assert [check.check(r) for r in records] == ["site-cloud"] * n
    assert len(calls) == 1, "a root is verified once"


def test_a_record_with_another_records_proof_or_a_bent_path_is_refused():
    records = _batch(5)
    swapped = SimpleNamespace(**{**vars(records[0]), "headers": records[1].headers})
    assert refusal(swapped) is RecordRefusal.BAD_SIGNATURE
    signer, sig, index, size, path = records[2].headers[1][1].decode().split(";")
    for bent in (f"{signer};{sig};{index};{size};", f"{signer};{sig};9;{size};{path}",
                 f"{signer};{sig};{index};{size};{path}AAAA", f"{signer};{sig};{index};x;{path}"):
        rec = SimpleNamespace(**{**vars(records[2]), "headers": [records[2].headers[0],
                                                                   (RECORD_SIG_HEADER, bent.encode())]})
        assert refusal(rec) in (RecordRefusal.MALFORMED, RecordRefusal.BAD_SIGNATURE), bent
