import json

import pytest

from din.shared.credentials import (
    CredentialRefusal,
    InvalidCredential,
    Presented,
    TenantVerifier,
    issue_token,
    read_credentials,
    request_proof,
    token_tenant,
    write_credentials,
)

SECRET = "11" * 32


def _flip_last(text: str) -> str:
    return text[:-1] + ("e" if text[-1] == "f" else "f")


def test_a_fresh_token_verifies():
    TenantVerifier({"acme": SECRET}).verify("acme", issue_token("acme", SECRET, now=1000.0), now=1001.0)


@pytest.mark.parametrize(
    "presented",
    [
        None,
        "",
        "garbage",
        issue_token("acme", "22" * 32, now=1000.0),
        issue_token("acme", SECRET, ttl_s=10, now=1000.0),
        issue_token("globex", SECRET, now=1000.0),
        _flip_last(issue_token("acme", SECRET, now=1000.0)),
        issue_token("acme", SECRET, now=1000.0).replace(".", ":", 1),
    ],
)
def test_forged_expired_or_foreign_tokens_are_refused(presented):
    verifier = TenantVerifier({"acme": SECRET, "globex": "33" * 32})
    with pytest.raises(InvalidCredential):
        verifier.verify("acme", presented, now=2000.0)


def test_credentials_file_keeps_existing_secrets_and_is_private(tmp_path):
    path = tmp_path / "credentials.json"
    first = write_credentials(path, ["acme", "globex"])
    second = write_credentials(path, ["acme", "globex", "initech"], existing=read_credentials(path))
    assert second["acme"] == first["acme"] and "initech" in second
    assert path.stat().st_mode & 0o777 == 0o600
    path.write_text("{not json")
    with pytest.raises(ValueError, match="credentials file"):
        read_credentials(path)


def test_a_token_with_non_ascii_characters_is_refused_not_a_crash():
    verifier = TenantVerifier({"acme": "00" * 32})
    token = issue_token("acme", "00" * 32)
    with pytest.raises(InvalidCredential):
        verifier.verify("acme", token[:-1] + "\u00e9")


TOKEN = issue_token("acme", SECRET, now=1000.0)
VERIFIER = TenantVerifier({"acme": SECRET, "globex": "33" * 32})
REPLY = "_INBOX.acme.cloud.abc.1"


def _verify(proof: str, **overrides) -> Presented:
    bound = {"model": "digits-small", "request_id": "r-1", "reply": REPLY, "bearer": False, **overrides}
    return VERIFIER.verify("acme", proof, 1001.0, **bound)


def test_a_proof_verifies_for_its_model_request_and_reply_only():
    proof = request_proof(TOKEN, "digits-small", "r-1", REPLY, now=1000.5)
    presented = _verify(proof)
    assert presented.nonce and presented.issued_s == 1000.5
    assert TOKEN not in proof and TOKEN.rsplit(".", 1)[1] not in proof, "the token's key never travels"
    for other in ({"model": "digits-large"}, {"request_id": "r-2"}, {"reply": "_INBOX.acme.cloud.abc.2"}):
        with pytest.raises(InvalidCredential) as caught:
            _verify(proof, **other)
        assert caught.value.reason is CredentialRefusal.SIGNATURE, other


def test_a_proof_for_any_reply_verifies_whatever_the_reply():
    proof = request_proof(TOKEN, "digits-small", "r-1", now=1000.5)
    assert _verify(proof, reply="_INBOX.whatever").nonce


@pytest.mark.parametrize(("proof", "reason"), [
    (request_proof(TOKEN, "digits-small", "r-1", REPLY, now=900.0), CredentialRefusal.STALE),
    (request_proof(TOKEN, "digits-small", "r-1", REPLY, now=1100.0), CredentialRefusal.STALE),
    (request_proof(issue_token("acme", SECRET, ttl_s=0.5, now=1000.0), "digits-small", "r-1", REPLY, now=1001.0),
     CredentialRefusal.EXPIRED),
    (request_proof(issue_token("acme", "22" * 32, now=1000.0), "digits-small", "r-1", REPLY, now=1001.0),
     CredentialRefusal.SIGNATURE),
    (request_proof(TOKEN, "digits-small", "r-1", REPLY, now=1001.0).replace(".r.", ".a.", 1),
     CredentialRefusal.SIGNATURE),
    (request_proof(TOKEN, "digits-small", "r-1", REPLY, now=1001.0).replace(".r.", ".x.", 1),
     CredentialRefusal.MALFORMED),
    ("din2.acme.99999999999999999999.1001000.r." + "0" * 64, CredentialRefusal.MALFORMED),
    ("din2.acme.1e9.1001000.r." + "0" * 64, CredentialRefusal.MALFORMED),
    (TOKEN, CredentialRefusal.BEARER),
    (None, CredentialRefusal.MISSING),
])
def test_stale_expired_forged_or_bare_credentials_are_refused_by_reason(proof, reason):
    with pytest.raises(InvalidCredential) as caught:
        _verify(proof)
    assert caught.value.reason is reason


def test_a_bare_token_is_accepted_only_when_bearer_tokens_are():
    assert _verify(TOKEN, bearer=True).nonce is None


def test_a_proof_names_its_tenant_and_a_non_token_is_sent_as_it_is():
    assert token_tenant(request_proof(TOKEN, "m", "r")) == "acme" == token_tenant(TOKEN)
    assert request_proof("not-a-token", "m", "r") == "not-a-token"


def test_the_token_proofs_bench_measures_every_step_and_writes_its_tables(tmp_path):
    from din.bench import token_proofs

    assert token_proofs.main(["--messages", "40", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "token_proofs.json").read_text())
    assert set(report["per_call"]) == {"bare_verify_us", "proof_make_us", "proof_verify_us", "single_use_us"}
    assert "single-use check" in (tmp_path / "token_proofs.md").read_text()
