"""Entries of the ``DIN_KEYS`` bucket: their names, and values signed by the key manager.

A value is ``{"body": <canonical JSON text>, "sig": <Ed25519 over body and key name>}``; each body carries
``issued_ms`` so an older value cannot replace a newer one.

A process that starts has no memory of what it saw before, so the bucket says itself what is current: after every
change the key manager writes the ``manifest`` entry (``Manifest``): every live entry's ``issued_ms``, the
revocation list, and the stream sequence the manifest itself is stored at (published with JetStream's
``Nats-Expected-Last-Sequence``, so the key manager knows that sequence before it signs). A manifest read at any
other sequence was re-published by someone else (an old one, or the current one moved) and is refused; an entry
older than the manifest lists, or absent from a manifest newer than it, is refused; revocations travel in every
manifest.

The bucket lives in the hub's JetStream domain; every other site's domain holds a mirror of it (``KeysMirror``),
a stream of the same name fed from the hub, so a process started at a site while its link to the hub is cut still
reads its keys there. A mirror carries the key manager's signed values unchanged: it cannot forge an entry.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

from din.shared import envelope
from din.shared.envelope import Identity, InvalidToken, PublicIdentity, Reason
from din.shared.naming import token

_ENTRY_HEADER = "Din-Keys-Entry"


class EntryKeys:
    """Names of the entries in the keys bucket, built from validated tokens."""

    REVOKED = "revoked"
    POLICY = "policy"
    MANIFEST = "manifest"

    @staticmethod
    def public(principal: str) -> str:
        """The entry holding ``principal``'s public identity."""
        return f"pub.{token(principal, what='principal')}"

    @staticmethod
    def sites(tenant: str) -> str:
        """The entry saying where tenant principal ``tenant``'s requests may be served (``TenantSites``)."""
        return f"sites.{token(tenant, what='tenant')}"

    @staticmethod
    def dek(holder: str, reader: str, version: int) -> str:
        """The entry holding ``version`` of ``reader``'s DEK, wrapped to ``holder``."""
        return f"dek.{token(holder, what='holder')}.{token(reader, what='reader')}.{int(version)}"


def keys_stream(bucket: str) -> str:
    """The JetStream stream behind key-value bucket ``bucket`` (nats.py's and the server's ``KV_`` convention)."""
    return f"KV_{bucket}"


async def watch_content(kv):
    """Watch every key of the bucket ``kv`` (nats.py's ``KeyValue``) from its current content on: the watcher and
    the stream sequence that content ends at (0: the bucket holds nothing). The content is all delivered once an
    entry at or past that sequence is: a watch delivers the last value of each key in sequence order.

    nats.py's own end-of-content marker (a ``None`` update) is not to be trusted: when the server delivers the
    entries before the watcher has read its consumer's info, the marker comes first, and whoever waited for it
    reads an empty bucket.
    """
    state = (await kv.status()).stream_info.state
    return await kv.watchall(), state.last_seq if state.messages else 0


class KeysMirror:
    """How a site's mirror of the keys bucket is fed: through the hub's JetStream API, from a durable consumer of
    the hub's stream kept for that site, whose messages the hub delivers on a subject only that site's leaf lets in.
    """

    @staticmethod
    def origin_api(hub: str) -> str:
        """The hub's JetStream API prefix, as a site's server reaches it over its leaf."""
        return f"$JS.{token(hub, what='hub')}.API"

    @staticmethod
    def consumer(site: str) -> str:
        """The durable consumer of the hub's keys stream that feeds ``site``'s mirror."""
        return f"MIRROR_{token(site, what='site')}"

    @staticmethod
    def deliver_subject(site: str, stream: str) -> str:
        """The subject the hub delivers ``site``'s mirror messages of ``stream`` on."""
        return f"$JS.M.{token(site, what='site')}.{token(stream, what='stream')}"


def _canonical(body: Mapping[str, object]) -> str:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def sign_entry(issuer: Identity, key: str, body: Mapping[str, object]) -> bytes:
    """A bucket value: ``body`` as canonical JSON, signed by ``issuer`` together with the entry's ``key``."""
    text = _canonical(body)
    signature = envelope.sign_result(issuer, text.encode("ascii"), {_ENTRY_HEADER: key})
    return json.dumps({"body": text, "sig": signature}).encode("ascii")


def read_entry(value: bytes, key: str, issuer: PublicIdentity) -> dict:
    """The body of a value written by ``sign_entry`` under ``key``; raises ``InvalidToken``."""
    try:
        doc = json.loads(value)
        text, signature = doc["body"], doc["sig"]
        if not isinstance(text, str) or not isinstance(signature, str):
            raise TypeError("entry")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise InvalidToken(Reason.MALFORMED) from None
    envelope.verify_result(issuer, text.encode("ascii", "replace"), {_ENTRY_HEADER: key}, signature)
    try:
        body = json.loads(text)
        if not isinstance(body, dict) or not isinstance(body.get("issued_ms"), int):
            raise TypeError("body")
    except (ValueError, TypeError):
        raise InvalidToken(Reason.MALFORMED) from None
    return body


def entry_issued_ms(value: bytes) -> int:
    """The ``issued_ms`` of a value its writer made with ``sign_entry`` (read without verifying: the writer's own)."""
    return int(json.loads(json.loads(value)["body"])["issued_ms"])


@dataclass(frozen=True)
class Manifest:
    """What the bucket holds as the key manager last wrote it: each live entry's ``issued_ms``, the revoked
    principals, and the stream sequence this manifest was written at (``seq``)."""

    issued_ms: int
    seq: int
    entries: Mapping[str, int]
    revoked: frozenset[str]

    def body(self) -> dict[str, object]:
        """The signed body of this manifest."""
        return {"issued_ms": self.issued_ms, "seq": self.seq, "entries": dict(sorted(self.entries.items())),
                "revoked": sorted(self.revoked)}

    def floor(self, key: str) -> int | None:
        """The oldest ``issued_ms`` of ``key`` still current (None: the manifest lists no such entry)."""
        return self.entries.get(key)


def sign_manifest(issuer: Identity, manifest: Manifest) -> bytes:
    """The ``manifest`` entry's value."""
    return sign_entry(issuer, EntryKeys.MANIFEST, manifest.body())


def read_manifest(value: bytes, revision: int | None, issuer: PublicIdentity) -> Manifest:
    """The manifest in ``value``, read at stream sequence ``revision``; raises ``InvalidToken`` when it does not
    verify or was stored at another sequence than the one it was signed for (``revision`` None: not checked, for
    a value not read from a stream)."""
    body = read_entry(value, EntryKeys.MANIFEST, issuer)
    try:
        entries = {str(k): int(v) for k, v in body["entries"].items()}
        manifest = Manifest(body["issued_ms"], int(body["seq"]), entries,
                            frozenset(str(p) for p in body["revoked"]))
    except (KeyError, TypeError, ValueError, AttributeError):
        raise InvalidToken(Reason.MALFORMED) from None
    if revision is not None and revision != manifest.seq:
        raise InvalidToken(Reason.REPLAY)
    return manifest
