"""Benchmark: what vouching for a job's routing facts costs per hop, against decoding the job header as before.

In-process, no broker, one run. The job header is a classified and placed job (workload, placement, stamps).
Measured side by side:

* ``decode``: ``JobV1.from_headers``, what every hop already paid to read the job;
* ``mac tag`` / ``mac verify``: ``JobFacts.tag`` / ``verify`` under the receiving site's data key, the form of
  every hop within a site and from the hub (admission -> classifier -> scheduler -> executor);
* ``sig tag`` / ``sig verify``: the Ed25519 form, for a hop whose sender lacks the receiver's key (an edge
  scheduler forwarding, an edge executor handing back or on).

Per request on the one-site path (three tagged hops): ``3 x (mac tag + mac verify)`` against ``3 x decode``.

Writes ``job_facts.json`` and ``.md`` to ``bench/results/`` (or ``--out``).

    python -m din.bench.job_facts [--messages 5000] [--out bench/results]
"""

from __future__ import annotations

from types import SimpleNamespace

from din.bench import in_process_main, machine_facts, per_call_us, where_measured
from din.shared.contracts.job import JobV1, WorkloadClassV1
from din.shared.envelope import DataKey, Identity, Keyring, sign_result
from din.shared.security import JobFacts, PayloadSecurity, site_principal
from tests.support import make_job

ROUNDS = 5
HOPS_PER_REQUEST = 3


def _job_headers() -> dict[str, str]:
    job = make_job(request_id="r-0123456789abcdef", tenant="acme", model="digits-small", labels=["pii"],
                   reply_to="_INBOX.acme.cloud.AbCdEfGhIjKlMnOp.17", traceparent="00-" + "1" * 32 + "-" + "2" * 16
                   + "-01")
    job.workload = WorkloadClassV1(task="image-classification", sla_class=job.sla_class, input_bytes=3200,
                                   size_class="small", sensitive=True, allowed_sites=["factory"],
                                   candidates=["digits-small", "digits-large"])
    job.model_chosen, job.site_chosen, job.executor_chosen, job.scheduler_site = (
        "digits-small", "cloud", "cloud-1", "cloud")
    job.stamps_ms = {"admitted": 1.0, "classified": 2.0, "scheduled": 3.0}
    return job.to_headers()


def _facts(site: str, identity: Identity, keyring: Keyring) -> JobFacts:
    agent = SimpleNamespace(principal=identity.name, keyring=keyring, publics={identity.name: identity.public},
                            revoked=frozenset(),
                            sign=lambda payload, headers: sign_result(identity, payload, headers))
    return JobFacts(PayloadSecurity(agent), site)


def measure(messages: int) -> dict:
    headers = _job_headers()
    identity = Identity.generate(site_principal("cloud"))
    keyring = Keyring()
    keyring.install(DataKey.generate(site_principal("cloud"), 1))
    cloud = _facts("cloud", identity, keyring)
    edge = _facts("branch", identity, Keyring())
    mac_tagged = cloud.tag(dict(headers), "cloud")
    sig_tagged = edge.tag(dict(headers), "cloud")
    figures = {
        "decode_us": per_call_us(lambda _: JobV1.from_headers(headers), messages, ROUNDS),
        "mac_tag_us": per_call_us(lambda _: cloud.tag(dict(headers), "cloud"), messages, ROUNDS),
        "mac_verify_us": per_call_us(lambda _: cloud.verify(mac_tagged), messages, ROUNDS),
        "sig_tag_us": per_call_us(lambda _: edge.tag(dict(headers), "cloud"), messages // 10, ROUNDS),
        "sig_verify_us": per_call_us(lambda _: cloud.verify(sig_tagged), messages // 10, ROUNDS),
    }
    assert not cloud.refusals, cloud.refusals
    figures = {k: round(v, 1) for k, v in figures.items()}
    per_request_added = HOPS_PER_REQUEST * (figures["mac_tag_us"] + figures["mac_verify_us"])
    per_request_decode = HOPS_PER_REQUEST * figures["decode_us"]
    return {
        "messages": messages, "rounds": ROUNDS, **machine_facts(), "job_header_bytes": len(headers["Din-Job-V1"]),
        "tag_header_bytes": {"mac": len(mac_tagged["Din-Job-Tag"]), "sig": len(sig_tagged["Din-Job-Tag"])},
        "per_hop": figures,
        "per_request": {"hops": HOPS_PER_REQUEST, "added_us": round(per_request_added, 1),
                        "decode_us": round(per_request_decode, 1),
                        "added_to_decode": round(per_request_added / per_request_decode, 2)},
    }


def markdown(report: dict) -> str:
    hop, req = report["per_hop"], report["per_request"]
    return "\n".join([
        "# Job routing facts: cost of the per-hop tag",
        "",
        f"In-process, {report['messages']} calls per round ({report['messages'] // 10} for the signature form), "
        f"{where_measured(report)}. Job header "
        f"{report['job_header_bytes']} B; the tag adds {report['tag_header_bytes']['mac']} B (MAC) or "
        f"{report['tag_header_bytes']['sig']} B (signature).",
        "",
        "| per hop | µs |",
        "|---|---:|",
        f"| decode the job header (`JobV1.from_headers`, paid before) | {hop['decode_us']} |",
        f"| MAC tag (sender) | {hop['mac_tag_us']} |",
        f"| MAC verify (receiver) | {hop['mac_verify_us']} |",
        f"| signature tag (cross-site sender without the receiver's key) | {hop['sig_tag_us']} |",
        f"| signature verify | {hop['sig_verify_us']} |",
        "",
        f"Per request on the one-site path ({req['hops']} tagged hops, all MAC): **{req['added_us']} µs** added, "
        f"{req['added_to_decode']}x what decoding the job header at those hops costs ({req['decode_us']} µs).",
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    return in_process_main(argv, __doc__, "job_facts", measure, markdown, default=5000)


if __name__ == "__main__":
    raise SystemExit(main())
