"""Benchmark: what signing every Kafka record costs its producer and checking it costs a reader.

In-process, no broker, one run. A completion record as the event log writes it, measured side by side:

* ``encode``: ``model_dump_json`` of the event, what the event log's background task already paid per record;
* ``sign alone``: the ``din-record-sig`` header of a record signed on its own (``RecordSigner.header``,
  Ed25519), paid in the same background task when the queue holds one record;
* ``sign in a batch of 64``: per record, when the queue holds 64 (one signature over their Merkle root);
* ``verify``: ``RecordVerifier.check`` of a record signed alone, paid by ``din report``, ``din replay`` and
  telemetry per record read; of a record of a batch already verified (the root cached), the hashing only.

A request writes about five records (admission decision, classification, scheduling decision, completion,
recorded request): ``RECORDS_PER_REQUEST x sign`` of background CPU per request, between the batch and the
alone figure.

Writes ``record_signatures.json`` and ``.md`` to ``bench/results/`` (or ``--out``).

    python -m din.bench.record_signatures [--records 5000] [--out bench/results]
"""

from __future__ import annotations

import time
from types import SimpleNamespace

from din.bench import in_process_main, machine_facts, per_call_us, where_measured
from din.shared.contracts.events import CompletionV1
from din.shared.contracts.inference import SlaClass
from din.shared.envelope import Identity
from din.shared.eventlog import EVENT_TYPE_HEADER, event_type
from din.shared.security.records import RecordSigner, RecordVerifier

ROUNDS = 5
RECORDS_PER_REQUEST = 5
BATCH = 64
TOPIC = "din.v1.events.completions"


def measure(records: int) -> dict:
    identity = Identity.generate("site-cloud")
    signer = RecordSigner(identity)
    verifier = RecordVerifier({identity.name: identity.public})
    event = CompletionV1(request_id="0123456789abcdef0123456789abcdef", tenant="acme", site="cloud",
                         executor="cloud-1", model="digits-small", model_version="2", sla_class=SlaClass.REALTIME,
                         ok=True, batch_size=4, degraded=False,
                         timings_ms={"queue": 0.3, "compute": 0.1, "total": 4.2}, at_ms=time.time() * 1000)
    value = event.model_dump_json().encode()
    kind = event_type(event).encode()
    header = signer.header(TOPIC, b"cloud", kind, 1_700_000_000_000, value)
    record = SimpleNamespace(topic=TOPIC, key=b"cloud", value=value, timestamp=1_700_000_000_000,
                             headers=[(EVENT_TYPE_HEADER, kind), header])
    leaves = [(TOPIC, b"cloud", kind, 1_700_000_000_000 + i, value) for i in range(BATCH)]
    batched = [SimpleNamespace(topic=TOPIC, key=b"cloud", value=value, timestamp=ts,
                               headers=[(EVENT_TYPE_HEADER, kind), h])
               for (_, _, _, ts, _), h in zip(leaves, signer.headers(leaves), strict=True)]
    verifier.check(batched[0])
    figures = {
        "encode_us": per_call_us(lambda _: event.model_dump_json(), records, ROUNDS),
        "sign_alone_us": per_call_us(lambda i: signer.header(TOPIC, b"cloud", kind, i, value), records, ROUNDS),
        "sign_batched_us": per_call_us(lambda _: signer.headers(leaves), max(1, records // BATCH), ROUNDS) / BATCH,
        "verify_alone_us": per_call_us(lambda _: RecordVerifier(verifier.publics).check(record), records, ROUNDS),
        "verify_batched_us": per_call_us(lambda i: verifier.check(batched[i % BATCH]), records, ROUNDS),
    }
    figures = {k: round(v, 1) for k, v in figures.items()}
    return {
        "records": records, "rounds": ROUNDS, **machine_facts(),
        "bytes": {"value": len(value), "signature_header": len(header[0]) + len(header[1])},
        "per_record": figures,
        "batch": BATCH,
        "per_request": {"records": RECORDS_PER_REQUEST,
                        "sign_alone_us": round(RECORDS_PER_REQUEST * figures["sign_alone_us"], 1),
                        "sign_batched_us": round(RECORDS_PER_REQUEST * figures["sign_batched_us"], 1)},
    }


def markdown(report: dict) -> str:
    rec, req = report["per_record"], report["per_request"]
    return "\n".join([
        "# Signed records: cost per Kafka record",
        "",
        f"In-process, {report['records']} calls per round, {where_measured(report)}. "
        f"A completion record of {report['bytes']['value']} B; the "
        f"signature header adds {report['bytes']['signature_header']} B.",
        "",
        "| per record | µs |",
        "|---|---:|",
        f"| encode the event (paid before) | {rec['encode_us']} |",
        f"| sign, a record alone (producer, in the event log's background task) | {rec['sign_alone_us']} |",
        f"| sign, per record of a batch of {report['batch']} | {rec['sign_batched_us']} |",
        f"| verify, a record alone (report, replay, telemetry) | {rec['verify_alone_us']} |",
        f"| verify, a record of a batch whose root was verified | {rec['verify_batched_us']} |",
        "",
        f"Per request ({req['records']} records): **{req['sign_alone_us']} µs** of background CPU to sign when "
        f"records go out one at a time (light load), **{req['sign_batched_us']} µs** when the event log's queue "
        f"holds {report['batch']} (heavy load).",
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    return in_process_main(argv, __doc__, "record_signatures", measure, markdown, count="--records", default=5000)


if __name__ == "__main__":
    raise SystemExit(main())
