import pytest

from din.shared.credentials import InvalidCredential, TenantVerifier, issue_token, read_credentials, write_credentials

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
