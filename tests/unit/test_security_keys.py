"""shared.security key files, holders and policy: who gets which key, and what is refused."""

from __future__ import annotations

import json
import stat

import pytest

from din.shared import envelope
from din.shared.envelope import InvalidToken, Reason
from din.shared.security import (
    AUDIT,
    KEYMANAGER,
    KEYSTORE_FILE,
    MASTER_KEY_FILE,
    OPERATOR,
    CryptoPolicy,
    KeyStore,
    Level,
    PrincipalKeys,
    SecuredServiceSettings,
    init_keys,
    key_file,
    key_holders,
    principals_of,
    read_entry,
    read_master_key,
    sign_entry,
    site_principal,
    tenant_principal,
    unlock_key,
)
from din.shared.topology import Topology
from tests.support import three_site_topology

TOPOLOGY = Topology.model_validate(three_site_topology("keys", {}, [
    {"name": "acme", "sensitive_sites": ["factory"]},
    {"name": "initech", "sensitive_sites": ["branch"], "always_sensitive": True},
]))


@pytest.fixture(scope="module")
def keys_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("keys")
    init_keys(path, TOPOLOGY)
    return path


def test_every_principal_gets_a_private_key_file_and_the_store_holds_all(keys_dir):
    store = KeyStore.load(keys_dir / KEYSTORE_FILE)
    assert set(store.publics) == set(principals_of(TOPOLOGY))
    assert store.kv_domain == "cloud"
    master = read_master_key(keys_dir / MASTER_KEY_FILE)
    for principal in principals_of(TOPOLOGY):
        assert store.identity(principal, master).public == store.publics[principal]
        path = key_file(keys_dir, principal)
        if principal == KEYMANAGER:
            assert not path.exists(), "only the key manager holds its identity, through the store"
            continue
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        keys = PrincipalKeys.load(path)
        assert keys.principal == principal
        assert keys.identity.public == store.publics[principal]
        assert keys.keymanager == store.publics[KEYMANAGER]
    for name in (MASTER_KEY_FILE, KEYSTORE_FILE):
        assert stat.S_IMODE((keys_dir / name).stat().st_mode) == 0o600


def test_private_keys_are_never_stored_in_clear(keys_dir):
    store = KeyStore.load(keys_dir / KEYSTORE_FILE)
    master = read_master_key(keys_dir / MASTER_KEY_FILE)
    texts = [p.read_text() for p in keys_dir.iterdir()]
    for principal in principals_of(TOPOLOGY):
        ident = store.identity(principal, master)
        for raw in (envelope._raw_private(ident._x25519), envelope._raw_private(ident._ed25519)):
            for spelling in (envelope._b64e(raw), raw.hex()):
                assert not any(spelling in text for text in texts), principal


def test_a_wrong_master_key_or_another_principals_unlock_key_opens_nothing(keys_dir):
    store = KeyStore.load(keys_dir / KEYSTORE_FILE)
    with pytest.raises(InvalidToken):
        store.identity(site_principal("cloud"), bytes(32))
    factory = json.loads(key_file(keys_dir, site_principal("factory")).read_text())
    branch = json.loads(key_file(keys_dir, site_principal("branch")).read_text())
    with pytest.raises(InvalidToken):
        envelope.unwrap_private(envelope._b64d(factory["identity"]), envelope._b64d(branch["unlock"]))
    assert unlock_key(b"m" * 32, "site-factory") != unlock_key(b"m" * 32, "site-branch")


def test_unusable_files_give_one_line_errors(tmp_path, keys_dir):
    with pytest.raises(ValueError, match="not found"):
        PrincipalKeys.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="not a usable DIN key file"):
        PrincipalKeys.load(bad)
    with pytest.raises(ValueError, match="not a usable DIN keystore"):
        KeyStore.load(bad)
    short = tmp_path / "short.key"
    short.write_text("AAAA\n")
    with pytest.raises(ValueError, match="32 bytes"):
        read_master_key(short)
    # A key file whose wrapped identity was swapped for another principal's is refused.
    doc = json.loads(key_file(keys_dir, site_principal("factory")).read_text())
    doc["principal"] = site_principal("branch")
    forged = tmp_path / "forged.json"
    forged.write_text(json.dumps(doc))
    with pytest.raises(ValueError):
        PrincipalKeys.load(forged)


def test_key_holders_follow_least_privilege():
    holders = key_holders(TOPOLOGY)
    hub = site_principal("cloud")
    assert holders[site_principal("factory")] == {site_principal("factory"), hub, KEYMANAGER}
    assert holders[site_principal("cloud")] == {hub, KEYMANAGER}
    # acme may run anywhere: every site seals its results.
    assert holders[tenant_principal("acme")] == {
        tenant_principal("acme"), hub, site_principal("factory"), site_principal("branch"), KEYMANAGER}
    # initech's data may only run at branch: factory never holds its key.
    assert site_principal("factory") not in holders[tenant_principal("initech")]
    assert holders[AUDIT] == {AUDIT, hub, KEYMANAGER}
    assert all(OPERATOR not in h for h in holders.values())
    revoked = key_holders(TOPOLOGY, revoked=[site_principal("branch"), KEYMANAGER])
    assert all(site_principal("branch") not in h and KEYMANAGER in h for h in revoked.values())


def test_crypto_policy_levels_and_what_it_refuses():
    default = CryptoPolicy()
    assert set(default.paths.values()) == {Level.ENCRYPTED}
    assert default.integrity_only_sites(TOPOLOGY) == []
    policy = CryptoPolicy(paths={"dedicated": "integrity", "local": "integrity"})
    assert policy.paths["vpn"] == Level.ENCRYPTED
    assert policy.integrity_only_sites(TOPOLOGY) == ["cloud", "factory"]
    with pytest.raises(ValueError, match="internet"):
        CryptoPolicy(paths={"internet": "integrity"})
    with pytest.raises(ValueError, match="unknown path type"):
        CryptoPolicy(paths={"satellite": "encrypted"})
    assert CryptoPolicy.model_validate_json(policy.model_dump_json()) == policy


def test_signed_entries_refuse_tampering_moving_and_other_issuers(keys_dir):
    store = KeyStore.load(keys_dir / KEYSTORE_FILE)
    issuer = store.identity(KEYMANAGER, read_master_key(keys_dir / MASTER_KEY_FILE))
    body = {"principals": ["site-branch"], "issued_ms": 5}
    value = sign_entry(issuer, "revoked", body)
    assert read_entry(value, "revoked", issuer.public) == body
    with pytest.raises(InvalidToken) as moved:
        read_entry(value, "policy", issuer.public)
    assert moved.value.reason == Reason.BAD_SIGNATURE
    tampered = value.replace(b"site-branch", b"site-bronch")
    with pytest.raises(InvalidToken):
        read_entry(tampered, "revoked", issuer.public)
    with pytest.raises(InvalidToken):
        read_entry(value, "revoked", store.publics[OPERATOR])
    with pytest.raises(InvalidToken) as garbage:
        read_entry(b"\xff{", "revoked", issuer.public)
    assert garbage.value.reason == Reason.MALFORMED


def test_secured_settings_need_a_key_file_unless_security_is_off(monkeypatch):
    class Settings(SecuredServiceSettings):
        model_config = {**SecuredServiceSettings.model_config, "env_prefix": "DIN_TESTSVC_"}

    base = {"DIN_NATS_URL": "nats://x:1", "DIN_KAFKA_BOOTSTRAP": "k:1", "DIN_SITE": "cloud"}
    for key, value in base.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("DIN_SECURITY", raising=False)
    with pytest.raises(ValueError, match="DIN_TESTSVC_KEY_FILE is required"):
        Settings()
    monkeypatch.setenv("DIN_SECURITY", "off")
    assert Settings().security is False
    monkeypatch.setenv("DIN_SECURITY", "on")
    monkeypatch.setenv("DIN_TESTSVC_KEY_FILE", "/keys/site-cloud.json")
    assert str(Settings().key_file) == "/keys/site-cloud.json"


def test_key_commands_must_be_signed_by_the_operator_fresh_and_once(keys_dir):
    from din.shared.contracts.keys import KeyAction
    from din.shared.envelope import ReplayGuard
    from din.shared.security import new_key_command, sign_key_command, verify_key_command

    operator = PrincipalKeys.load(key_file(keys_dir, OPERATOR))
    tenant = PrincipalKeys.load(key_file(keys_dir, tenant_principal("acme")))
    guard = ReplayGuard(60)
    command = new_key_command(KeyAction.REVOKE, principal="site-branch")
    body, headers = sign_key_command(operator, command)
    assert verify_key_command(body, headers, operator.identity.public, guard) == command
    with pytest.raises(InvalidToken) as replayed:
        verify_key_command(body, headers, operator.identity.public, guard)
    assert replayed.value.reason == Reason.REPLAY
    forged_body, forged_headers = sign_key_command(tenant, new_key_command(KeyAction.REVOKE, principal="site-cloud"))
    with pytest.raises(InvalidToken):
        verify_key_command(forged_body, forged_headers, operator.identity.public, guard)
    with pytest.raises(InvalidToken):
        verify_key_command(body.replace(b"site-branch", b"site-cloud!"), headers, operator.identity.public, guard)
    with pytest.raises(InvalidToken) as unsigned:
        verify_key_command(body, {}, operator.identity.public, guard)
    assert unsigned.value.reason == Reason.MALFORMED
    stale = new_key_command(KeyAction.STATUS).model_copy(update={"issued_ms": 1})
    with pytest.raises(InvalidToken) as old:
        verify_key_command(*sign_key_command(operator, stale), operator.identity.public, guard)
    assert old.value.reason == Reason.STALE
