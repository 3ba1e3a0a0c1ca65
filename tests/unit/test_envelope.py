"""shared.envelope: known answers, round trips, every refused attack, rotation, replay, wrapping.

The known-answer tests recompute the expected bytes with ``cryptography``
primitives directly from the documented wire format, so they check the
format, not just that the module agrees with itself.
"""

from __future__ import annotations

import ast
import hashlib
import hmac
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from din.shared import envelope
from din.shared.envelope import (
    PAIR_EPOCH_S,
    PAIR_KEY_VERSION,
    DataKey,
    Identity,
    InvalidToken,
    Keyring,
    PairKeys,
    PathPolicy,
    PublicIdentity,
    Reason,
    ReplayGuard,
    Sealed,
    SealRefused,
    SiteIdentity,
    open_pair,
    seal_pair,
)
from din.shared.errors import DinError, ErrorCode, error_reply
from tests.support import T0, ManualClock

# RFC 7748 section 6.1 (Alice) and RFC 8032 section 7.1 (TEST 1).
X25519_PRIVATE = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
X25519_PUBLIC = bytes.fromhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
ED25519_PRIVATE = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
ED25519_PUBLIC = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")

DEK_BYTES = bytes(range(32))
NONCE = bytes(range(100, 112))
AAD = {"request_id": "req-1", "tenant": "acme", "model": "resnet50"}

KAT_HEADERS = {
    "Din-Env-V": "1",
    "Din-Env-Mode": "aead",
    "Din-Env-Kv": "1",
    "Din-Env-Sender": "site-b",
    "Din-Env-Reader": "site-a",
    "Din-Env-Ts": "1700000000000",
    "Din-Env-Nonce": "ZGVmZ2hpamtsbW5v",
    "Din-Env-Aad": '{"model":"resnet50","request_id":"req-1","tenant":"acme"}',
}
# Pinned so an accidental wire-format change shows up even if both sides change together.
KAT_BODY_HEX = "52d5c8c3f181b1f0c151915be1b9972763a3721524d4ad249f"


class FixedRandom:
    """Hands out queued byte strings, then falls back to a counter: deterministic nonces and keys."""

    def __init__(self, *chunks: bytes) -> None:
        self.chunks = list(chunks)
        self.counter = 0

    def __call__(self, n: int) -> bytes:
        if self.chunks:
            chunk = self.chunks.pop(0)
            assert len(chunk) == n
            return chunk
        self.counter += 1
        return hashlib.sha256(self.counter.to_bytes(8, "big")).digest()[:n]


def _hkdf(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def _context(reader: str, version: int) -> bytes:
    return bytes([len(reader)]) + reader.encode() + version.to_bytes(4, "big")


def _canonical(obj: dict[str, str]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def ring(clock: ManualClock) -> Keyring:
    """One ring shared by sender and reader (as after DEK distribution), keys for site-a and site-b."""
    kr = Keyring(grace_s=60, clock=clock)
    kr.rotate("site-a")
    kr.rotate("site-b")
    return kr


def _seal(ring: Keyring, payload: bytes = b"tensor bytes", **kw) -> Sealed:
    args = {"reader": "site-a", "aad": AAD, "keyring": ring, "sender": "site-b"} | kw
    return envelope.seal(payload, **args)


def _refused(reason: Reason, fn, *args, **kwargs) -> InvalidToken:
    with pytest.raises(InvalidToken) as info:
        fn(*args, **kwargs)
    err = info.value
    assert err.reason == reason
    assert str(err) == err.message == InvalidToken.MESSAGE
    assert err.code == ErrorCode.UNAUTHENTICATED
    assert reason.value not in str(err)
    # No chained cryptography exception hinting at the failed check.
    assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__)
    return err


# --------------------------------------------------------------------------- known answers


def test_identity_public_keys_match_rfc_vectors() -> None:
    ident = Identity.from_private_bytes("site-a", x25519=X25519_PRIVATE, ed25519=ED25519_PRIVATE)
    assert ident.public.x25519 == X25519_PUBLIC
    assert ident.public.ed25519 == ED25519_PUBLIC
    assert ident.public.name == "site-a"


def test_public_identity_serializes_and_round_trips() -> None:
    pub = Identity.from_private_bytes("site-a", x25519=X25519_PRIVATE, ed25519=ED25519_PRIVATE).public
    data = pub.to_dict()
    assert data == {
        "name": "site-a",
        "x25519": "hSDwCYkwp1R0i33ctD73Wg2_Og0mOBr066SpjqqbTmo",
        "ed25519": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo",
    }
    assert PublicIdentity.from_dict(data) == pub
    with pytest.raises(ValueError):
        PublicIdentity.from_dict({"name": "site-a", "x25519": data["x25519"]})
    with pytest.raises(ValueError):
        PublicIdentity.from_dict(data | {"x25519": data["x25519"][:-2]})


def _kat_ring() -> Keyring:
    kr = Keyring(clock=ManualClock(), random=FixedRandom(NONCE))
    kr.install(DataKey("site-a", 1, DEK_BYTES))
    return kr


def test_seal_known_answer_matches_documented_format() -> None:
    sealed = envelope.seal(
        b"hello DIN", reader="site-a", aad=AAD, keyring=_kat_ring(), sender="site-b", now=T0
    )
    assert sealed.headers == KAT_HEADERS
    # Independent recomputation from the module docstring's wire format.
    key = _hkdf(DEK_BYTES, b"din.envelope.v1/aead/" + _context("site-a", 1))
    expected = AESGCM(key).encrypt(NONCE, b"hello DIN", _canonical(KAT_HEADERS))
    assert sealed.body == expected
    assert sealed.body.hex() == KAT_BODY_HEX
    assert envelope.open(sealed, keyring=_kat_ring(), expected_reader="site-a", now=T0) == b"hello DIN"


def test_integrity_only_known_answer() -> None:
    sealed = envelope.seal(
        b"hello DIN", reader="site-a", aad=AAD, keyring=_kat_ring(), sender="site-b", now=T0,
        confidential=False,
    )
    headers = dict(KAT_HEADERS, **{"Din-Env-Mode": "mac"})
    mac_key = _hkdf(DEK_BYTES, b"din.envelope.v1/mac/" + _context("site-a", 1))
    tag = hmac.digest(mac_key, _canonical(headers) + b"\x00hello DIN", "sha256")
    assert sealed.body == b"hello DIN"
    assert sealed.headers == headers | {"Din-Env-Tag": envelope._b64e(tag)}


def test_sign_result_known_answer() -> None:
    ident = Identity.from_private_bytes("site-a", x25519=X25519_PRIVATE, ed25519=ED25519_PRIVATE)
    headers = {"Din-Job-V1": '{"request_id":"req-1"}', "Din-Env-Kv": "1"}
    signature = envelope.sign_result(ident, b"result", headers)
    message = b"din.envelope.v1/result\x00" + _canonical(headers) + b"\x00result"
    expected = Ed25519PrivateKey.from_private_bytes(ED25519_PRIVATE).sign(message)
    assert envelope._b64d(signature) == expected
    Ed25519PublicKey.from_public_bytes(ED25519_PUBLIC).verify(expected, message)


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("size", [1024, 16 * 1024, 256 * 1024])
@pytest.mark.parametrize("confidential", [True, False])
def test_round_trip(ring: Keyring, size: int, confidential: bool) -> None:
    payload = bytes((i * 7 + 3) % 256 for i in range(size))
    sealed = _seal(ring, payload, confidential=confidential)
    if confidential:
        assert len(sealed.body) == size + 16
        assert payload[:64] not in sealed.body
    else:
        assert sealed.body == payload
    # Through headers and back, as a NATS message would carry it.
    received = Sealed.from_headers(sealed.body, sealed.to_headers())
    opened = envelope.open(
        received, keyring=ring, expected_reader="site-a", expected_aad=AAD,
        allow_integrity_only=not confidential,
    )
    assert opened == payload
    assert received.aad == AAD
    assert received.sender == "site-b" and received.reader == "site-a" and received.key_version == 1
    assert received.timestamp == T0
    assert received.confidential is confidential


def test_every_message_gets_a_fresh_nonce(ring: Keyring) -> None:
    a, b = _seal(ring), _seal(ring)
    assert a.nonce != b.nonce
    assert a.body != b.body


def test_from_headers_reads_kafka_pairs_and_ignores_other_headers(ring: Keyring) -> None:
    sealed = _seal(ring)
    pairs = [("traceparent", b"00-abc"), *((k, v.encode()) for k, v in sealed.to_headers().items())]
    received = Sealed.from_headers(sealed.body, pairs)
    assert received.headers == sealed.headers
    assert envelope.open(received, keyring=ring, expected_reader="site-a") == b"tensor bytes"
    _refused(Reason.MALFORMED, Sealed.from_headers, sealed.body, {"Din-Env-Sender": "s\u00eftè"})
    _refused(Reason.MALFORMED, Sealed.from_headers, sealed.body, [("Din-Env-Ts", b"\xff")])


def test_sealing_derives_no_keys(ring: Keyring, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_derivation(*_a, **_k):
        raise AssertionError("key derivation on the hot path")

    monkeypatch.setattr(envelope, "_hkdf", no_derivation)
    sealed = _seal(ring)
    assert envelope.open(sealed, keyring=ring, expected_reader="site-a") == b"tensor bytes"


# --------------------------------------------------------------------------- attacks, one error


def _with_headers(sealed: Sealed, **changes: str | None) -> Sealed:
    headers = dict(sealed.headers)
    for name, value in changes.items():
        name = "Din-Env-" + name.replace("_", "-")
        if value is None:
            headers.pop(name)
        else:
            headers[name] = value
    return Sealed(sealed.body, headers)


def _flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


def test_tampered_ciphertext_is_refused(ring: Keyring) -> None:
    sealed = _seal(ring)
    for index in (0, len(sealed.body) // 2, len(sealed.body) - 1):  # data and tag
        _refused(Reason.BAD_TAG, envelope.open, Sealed(_flip(sealed.body, index), sealed.headers),
                 keyring=ring, expected_reader="site-a")
    _refused(Reason.BAD_TAG, envelope.open, Sealed(sealed.body[:-1], sealed.headers),
             keyring=ring, expected_reader="site-a")
    _refused(Reason.BAD_TAG, envelope.open, Sealed(sealed.body + b"\x00", sealed.headers),
             keyring=ring, expected_reader="site-a")


@pytest.mark.parametrize(
    ("header", "value"),
    [
        ("Sender", "site-c"),
        ("Ts", str(int(T0 * 1000) + 1)),
        ("Nonce", "AAAAAAAAAAAAAAAA"),
        ("Aad", '{"model":"resnet50","request_id":"req-2","tenant":"acme"}'),
        ("Aad", '{"model":"resnet50", "request_id":"req-1","tenant":"acme"}'),  # same meaning, other bytes
    ],
)
def test_changed_header_is_refused(ring: Keyring, header: str, value: str) -> None:
    sealed = _seal(ring)
    _refused(Reason.BAD_TAG, envelope.open, _with_headers(sealed, **{header: value}),
             keyring=ring, expected_reader="site-a")


def test_swapped_headers_between_messages_are_refused(ring: Keyring) -> None:
    first = _seal(ring, b"first", aad=AAD)
    second = _seal(ring, b"second", aad=AAD | {"request_id": "req-2"})
    _refused(Reason.BAD_TAG, envelope.open, Sealed(first.body, second.headers),
             keyring=ring, expected_reader="site-a")
    _refused(Reason.BAD_TAG, envelope.open, _with_headers(first, Aad=second.headers["Din-Env-Aad"]),
             keyring=ring, expected_reader="site-a")


def test_unknown_key_version_is_refused(ring: Keyring) -> None:
    sealed = _seal(ring)
    _refused(Reason.UNKNOWN_KEY, envelope.open, _with_headers(sealed, Kv="99"),
             keyring=ring, expected_reader="site-a")
    ring.rotate("site-a")
    _refused(Reason.BAD_TAG, envelope.open, _with_headers(sealed, Kv="2"),
             keyring=ring, expected_reader="site-a")
    fresh = Keyring(clock=ring.clock)
    _refused(Reason.UNKNOWN_KEY, envelope.open, sealed, keyring=fresh, expected_reader="site-a")


def test_message_for_another_reader_is_refused(ring: Keyring) -> None:
    sealed = _seal(ring)
    _refused(Reason.WRONG_READER, envelope.open, sealed, keyring=ring, expected_reader="site-b")
    # Relabelled so site-b would take it: site-b's own key does not authenticate it.
    _refused(Reason.BAD_TAG, envelope.open, _with_headers(sealed, Reader="site-b"),
             keyring=ring, expected_reader="site-b")


def test_unexpected_routing_metadata_is_refused(ring: Keyring) -> None:
    sealed = _seal(ring)
    _refused(Reason.AAD_MISMATCH, envelope.open, sealed, keyring=ring, expected_reader="site-a",
             expected_aad=AAD | {"tenant": "other"})
    opened = envelope.open(sealed, keyring=ring, expected_reader="site-a", expected_aad=dict(AAD))
    assert opened == b"tensor bytes"


@pytest.mark.parametrize(
    "changes",
    [
        {"V": None},
        {"Mode": None},
        {"Nonce": None},
        {"Aad": None},
        {"V": "2"},
        {"Mode": "none"},
        {"Kv": "-1"},
        {"Kv": "one"},
        {"Ts": "1.5"},
        {"Nonce": "ZGVmZ2hpamtsbW5"},  # 11 bytes
        {"Nonce": "ZGVmZ2hpamtsbW5v=="},  # padded
        {"Nonce": "ZGVmZ2hpamtsbW5+"},  # not base64url
        {"Kv": 1},  # not a string, as a careless caller might build it
    ],
)
def test_malformed_headers_are_refused(ring: Keyring, changes: dict[str, str | None]) -> None:
    _refused(Reason.MALFORMED, envelope.open, _with_headers(_seal(ring), **changes),
             keyring=ring, expected_reader="site-a")


def test_downgrade_to_integrity_only_is_refused(ring: Keyring) -> None:
    sealed = _seal(ring)
    _refused(Reason.MALFORMED, envelope.open, _with_headers(sealed, Mode="mac"),
             keyring=ring, expected_reader="site-a", allow_integrity_only=True)
    forged = _with_headers(sealed, Mode="mac", Tag=envelope._b64e(bytes(32)))
    _refused(Reason.BAD_TAG, envelope.open, forged, keyring=ring, expected_reader="site-a",
             allow_integrity_only=True)


def test_revoked_sender_and_reader_are_refused(ring: Keyring) -> None:
    sealed = _seal(ring)
    ring.revoke("site-b")
    assert ring.is_revoked("site-b")
    _refused(Reason.REVOKED, envelope.open, sealed, keyring=ring, expected_reader="site-a")
    with pytest.raises(SealRefused):
        _seal(ring)
    with pytest.raises(SealRefused):
        _seal(ring, reader="site-b", sender="site-a")
    to_b = _seal(ring, reader="site-a", sender="site-c")
    ring.revoke("site-a")
    _refused(Reason.REVOKED, envelope.open, to_b, keyring=ring, expected_reader="site-a")


def test_keyring_hands_out_the_sealing_and_opening_keys(ring: Keyring, clock: ManualClock) -> None:
    sealing = ring.sealing_key("site-a", sender="site-b")
    assert sealing.version == ring.current_version("site-a")
    associated = b"headers"
    box = sealing.encrypt(NONCE, b"payload", associated)
    opening = ring.opening_key("site-a", sealing.version, sender="site-b")
    assert opening.decrypt(NONCE, box, associated) == b"payload"
    _refused(Reason.BAD_TAG, opening.decrypt, NONCE, _flip(box, 0), associated)
    opening.verify_mac(associated, b"payload", sealing.mac(associated, b"payload"))
    _refused(Reason.BAD_TAG, opening.verify_mac, associated, b"payload!", sealing.mac(associated, b"payload"))
    _refused(Reason.UNKNOWN_KEY, ring.opening_key, "site-a", 99, sender="site-b")
    ring.rotate("site-a", grace_s=5)
    clock.advance(6)
    _refused(Reason.RETIRED_KEY, ring.opening_key, "site-a", sealing.version, sender="site-b")
    ring.revoke("site-b")
    with pytest.raises(SealRefused):
        ring.sealing_key("site-a", sender="site-b")
    _refused(Reason.REVOKED, ring.opening_key, "site-a", sealing.version + 1, sender="site-b")


def test_seal_and_open_use_only_the_keyrings_public_methods() -> None:
    tree = ast.parse(Path(envelope.__file__).read_text(encoding="utf-8"))
    functions = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
    for name in ("seal", "open"):
        private = sorted(
            f"{node.value.id}.{node.attr}" for node in ast.walk(functions[name])
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.attr.startswith("_")
        )
        assert private == [], f"envelope.{name} reaches into {private}"


def test_every_refusal_looks_the_same(ring: Keyring, clock: ManualClock) -> None:
    """Whatever check fails, the caller sees one code, one message, one reply."""
    signer = Identity.generate("site-a")
    guard = ReplayGuard(30, clock)
    sealed = _seal(ring)
    envelope.open(sealed, keyring=ring, expected_reader="site-a", replay_guard=guard)

    def at_a(message: Sealed, **kw):
        return lambda: envelope.open(message, keyring=ring, expected_reader="site-a", **kw)

    forged_signature = envelope.sign_result(signer, b"y", {})
    wrapped_private = envelope.wrap_private(signer, bytes(32))
    attempts = [
        (Reason.BAD_TAG, at_a(Sealed(_flip(sealed.body, 0), sealed.headers))),
        (Reason.UNKNOWN_KEY, at_a(_with_headers(sealed, Kv="9"))),
        (Reason.WRONG_READER, lambda: envelope.open(sealed, keyring=ring, expected_reader="site-b")),
        (Reason.REPLAY, at_a(sealed, replay_guard=guard)),
        (Reason.MALFORMED, at_a(_with_headers(sealed, V=None))),
        (Reason.MODE_NOT_ALLOWED, at_a(_seal(ring, confidential=False))),
        (Reason.BAD_SIGNATURE, lambda: envelope.verify_result(signer.public, b"x", {}, forged_signature)),
        (Reason.BAD_TAG, lambda: envelope.unwrap_private(wrapped_private, bytes([1]) * 32)),
    ]
    replies = set()
    for reason, attempt in attempts:
        with pytest.raises(InvalidToken) as info:
            attempt()
        assert info.value.reason == reason
        body, headers = error_reply(info.value, "req-1")
        replies.add((body, tuple(sorted(headers.items()))))
    assert len(replies) == 1
    model = InvalidToken(Reason.REPLAY).to_model()
    assert model.code == ErrorCode.UNAUTHENTICATED and model.status == 401 and not model.retriable
    assert isinstance(InvalidToken(), DinError)


# --------------------------------------------------------------------------- rotation


def test_rotation_accepts_old_version_within_grace_only(ring: Keyring, clock: ManualClock) -> None:
    old = _seal(ring)
    clock.advance(10)
    assert ring.rotate("site-a") == 2
    assert ring.current_version("site-a") == 2
    new = _seal(ring)
    assert new.key_version == 2 and old.key_version == 1

    clock.advance(60)  # exactly at the end of the grace window
    assert envelope.open(old, keyring=ring, expected_reader="site-a") == b"tensor bytes"
    clock.advance(0.001)
    _refused(Reason.RETIRED_KEY, envelope.open, old, keyring=ring, expected_reader="site-a")
    assert envelope.open(new, keyring=ring, expected_reader="site-a") == b"tensor bytes"

    assert ring.prune() == 1
    assert ring.versions("site-a") == [2]
    _refused(Reason.UNKNOWN_KEY, envelope.open, old, keyring=ring, expected_reader="site-a")


def test_explicit_now_overrides_the_clock(ring: Keyring) -> None:
    old = _seal(ring)
    ring.rotate("site-a", now=T0)
    assert envelope.open(old, keyring=ring, expected_reader="site-a", now=T0 + 59) == b"tensor bytes"
    _refused(Reason.RETIRED_KEY, envelope.open, old, keyring=ring, expected_reader="site-a", now=T0 + 61)


def test_rotation_with_zero_grace_cuts_off_at_once(ring: Keyring, clock: ManualClock) -> None:
    old = _seal(ring)
    ring.rotate("site-a", grace_s=0)
    clock.advance(0.001)
    _refused(Reason.RETIRED_KEY, envelope.open, old, keyring=ring, expected_reader="site-a")


def test_retire_stops_sealing_and_rotate_continues_numbering(ring: Keyring, clock: ManualClock) -> None:
    ring.retire("site-a", 1, grace_s=5)
    assert ring.current_version("site-a") is None
    with pytest.raises(SealRefused):
        _seal(ring)
    assert ring.rotate("site-a") == 2


def test_install_distributed_keys(clock: ManualClock) -> None:
    v1, v2 = DataKey("site-a", 1, bytes(32)), DataKey("site-a", 2, bytes([1]) * 32)
    reader = Keyring(grace_s=60, clock=clock)
    reader.install(v2)
    reader.install(v1)  # arrives late: kept, already retired
    assert reader.current_version("site-a") == 2
    assert reader.current_key("site-a") == v2
    reader.install(v2)  # idempotent
    with pytest.raises(ValueError):
        reader.install(DataKey("site-a", 2, bytes([2]) * 32))
    sender = Keyring(clock=clock)
    sender.install(v1)
    sealed = _seal(sender)
    assert envelope.open(sealed, keyring=reader, expected_reader="site-a") == b"tensor bytes"
    clock.advance(61)
    _refused(Reason.RETIRED_KEY, envelope.open, sealed, keyring=reader, expected_reader="site-a")


def test_seal_without_a_key_is_refused_locally() -> None:
    with pytest.raises(SealRefused) as info:
        _seal(Keyring())
    assert info.value.code == ErrorCode.INTERNAL
    with pytest.raises(TypeError):
        _seal(_kat_ring(), aad={"request_id": 1})


# --------------------------------------------------------------------------- replay


def test_replayed_message_is_refused(ring: Keyring, clock: ManualClock) -> None:
    guard = ReplayGuard(30, clock)
    sealed = _seal(ring)
    opened = envelope.open(sealed, keyring=ring, expected_reader="site-a", replay_guard=guard)
    assert opened == b"tensor bytes"
    _refused(Reason.REPLAY, envelope.open, sealed, keyring=ring, expected_reader="site-a", replay_guard=guard)
    clock.advance(31)
    _refused(Reason.STALE, envelope.open, sealed, keyring=ring, expected_reader="site-a", replay_guard=guard)


def test_forgeries_do_not_fill_the_replay_guard(ring: Keyring, clock: ManualClock) -> None:
    guard = ReplayGuard(30, clock)
    sealed = _seal(ring)
    _refused(Reason.BAD_TAG, envelope.open, Sealed(_flip(sealed.body, 0), sealed.headers),
             keyring=ring, expected_reader="site-a", replay_guard=guard)
    assert len(guard) == 0
    opened = envelope.open(sealed, keyring=ring, expected_reader="site-a", replay_guard=guard)
    assert opened == b"tensor bytes"


def test_replay_guard_window(clock: ManualClock) -> None:
    guard = ReplayGuard(30, clock)
    guard.check("a", T0 - 30)
    guard.check("b", T0 + 30)
    _refused(Reason.STALE, guard.check, "c", T0 - 30.5)
    _refused(Reason.STALE, guard.check, "d", T0 + 30.5)  # from the future beyond clock skew
    _refused(Reason.REPLAY, guard.check, "b", T0 + 30)


def test_replay_guard_evicts_old_entries(clock: ManualClock) -> None:
    guard = ReplayGuard(10, clock)
    for i in range(100):
        guard.check(f"n{i}", clock())
        clock.advance(1)
    assert len(guard) == 11
    _refused(Reason.STALE, guard.check, "n0", T0)
    # A caller whose clock steps back cannot get an evicted nonce accepted.
    _refused(Reason.STALE, guard.check, "n0", T0, now=T0 + 5)


def test_replay_guard_memory_is_bounded_without_letting_replays_through(clock: ManualClock) -> None:
    guard = ReplayGuard(60, clock, max_entries=3)
    for i in range(10):
        guard.check(f"n{i}", T0 + i / 10)
    assert len(guard) == 3
    for i in range(10):
        with pytest.raises(InvalidToken):
            guard.check(f"n{i}", T0 + i / 10)
    # n7..n9 are kept; everything at or before the newest evicted (n6) is refused.
    _refused(Reason.STALE, guard.check, "late-but-new", T0 + 0.55)
    _refused(Reason.STALE, guard.check, "late-but-new", T0 + 0.6)
    guard.check("late-but-new", T0 + 0.65)
    assert len(guard) == 3


# --------------------------------------------------------------------------- integrity-only mode


def test_integrity_only_leaves_plaintext_readable_and_detects_tampering(ring: Keyring) -> None:
    sealed = _seal(ring, b'{"prediction": 7}', confidential=False)
    assert sealed.body == b'{"prediction": 7}'
    assert not sealed.confidential
    ok = envelope.open(sealed, keyring=ring, expected_reader="site-a", allow_integrity_only=True)
    assert ok == b'{"prediction": 7}'
    _refused(Reason.BAD_TAG, envelope.open, Sealed(b'{"prediction": 8}', sealed.headers),
             keyring=ring, expected_reader="site-a", allow_integrity_only=True)
    _refused(Reason.BAD_TAG, envelope.open, _with_headers(sealed, Sender="site-c"),
             keyring=ring, expected_reader="site-a", allow_integrity_only=True)
    bad_tag = envelope._b64e(_flip(envelope._b64d(sealed.headers["Din-Env-Tag"]), 5))
    _refused(Reason.BAD_TAG, envelope.open, _with_headers(sealed, Tag=bad_tag),
             keyring=ring, expected_reader="site-a", allow_integrity_only=True)
    _refused(Reason.MALFORMED, envelope.open, _with_headers(sealed, Tag=None),
             keyring=ring, expected_reader="site-a", allow_integrity_only=True)
    # A path that requires confidentiality refuses it even when authentic.
    _refused(Reason.MODE_NOT_ALLOWED, envelope.open, sealed, keyring=ring, expected_reader="site-a")


def test_path_policy() -> None:
    policy = PathPolicy(integrity_only=frozenset({"site-local"}))
    assert policy.confidential("cross-site")
    assert not policy.confidential("site-local")
    assert PathPolicy().confidential("site-local")


# --------------------------------------------------------------------------- DEK distribution


def test_wrapped_dek_round_trip_and_use(clock: ManualClock) -> None:
    keymanager = Identity.generate("keymanager")
    site = SiteIdentity.generate("site-a")
    km_ring = Keyring(clock=clock)
    version = km_ring.rotate("site-a")
    dek = km_ring.current_key("site-a")
    wrapped = envelope.wrap_dek_for(site.public, dek, issuer=keymanager)
    assert dek.key not in wrapped
    got = envelope.unwrap_dek(site, wrapped, issuer_public=keymanager.public)
    assert got == dek and got.version == version
    site_ring = Keyring(clock=clock)
    site_ring.install(got)
    sealed = envelope.seal(b"x", reader="site-a", aad={}, keyring=km_ring, sender="keymanager")
    assert envelope.open(sealed, keyring=site_ring, expected_reader="site-a") == b"x"
    # Wrapping is randomized: two wraps of one key differ.
    assert envelope.wrap_dek_for(site.public, dek, issuer=keymanager) != wrapped


def test_wrapped_dek_refusals() -> None:
    keymanager = Identity.generate("keymanager")
    site, other = Identity.generate("site-a"), Identity.generate("site-b")
    dek = DataKey("site-a", 3, bytes(range(32)))
    wrapped = envelope.wrap_dek_for(site.public, dek, issuer=keymanager)
    _refused(Reason.BAD_SIGNATURE, envelope.unwrap_dek, other, wrapped, issuer_public=keymanager.public)
    _refused(Reason.BAD_SIGNATURE, envelope.unwrap_dek, site, wrapped, issuer_public=other.public)
    for index in range(0, len(wrapped), 7):
        with pytest.raises(InvalidToken):
            envelope.unwrap_dek(site, _flip(wrapped, index), issuer_public=keymanager.public)
    _refused(Reason.MALFORMED, envelope.unwrap_dek, site, wrapped[:40], issuer_public=keymanager.public)
    # Signed by the real key manager but wrapped by someone else's ephemeral key: the tag fails.
    forged_body = bytearray(wrapped[:-64])
    forged_body[-1] ^= 1
    resigned = bytes(forged_body) + keymanager.sign(bytes(forged_body) + site.public.x25519)
    _refused(Reason.BAD_TAG, envelope.unwrap_dek, site, resigned, issuer_public=keymanager.public)


# --------------------------------------------------------------------------- private keys at rest


def test_wrapped_private_key_round_trip() -> None:
    master = bytes(range(32, 64))
    site = SiteIdentity.from_private_bytes("site-a", x25519=X25519_PRIVATE, ed25519=ED25519_PRIVATE)
    wrapped = envelope.wrap_private(site, master)
    assert X25519_PRIVATE not in wrapped and ED25519_PRIVATE not in wrapped
    back = envelope.unwrap_private(wrapped, master)
    assert type(back) is SiteIdentity and back.site == "site-a"
    assert back.public == site.public
    signature = envelope.sign_result(back, b"p", {})
    envelope.verify_result(site.public, b"p", {}, signature)
    plain = envelope.unwrap_private(envelope.wrap_private(Identity.generate("keymanager"), master), master)
    assert type(plain) is Identity


def test_wrapped_private_key_refusals() -> None:
    master = bytes(range(32, 64))
    wrapped = envelope.wrap_private(Identity.generate("site-a"), master)
    _refused(Reason.BAD_TAG, envelope.unwrap_private, wrapped, bytes(32))
    renamed = wrapped.replace(b"site-a", b"site-b")
    _refused(Reason.BAD_TAG, envelope.unwrap_private, renamed, master)
    for index in range(len(wrapped)):
        with pytest.raises(InvalidToken):
            envelope.unwrap_private(_flip(wrapped, index), master)
    _refused(Reason.MALFORMED, envelope.unwrap_private, wrapped[:-1], master)
    with pytest.raises(ValueError):
        envelope.wrap_private(Identity.generate("site-a"), b"short")


def test_secrets_stay_out_of_repr() -> None:
    site = Identity.from_private_bytes("site-a", x25519=X25519_PRIVATE, ed25519=ED25519_PRIVATE)
    dek = DataKey("site-a", 1, DEK_BYTES)
    assert repr(site) == "Identity(name='site-a')"
    assert DEK_BYTES.hex() not in repr(dek) and repr(DEK_BYTES) not in repr(dek)


# --------------------------------------------------------------------------- result signatures


def test_result_signature_round_trip_and_refusals() -> None:
    site, other = Identity.generate("site-a"), Identity.generate("site-b")
    headers = {"Din-Job-V1": '{"request_id":"req-1"}', "Din-Env-Kv": "2"}
    signature = envelope.sign_result(site, b"logits", headers)
    envelope.verify_result(site.public, b"logits", headers, signature)
    envelope.verify_result(site.public.ed25519, b"logits", headers, signature)
    # The signature can ride in the same headers it signs.
    with_signature = headers | {envelope.SIGNATURE_HEADER: signature}
    envelope.verify_result(site.public, b"logits", with_signature, signature)

    _refused(Reason.BAD_SIGNATURE, envelope.verify_result, site.public, b"logitz", headers, signature)
    _refused(Reason.BAD_SIGNATURE, envelope.verify_result, site.public, b"logits",
             headers | {"Din-Env-Kv": "3"}, signature)
    _refused(Reason.BAD_SIGNATURE, envelope.verify_result, site.public, b"logits",
             headers | {"Din-Extra": "1"}, signature)
    _refused(Reason.BAD_SIGNATURE, envelope.verify_result, other.public, b"logits", headers, signature)
    forged = envelope._b64e(_flip(envelope._b64d(signature), 10))
    _refused(Reason.BAD_SIGNATURE, envelope.verify_result, site.public, b"logits", headers, forged)
    _refused(Reason.MALFORMED, envelope.verify_result, site.public, b"logits", headers, signature[:-4])
    # Payload and header boundary cannot be shifted.
    _refused(Reason.BAD_SIGNATURE, envelope.verify_result, site.public, b"",
             {"Din-Job-V1": '{"request_id":"req-1"}', "Din-Env-Kv": "2logits"}, signature)


def test_a_pairwise_seal_opens_for_its_reader_alone_and_proves_its_sender():
    alice, bob, eve = (PairKeys(Identity.generate(name)) for name in ("site-a", "site-b", "site-e"))
    publics = {p.identity.name: p.identity.public.x25519 for p in (alice, bob, eve)}
    sealed = seal_pair(b"secret", pairs=alice, reader="site-b", reader_x25519=publics["site-b"], aad={"rid": "r"})
    assert sealed.headers["Din-Env-Kv"] == PAIR_KEY_VERSION and b"secret" not in sealed.body
    assert open_pair(sealed, pairs=bob, expected_reader="site-b", sender_x25519=publics.get,
                     expected_aad={"rid": "r"}) == b"secret"
    for reason, pairs, reader, senders in (
        (Reason.WRONG_READER, eve, "site-e", publics.get),                    # another reader
        (Reason.BAD_TAG, eve, "site-b", publics.get),                          # eve claiming to be bob
        (Reason.UNKNOWN_KEY, bob, "site-b", lambda name: None),               # a sender bob does not accept
        (Reason.BAD_TAG, bob, "site-b", lambda name: publics["site-e"]),      # eve's key for alice's name
    ):
        with pytest.raises(InvalidToken) as info:
            open_pair(sealed, pairs=pairs, expected_reader=reader, sender_x25519=senders)
        assert info.value.reason == reason
    forged = Sealed(sealed.body, {**sealed.headers, "Din-Env-Sender": "site-e"})
    with pytest.raises(InvalidToken):
        open_pair(forged, pairs=bob, expected_reader="site-b", sender_x25519=publics.get)
    with pytest.raises(InvalidToken) as info:
        envelope.open(sealed, keyring=Keyring(), expected_reader="site-b")
    assert info.value.reason == Reason.UNKNOWN_KEY
    with pytest.raises(InvalidToken):
        seal_pair(b"x", pairs=alice, reader="site-b", reader_x25519=b"\x00" * 32, aad={})


def test_pairwise_keys_roll_each_epoch_and_a_message_an_epoch_away_is_stale():
    alice, bob = PairKeys(Identity.generate("site-a")), PairKeys(Identity.generate("site-b"))
    publics = {p.identity.name: p.identity.public.x25519 for p in (alice, bob)}
    assert alice.key(publics["site-b"], 7).encrypt(b"\x00" * 12, b"x", b"") != \
        alice.key(publics["site-b"], 8).encrypt(b"\x00" * 12, b"x", b"")
    t = T0
    sealed = seal_pair(b"m", pairs=alice, reader="site-b", reader_x25519=publics["site-b"], aad={}, now=t)
    for later, opens in ((0, True), (PAIR_EPOCH_S, True), (2 * PAIR_EPOCH_S + 1, False)):
        if opens:
            assert open_pair(sealed, pairs=bob, expected_reader="site-b", sender_x25519=publics.get,
                             now=t + later) == b"m"
        else:
            with pytest.raises(InvalidToken) as info:
                open_pair(sealed, pairs=bob, expected_reader="site-b", sender_x25519=publics.get, now=t + later)
            assert info.value.reason == Reason.STALE
