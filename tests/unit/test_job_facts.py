"""A job's routing facts are vouched for at every hop: ``JobFacts`` tags the job header, the next hop verifies it.

No NATS: agents get their keys from ``KeyAuthority`` entries directly (``tests.unit.conftest``).
"""

from __future__ import annotations

import pytest

from din.shared.contracts.inference import RequestHeaders, SlaClass
from din.shared.envelope import InvalidToken, Reason
from din.shared.security import (
    JOB_TAG_HEADER,
    JobFacts,
    PayloadSecurity,
    check_binding,
    request_binding,
)
from din.shared.security.jobfacts import JOB_HEADER
from tests.support import make_job
from tests.unit.conftest import ACME, BRANCH, FACTORY, HUB
from tests.unit.test_security_rotation import deliver

REPLY = "_INBOX.acme.cloud.x"


@pytest.fixture
def facts(authority, agents):
    deliver(authority.publication(), agents)
    return {p: JobFacts(PayloadSecurity(agent), p.removeprefix("site-")) for p, agent in agents.items()
            if p in (HUB, FACTORY, BRANCH)}


def job_headers(**changes) -> dict[str, str]:
    job = make_job(request_id="r-1", tenant="acme", model="digits-small", deadline_ms=2_000_000_000_000,
                   reply_to=REPLY, received_ms=1.0, labels=["pii"])
    for name, value in changes.items():
        setattr(job, name, value)
    return job.to_headers()


def refused(reason: Reason, fn, *args) -> None:
    with pytest.raises(InvalidToken) as info:
        fn(*args)
    assert info.value.reason == reason


def test_a_hop_within_a_site_or_from_the_hub_is_tagged_with_the_receiving_sites_key(facts):
    within = facts[FACTORY].tag(job_headers(), "factory")
    assert within[JOB_TAG_HEADER].startswith(f"mac;{FACTORY};")
    assert facts[FACTORY].verify(within) == FACTORY
    from_hub = facts[HUB].tag(job_headers(), "branch")
    assert from_hub[JOB_TAG_HEADER].startswith(f"mac;{BRANCH};")
    assert facts[BRANCH].verify(from_hub) == BRANCH
    assert facts[HUB].signed == 0


def test_a_hop_whose_sender_lacks_the_receivers_key_is_signed_by_the_sending_site(facts):
    headers = facts[BRANCH].tag(job_headers(), "factory")
    assert headers[JOB_TAG_HEADER].startswith(f"sig;{BRANCH};")
    assert facts[FACTORY].verify(headers) == BRANCH
    assert facts[BRANCH].signed == 1


@pytest.mark.parametrize("change", [
    {"labels": []}, {"sla_class": SlaClass.BATCH}, {"deadline_ms": 4_000_000_000_000}, {"site_chosen": "branch"},
    {"tenant": "globex"}, {"reply_to": "_INBOX.globex.cloud.y"},
])
def test_any_change_to_the_facts_after_tagging_is_refused(facts, change):
    for sender, receiver in ((HUB, "cloud"), (BRANCH, "factory")):
        tagged = facts[sender].tag(job_headers(), receiver)
        forged = {**tagged, JOB_HEADER: job_headers(**change)[JOB_HEADER]}
        refused(Reason.BAD_TAG if tagged[JOB_TAG_HEADER].startswith("mac") else Reason.BAD_SIGNATURE,
                facts[sender if receiver == "cloud" else FACTORY].verify, forged)


def test_a_tag_for_another_site_does_not_open_here(facts):
    refused(Reason.WRONG_READER, facts[BRANCH].verify, facts[HUB].tag(job_headers(), "factory"))


def test_untagged_garbled_and_unknown_signers_are_refused_and_counted(facts):
    branch = facts[BRANCH]
    good = facts[HUB].tag(job_headers(), "branch")
    _, reader, version, tag = good[JOB_TAG_HEADER].split(";")
    cases = [
        (Reason.MALFORMED, job_headers()),
        (Reason.MALFORMED, {JOB_TAG_HEADER: good[JOB_TAG_HEADER]}),
        (Reason.MALFORMED, {**good, JOB_TAG_HEADER: "garbage"}),
        (Reason.MALFORMED, {**good, JOB_TAG_HEADER: f"mac;{reader};{version};é"}),
        (Reason.MALFORMED, {**good, JOB_TAG_HEADER: f"mac;{reader};{'9' * 400};{tag}"}),
        (Reason.MALFORMED, {**good, JOB_TAG_HEADER: f"mac;{reader};{version};{tag[:-4]}"}),
        (Reason.UNKNOWN_KEY, {**good, JOB_TAG_HEADER: f"mac;{reader};977;{tag}"}),
        (Reason.UNKNOWN_KEY, {**good, JOB_TAG_HEADER: f"sig;{ACME};{tag}"}),
        (Reason.UNKNOWN_KEY, {**good, JOB_TAG_HEADER: "sig;site-nowhere;abc"}),
        (Reason.MALFORMED, {**good, JOB_TAG_HEADER: f"sig;{HUB};not-a-signature"}),
    ]
    for reason, headers in cases:
        refused(reason, branch.verify, headers)
    assert branch.detail()["job_refused"] == str(len(cases))
    assert branch.detail()["job_refused_malformed"] == "7"


def test_a_tenant_cannot_vouch_for_a_job(facts, agents):
    tenant = JobFacts(PayloadSecurity(agents[ACME]), "cloud")
    headers = tenant.tag(job_headers(), "cloud")
    assert headers[JOB_TAG_HEADER].startswith(f"sig;{ACME};"), "a tenant holds no site key"
    refused(Reason.UNKNOWN_KEY, facts[HUB].verify, headers)


def test_a_revoked_sites_signature_is_refused(facts, agents):
    headers = facts[BRANCH].tag(job_headers(), "factory")
    agents[FACTORY].revoked = frozenset({BRANCH})
    refused(Reason.REVOKED, facts[FACTORY].verify, headers)


def test_option_headers_are_bound_by_the_clients_seal_and_left_to_the_job_header_after_admission():
    headers = {RequestHeaders.LABELS: "pii", RequestHeaders.SLA_CLASS: "batch", RequestHeaders.TOKEN: "t",
               RequestHeaders.CONTENT_TYPE: "application/json"}
    aad = request_binding("r-1", "acme", "digits-small", REPLY, headers)
    assert aad[RequestHeaders.LABELS] == "pii" and aad[RequestHeaders.SLA_CLASS] == "batch"
    assert RequestHeaders.TOKEN not in aad, "the token never travels on in the seal's clear AAD"
    assert aad != request_binding("r-1", "acme", "digits-small", REPLY, {**headers, RequestHeaders.LABELS: "x"})
    later_hop = request_binding("r-1", "acme", "digits-small", REPLY, {RequestHeaders.CONTENT_TYPE: "application/json"})
    check_binding(aad, later_hop)
    with pytest.raises(InvalidToken):
        check_binding({**aad, "rid": "r-2"}, later_hop)
