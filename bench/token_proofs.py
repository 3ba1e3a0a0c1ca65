"""Benchmark: what request-bound token proofs cost per request, against the bare token admission verified before.

In-process, no broker, one run. Measured side by side:

* ``bare verify``: ``TenantVerifier.verify`` of a bare ``din1`` token (what admission paid per request before);
* ``proof make``: ``request_proof``, what the client (or the gateway) now pays per request;
* ``proof verify``: ``TenantVerifier.verify`` of that proof for its model, request id and reply subject;
* ``single use``: the admission's in-memory check that a proof was not used before (``ReplayGuard``), paid by
  an unsealed request only (a sealed one is single-use by its envelope's nonce). A site with several
  admissions also claims an unsealed request's proof in its JetStream nonce bucket: one KV create, a broker
  round trip not measured here.

Writes ``token_proofs.json`` and ``.md`` to ``bench/results/`` (or ``--out``).

    python -m din.bench.token_proofs [--messages 20000] [--out bench/results]
"""

from __future__ import annotations

import itertools
import time

from din.bench import in_process_main, machine_facts, per_call_us, where_measured
from din.shared.credentials import TenantVerifier, issue_token, request_proof
from din.shared.envelope import ReplayGuard

ROUNDS = 5
SECRET = "5e" * 32
MODEL = "digits-small"
REPLY = "_INBOX.acme.cloud.AbCdEfGhIjKlMnOp.0123456789abcdef0123456789abcdef"


def measure(messages: int) -> dict:
    now = time.time()
    token = issue_token("acme", SECRET, now=now)
    verifier = TenantVerifier({"acme": SECRET})
    ids = [f"{i:032x}" for i in range(messages)]
    proofs = [request_proof(token, MODEL, rid, REPLY, now=now) for rid in ids]
    nonces = [verifier.verify("acme", p, now, model=MODEL, request_id=rid, reply=REPLY, bearer=False).nonce
              for p, rid in zip(proofs, ids, strict=True)]
    guard = ReplayGuard(60.0, lambda: now, max_entries=messages * ROUNDS + 1)
    every_round = [f"{r}{nonce}" for r in range(ROUNDS) for nonce in nonces]
    calls = itertools.count()

    def single_use(_: int) -> None:
        guard.check(every_round[next(calls)], now, now=now)

    figures = {
        "bare_verify_us": per_call_us(lambda _: verifier.verify("acme", token, now), messages, ROUNDS),
        "proof_make_us": per_call_us(lambda i: request_proof(token, MODEL, ids[i], REPLY, now=now), messages,
                                     ROUNDS),
        "proof_verify_us": per_call_us(lambda i: verifier.verify("acme", proofs[i], now, model=MODEL,
                                                                 request_id=ids[i], reply=REPLY, bearer=False),
                                       messages, ROUNDS),
        "single_use_us": per_call_us(single_use, messages, ROUNDS),
    }
    figures = {k: round(v, 2) for k, v in figures.items()}
    sealed = figures["proof_make_us"] + figures["proof_verify_us"]
    unsealed = sealed + figures["single_use_us"]
    return {
        "messages": messages, "rounds": ROUNDS, **machine_facts(),
        "bytes": {"token": len(token), "proof": len(proofs[0])},
        "per_call": figures,
        "per_request": {"sealed_us": round(sealed, 2), "unsealed_us": round(unsealed, 2),
                        "added_sealed_us": round(sealed - figures["bare_verify_us"], 2),
                        "added_unsealed_us": round(unsealed - figures["bare_verify_us"], 2),
                        "unsealed_to_bare": round(unsealed / figures["bare_verify_us"], 2)},
    }


def markdown(report: dict) -> str:
    call, req = report["per_call"], report["per_request"]
    return "\n".join([
        "# Token proofs: cost of a request-bound, single-use credential",
        "",
        f"In-process, {report['messages']} calls per round, {where_measured(report)}. "
        f"Token {report['bytes']['token']} B, proof "
        f"{report['bytes']['proof']} B.",
        "",
        "| per request | µs |",
        "|---|---:|",
        f"| bare token verify (admission, before) | {call['bare_verify_us']} |",
        f"| proof make (client or gateway) | {call['proof_make_us']} |",
        f"| proof verify (admission) | {call['proof_verify_us']} |",
        f"| single-use check (admission, unsealed requests) | {call['single_use_us']} |",
        "",
        f"Per request: **{req['sealed_us']} µs** sealed, **{req['unsealed_us']} µs** unsealed, "
        f"{req['added_sealed_us']} / {req['added_unsealed_us']} µs more than the bare token "
        f"({req['unsealed_to_bare']}x); a site with several admissions adds one JetStream KV create per "
        "unsealed request (not measured here).",
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    return in_process_main(argv, __doc__, "token_proofs", measure, markdown, default=20000)


if __name__ == "__main__":
    raise SystemExit(main())
