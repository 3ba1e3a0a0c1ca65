"""Benchmark: what signing and checking one control message costs, against taking it unsigned.

In-process, no broker. For a heartbeat (about 0.5 KB of JSON) and a completion (about 0.6 KB, with its closing
``Din-Request-Id`` header), measured side by side in one run:

* ``unsigned``: ``ControlVerifier(None).open`` — decode the body and check its claims (what a receiver pays with
  security off);
* ``sign``: ``ControlSigner.headers`` — the Ed25519 signature and the ``Din-Ctl-*`` headers (the sender's cost);
* ``verify``: ``ControlVerifier.open`` with signatures on — signature, signer rule, replay guard, decode, claims;
* ``sign + verify - unsigned``: what signatures add per message, end to end.

Writes ``control_signatures.json`` and ``.md`` to ``bench/results/`` (or ``--out``).

    python -m bench.control_signatures [--messages 5000] [--out bench/results]
"""

from __future__ import annotations

import statistics
import time
from types import SimpleNamespace

from din.bench import in_process_main, machine_facts, per_call_us, where_measured
from din.shared.contracts.events import CompletionV1
from din.shared.contracts.inference import SlaClass
from din.shared.envelope import Identity
from din.shared.naming import Subjects
from din.shared.security import ControlSigner, ControlVerifier
from tests.support import make_heartbeat

ROUNDS = 5


def _cases() -> dict[str, tuple[str, str, bytes, dict[str, str] | None]]:
    beat = make_heartbeat("cloud-1", "cloud", ["digits-small", "digits-large"], capacity=16)
    done = CompletionV1(request_id="r-0123456789", tenant="acme", site="cloud", executor="cloud-1",
                        model="digits-small", model_version="1", sla_class=SlaClass.INTERACTIVE, ok=True,
                        batch_size=4, degraded=False, timings_ms={"total": 3.2, "queue": 0.4, "compute": 1.1},
                        at_ms=time.time() * 1000)
    return {
        "heartbeat": ("heartbeat", Subjects.heartbeat("cloud", "cloud-1"), beat.model_dump_json().encode(), None),
        "completion": ("completed", Subjects.completed("cloud"), done.model_dump_json().encode(),
                       {"Din-Request-Id": "r-0123456789"}),
    }


def _measure_case(signer: ControlSigner, agent, channel: str, subject: str, body: bytes,
                  extra: dict[str, str] | None, messages: int) -> dict:
    off = ControlVerifier(None)
    unsigned = per_call_us(lambda _: off.open(channel, subject, body, extra), messages, ROUNDS)
    sign = per_call_us(lambda _: signer.headers(subject, body, extra), messages, ROUNDS)
    verify_rounds = []
    on = ControlVerifier(agent, max_entries=messages * ROUNDS + 1)
    for _ in range(ROUNDS):
        signed = [signer.headers(subject, body, extra) for _ in range(messages)]
        started = time.perf_counter()
        for headers in signed:
            on.open(channel, subject, body, headers)
        verify_rounds.append((time.perf_counter() - started) / messages * 1e6)
    verify_us = statistics.median(verify_rounds)
    assert sum(on.refusals.values()) == 0, on.refusals
    return {
        "body_bytes": len(body),
        "header_bytes": sum(len(k) + len(v) for k, v in signer.headers(subject, body, extra).items()),
        "unsigned_us": round(unsigned, 1),
        "sign_us": round(sign, 1),
        "verify_us": round(verify_us, 1),
        "added_us": round(sign + verify_us - unsigned, 1),
        "ratio_signed_to_unsigned": round((sign + verify_us) / unsigned, 2),
    }


def measure(messages: int) -> dict:
    identity = Identity.generate("site-cloud")
    agent = SimpleNamespace(publics={identity.name: identity.public}, revoked=frozenset())
    signer = ControlSigner(identity)
    results = {name: _measure_case(signer, agent, *case, messages) for name, case in _cases().items()}
    return {"messages": messages, "rounds": ROUNDS, **machine_facts(), "results": results}


def markdown(report: dict) -> str:
    lines = [
        "# Signed control messages: cost per message",
        "",
        f"In-process, {report['messages']} messages per round, {where_measured(report)}. "
        f"`unsigned` is what a receiver pays with security off "
        "(decode and claims); `sign` the sender's cost; `verify` the receiver's with signatures on (signature, "
        "signer rule, replay guard, decode, claims).",
        "",
        "| message | body B | added header B | unsigned µs | sign µs | verify µs | added µs | (sign+verify)/unsigned |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in report["results"].items():
        lines.append(f"| {name} | {r['body_bytes']} | {r['header_bytes']} | {r['unsigned_us']} | {r['sign_us']} | "
                     f"{r['verify_us']} | {r['added_us']} | {r['ratio_signed_to_unsigned']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    return in_process_main(argv, __doc__, "control_signatures", measure, markdown, default=5000)


if __name__ == "__main__":
    raise SystemExit(main())
