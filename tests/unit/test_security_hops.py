"""Every hop of a request, sealed and checked, and every attack refused the same way (one code, one message).

Client (``DinClient.seal`` / ``open_answer``) -> admission (``RequestOpener``) ->
scheduler (open, ``check_binding``, re-seal to the site) -> executor (open, answer
sealed to the tenant and signed). No NATS: agents get their keys from
``KeyAuthority`` entries directly.
"""

from __future__ import annotations

import json

import pytest

from din.client import DinClient, DinRequestError, RefusedAnswer, confined
from din.services.admission.ingress import RequestOpener
from din.shared import envelope
from din.shared.contracts.inference import InferResponseV1, RequestHeaders, ServedByV1
from din.shared.envelope import InvalidToken, Reason, SealRefused
from din.shared.errors import ErrorCode
from din.shared.security import (
    ANSWER_FIELD,
    ANSWER_KEY_FIELD,
    ANSWER_PLAIN,
    AUDIT,
    SIGNER_HEADER,
    PayloadProtection,
    PayloadSecurity,
    TenantSites,
    check_binding,
    encode_answer_key,
    payload_size,
    request_binding,
    result_binding,
    seal_for_audit,
    seal_to_site,
    stage_binding,
    without_envelope,
)
from tests.unit.conftest import ACME, BRANCH, FACTORY, HUB, INITECH
from tests.unit.test_security_rotation import deliver

MODEL = "digits-small"
REPLY = "_INBOX.client.token1"


class StubNats:
    """Just enough of a NATS client for ``DinClient`` to build and check messages."""

    def new_inbox(self) -> str:
        return "_INBOX.client"


@pytest.fixture
def net(authority, agents):
    deliver(authority.publication(), agents)
    return {p: PayloadSecurity(agent) for p, agent in agents.items()}


def client_for(security: PayloadSecurity, tenant: str = "acme") -> DinClient:
    return DinClient(StubNats(), tenant, "token", security=security)


def request(client: DinClient, rid: str = "req-1", reply: str = REPLY, model: str = MODEL):
    body, headers = client.build({"input": [[0.5] * 4]}, request_id=rid)
    return client.seal(model, body, headers, reply)


def result_json(rid: str) -> bytes:
    return InferResponseV1(
        model_name=MODEL, model_version="1", id=rid, outputs=[],
        served_by=ServedByV1(site="factory", executor="factory-1", model=MODEL, model_version="1", degraded=False,
                             batch_size=1),
    ).model_dump_json().encode()


def answer(site: PayloadSecurity, rid: str, to: DinClient, tenant: str = "acme", confidential: bool = True):
    """A site's answer to a request of client ``to``: sealed to its answer key, signed by the site."""
    sealed = site.seal_answer(result_json(rid), answer_key=encode_answer_key(to._answer),
                              aad=result_binding(rid, tenant), confidential=confidential)
    return sealed.body, site.sign_answer(sealed.body, sealed.to_headers())


def refused(reason: Reason, fn, *args, **kwargs) -> InvalidToken:
    with pytest.raises(InvalidToken) as info:
        fn(*args, **kwargs)
    assert info.value.reason == reason
    assert info.value.code == ErrorCode.UNAUTHENTICATED
    assert info.value.message == InvalidToken.MESSAGE
    return info.value


def test_the_whole_path_sealed_hop_by_hop(net):
    client = client_for(net[ACME])
    body, headers = request(client)
    plain = json.loads(client.build({"input": [[0.5] * 4]}, request_id="x")[0])
    assert b"0.5" not in body and envelope.H_NONCE in headers

    opener = RequestOpener(net[HUB], max_payload=1 << 20)
    unsealed = opener.unseal("acme", MODEL, REPLY, headers, body)
    assert json.loads(unsealed.plaintext)["inputs"] == plain["inputs"]
    assert unsealed.protection == PayloadProtection.ENCRYPTED
    forward_body, forward_env = opener.forward(unsealed, request_id="req-1", tenant="acme", model=MODEL, reply=REPLY,
                                               passthrough={}, body=body)
    assert forward_body == body and forward_env == {k: v for k, v in headers.items() if k.startswith("Din-Env-")}

    # The scheduler (a separate process, with its own replay guard) opens, checks the job against the seal, re-seals.
    scheduler = PayloadSecurity(net[HUB].agent)
    passthrough = without_envelope({k: v for k, v in headers.items() if k.startswith(("Content-Type", "Din-Tensor"))})
    opened = scheduler.open_to_me(forward_body, forward_env, senders=lambda sender: sender == ACME)
    check_binding(opened.aad, request_binding("req-1", "acme", MODEL, REPLY, passthrough))
    job = scheduler.seal(opened.plaintext, reader=FACTORY, aad=opened.aad, confidential=False)
    assert job.body == opened.plaintext, "factory's dedicated link is integrity-only by policy"

    executor = net[FACTORY]
    at_site = executor.open(job.body, job.to_headers(), reader=FACTORY, allow_integrity=True)
    assert at_site.plaintext == unsealed.plaintext and not at_site.confidential

    result_body, result_headers = answer(executor, "req-1", client, confidential=True)
    result = client.open_answer("req-1", result_body, result_headers)
    assert result.signer == FACTORY and result.encrypted and result.response.id == "req-1"


def test_integrity_only_is_refused_where_the_policy_does_not_allow_it(net):
    client = client_for(net[ACME])
    mac_result = answer(net[BRANCH], "req-9", client, confidential=False)
    with pytest.raises(DinRequestError) as info:
        client.open_answer("req-9", *mac_result)
    assert info.value.error.code == ErrorCode.UNAUTHENTICATED
    assert net[ACME].refusals[Reason.MODE_NOT_ALLOWED.value] == 1
    assert client.open_answer("req-8", *answer(net[FACTORY], "req-8", client, confidential=False)).encrypted is False


def test_plaintext_ingress_only_for_tenants_the_policy_names(net, authority, agents):
    opener = RequestOpener(net[HUB], max_payload=1 << 20)
    refused(Reason.MALFORMED, opener.unseal, "acme", MODEL, REPLY, {}, b'{"inputs": []}')
    authority.policy = authority.policy.model_copy(update={"plaintext_ingress": ["acme"]})
    deliver([authority.policy_entry()], agents)
    unsealed = opener.unseal("acme", MODEL, REPLY, {}, b'{"inputs": []}')
    assert unsealed.protection == PayloadProtection.CLIENT_PLAINTEXT
    body, env = opener.forward(unsealed, request_id="r", tenant="acme", model=MODEL, reply=REPLY, passthrough={},
                               body=b'{"inputs": []}')
    assert b"inputs" not in body, "sealed at admission before it goes on"
    refused(Reason.WRONG_READER, net[FACTORY].open_to_me, body, env, senders=lambda sender: True)
    opened = PayloadSecurity(net[HUB].agent).open_to_me(body, env, senders=lambda sender: sender == HUB)
    assert opened.aad[ANSWER_FIELD] == ANSWER_PLAIN
    check_binding(opened.aad, request_binding("r", "acme", MODEL, REPLY, {}))


def test_every_attack_is_refused_with_one_code_and_counted(net, authority, agents, clock):
    client = client_for(net[ACME])
    hub = net[HUB]
    opener = RequestOpener(hub, max_payload=1 << 20)
    seen: list[InvalidToken] = []

    def attempt(reason: Reason, headers, body, *, tenant="acme", reply=REPLY):
        err = refused(reason, opener.unseal, tenant, MODEL, reply, headers, body)
        hub.refused(err)
        seen.append(err)

    body, headers = request(client, "req-1")
    other_body, other_headers = request(client, "req-2")
    flipped = body[:5] + bytes([body[5] ^ 1]) + body[6:]
    attempt(Reason.BAD_TAG, headers, flipped)                                   # tampered ciphertext
    attempt(Reason.BAD_TAG, {**other_headers, RequestHeaders.REQUEST_ID: "req-1",
                             **{k: v for k, v in headers.items() if k != "Din-Env-Aad"}}, other_body)  # swapped
    attempt(Reason.UNKNOWN_KEY, {**headers, "Din-Env-Kv": "99"}, body)         # a data key, not the pair's
    attempt(Reason.AAD_MISMATCH, headers, body, reply="_INBOX.attacker.1")      # answer redirected
    attempt(Reason.UNKNOWN_KEY, headers, body, tenant="initech")               # another tenant's request
    elsewhere = net[ACME].seal_to(b"{}", to=FACTORY, aad=request_binding("req-6", "acme", MODEL, REPLY, {}))
    attempt(Reason.WRONG_READER, {RequestHeaders.REQUEST_ID: "req-6", **elsewhere.to_headers()}, elsewhere.body)
    opener.unseal("acme", MODEL, REPLY, headers, body)                          # the genuine one, once
    attempt(Reason.REPLAY, headers, body)                                       # replayed
    attempt(Reason.MALFORMED, {RequestHeaders.REQUEST_ID: "req-3"}, b"{}")     # unsealed

    # Stale: sealed more than an epoch of the pairwise keys ago.
    old_body, old_headers = request(client, "req-4")
    clock.now += 2 * envelope.PAIR_EPOCH_S + 1
    attempt(Reason.STALE, old_headers, old_body)

    # Revoked: a tenant's requests are refused as soon as the key manager revokes it.
    initech = client_for(net[INITECH], "initech")
    by_initech, initech_headers = request(initech, "req-5")
    entries, _, _ = authority.revoke(INITECH)
    deliver(entries, agents)
    assert initech_headers[envelope.H_READER] == BRANCH, "initech's requests are opened at branch only"
    at_branch = RequestOpener(net[BRANCH], max_payload=1 << 20)
    error = refused(Reason.REVOKED, at_branch.unseal, "initech", MODEL, REPLY, initech_headers, by_initech)
    hub.refused(error)
    seen.append(error)

    assert {e.code for e in seen} == {ErrorCode.UNAUTHENTICATED}
    assert {str(e) for e in seen} == {InvalidToken.MESSAGE}
    assert {e.to_model("r").model_dump_json() for e in seen} == {seen[0].to_model("r").model_dump_json()}
    detail = hub.detail()
    assert detail["auth_refused"] == str(len(seen))
    for reason in ("bad_tag", "unknown_key", "aad_mismatch", "wrong_reader", "replay", "malformed", "stale",
                   "revoked"):
        assert int(detail[f"auth_refused_{reason}"]) >= 1, reason


def test_forged_or_misdirected_results_are_refused_by_the_client(net):
    client = client_for(net[ACME])
    body, headers = answer(net[FACTORY], "req-1", client)

    def rejected(reason: Reason, data, hdrs, rid="req-1"):
        before = client.security.refusals[reason.value]
        with pytest.raises(DinRequestError) as info:
            client.open_answer(rid, data, hdrs)
        assert info.value.error.code == ErrorCode.UNAUTHENTICATED
        assert info.value.error.message == InvalidToken.MESSAGE
        assert client.security.refusals[reason.value] == before + 1

    signature = headers[envelope.SIGNATURE_HEADER]
    forged = envelope._b64e(bytes([envelope._b64d(signature)[0] ^ 1]) + envelope._b64d(signature)[1:])
    rejected(Reason.BAD_SIGNATURE, body, {**headers, envelope.SIGNATURE_HEADER: forged})
    rejected(Reason.BAD_SIGNATURE, body, {**headers, SIGNER_HEADER: BRANCH})       # claims another site signed
    rejected(Reason.UNKNOWN_KEY, body, {**headers, SIGNER_HEADER: ACME})          # not a site at all
    rejected(Reason.BAD_SIGNATURE, body[:-1] + bytes([body[-1] ^ 1]), headers)    # tampered after signing
    rejected(Reason.AAD_MISMATCH, body, headers, rid="req-2")                     # another request's result
    rejected(Reason.MALFORMED, result_json("req-1"), {})                           # unsealed, unsigned
    # A tenant cannot read or accept another tenant's result, nor another client of the same tenant.
    initech = client_for(net[INITECH], "initech")
    with pytest.raises(DinRequestError):
        initech.open_answer("req-1", body, headers)
    with pytest.raises(RefusedAnswer):
        client_for(net[ACME]).open_answer("req-1", body, headers)
    # A result sealed to the tenant's data key (what any site that serves the tenant could open) is refused.
    dek_sealed = net[FACTORY].seal(result_json("req-1"), reader=ACME, aad=result_binding("req-1", "acme"))
    rejected(Reason.WRONG_READER, dek_sealed.body, net[FACTORY].sign_answer(dek_sealed.body, dek_sealed.to_headers()))
    # An error counts only when a site signed it for the reply subject it came on.
    error = b'{"error": {"code": "overloaded", "message": "m", "retriable": true, "status": 503}}'
    signed = net[FACTORY].sign_error(error, {"Din-Error": "overloaded"}, REPLY)
    with pytest.raises(DinRequestError) as info:
        client.open_answer("req-1", error, signed, reply=REPLY)
    assert info.value.error.code == ErrorCode.OVERLOADED and not isinstance(info.value, RefusedAnswer)
    for forged, headers_, reply in (
        (error, {"Din-Error": "overloaded"}, REPLY),                                   # unsigned
        (error, signed, REPLY + ".other"),                                             # another request's
        (error.replace(b"overloaded", b"forbidden_"), signed, REPLY),                  # tampered after signing
        (error, {**signed, SIGNER_HEADER: BRANCH}, REPLY),                             # claims another site
        (error, signed, None),                                                         # nothing to check it for
    ):
        with pytest.raises(RefusedAnswer) as info:
            client.open_answer("req-1", forged, headers_, reply=reply)
        assert info.value.error.code == ErrorCode.UNAUTHENTICATED
    assert client.open_answer("req-1", body, headers).signer == FACTORY


def test_a_result_from_a_site_that_may_not_serve_the_request_is_refused(net):
    client = client_for(net[ACME])
    assert client.security.agent.sites == TenantSites(
        frozenset({"cloud", "factory", "branch"}), frozenset({"factory"}),
        (("branch", "branch", "factory"), ("cloud", "cloud", "factory"), ("factory", "factory", "factory")), "cloud")
    assert net[INITECH].agent.sites == TenantSites(
        frozenset({"branch"}), frozenset({"branch"}),
        (("branch", "branch", "branch"), ("cloud", "branch", "branch"), ("factory", "branch", "branch")),
        "cloud"), "its own only: every request is opened at branch"
    sites = client.security.agent.sites
    assert (sites.entry(None), sites.entry("branch"), sites.entry("branch", sensitive=True)) == (
        "cloud", "branch", "factory"), "sensitive data is sealed for the admission that may open it"
    from_hub = answer(net[HUB], "req-1", client)
    assert client.open_answer("req-1", *from_hub).signer == HUB, "ordinary data: any site that serves acme"
    before = client.security.refusals[Reason.WRONG_SITE.value]
    with pytest.raises(RefusedAnswer):
        client.open_answer("req-1", *from_hub, sensitive=True)
    assert client.security.refusals[Reason.WRONG_SITE.value] == before + 1
    assert client.open_answer("req-1", *answer(net[FACTORY], "req-1", client), sensitive=True).signer == FACTORY
    initech = client_for(net[INITECH], "initech")
    with pytest.raises(RefusedAnswer):
        initech.open_answer("req-1", *answer(net[HUB], "req-1", initech, tenant="initech"))


@pytest.mark.parametrize(("headers", "confined_to_sensitive_sites"), [
    ({RequestHeaders.LABELS: "pii"}, True),
    ({RequestHeaders.LABELS: "blue, PII"}, True),
    ({RequestHeaders.LABELS: "blue"}, False),
    ({}, False),
    ({RequestHeaders.LABELS: "pii", RequestHeaders.SPLIT: "auto"}, False),
    ({RequestHeaders.LABELS: "pii", RequestHeaders.SPLIT: "none"}, True),
])
def test_which_requests_only_their_sensitive_sites_may_answer(headers, confined_to_sensitive_sites):
    assert confined(headers) is confined_to_sensitive_sites


def test_audit_seal_and_payload_size(net):
    sealed = seal_for_audit(net[HUB], b"tensor bytes", request_id="r", tenant="acme")
    assert sealed.reader == AUDIT and b"tensor bytes" not in sealed.body
    audit = net[AUDIT]
    assert audit.open(sealed.body, sealed.to_headers(), reader=AUDIT, replay=False).plaintext == b"tensor bytes"
    with pytest.raises(InvalidToken):
        net[FACTORY].open(sealed.body, sealed.to_headers(), reader=AUDIT)
    assert payload_size(sealed.body, sealed.to_headers()) == len(b"tensor bytes")
    assert payload_size(b"abc", {}) == 3
    mac = net[HUB].seal(b"abc", reader=FACTORY, aad={}, confidential=False)
    assert payload_size(mac.body, mac.to_headers()) == 3


def test_security_off_passes_payloads_through():
    off = PayloadSecurity(None)
    assert not off.enabled and off.detail()["security"] == "off"
    opener = RequestOpener(off, max_payload=10)
    unsealed = opener.unseal("acme", MODEL, REPLY, {}, b"{}")
    assert unsealed.protection == PayloadProtection.OFF
    assert opener.forward(unsealed, request_id="r", tenant="acme", model=MODEL, reply=REPLY, passthrough={},
                          body=b"{}") == (b"{}", {})
    client = client_for(off)
    body, headers = client.build({"input": [[1.0]]}, request_id="r")
    assert client.seal(MODEL, body, headers, REPLY) == (body, headers)
    assert client.open_answer("r", result_json("r"), {}).signer is None


def test_oversized_sealed_requests_are_refused_before_any_crypto(net):
    opener = RequestOpener(net[HUB], max_payload=8)
    body, headers = request(client_for(net[ACME]))
    with pytest.raises(Exception) as info:
        opener.unseal("acme", MODEL, REPLY, headers, body)
    assert getattr(info.value, "code", None) == ErrorCode.PAYLOAD_TOO_LARGE
    assert len(net[HUB].replay) == 0, "nothing was opened"


def test_seal_to_site_follows_the_policy_and_never_relaxes_sensitive_data(net):
    hub = net[HUB]
    aad = {"rid": "r", "tenant": "acme"}
    assert not seal_to_site(hub, b"x", site="factory", aad=aad).confidential
    assert seal_to_site(hub, b"x", site="factory", aad=aad, sensitive=True).confidential
    assert seal_to_site(hub, b"x", site="branch", aad=aad).confidential
    relaxed = seal_to_site(hub, b"x", site="factory", aad=aad)
    refused(Reason.MODE_NOT_ALLOWED, net[FACTORY].open, relaxed.body, relaxed.to_headers(), reader=FACTORY)
    assert net[FACTORY].open(relaxed.body, relaxed.to_headers(), reader=FACTORY, allow_integrity=True).plaintext == b"x"


def test_a_stage_hand_off_opens_only_as_the_stage_and_site_it_was_sealed_for(net):
    tensor = {"Din-Tensor-Name": "hidden_1", "Din-Tensor-Shape": "1,256", "Din-Tensor-Datatype": "FP32"}
    sent = stage_binding("req-1", "acme", 1, "cloud", REPLY, tensor, answer_key="k")
    handed = net[FACTORY].seal_to(b"\x01" * 1024, to=HUB, aad=sent)
    tail = PayloadSecurity(net[HUB].agent)
    opened = tail.open_to_me(handed.body, handed.to_headers(), senders=lambda sender: sender == FACTORY)
    check_binding(opened.aad, stage_binding("req-1", "acme", 1, "cloud", REPLY, tensor))
    for wrong in (stage_binding("req-1", "acme", 1, "branch", REPLY, tensor),
                  stage_binding("req-1", "acme", 0, "cloud", REPLY, tensor),
                  stage_binding("req-1", "acme", 1, "cloud", "_INBOX.thief", tensor),
                  stage_binding("req-1", "acme", 1, "cloud", REPLY, {**tensor, "Din-Tensor-Shape": "2,128"})):
        refused(Reason.AAD_MISMATCH, check_binding, opened.aad, wrong)
    corrupted = bytearray(handed.body)
    corrupted[10] ^= 0xFF
    refused(Reason.BAD_TAG, PayloadSecurity(net[HUB].agent).open_to_me, bytes(corrupted), handed.to_headers(),
            senders=lambda sender: True)
    refused(Reason.UNKNOWN_KEY, PayloadSecurity(net[HUB].agent).open_to_me, handed.body, handed.to_headers(),
            senders=lambda sender: sender == BRANCH)
    with pytest.raises(SealRefused):
        net[FACTORY].seal_to(b"state", to="site-nowhere", aad=sent)


def test_a_sites_keys_open_only_what_it_serves(net):
    """Least knowledge: the answer opens for the requesting client alone, a hand-off for the next stage's site
    alone, a hand-back for the scheduler's site alone; every other principal's keys open none of them."""
    client = client_for(net[ACME])
    body, headers = request(client)
    opened = net[HUB].open_to_me(body, headers, senders=lambda sender: sender == ACME)
    job = seal_to_site(net[HUB], opened.plaintext, site="branch", aad=opened.aad)
    at_branch = net[BRANCH].open(job.body, job.to_headers(), reader=BRANCH)
    answer_key = at_branch.aad[ANSWER_KEY_FIELD]
    result = net[BRANCH].seal_answer(result_json("req-1"), answer_key=answer_key, aad=result_binding("req-1", "acme"))
    hand_off = net[BRANCH].seal_to(b"hidden", to=FACTORY, aad=stage_binding(
        "req-1", "acme", 1, "factory", REPLY, {}, answer_key=answer_key))
    hand_back = net[BRANCH].seal_to(opened.plaintext, to=HUB, aad=opened.aad)
    signed = net[BRANCH].sign_answer(result.body, result.to_headers())
    assert client.open_answer("req-1", result.body, signed).signer == BRANCH
    sealed_for = {FACTORY: hand_off, HUB: hand_back}
    for principal, security in net.items():
        for reader, sealed in sealed_for.items():
            if principal == reader:
                continue
            with pytest.raises(InvalidToken):
                security.open_to_me(sealed.body, sealed.to_headers(), senders=lambda sender: True)
            for dek_reader in (ACME, FACTORY, HUB, BRANCH):
                with pytest.raises(InvalidToken):
                    security.open(sealed.body, sealed.to_headers(), reader=dek_reader, replay=False)
        with pytest.raises(InvalidToken):
            security.open_to_me(result.body, result.to_headers(), senders=lambda sender: True)
    with pytest.raises(RefusedAnswer):
        client_for(net[ACME]).open_answer("req-1", result.body, signed)
    assert net[FACTORY].open_to_me(hand_off.body, hand_off.to_headers(),
                                   senders=lambda sender: sender == BRANCH).plaintext == b"hidden"
    assert net[HUB].open_to_me(hand_back.body, hand_back.to_headers(),
                               senders=lambda sender: sender == BRANCH).plaintext == opened.plaintext


def test_the_per_hop_sealing_bench_compares_each_case_with_the_tenant_key(tmp_path):
    from din.bench import per_hop_sealing

    assert per_hop_sealing.main(["--messages", "20", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "per_hop_sealing.json").read_text())
    assert {(r["size"], r["case"]) for r in report["rows"]} == {
        (size, case) for size in per_hop_sealing.SIZES for case in ("tenant key", "answer key", "site pair")}
    assert all(r["ratio"] == 1.0 for r in report["rows"] if r["case"] == "tenant key")
    assert report["first_contact_us"] > 0


def test_a_client_seals_each_request_for_its_entry_sites_admission_alone(net):
    at_branch = DinClient(StubNats(), "acme", "token", security=net[ACME], site="branch")
    body, headers = request(at_branch)
    assert headers[envelope.H_READER] == BRANCH and request(client_for(net[ACME]))[1][envelope.H_READER] == HUB
    refused(Reason.WRONG_READER, RequestOpener(net[HUB], max_payload=1 << 20).unseal, "acme", MODEL, REPLY, headers,
            body)
    for principal, security in net.items():
        if principal != BRANCH:
            with pytest.raises(InvalidToken):
                security.open_to_me(body, headers, senders=lambda sender: True, replay=False)
    assert RequestOpener(net[BRANCH], max_payload=1 << 20).unseal("acme", MODEL, REPLY, headers, body).plaintext
