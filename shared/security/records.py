"""Signed records: every event DIN writes to Kafka carries its producer's signature, and readers check it.

Anyone who may write to a topic (a leaked Kafka login, a compromised broker admin) could otherwise plant
decisions, completions or recorded requests that ``din report``, ``din replay`` and telemetry would take as DIN's.
The event log (``shared.eventlog``) signs the records it sends with the producing process's Ed25519 identity, in
its background task (never on the request path), a batch at a time: each record's leaf hash covers the concrete
topic, the record key, its ``din-event-type``, its Kafka timestamp and its value; the leaves of a batch form a
Merkle tree whose root is signed once; each record's ``din-record-sig`` header is
``<signer>;<root signature>;<index>;<batch size>;<sibling hashes>``. One signature per batch keeps the cost per
record small exactly when records are many; a reader verifies a root once (``RecordVerifier`` caches it).

A reader accepts a record only when it is signed by a site (every DIN service runs as its site's principal), that
site is known and not revoked, and its path leads to a root the signature covers; anything else is skipped and
counted by ``RecordRefusal``, like a corrupt record. With security off nothing is signed and readers check nothing.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Mapping, Sequence
from enum import StrEnum

from din.shared import envelope
from din.shared.envelope import Identity, InvalidToken, PublicIdentity
from din.shared.eventlog import EVENT_TYPE_HEADER
from din.shared.security import b64url
from din.shared.security.agent import KeyAgent
from din.shared.security.principals import site_of

RECORD_SIG_HEADER = "din-record-sig"
_MAX_HEADER = 2048


class RecordRefusal(StrEnum):
    """Why a reader skipped a record."""

    UNSIGNED = "unsigned"
    MALFORMED = "malformed"
    UNKNOWN_SIGNER = "unknown_signer"
    """Signed by a principal the reader does not know, or by one that is not a site."""
    REVOKED = "revoked"
    BAD_SIGNATURE = "bad_signature"
    """The signature does not verify: the record was changed, moved to another topic or key, or forged."""


class ForgedRecord(Exception):
    """A record that did not verify (``reason``)."""

    def __init__(self, reason: RecordRefusal) -> None:
        super().__init__(reason.value)
        self.reason = reason


Leaf = tuple[str, bytes | None, bytes, int, bytes]
"""What a record's signature covers: topic, key, event type, Kafka timestamp (ms), value."""

_MAX_BATCH = 4096
_ROOT_CACHE = 4096


def _leaf(record: Leaf, signer: str) -> bytes:
    topic, key, type_name, timestamp_ms, value = record
    head = "\x00".join(("din-record-v1", signer, topic, (key or b"").hex(), type_name.decode("latin-1"),
                         str(int(timestamp_ms))))
    return hashlib.sha256(b"\x00" + head.encode("utf-8", "surrogateescape") + b"\x00" + value).digest()


def _parent(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _levels(leaves: list[bytes]) -> list[list[bytes]]:
    levels = [leaves]
    while len(levels[-1]) > 1:
        level = levels[-1]
        levels.append([_parent(level[i], level[i + 1]) if i + 1 < len(level) else level[i]
                       for i in range(0, len(level), 2)])
    return levels


def _path(levels: list[list[bytes]], index: int) -> list[bytes]:
    siblings = []
    for level in levels[:-1]:
        if index ^ 1 < len(level):
            siblings.append(level[index ^ 1])
        index //= 2
    return siblings


def merkle_root(leaf: bytes, index: int, size: int, siblings: list[bytes]) -> bytes:
    """The root a leaf at ``index`` of a batch of ``size`` leads to along ``siblings``; ``ValueError`` when the
    path does not fit the batch."""
    if not 0 <= index < size or size > _MAX_BATCH:
        raise ValueError("index outside the batch")
    node, rest = leaf, list(siblings)
    while size > 1:
        if index ^ 1 < size:
            if not rest:
                raise ValueError("path too short")
            sibling = rest.pop(0)
            node = _parent(sibling, node) if index & 1 else _parent(node, sibling)
        index //= 2
        size = (size + 1) // 2
    if rest:
        raise ValueError("path too long")
    return node


def _root_covered(signer: str) -> dict[str, str]:
    return {"record-batch": "v1", "signer": signer}


class RecordSigner:
    """Signs the records one process writes, as its principal, a batch at a time."""

    def __init__(self, identity: Identity) -> None:
        self.identity = identity

    def headers(self, records: list[Leaf]) -> list[tuple[str, bytes]]:
        """The ``din-record-sig`` header of each record of one batch (one signature for all)."""
        headers = []
        for first in range(0, len(records), _MAX_BATCH):
            headers += self._batch(records[first:first + _MAX_BATCH])
        return headers

    def header(self, topic: str, key: bytes | None, type_name: bytes, timestamp_ms: int,
               value: bytes) -> tuple[str, bytes]:
        """The ``din-record-sig`` header of one record signed alone."""
        return self._batch([(topic, key, type_name, timestamp_ms, value)])[0]

    def _batch(self, records: list[Leaf]) -> list[tuple[str, bytes]]:
        name = self.identity.name
        levels = _levels([_leaf(record, name) for record in records])
        signature = envelope.sign_result(self.identity, levels[-1][0], _root_covered(name))
        size = len(records)
        return [(RECORD_SIG_HEADER, f"{name};{signature};{i};{size};"
                 f"{b64url.encode(b''.join(_path(levels, i)))}".encode("ascii")) for i in range(size)]


def header_value(headers: Sequence[tuple[str, bytes]] | None, name: str) -> bytes | None:
    """The value of header ``name`` in a Kafka record's headers (the first one), or None."""
    for key, value in headers or ():
        if key == name:
            return value
    return None


class RecordVerifier:
    """Checks records read from Kafka against the producers' public identities; counts what it refuses."""

    def __init__(self, publics: Mapping[str, PublicIdentity], revoked: frozenset[str] | set[str] = frozenset(),
                 *, agent: KeyAgent | None = None, former: Sequence[Mapping[str, PublicIdentity]] = ()) -> None:
        self._publics = publics
        self._revoked = frozenset(revoked)
        self._agent = agent
        self.former = list(former)
        """Identities of earlier runs (each run has new keys; Kafka keeps their records)."""
        self.refused: Counter[RecordRefusal] = Counter()
        self._verified: dict[tuple[str, bytes, str], None] = {}

    @classmethod
    def of_agent(cls, agent: KeyAgent) -> RecordVerifier:
        """A verifier that reads the public identities and revocations ``agent`` holds at each check."""
        return cls({}, agent=agent)

    @property
    def publics(self) -> Mapping[str, PublicIdentity]:
        return self._agent.publics if self._agent is not None else self._publics

    @property
    def revoked(self) -> frozenset[str] | set[str]:
        return self._agent.revoked if self._agent is not None else self._revoked

    def check(self, record) -> str:
        """The site principal that signed ``record`` (an aiokafka ``ConsumerRecord``: topic, key, value, headers,
        timestamp); raises ``ForgedRecord``, counted."""
        try:
            return self._check(record)
        except ForgedRecord as refused:
            self.refused[refused.reason] += 1
            raise

    def _check(self, record) -> str:
        raw = header_value(record.headers, RECORD_SIG_HEADER)
        if raw is None:
            raise ForgedRecord(RecordRefusal.UNSIGNED)
        try:
            if len(raw) > _MAX_HEADER:
                raise ValueError("too long")
            signer, signature, index, size, path = raw.decode("ascii").split(";")
            siblings_raw = b64url.decode(path) if path else b""
            if len(siblings_raw) % 32:
                raise ValueError("path")
            siblings = [siblings_raw[i:i + 32] for i in range(0, len(siblings_raw), 32)]
            type_name = header_value(record.headers, EVENT_TYPE_HEADER) or b""
            leaf = _leaf((record.topic, record.key, type_name, record.timestamp, record.value or b""), signer)
            root = merkle_root(leaf, int(index), int(size), siblings)
        except (ValueError, UnicodeDecodeError):
            raise ForgedRecord(RecordRefusal.MALFORMED) from None
        candidates = [keys[signer] for keys in (self.publics, *self.former) if signer in keys]
        if not candidates or site_of(signer) is None:
            raise ForgedRecord(RecordRefusal.UNKNOWN_SIGNER)
        if signer in self.revoked:
            raise ForgedRecord(RecordRefusal.REVOKED)
        if (signer, root, signature) in self._verified:
            return signer
        for public in candidates:
            try:
                envelope.verify_result(public, root, _root_covered(signer), signature)
            except InvalidToken:
                continue
            if len(self._verified) >= _ROOT_CACHE:
                self._verified.pop(next(iter(self._verified)))
            self._verified[(signer, root, signature)] = None
            return signer
        raise ForgedRecord(RecordRefusal.BAD_SIGNATURE)

    def detail(self) -> dict[str, int]:
        """``records_refused_<reason>`` for every reason."""
        return {f"records_refused_{r.value}": self.refused[r] for r in RecordRefusal}
