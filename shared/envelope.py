"""Envelope encryption for every payload that crosses the bus or lands in Kafka.

This is DIN's only door to ``cryptography.hazmat``; no other module imports it.
Like Fernet, the surface is small: ``seal`` / ``open`` a payload, rotate keys,
wrap keys for storage and distribution, sign and verify results. Every
authentication failure raises the same ``InvalidToken`` with the same message;
which check failed is kept in ``InvalidToken.reason`` for telemetry counters
only.

Keys
    Each principal (a site, a tenant, a service) has an ``Identity``: an X25519
    key pair for key agreement and an Ed25519 key pair for signing. Payloads
    are encrypted under a *data-encryption key* (DEK) that belongs to the
    *reader* (a site or a tenant) and carries a version. A ``Keyring`` holds
    DEKs by ``(reader, version)``: the current version seals, retired versions
    still open for a grace window, revoked principals are refused. A new version
    may be installed *pending* (it opens but does not seal) and activated later,
    so every holder can open it before anyone seals with it.

Distribution
    The key manager wraps a reader's DEK to each holder's X25519 public key
    (ephemeral ECDH + HKDF + AES-GCM) and signs the result with its Ed25519
    key (``wrap_dek_for``); the holder unwraps with its identity and the key
    manager's pinned public key (``unwrap_dek``). Identities are stored
    encrypted under a master key (``wrap_private`` / ``unwrap_private``).
    No private key or DEK crosses the bus in clear.

Wire format (version 1)
    A sealed message is a body plus ``Din-Env-*`` headers, all ASCII strings:

    ``Din-Env-V``       format version, ``"1"``
    ``Din-Env-Mode``    ``"aead"`` (AES-256-GCM, body = ciphertext || 16-byte tag)
                        or ``"mac"`` (integrity only: body = plaintext, HMAC-SHA256 in ``Din-Env-Tag``)
    ``Din-Env-Kv``      DEK version, decimal; ``"0"``: the pairwise key of sender and reader
    ``Din-Env-Sender``  sending principal
    ``Din-Env-Reader``  reader whose DEK sealed the message
    ``Din-Env-Ts``      sealing time, Unix epoch milliseconds, decimal
    ``Din-Env-Nonce``   96 random bits, base64url without padding
    ``Din-Env-Aad``     caller's routing metadata (request id, tenant, model...),
                        JSON with sorted keys and no spaces
    ``Din-Env-Tag``     ``"mac"`` mode only: HMAC-SHA256 tag, base64url without padding

    The associated data is the JSON (sorted keys, no spaces, ASCII) of every
    header above except ``Din-Env-Tag``, so changing or swapping any header
    between messages makes ``open`` fail. In ``"mac"`` mode the tag is
    ``HMAC-SHA256(mac_key, associated_data || 0x00 || plaintext)``.
    The AEAD and MAC keys are derived once per DEK with HKDF-SHA256, no salt,
    info ``b"din.envelope.v1/aead/"`` (or ``/mac/``) followed by one byte of reader
    length, the reader, and the version as 4 bytes big-endian; they are cached,
    so the hot path derives nothing.

Pairwise keys (``Din-Env-Kv: 0``)
    A payload meant for one reader only is sealed under the key that sender and
    reader share without anyone else: X25519 of the sender's private key and the
    reader's public key (static-static, as NaCl's box), through HKDF-SHA256 with
    info ``b"din.envelope.v1/pair"`` and both public keys in order, then per hour
    (``PAIR_EPOCH_S``, the epoch of ``Din-Env-Ts``) with info ``/pair-epoch`` and the
    epoch as 8 bytes big-endian; the reader derives it from its private key and the
    sender's public key, so the seal also proves the sender (``seal_pair`` /
    ``open_pair``, cached per peer in ``PairKeys``, so the hot path agrees on nothing).
    A pairwise message more than an epoch from the reader's clock is ``stale``. The reader is a principal, or
    an *answer key*: a key pair a client makes for its answers and sends bound in
    its request, so only that client opens them.

Limits
    A DEK is shared by the reader and everyone allowed to seal to it, so the
    AEAD proves "sealed by a holder of the reader's DEK", and the sender header
    is as honest as the holders. Where the origin itself must be proven, sign
    with ``sign_result``. Revoking a principal refuses its name at once; rotate
    (``grace_s=0``) every DEK it held to stop it from sealing under another name.
    Random 96-bit nonces bound each DEK to well under 2**32 messages: rotate long
    before that.
"""

from __future__ import annotations

import base64
import heapq
import hmac
import json
import os
import struct
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from din.shared.errors import DinError, ErrorCode
from din.shared.naming import token

__all__ = [
    "DEFAULT_GRACE_S",
    "DataKey",
    "Identity",
    "InstalledKey",
    "InvalidToken",
    "Keyring",
    "PAIR_EPOCH_S",
    "PAIR_KEY_VERSION",
    "PairKeys",
    "PathPolicy",
    "PublicIdentity",
    "Reason",
    "ReplayGuard",
    "SIGNATURE_HEADER",
    "SealRefused",
    "Sealed",
    "SiteIdentity",
    "open",
    "open_pair",
    "seal",
    "seal_pair",
    "sign_result",
    "unwrap_dek",
    "unwrap_private",
    "verify_result",
    "wrap_dek_for",
    "wrap_private",
]

FORMAT_VERSION = "1"
MODE_AEAD = "aead"
MODE_MAC = "mac"
PAIR_KEY_VERSION = "0"
"""``Din-Env-Kv`` of a payload sealed under the pairwise key of its sender and reader."""

H_VERSION = "Din-Env-V"
H_MODE = "Din-Env-Mode"
H_KEY_VERSION = "Din-Env-Kv"
H_SENDER = "Din-Env-Sender"
H_READER = "Din-Env-Reader"
H_TIMESTAMP = "Din-Env-Ts"
H_NONCE = "Din-Env-Nonce"
H_AAD = "Din-Env-Aad"
H_TAG = "Din-Env-Tag"
ENVELOPE_HEADERS = (H_VERSION, H_MODE, H_KEY_VERSION, H_SENDER, H_READER, H_TIMESTAMP, H_NONCE, H_AAD, H_TAG)
_AUTHENTICATED_HEADERS = ENVELOPE_HEADERS[:-1]
_ENVELOPE_HEADER_SET = frozenset(ENVELOPE_HEADERS)

SIGNATURE_HEADER = "Din-Sig"
"""Where a result's Ed25519 signature travels; excluded from what is signed."""

DEFAULT_GRACE_S = 3600.0
KEY_BYTES = 32
NONCE_BYTES = 12
_TAG_BYTES = 16
_LABEL = b"din.envelope.v1"

_WRAPPED_DEK_MAGIC = b"DINW\x01"
_WRAPPED_PRIVATE_MAGIC = b"DINP\x01"
_KIND_IDENTITY = 1
_KIND_SITE = 2


# --------------------------------------------------------------------------- errors


class Reason(StrEnum):
    """Why authentication failed. For telemetry counters only; never shown to a caller."""

    MALFORMED = "malformed"
    WRONG_READER = "wrong_reader"
    REVOKED = "revoked"
    UNKNOWN_KEY = "unknown_key"
    RETIRED_KEY = "retired_key"
    MODE_NOT_ALLOWED = "mode_not_allowed"
    BAD_TAG = "bad_tag"
    AAD_MISMATCH = "aad_mismatch"
    BAD_SIGNATURE = "bad_signature"
    STALE = "stale"
    REPLAY = "replay"
    WRONG_SITE = "wrong_site"


class InvalidToken(DinError):
    """A sealed message, wrapped key or signature could not be authenticated.

    Always the same code (``unauthenticated``) and the same message, whatever
    check failed, so a caller learns nothing about which part was wrong.
    ``reason`` says which check failed, for counters and never for replies.
    """

    MESSAGE = "message could not be authenticated"

    def __init__(self, reason: Reason = Reason.MALFORMED) -> None:
        super().__init__(ErrorCode.UNAUTHENTICATED, self.MESSAGE)
        self.reason = Reason(reason)


class SealRefused(DinError):
    """This process cannot seal: no current DEK for the reader, or a revoked sender or reader.

    A local configuration fault, not an attack, so the message names the cause.
    """

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.INTERNAL, message)


# --------------------------------------------------------------------------- encoding helpers


def _b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64d(text: str | bytes, length: int | None = None) -> bytes:
    """Strict base64url without padding; raises ``ValueError`` on anything else."""
    if isinstance(text, bytes):
        text = text.decode("ascii")
    raw = base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
    if _b64e(raw) != text or (length is not None and len(raw) != length):
        raise ValueError("not canonical base64url")
    return raw


_CANONICAL_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True)
"""Built once: ``json.dumps`` with options builds a new encoder per call, a measurable cost on the hot path."""


def _canonical(obj: Mapping[str, str]) -> bytes:
    return _CANONICAL_JSON.encode(obj).encode("ascii")


def _check_str_map(values: Mapping[str, str], what: str) -> dict[str, str]:
    result = dict(values)
    for key, value in result.items():
        if not isinstance(key, str) or not key or not isinstance(value, str):
            raise TypeError(f"{what} must map non-empty str keys to str values, got {key!r}: {value!r}")
    return result


def _hkdf(secret: bytes, info: bytes, *, salt: bytes | None = None) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=salt, info=info).derive(secret)


def _raw_public(key: X25519PublicKey | Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _raw_private(key: X25519PrivateKey | Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


def _name_bytes(name: str) -> bytes:
    raw = token(name, what="principal").encode("ascii")
    return bytes([len(raw)]) + raw


def _read_name(blob: bytes, offset: int) -> tuple[str, int]:
    length = blob[offset]
    end = offset + 1 + length
    if end > len(blob):
        raise ValueError("truncated")
    return token(blob[offset + 1 : end].decode("ascii"), what="principal"), end


# --------------------------------------------------------------------------- identities


@dataclass(frozen=True, slots=True)
class PublicIdentity:
    """The public half of an ``Identity``: safe to publish, pin and log."""

    name: str
    x25519: bytes = field(repr=False)
    ed25519: bytes = field(repr=False)

    def __post_init__(self) -> None:
        token(self.name, what="principal")
        if len(self.x25519) != 32 or len(self.ed25519) != 32:
            raise ValueError("public keys are 32 raw bytes each")

    def to_dict(self) -> dict[str, str]:
        """``{"name", "x25519", "ed25519"}`` with keys in base64url, for JSON documents."""
        return {"name": self.name, "x25519": _b64e(self.x25519), "ed25519": _b64e(self.ed25519)}

    @classmethod
    def from_dict(cls, data: Mapping[str, str]) -> PublicIdentity:
        """Inverse of ``to_dict``; raises ``ValueError`` on malformed input."""
        try:
            return cls(data["name"], _b64d(data["x25519"], 32), _b64d(data["ed25519"], 32))
        except (KeyError, TypeError) as exc:
            raise ValueError("malformed public identity") from exc


class Identity:
    """A principal's key pairs: X25519 for key agreement, Ed25519 for signing.

    Private keys never leave this object except through ``wrap_private``.
    """

    _kind = _KIND_IDENTITY
    __slots__ = ("name", "_x25519", "_ed25519", "_public")

    def __init__(self, name: str, x25519: X25519PrivateKey, ed25519: Ed25519PrivateKey) -> None:
        self.name = token(name, what="principal")
        self._x25519 = x25519
        self._ed25519 = ed25519
        self._public = PublicIdentity(
            self.name, _raw_public(x25519.public_key()), _raw_public(ed25519.public_key())
        )

    @classmethod
    def generate(cls, name: str) -> Identity:
        """Fresh random key pairs."""
        return cls(name, X25519PrivateKey.generate(), Ed25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, name: str, *, x25519: bytes, ed25519: bytes) -> Identity:
        """Rebuild from 32-byte raw private keys (fixed test vectors, or after unwrapping)."""
        return cls(
            name, X25519PrivateKey.from_private_bytes(x25519), Ed25519PrivateKey.from_private_bytes(ed25519)
        )

    @property
    def public(self) -> PublicIdentity:
        """The publishable half."""
        return self._public

    def sign(self, message: bytes) -> bytes:
        """Ed25519 signature (64 bytes) over ``message``."""
        return self._ed25519.sign(message)

    def agree(self, peer_x25519: bytes) -> bytes:
        """X25519 shared secret with a peer's 32-byte public key."""
        return self._x25519.exchange(X25519PublicKey.from_public_bytes(peer_x25519))

    def _private_bytes(self) -> bytes:
        return _raw_private(self._x25519) + _raw_private(self._ed25519)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class SiteIdentity(Identity):
    """The identity of one DIN site (its executors and gateways share it)."""

    _kind = _KIND_SITE
    __slots__ = ()

    @property
    def site(self) -> str:
        """The site name."""
        return self.name


_KINDS: dict[int, type[Identity]] = {_KIND_IDENTITY: Identity, _KIND_SITE: SiteIdentity}


def _master_aead(master_key: bytes) -> AESGCM:
    if not isinstance(master_key, bytes) or len(master_key) != KEY_BYTES:
        raise ValueError("master key must be 32 bytes")
    return AESGCM(_hkdf(master_key, _LABEL + b"/private-key-wrap"))


def wrap_private(identity: Identity, master_key: bytes) -> bytes:
    """Encrypt ``identity``'s private keys under a 32-byte master key, for storage.

    Layout: ``"DINP" 0x01 | kind | len(name) | name | nonce(12) | AES-GCM(x25519 || ed25519)``;
    everything before the nonce is associated data.
    """
    aead = _master_aead(master_key)
    header = _WRAPPED_PRIVATE_MAGIC + bytes([identity._kind]) + _name_bytes(identity.name)
    nonce = os.urandom(NONCE_BYTES)
    secret = identity._private_bytes()
    return header + nonce + aead.encrypt(nonce, secret, header)


def unwrap_private(wrapped: bytes, master_key: bytes) -> Identity:
    """Inverse of ``wrap_private``. Raises ``InvalidToken`` if it does not authenticate."""
    aead = _master_aead(master_key)
    try:
        if not wrapped.startswith(_WRAPPED_PRIVATE_MAGIC):
            raise ValueError("magic")
        cls = _KINDS[wrapped[len(_WRAPPED_PRIVATE_MAGIC)]]
        name, offset = _read_name(wrapped, len(_WRAPPED_PRIVATE_MAGIC) + 1)
        nonce = wrapped[offset : offset + NONCE_BYTES]
        body = wrapped[offset + NONCE_BYTES :]
        if len(nonce) != NONCE_BYTES or len(body) != 64 + _TAG_BYTES:
            raise ValueError("length")
        secret = aead.decrypt(nonce, body, wrapped[:offset])
    except (ValueError, KeyError, IndexError, TypeError, AttributeError, UnicodeDecodeError):
        raise InvalidToken(Reason.MALFORMED) from None
    except InvalidTag:
        raise InvalidToken(Reason.BAD_TAG) from None
    return cls.from_private_bytes(name, x25519=secret[:32], ed25519=secret[32:])


# --------------------------------------------------------------------------- data keys


@dataclass(frozen=True, slots=True)
class DataKey:
    """One version of a reader's data-encryption key. The key bytes never appear in ``repr``."""

    reader: str
    version: int
    key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        token(self.reader, what="reader")
        version = self.version
        if not isinstance(version, int) or isinstance(version, bool) or not 0 < version < 2**32:
            raise ValueError("version must be an int in 1..2**32-1")
        if not isinstance(self.key, bytes) or len(self.key) != KEY_BYTES:
            raise ValueError("a data key is 32 bytes")

    @classmethod
    def generate(cls, reader: str, version: int) -> DataKey:
        """A fresh random key."""
        return cls(reader, version, os.urandom(KEY_BYTES))


def _dek_context(reader: str, version: int) -> bytes:
    return _name_bytes(reader) + struct.pack(">I", version)


def wrap_dek_for(recipient: PublicIdentity, dek: DataKey, *, issuer: Identity) -> bytes:
    """Wrap ``dek`` so only ``recipient`` can read it, signed by ``issuer`` (the key manager).

    Ephemeral X25519 with the recipient's public key, HKDF-SHA256 (salt = ephemeral
    public || recipient public) to a wrapping key, AES-256-GCM over the 32 key bytes.
    Layout: ``"DINW" 0x01 | len(reader) | reader | version(4, BE) | ephemeral public(32)
    | nonce(12) | ciphertext(48) | Ed25519 signature(64)``. The signature covers
    everything before it plus the recipient's X25519 public key, so a blob cannot be
    redirected, relabelled as another reader or version, or forged by anyone but the issuer.
    """
    ephemeral = X25519PrivateKey.generate()
    ephemeral_public = _raw_public(ephemeral.public_key())
    shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(recipient.x25519))
    wrapping_key = _hkdf(shared, _LABEL + b"/dek-wrap", salt=ephemeral_public + recipient.x25519)
    header = _WRAPPED_DEK_MAGIC + _dek_context(dek.reader, dek.version) + ephemeral_public
    nonce = os.urandom(NONCE_BYTES)
    body = header + nonce + AESGCM(wrapping_key).encrypt(nonce, dek.key, header + recipient.x25519)
    return body + issuer.sign(body + recipient.x25519)


def unwrap_dek(identity: Identity, wrapped: bytes, *, issuer_public: PublicIdentity) -> DataKey:
    """Inverse of ``wrap_dek_for``, for the recipient. Raises ``InvalidToken`` on any failure."""
    own_public = identity.public.x25519
    try:
        if not wrapped.startswith(_WRAPPED_DEK_MAGIC) or len(wrapped) < 64:
            raise ValueError("magic")
        body, signature = wrapped[:-64], wrapped[-64:]
        Ed25519PublicKey.from_public_bytes(issuer_public.ed25519).verify(signature, body + own_public)
        reader, offset = _read_name(body, len(_WRAPPED_DEK_MAGIC))
        (version,) = struct.unpack(">I", body[offset : offset + 4])
        offset += 4
        ephemeral_public = body[offset : offset + 32]
        nonce = body[offset + 32 : offset + 32 + NONCE_BYTES]
        ciphertext = body[offset + 32 + NONCE_BYTES :]
        if len(ciphertext) != KEY_BYTES + _TAG_BYTES:
            raise ValueError("length")
        shared = identity.agree(ephemeral_public)
        wrapping_key = _hkdf(shared, _LABEL + b"/dek-wrap", salt=ephemeral_public + own_public)
        key = AESGCM(wrapping_key).decrypt(nonce, ciphertext, body[: offset + 32] + own_public)
        return DataKey(reader, version, key)
    except InvalidSignature:
        raise InvalidToken(Reason.BAD_SIGNATURE) from None
    except InvalidTag:
        raise InvalidToken(Reason.BAD_TAG) from None
    except (ValueError, IndexError, TypeError, struct.error, UnicodeDecodeError):
        raise InvalidToken(Reason.MALFORMED) from None


class InstalledKey:
    """One DEK version held by a ``Keyring``, with the AEAD and MAC keys derived from it once.

    ``accept_until`` is None while the version is current or pending, else the time after
    which ``open`` refuses it.
    """

    __slots__ = ("dek", "accept_until", "_aead", "_mac_key")

    def __init__(self, dek: DataKey) -> None:
        context = _dek_context(dek.reader, dek.version)
        self.dek = dek
        self.accept_until: float | None = None
        self._aead = AESGCM(_hkdf(dek.key, _LABEL + b"/aead/" + context))
        self._mac_key = _hkdf(dek.key, _LABEL + b"/mac/" + context)

    @property
    def version(self) -> int:
        return self.dek.version

    def encrypt(self, nonce: bytes, plaintext: bytes, associated: bytes) -> bytes:
        """AES-256-GCM: ciphertext || 16-byte tag."""
        return self._aead.encrypt(nonce, plaintext, associated)

    def decrypt(self, nonce: bytes, ciphertext: bytes, associated: bytes) -> bytes:
        """Inverse of ``encrypt``; raises ``InvalidToken`` (bad tag) if it does not authenticate."""
        try:
            return self._aead.decrypt(nonce, ciphertext, associated)
        except InvalidTag:
            raise InvalidToken(Reason.BAD_TAG) from None

    def mac(self, associated: bytes, plaintext: bytes) -> bytes:
        """HMAC-SHA256 over ``associated || 0x00 || plaintext`` (integrity-only mode)."""
        mac = hmac.new(self._mac_key, associated, "sha256")
        mac.update(b"\x00")
        mac.update(plaintext)
        return mac.digest()

    def verify_mac(self, associated: bytes, plaintext: bytes, tag: bytes) -> None:
        """Raise ``InvalidToken`` (bad tag) unless ``tag`` is the MAC of ``associated`` and ``plaintext``."""
        if not hmac.compare_digest(self.mac(associated, plaintext), tag):
            raise InvalidToken(Reason.BAD_TAG)


class Keyring:
    """DEKs by ``(reader, version)``: the current version seals, retired versions open for a grace window.

    ``clock`` returns Unix seconds (inject a fake one in tests); ``random`` makes
    nonces and new keys and exists only so tests can make known-answer vectors.
    Not thread-safe: use one per event loop or guard it.
    """

    def __init__(
        self,
        *,
        grace_s: float = DEFAULT_GRACE_S,
        clock: Callable[[], float] = time.time,
        random: Callable[[int], bytes] = os.urandom,
    ) -> None:
        if grace_s < 0:
            raise ValueError("grace_s must be >= 0")
        self.grace_s = grace_s
        self.clock = clock
        self.random = random
        self._entries: dict[tuple[str, int], InstalledKey] = {}
        self._current: dict[str, InstalledKey] = {}
        self._revoked: set[str] = set()

    def install(
        self, dek: DataKey, *, now: float | None = None, grace_s: float | None = None, activate: bool = True
    ) -> None:
        """Add a DEK (e.g. one from ``unwrap_dek``).

        A version newer than the reader's current one becomes current and the old
        current is retired at ``now`` (accepted for ``grace_s``, default the ring's).
        With ``activate=False`` a newer version is only *pending*: it opens messages
        but does not seal until ``activate`` (two-phase rotation: every holder can
        open a version before anyone seals with it). An older version is kept as
        already retired. Re-installing the same key is a no-op (or activates a
        pending one); a different key under an existing version raises ``ValueError``.
        """
        slot = (dek.reader, dek.version)
        existing = self._entries.get(slot)
        if existing is not None:
            if not hmac.compare_digest(existing.dek.key, dek.key):
                raise ValueError(f"a different key is installed as {dek.reader} v{dek.version}")
            if activate and existing.accept_until is None and self._current.get(dek.reader) is not existing:
                self.activate(dek.reader, dek.version, now=now, grace_s=grace_s)
            return
        entry = InstalledKey(dek)
        current = self._current.get(dek.reader)
        self._entries[slot] = entry
        if current is None or dek.version > current.dek.version:
            if activate:
                self.activate(dek.reader, dek.version, now=now, grace_s=grace_s)
        else:
            now = self.clock() if now is None else now
            entry.accept_until = now + (self.grace_s if grace_s is None else grace_s)

    def activate(
        self, reader: str, version: int, *, now: float | None = None, grace_s: float | None = None
    ) -> None:
        """Make installed ``version`` the one that seals for ``reader``.

        The previous current version is retired at ``now`` (accepted for ``grace_s``,
        default the ring's). Activating a version older than the current one, or one
        already retired, raises ``ValueError``; activating the current one is a no-op.
        """
        entry = self._entries[(reader, version)]
        current = self._current.get(reader)
        if current is entry:
            return
        if entry.accept_until is not None or (current is not None and version < current.dek.version):
            raise ValueError(f"{reader} v{version} is retired or older than the current version")
        now = self.clock() if now is None else now
        until = now + (self.grace_s if grace_s is None else grace_s)
        if current is not None:
            current.accept_until = until
        for (other_reader, other_version), other in self._entries.items():
            pending_older = other_reader == reader and other_version < version and other.accept_until is None
            if pending_older and other is not current:
                other.accept_until = until  # an older version still pending never gets to seal
        self._current[reader] = entry

    def rotate(self, reader: str, *, now: float | None = None, grace_s: float | None = None) -> int:
        """Make a fresh DEK current for ``reader`` and return its version.

        The previous version stays accepted by ``open`` for ``grace_s`` (default the
        ring's); pass ``grace_s=0`` to cut it off at once (after a compromise).
        """
        version = max(self.versions(token(reader, what="reader")), default=0) + 1
        self.install(DataKey(reader, version, self.random(KEY_BYTES)), now=now, grace_s=grace_s)
        return version

    def retire(
        self, reader: str, version: int, *, now: float | None = None, grace_s: float | None = None
    ) -> None:
        """Stop accepting ``version`` after ``grace_s``; it no longer seals even if it was current."""
        entry = self._entries[(reader, version)]
        if self._current.get(reader) is entry:
            del self._current[reader]
        now = self.clock() if now is None else now
        until = now + (self.grace_s if grace_s is None else grace_s)
        entry.accept_until = until if entry.accept_until is None else min(entry.accept_until, until)

    def prune(self, *, now: float | None = None) -> int:
        """Forget retired keys whose grace has passed; return how many were dropped."""
        now = self.clock() if now is None else now
        expired = [s for s, e in self._entries.items() if e.accept_until is not None and now > e.accept_until]
        for slot in expired:
            del self._entries[slot]
        return len(expired)

    def revoke(self, principal: str) -> None:
        """Refuse ``principal`` as sender and as reader from now on."""
        self._revoked.add(token(principal, what="principal"))

    def is_revoked(self, principal: str) -> bool:
        return principal in self._revoked

    def current_version(self, reader: str) -> int | None:
        """The version that seals for ``reader``, or None if it has none."""
        entry = self._current.get(reader)
        return None if entry is None else entry.dek.version

    def current_key(self, reader: str) -> DataKey:
        """The current DEK for ``reader``, for the key manager to wrap and distribute."""
        entry = self._current.get(reader)
        if entry is None:
            raise KeyError(reader)
        return entry.dek

    def get(self, reader: str, version: int) -> DataKey | None:
        """The DEK held as ``version`` of ``reader``, for the key manager to recover its state."""
        entry = self._entries.get((reader, version))
        return None if entry is None else entry.dek

    def versions(self, reader: str) -> list[int]:
        """All versions held for ``reader``, oldest first (current and retired)."""
        return sorted(v for r, v in self._entries if r == reader)

    def sealing_key(self, reader: str, *, sender: str) -> InstalledKey:
        """The key ``sender`` seals to ``reader`` with; raises ``SealRefused`` if either is revoked or ``reader``
        has no current version."""
        if reader in self._revoked or sender in self._revoked:
            raise SealRefused("sender or reader is revoked")
        entry = self._current.get(reader)
        if entry is None:
            raise SealRefused(f"no current data key for reader {reader!r}")
        return entry

    def opening_key(self, reader: str, version: int, *, sender: str, now: float | None = None) -> InstalledKey:
        """The key that opens ``version`` of ``reader`` from ``sender`` at ``now``; raises ``InvalidToken`` for a
        revoked party, an unknown version or one retired past its grace."""
        if reader in self._revoked or sender in self._revoked:
            raise InvalidToken(Reason.REVOKED)
        now = self.clock() if now is None else now
        entry = self._entries.get((reader, version))
        if entry is None:
            raise InvalidToken(Reason.UNKNOWN_KEY)
        if entry.accept_until is not None and now > entry.accept_until:
            raise InvalidToken(Reason.RETIRED_KEY)
        return entry


# --------------------------------------------------------------------------- replay


class ReplayGuard:
    """Refuses a message whose timestamp is outside ``window_s`` of now, or whose nonce was seen.

    Memory is bounded: nonces older than the window are evicted, and if more than
    ``max_entries`` are live the oldest are evicted. Anything at or before the
    newest evicted timestamp is refused from then on, so no replay ever slips
    through (at the cost of refusing late messages under a flood).
    """

    def __init__(
        self, window_s: float, clock: Callable[[], float] = time.time, *, max_entries: int = 100_000
    ) -> None:
        if window_s <= 0 or max_entries <= 0:
            raise ValueError("window_s and max_entries must be positive")
        self.window_s = window_s
        self.clock = clock
        self.max_entries = max_entries
        self._seen: set[str] = set()
        self._by_time: list[tuple[float, str]] = []
        self._floor = float("-inf")

    def __len__(self) -> int:
        return len(self._seen)

    def check(self, nonce: str, timestamp: float, *, now: float | None = None) -> None:
        """Record ``nonce`` sent at ``timestamp`` (Unix seconds) or raise ``InvalidToken``."""
        now = self.clock() if now is None else now
        self._evict(now - self.window_s)
        if abs(now - timestamp) > self.window_s or timestamp <= self._floor:
            raise InvalidToken(Reason.STALE)
        if nonce in self._seen:
            raise InvalidToken(Reason.REPLAY)
        self._seen.add(nonce)
        heapq.heappush(self._by_time, (timestamp, nonce))
        while len(self._seen) > self.max_entries:
            oldest, old_nonce = heapq.heappop(self._by_time)
            self._seen.discard(old_nonce)
            self._floor = max(self._floor, oldest)

    def release(self, nonce: str) -> None:
        """Forget ``nonce``: a message handed back for redelivery (a work-queue NAK) may arrive again.

        Only for a message this process authenticated and then gave back itself.
        """
        self._seen.discard(nonce)

    def _evict(self, horizon: float) -> None:
        # Raising the floor past every evicted timestamp keeps a caller whose clock
        # steps backwards from getting an evicted nonce accepted again.
        by_time = self._by_time
        while by_time and by_time[0][0] < horizon:
            oldest, old_nonce = heapq.heappop(by_time)
            self._seen.discard(old_nonce)
            self._floor = max(self._floor, oldest)


# --------------------------------------------------------------------------- seal / open


@dataclass(frozen=True, slots=True)
class Sealed:
    """A sealed payload: a body and its ``Din-Env-*`` headers.

    ``body`` is the ciphertext, or the plaintext in integrity-only mode. Header
    values are authenticated only once ``open`` has returned.
    """

    body: bytes
    headers: dict[str, str]

    def to_headers(self) -> dict[str, str]:
        """The envelope headers, ready for a NATS message or (encoded) a Kafka record."""
        return dict(self.headers)

    @classmethod
    def from_headers(
        cls, body: bytes, headers: Mapping[str, str | bytes] | Iterable[tuple[str, str | bytes]] | None
    ) -> Sealed:
        """Pick the ``Din-Env-*`` headers out of a message's headers (NATS dict or Kafka pairs).

        Other headers are ignored; values that are not ASCII raise ``InvalidToken``.
        """
        if isinstance(headers, Mapping):
            pairs = [(name, headers[name]) for name in ENVELOPE_HEADERS if name in headers]
        else:
            pairs = [(name, value) for name, value in (headers or ()) if name in _ENVELOPE_HEADER_SET]
        picked: dict[str, str] = {}
        for name, value in pairs:
            try:
                text = value.decode("ascii") if isinstance(value, bytes) else value
                if not text.isascii():
                    raise UnicodeError("not ASCII")
            except (UnicodeError, AttributeError):
                raise InvalidToken(Reason.MALFORMED) from None
            picked[name] = text
        return cls(bytes(body), picked)

    @property
    def key_version(self) -> int:
        return int(self.headers[H_KEY_VERSION])

    @property
    def sender(self) -> str:
        return self.headers[H_SENDER]

    @property
    def reader(self) -> str:
        return self.headers[H_READER]

    @property
    def timestamp(self) -> float:
        """Sealing time, Unix seconds."""
        return int(self.headers[H_TIMESTAMP]) / 1000

    @property
    def nonce(self) -> str:
        return self.headers[H_NONCE]

    @property
    def confidential(self) -> bool:
        return self.headers.get(H_MODE) == MODE_AEAD

    @property
    def aad(self) -> dict[str, str]:
        """The routing metadata bound to this message."""
        return json.loads(self.headers[H_AAD])


@dataclass(frozen=True, slots=True)
class PathPolicy:
    """Which message paths may travel integrity-only (plaintext visible, still authenticated).

    Everything is confidential unless named in ``integrity_only``, e.g. an executor's
    loopback path inside one trusted site. Sealers pass
    ``confidential=policy.confidential(path)``; openers pass
    ``allow_integrity_only=not policy.confidential(path)``.
    """

    integrity_only: frozenset[str] = frozenset()

    def confidential(self, path: str) -> bool:
        return path not in self.integrity_only


def _aad_header(aad: Mapping[str, str]) -> str:
    return _CANONICAL_JSON.encode(_check_str_map(aad, "aad"))


def seal(
    plaintext: bytes,
    *,
    reader: str,
    aad: Mapping[str, str],
    keyring: Keyring,
    sender: str,
    now: float | None = None,
    confidential: bool = True,
) -> Sealed:
    """Seal ``plaintext`` for ``reader`` under its current DEK.

    ``aad`` is the routing metadata to bind (request id, tenant, model...); it travels
    in clear in ``Din-Env-Aad``. With ``confidential=False`` the body stays plaintext
    and an HMAC-SHA256 tag authenticates it and the headers (trusted local paths only).
    Raises ``SealRefused`` if the reader has no current DEK or a party is revoked.
    """
    key = keyring.sealing_key(reader, sender=sender)
    token(sender, what="sender")
    now = keyring.clock() if now is None else now
    nonce = keyring.random(NONCE_BYTES)
    headers = {
        H_VERSION: FORMAT_VERSION,
        H_MODE: MODE_AEAD if confidential else MODE_MAC,
        H_KEY_VERSION: str(key.version),
        H_SENDER: sender,
        H_READER: reader,
        H_TIMESTAMP: str(int(now * 1000)),
        H_NONCE: _b64e(nonce),
        H_AAD: _aad_header(aad),
    }
    associated = _canonical(headers)
    if confidential:
        return Sealed(key.encrypt(nonce, plaintext, associated), headers)
    headers[H_TAG] = _b64e(key.mac(associated, plaintext))
    return Sealed(bytes(plaintext), headers)


def _parse(sealed: Sealed) -> tuple[dict[str, str], bytes, bytes | None, bytes]:
    """The authenticated headers, nonce, MAC tag (``mac`` mode) and associated data of ``sealed``."""
    headers = sealed.headers
    try:
        authenticated = {name: headers[name] for name in _AUTHENTICATED_HEADERS}
        mode = authenticated[H_MODE]
        version_text = authenticated[H_KEY_VERSION]
        ts_text = authenticated[H_TIMESTAMP]
        if (
            authenticated[H_VERSION] != FORMAT_VERSION
            or mode not in (MODE_AEAD, MODE_MAC)
            or not (version_text.isascii() and version_text.isdigit())
            or not (ts_text.isascii() and ts_text.isdigit())
        ):
            raise ValueError("header")
        nonce = _b64d(authenticated[H_NONCE], NONCE_BYTES)
        tag = _b64d(headers[H_TAG], 32) if mode == MODE_MAC else None
        return authenticated, nonce, tag, _canonical(authenticated)
    except (KeyError, ValueError, TypeError, AttributeError, UnicodeError):
        raise InvalidToken(Reason.MALFORMED) from None


def _unseal(
    sealed: Sealed, key: InstalledKey, authenticated: dict[str, str], nonce: bytes, tag: bytes | None,
    associated: bytes, *, now: float, expected_aad: Mapping[str, str] | None, replay_guard: ReplayGuard | None,
    allow_integrity_only: bool,
) -> bytes:
    if authenticated[H_MODE] == MODE_AEAD:
        plaintext = key.decrypt(nonce, sealed.body, associated)
    else:
        key.verify_mac(associated, sealed.body, tag)
        if not allow_integrity_only:
            raise InvalidToken(Reason.MODE_NOT_ALLOWED)
        plaintext = sealed.body
    if expected_aad is not None and authenticated[H_AAD] != _aad_header(expected_aad):
        raise InvalidToken(Reason.AAD_MISMATCH)
    if replay_guard is not None:
        replay_guard.check(authenticated[H_NONCE], int(authenticated[H_TIMESTAMP]) / 1000, now=now)
    return plaintext


def open(  # noqa: A001 - the Fernet-like name is the point; use as ``envelope.open``
    sealed: Sealed,
    *,
    keyring: Keyring,
    expected_reader: str,
    now: float | None = None,
    expected_aad: Mapping[str, str] | None = None,
    replay_guard: ReplayGuard | None = None,
    allow_integrity_only: bool = False,
) -> bytes:
    """Authenticate and return the plaintext of ``sealed``, or raise ``InvalidToken``.

    Refused: a tampered body or header, a message for another reader, an unknown
    key version or one retired past its grace, a revoked sender or reader, an
    integrity-only message where confidentiality is required, routing metadata
    other than ``expected_aad`` (when given), and a stale or replayed message
    (when a ``replay_guard`` is given; checked only after authentication, so
    forgeries cannot fill it). A pairwise-sealed message opens only with ``open_pair``.
    """
    authenticated, nonce, tag, associated = _parse(sealed)
    reader = authenticated[H_READER]
    if reader != expected_reader:
        raise InvalidToken(Reason.WRONG_READER)
    if authenticated[H_KEY_VERSION] == PAIR_KEY_VERSION:
        raise InvalidToken(Reason.UNKNOWN_KEY)
    now = keyring.clock() if now is None else now
    key = keyring.opening_key(reader, int(authenticated[H_KEY_VERSION]), sender=authenticated[H_SENDER], now=now)
    return _unseal(sealed, key, authenticated, nonce, tag, associated, now=now, expected_aad=expected_aad,
                   replay_guard=replay_guard, allow_integrity_only=allow_integrity_only)


PAIR_EPOCH_S = 3600
"""Pairwise keys roll every epoch of this many seconds (the epoch of a message is that of its ``Din-Env-Ts``):
a pair of sites seals under a new key each hour, and a pairwise message more than an epoch old or ahead does
not open (``stale``)."""


class PairKeys:
    """The pairwise keys of ``identity`` with its peers: the X25519 agreement made once per peer public key, a key
    derived from it per epoch, both kept for the ``max_peers`` most recent (answer keys come and go with clients)."""

    __slots__ = ("identity", "max_peers", "_shared", "_keys")

    def __init__(self, identity: Identity, *, max_peers: int = 4096) -> None:
        self.identity = identity
        self.max_peers = max_peers
        self._shared: dict[bytes, bytes] = {}
        self._keys: dict[tuple[bytes, int], InstalledKey] = {}

    def key(self, peer_x25519: bytes, epoch: int) -> InstalledKey:
        """The key this identity shares with the holder of ``peer_x25519`` in ``epoch``; ``InvalidToken`` for a
        bad public key."""
        key = self._keys.get((peer_x25519, epoch))
        if key is None:
            shared = self._shared.get(peer_x25519)
            if shared is None:
                try:
                    agreed = self.identity.agree(peer_x25519)
                except (ValueError, TypeError):
                    raise InvalidToken(Reason.MALFORMED) from None
                low, high = sorted((self.identity.public.x25519, peer_x25519))
                shared = _hkdf(agreed, _LABEL + b"/pair" + low + high)
                _bounded_put(self._shared, peer_x25519, shared, self.max_peers)
            key = InstalledKey(DataKey("pair", 1, _hkdf(shared, _LABEL + b"/pair-epoch" + struct.pack(">Q", epoch))))
            _bounded_put(self._keys, (peer_x25519, epoch), key, 2 * self.max_peers)
        return key


def _bounded_put(cache: dict, key, value, limit: int) -> None:
    if len(cache) >= limit:
        cache.pop(next(iter(cache)))
    cache[key] = value


def _epoch(seconds: float) -> int:
    return int(seconds // PAIR_EPOCH_S)


def seal_pair(
    plaintext: bytes,
    *,
    pairs: PairKeys,
    reader: str,
    reader_x25519: bytes,
    aad: Mapping[str, str],
    now: float | None = None,
    confidential: bool = True,
) -> Sealed:
    """Seal ``plaintext`` for ``reader`` (a principal, or the name an answer key goes by) under the key only the
    sender (``pairs.identity``) and the holder of ``reader_x25519`` can derive; otherwise like ``seal``."""
    sender = pairs.identity.name
    nonce = os.urandom(NONCE_BYTES)
    now = time.time() if now is None else now
    headers = {
        H_VERSION: FORMAT_VERSION,
        H_MODE: MODE_AEAD if confidential else MODE_MAC,
        H_KEY_VERSION: PAIR_KEY_VERSION,
        H_SENDER: sender,
        H_READER: token(reader, what="reader"),
        H_TIMESTAMP: str(int(now * 1000)),
        H_NONCE: _b64e(nonce),
        H_AAD: _aad_header(aad),
    }
    key = pairs.key(reader_x25519, _epoch(now))
    associated = _canonical(headers)
    if confidential:
        return Sealed(key.encrypt(nonce, plaintext, associated), headers)
    headers[H_TAG] = _b64e(key.mac(associated, plaintext))
    return Sealed(bytes(plaintext), headers)


def open_pair(
    sealed: Sealed,
    *,
    pairs: PairKeys,
    expected_reader: str,
    sender_x25519: Callable[[str], bytes | None],
    now: float | None = None,
    expected_aad: Mapping[str, str] | None = None,
    replay_guard: ReplayGuard | None = None,
    allow_integrity_only: bool = False,
) -> bytes:
    """Authenticate and return the plaintext of a payload ``seal_pair`` sealed for ``expected_reader`` (whose key
    ``pairs`` holds), or raise ``InvalidToken``. ``sender_x25519`` gives the public key of the named sender, None
    when it is unknown or may not send here (refused ``unknown_key``); otherwise refused like ``open``."""
    authenticated, nonce, tag, associated = _parse(sealed)
    if authenticated[H_READER] != expected_reader:
        raise InvalidToken(Reason.WRONG_READER)
    if authenticated[H_KEY_VERSION] != PAIR_KEY_VERSION:
        raise InvalidToken(Reason.UNKNOWN_KEY)
    peer = sender_x25519(authenticated[H_SENDER])
    if peer is None:
        raise InvalidToken(Reason.UNKNOWN_KEY)
    now = time.time() if now is None else now
    epoch = _epoch(int(authenticated[H_TIMESTAMP]) / 1000)
    if abs(epoch - _epoch(now)) > 1:
        raise InvalidToken(Reason.STALE)
    return _unseal(sealed, pairs.key(peer, epoch), authenticated, nonce, tag, associated, now=now,
                   expected_aad=expected_aad, replay_guard=replay_guard, allow_integrity_only=allow_integrity_only)


# --------------------------------------------------------------------------- result signatures


def _result_message(payload: bytes, headers: Mapping[str, str]) -> bytes:
    signed = _check_str_map({k: v for k, v in headers.items() if k != SIGNATURE_HEADER}, "headers")
    return _LABEL + b"/result\x00" + _canonical(signed) + b"\x00" + bytes(payload)


def sign_result(identity: Identity, payload: bytes, headers: Mapping[str, str]) -> str:
    """Ed25519 signature over ``payload`` and the canonical JSON of ``headers``, base64url.

    Sign the headers that matter (job, envelope), not whatever a broker adds; a
    ``Din-Sig`` key in ``headers`` is ignored, so the signature can be added to the
    same dict afterwards.
    """
    return _b64e(identity.sign(_result_message(payload, headers)))


def verify_result(
    public_key: PublicIdentity | bytes, payload: bytes, headers: Mapping[str, str], signature: str
) -> None:
    """Check ``signature`` over ``payload`` and ``headers``; raise ``InvalidToken`` if it is not valid.

    ``public_key`` is the signer's ``PublicIdentity`` or its raw 32-byte Ed25519 key.
    """
    raw = public_key.ed25519 if isinstance(public_key, PublicIdentity) else public_key
    try:
        key = Ed25519PublicKey.from_public_bytes(raw)
        key.verify(_b64d(signature, 64), _result_message(payload, headers))
    except InvalidSignature:
        raise InvalidToken(Reason.BAD_SIGNATURE) from None
    except (ValueError, TypeError, UnicodeError):
        raise InvalidToken(Reason.MALFORMED) from None
