"""Who holds which key, how keys reach them, and how each hop of a request is sealed.

``shared.envelope`` is the crypto; this module wires it into DIN. It imports no
``cryptography.hazmat``: every primitive goes through ``shared.envelope``.

Principals
    ``site-<site>`` (a site's executors; the hub site's admission and scheduler),
    ``tenant-<tenant>`` (a tenant's clients), ``audit`` (reads recorded payloads),
    ``operator`` (signs key commands) and ``keymanager`` (the key authority).
    Each has an ``Identity`` (X25519 + Ed25519).

Key files (``init_keys``, run by ``din up`` and ``din keys init``)
    ``keys/master.key``      the key manager's 32-byte master key (mode 0600)
    ``keys/keystore.json``   every identity, its private keys wrapped under
                             ``unlock(master, principal)`` = HMAC-SHA256(master,
                             ``"din.keys.v1/unlock\\0" || principal``): the key manager's store
    ``keys/<principal>.json`` one principal's credentials (mode 0600): its wrapped
                             identity and unlock key, the key manager's public key
                             to pin, the bucket and JetStream domain. A service is
                             given only its own file, so it holds only its own identity.

Data keys (DEKs) and readers
    A payload is sealed to a *reader*; the reader's DEK (``shared.envelope.Keyring``)
    opens it. ``key_holders`` decides who receives each reader's DEK:
    ``site-<s>``: the site and the hub site (whose scheduler seals jobs to it);
    ``tenant-<t>``: the tenant, the hub site (admission opens requests, the
    scheduler re-seals them) and every site that may serve the tenant (it seals
    the result); ``audit``: the auditor and the hub site. The key manager holds
    every DEK too, wrapped to itself, so it recovers its state from the bucket.

The key-value bucket ``DIN_KEYS`` (JetStream at the hub site), every value signed by the key manager
    ``pub.<principal>``                  a public identity
    ``dek.<holder>.<reader>.<version>``  a DEK wrapped to ``holder`` (``wrap_dek_for``),
                                         with its state: pending, active, or retired at ``not_after``
    ``revoked``                          revoked principals
    ``policy``                           the per-path crypto policy, resolved per site
    A value is ``{"body": <canonical JSON text>, "sig": <Ed25519 over body and key name>}``;
    each body carries ``issued_ms`` so an older value cannot replace a newer one.
    Holders watch the bucket (``KeyAgent``) and install DEKs as they appear.

Rotation is two-phase: a new version is published *pending* (every holder can open
it), activated ``activation_delay_s`` later (holders seal with it), and the old
version is accepted until ``not_after`` (the grace window), so nothing in flight is lost.

Hops (wire headers: ``Din-Env-*`` from ``shared.envelope``; ``Din-Signer`` and ``Din-Sig`` on results)
    client -> admission      sealed to ``tenant-<t>`` by the tenant; AAD = ``request_binding``
                             (request id, tenant, model, reply subject, tensor headers).
                             Forwarded to classifier and scheduler as it is.
    scheduler -> executor    opened and re-sealed to ``site-<s>`` with the same AAD,
                             encrypted or, where the operator's policy allows for that
                             site's link, integrity-only (sensitive data is always encrypted).
    executor -> client       the result sealed to ``tenant-<t>`` (AAD ``result_binding``) and
                             signed by the site (Ed25519 over SHA-256 of the body and the
                             envelope headers); the client verifies, then opens.
    executor -> scheduler    a job handed back is re-sealed to ``tenant-<t>``.
    executor -> executor     a multi-stage job's intermediate tensor or decode state, sealed to
                             ``tenant-<t>`` (held only by sites that may serve the tenant, which already
                             hold it to seal results) with AAD ``stage_binding``: request, stage, the next
                             stage's site, reply subject, tensor headers; the receiving executor refuses
                             one bound to another site. Token stream chunks go to the client like results.
    Kafka                    payloads recorded for audit are sealed with ``seal_for_audit``.
    A tenant named in the policy's ``plaintext_ingress`` may send unsealed requests (raw
    NATS clients); admission seals them at once and the executor answers unsealed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import os
import secrets
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from pydantic import AliasChoices, BaseModel, Field, field_validator, model_validator

from shared import envelope
from shared.contracts.keys import KeyAction, KeyCommandV1
from shared.envelope import (
    Identity,
    InvalidToken,
    Keyring,
    PathPolicy,
    PublicIdentity,
    Reason,
    ReplayGuard,
    Sealed,
    SiteIdentity,
)
from shared.naming import token
from shared.settings import ServiceSettings
from shared.topology import PathType, Topology

log = logging.getLogger(__name__)

KEYS_BUCKET = "DIN_KEYS"
KEYMANAGER = "keymanager"
OPERATOR = "operator"
AUDIT = "audit"
SITE_PREFIX = "site-"
TENANT_PREFIX = "tenant-"

SIGNER_HEADER = "Din-Signer"
"""Principal that signed a result (``Din-Sig`` carries the signature)."""
ENVELOPE_PREFIX = "Din-Env-"
BOUND_HEADER_PREFIXES = ("Din-Tensor-", "Content-Type")
"""Request headers that change how the body is read: bound into the AAD."""
ANSWER_FIELD = "answer"
ANSWER_PLAIN = "plain"

KEY_FILE_FORMAT = "din.keys.principal.v1"
KEYSTORE_FORMAT = "din.keys.store.v1"
MASTER_KEY_FILE = "master.key"
KEYSTORE_FILE = "keystore.json"
AGENT_GRACE_S = 24 * 3600.0
"""A keyring's default grace; the key manager's ``not_after`` normally retires old versions much sooner."""
_UNLOCK_LABEL = b"din.keys.v1/unlock\x00"
_ENTRY_HEADER = "Din-Keys-Entry"
_AEAD_TAG_BYTES = 16


# --------------------------------------------------------------------------- principals


def site_principal(site: str) -> str:
    """The principal (and DEK reader) of a site."""
    return token(SITE_PREFIX + site, what="site principal")


def tenant_principal(tenant: str) -> str:
    """The principal (and DEK reader) of a tenant."""
    return token(TENANT_PREFIX + tenant, what="tenant principal")


def site_of(principal: str) -> str | None:
    """The site a ``site-<site>`` principal names, else None."""
    return principal[len(SITE_PREFIX):] if principal.startswith(SITE_PREFIX) else None


def serving_sites(topology: Topology, tenant: str) -> list[str]:
    """Sites that may run ``tenant``'s requests: its sensitive sites if all its data is sensitive, else every site."""
    spec = next(t for t in topology.tenants if t.name == tenant)
    if spec.always_sensitive and spec.sensitive_sites:
        return list(spec.sensitive_sites)
    return [s.name for s in topology.sites]


def principals_of(topology: Topology) -> list[str]:
    """Every principal of a network, key manager first."""
    return [
        KEYMANAGER,
        OPERATOR,
        AUDIT,
        *(site_principal(s.name) for s in topology.sites),
        *(tenant_principal(t.name) for t in topology.tenants),
    ]


def key_holders(topology: Topology, revoked: Iterable[str] = ()) -> dict[str, frozenset[str]]:
    """For each DEK reader, the principals that receive its DEK (least privilege; revoked ones left out)."""
    hub = site_principal(topology.hub.name)
    readers: dict[str, set[str]] = {}
    for site in topology.sites:
        readers[site_principal(site.name)] = {site_principal(site.name), hub}
    for tenant in topology.tenants:
        sites = {site_principal(s) for s in serving_sites(topology, tenant.name)}
        readers[tenant_principal(tenant.name)] = {tenant_principal(tenant.name), hub, *sites}
    readers[AUDIT] = {AUDIT, hub}
    gone = set(revoked) - {KEYMANAGER}
    return {reader: frozenset((holders - gone) | {KEYMANAGER}) for reader, holders in readers.items()}


# --------------------------------------------------------------------------- policy


class Level(StrEnum):
    """Assurance of a payload on one path. Results are signed at every level."""

    ENCRYPTED = "encrypted"
    INTEGRITY = "integrity"


class PayloadProtection(StrEnum):
    """What protected one request, as telemetry reports it (``CompletionV1.protection``)."""

    ENCRYPTED = "encrypted"
    INTEGRITY = "integrity"
    CLIENT_PLAINTEXT = "client-plaintext"
    OFF = "off"


LOCAL_PATH = "local"
"""The path key for a site's own link to itself (the hub's executors)."""


class CryptoPolicy(BaseModel):
    """The operator's per-path crypto policy: an assurance level per path type, and tenants allowed to send in clear.

    ``paths`` maps ``local`` (the hub's own site) and each topology path type
    (``dedicated``, ``vpn``, ``internet``) to ``encrypted`` or ``integrity``.
    Integrity-only (authenticated, readable) is allowed only where listed here and
    never on ``internet``; sensitive requests are encrypted whatever the path.
    """

    paths: dict[str, Level] = Field(
        default_factory=lambda: {p: Level.ENCRYPTED for p in (LOCAL_PATH, *PathType)},
        description="Assurance level per path type (local, dedicated, vpn, internet).",
    )
    plaintext_ingress: list[str] = Field(
        default_factory=list,
        description="Tenants whose unsealed requests admission accepts (raw NATS clients); answered unsealed.",
    )

    @field_validator("paths")
    @classmethod
    def _known_paths(cls, value: dict[str, Level]) -> dict[str, Level]:
        known = {LOCAL_PATH, *(p.value for p in PathType)}
        unknown = set(value) - known
        if unknown:
            raise ValueError(f"unknown path type {sorted(unknown)[0]!r}: use {', '.join(sorted(known))}")
        if value.get(PathType.INTERNET.value) == Level.INTEGRITY:
            raise ValueError("the internet path cannot be integrity-only: it is never a trusted segment")
        return {p: value.get(p, Level.ENCRYPTED) for p in sorted(known)}

    def level(self, path: PathType | None) -> Level:
        """The level of a path (None: a site's link to itself)."""
        return self.paths[LOCAL_PATH if path is None else path.value]

    def integrity_only_sites(self, topology: Topology) -> list[str]:
        """Sites whose link to the hub may carry integrity-only payloads."""
        hub = topology.hub.name
        return sorted(s.name for s in topology.sites if self.level(topology.path_between(hub, s.name)) == Level.INTEGRITY)


# --------------------------------------------------------------------------- key files


def _b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64d(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def unlock_key(master_key: bytes, principal: str) -> bytes:
    """The key a principal's identity is wrapped under, derived from the master key."""
    return hmac.digest(master_key, _UNLOCK_LABEL + token(principal, what="principal").encode("ascii"), "sha256")


def _write_secret(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.chmod(path, 0o600)


def read_master_key(path: Path) -> bytes:
    """The master key in ``path`` (base64url, 32 bytes); raises ``ValueError`` naming the file."""
    try:
        key = _b64d(Path(path).read_text().strip())
    except (OSError, ValueError) as exc:
        raise ValueError(f"master key file {path} unusable ({exc.__class__.__name__}): rerun `din keys init`") from None
    if len(key) != 32:
        raise ValueError(f"master key file {path} does not hold 32 bytes: rerun `din keys init`")
    return key


@dataclass(frozen=True)
class PrincipalKeys:
    """One principal's credentials, loaded from its key file: its identity and the key manager to trust."""

    identity: Identity
    keymanager: PublicIdentity
    bucket: str = KEYS_BUCKET
    kv_domain: str | None = None

    @property
    def principal(self) -> str:
        return self.identity.name

    @classmethod
    def load(cls, path: Path) -> PrincipalKeys:
        """Read a key file written by ``init_keys``; raises ``ValueError`` with a one-line message."""
        try:
            doc = json.loads(Path(path).read_text())
            if doc.get("format") != KEY_FILE_FORMAT:
                raise ValueError("format")
            identity = envelope.unwrap_private(_b64d(doc["identity"]), _b64d(doc["unlock"]))
            if identity.name != doc["principal"]:
                raise ValueError("principal")
            return cls(identity, PublicIdentity.from_dict(doc["keymanager"]), doc["bucket"], doc.get("kv_domain"))
        except FileNotFoundError:
            raise ValueError(f"key file {path} not found: start the stack with `din up` or run `din keys init`") from None
        except (OSError, ValueError, KeyError, TypeError, InvalidToken) as exc:
            raise ValueError(f"key file {path} is not a usable DIN key file ({exc.__class__.__name__})") from None

    def document(self, unlock: bytes) -> dict[str, object]:
        """The key file's content, the identity wrapped under ``unlock``."""
        return {
            "format": KEY_FILE_FORMAT,
            "principal": self.principal,
            "bucket": self.bucket,
            "kv_domain": self.kv_domain,
            "keymanager": self.keymanager.to_dict(),
            "identity": _b64e(envelope.wrap_private(self.identity, unlock)),
            "unlock": _b64e(unlock),
        }


@dataclass
class KeyStore:
    """The key manager's store: every principal's public identity and its private keys wrapped under the master key."""

    publics: dict[str, PublicIdentity]
    wrapped: dict[str, bytes]
    bucket: str = KEYS_BUCKET
    kv_domain: str | None = None

    def identity(self, principal: str, master_key: bytes) -> Identity:
        """Unwrap ``principal``'s identity; raises ``InvalidToken`` under a wrong master key."""
        return envelope.unwrap_private(self.wrapped[principal], unlock_key(master_key, principal))

    def save(self, path: Path) -> None:
        doc = {
            "format": KEYSTORE_FORMAT,
            "bucket": self.bucket,
            "kv_domain": self.kv_domain,
            "principals": {
                name: {"public": self.publics[name].to_dict(), "identity": _b64e(self.wrapped[name])}
                for name in self.publics
            },
        }
        _write_secret(Path(path), json.dumps(doc, indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> KeyStore:
        """Read ``keystore.json``; raises ``ValueError`` with a one-line message."""
        try:
            doc = json.loads(Path(path).read_text())
            if doc.get("format") != KEYSTORE_FORMAT:
                raise ValueError("format")
            entries = doc["principals"]
            return cls(
                {name: PublicIdentity.from_dict(e["public"]) for name, e in entries.items()},
                {name: _b64d(e["identity"]) for name, e in entries.items()},
                doc["bucket"],
                doc.get("kv_domain"),
            )
        except FileNotFoundError:
            raise ValueError(f"keystore {path} not found: run `din keys init` or start with `din up`") from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"keystore {path} is not a usable DIN keystore ({exc.__class__.__name__})") from None


def key_file_name(principal: str) -> str:
    """File name of ``principal``'s key file."""
    return f"{token(principal, what='principal')}.json"


def key_file(keys_dir: Path, principal: str) -> Path:
    """Where ``init_keys`` writes ``principal``'s key file."""
    return Path(keys_dir) / key_file_name(principal)


def init_keys(keys_dir: Path, topology: Topology, *, master_key: bytes | None = None) -> KeyStore:
    """Create identities for every principal of ``topology`` and write the key files (see module docstring)."""
    keys_dir = Path(keys_dir)
    master = master_key or secrets.token_bytes(32)
    identities: dict[str, Identity] = {}
    for principal in principals_of(topology):
        cls = SiteIdentity if site_of(principal) is not None else Identity
        identities[principal] = cls.generate(principal)
    keymanager = identities[KEYMANAGER].public
    store = KeyStore(
        {name: ident.public for name, ident in identities.items()},
        {name: envelope.wrap_private(ident, unlock_key(master, name)) for name, ident in identities.items()},
        KEYS_BUCKET,
        topology.hub.name,
    )
    _write_secret(keys_dir / MASTER_KEY_FILE, _b64e(master) + "\n")
    store.save(keys_dir / KEYSTORE_FILE)
    for name, ident in identities.items():
        if name == KEYMANAGER:
            continue
        creds = PrincipalKeys(ident, keymanager, KEYS_BUCKET, topology.hub.name)
        _write_secret(key_file(keys_dir, name), json.dumps(creds.document(unlock_key(master, name)), indent=2) + "\n")
    return store


# --------------------------------------------------------------------------- signed bucket entries


class EntryKeys:
    """Names of the entries in the keys bucket, built from validated tokens."""

    REVOKED = "revoked"
    POLICY = "policy"

    @staticmethod
    def public(principal: str) -> str:
        return f"pub.{token(principal, what='principal')}"

    @staticmethod
    def dek(holder: str, reader: str, version: int) -> str:
        return f"dek.{token(holder, what='holder')}.{token(reader, what='reader')}.{int(version)}"


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


@dataclass
class DekState:
    """What a holder knows of one DEK version: whether it seals yet and until when it opens."""

    active: bool
    not_after: float | None


# --------------------------------------------------------------------------- the key agent


class KeyAgent:
    """One principal's view of the keys bucket: its DEKs (in a ``Keyring``), public identities, revocations, policy.

    ``apply`` is the whole logic and knows no NATS; ``watch`` feeds it from the
    bucket. Entries that do not verify are counted in ``refused`` and ignored.
    """

    def __init__(self, keys: PrincipalKeys, *, clock: Callable[[], float] = time.time) -> None:
        self.keys = keys
        self.principal = keys.principal
        self.keyring = Keyring(grace_s=AGENT_GRACE_S, clock=clock)
        self.clock = clock
        self.publics: dict[str, PublicIdentity] = {keys.keymanager.name: keys.keymanager}
        self.revoked: frozenset[str] = frozenset()
        self.policy: PathPolicy | None = None
        self.plaintext_ingress: frozenset[str] = frozenset()
        self.deks: dict[tuple[str, int], DekState] = {}
        self.applied = 0
        self.refused = 0
        self._issued: dict[str, int] = {}
        self._changed: asyncio.Condition | None = None
        self._watcher = None
        self._task: asyncio.Task | None = None
        self._initial = False

    # -- pure logic

    def apply(self, key: str, value: bytes, *, deleted: bool = False) -> bool:
        """Apply one bucket entry; return True when it changed what this agent knows."""
        if deleted:
            return False
        kind, _, rest = key.partition(".")
        if kind == "dek" and rest.split(".", 1)[0] != self.principal:
            return False
        try:
            body = read_entry(value, key, self.keys.keymanager)
            issued = body["issued_ms"]
            if issued < self._issued.get(key, -1):
                return False
            if kind == "pub":
                self._apply_public(rest, body)
            elif kind == "dek":
                self._apply_dek(rest, body)
            elif key == EntryKeys.REVOKED:
                self._apply_revoked(body)
            elif key == EntryKeys.POLICY:
                self.policy = PathPolicy(integrity_only=frozenset(str(s) for s in body["integrity_only"]))
                self.plaintext_ingress = frozenset(str(t) for t in body["plaintext_ingress"])
            else:
                return False
        except (InvalidToken, ValueError, KeyError, TypeError, IndexError) as exc:
            self.refused += 1
            log.warning("key entry %s refused (%s)", key, getattr(exc, "reason", exc.__class__.__name__))
            return False
        self._issued[key] = issued
        self.applied += 1
        self.keyring.prune()
        return True

    def _apply_public(self, principal: str, body: dict) -> None:
        public = PublicIdentity.from_dict(body["identity"])
        if public.name != principal:
            raise ValueError("public identity under another name")
        self.publics[principal] = public

    def _apply_dek(self, rest: str, body: dict) -> None:
        _, reader, version_text = rest.split(".")
        dek = envelope.unwrap_dek(self.keys.identity, _b64d(body["wrapped"]), issuer_public=self.keys.keymanager)
        if dek.reader != reader or dek.version != int(version_text):
            raise ValueError("wrapped key under another name")
        active = bool(body["active"])
        not_after = body.get("not_after")
        now = self.clock()
        if not_after is not None and now > float(not_after):
            self.deks.pop((reader, dek.version), None)
            with contextlib.suppress(KeyError):
                self.keyring.retire(reader, dek.version, grace_s=0, now=float(not_after))
            return
        self.keyring.install(dek, activate=active and not_after is None)
        if not_after is not None:
            self.keyring.retire(reader, dek.version, now=now, grace_s=float(not_after) - now)
        self.deks[(reader, dek.version)] = DekState(active, None if not_after is None else float(not_after))

    def _apply_revoked(self, body: dict) -> None:
        principals = frozenset(str(p) for p in body["principals"])
        for principal in principals - self.revoked:
            self.keyring.revoke(principal)
        self.revoked = self.revoked | principals

    def ready_for(self, readers: Iterable[str]) -> bool:
        """True once the policy is known and every one of ``readers`` has a DEK that seals."""
        return self.policy is not None and all(self.keyring.current_version(r) is not None for r in readers)

    def integrity_allowed(self, site: str | None) -> bool:
        """True when the policy lets the link between the hub and ``site`` carry integrity-only payloads."""
        return site is not None and self.policy is not None and not self.policy.confidential(site)

    def sign(self, payload: bytes, headers: Mapping[str, str]) -> str:
        """This principal's Ed25519 signature over ``payload`` and ``headers``."""
        return envelope.sign_result(self.keys.identity, payload, headers)

    def versions(self) -> dict[str, int]:
        """The sealing version of each reader held."""
        readers = {reader for reader, _ in self.deks}
        return {r: v for r in sorted(readers) if (v := self.keyring.current_version(r)) is not None}

    # -- NATS

    async def watch(
        self, nc, *, ready: Callable[[KeyAgent], bool] | None = None, timeout_s: float = 60.0
    ) -> None:
        """Watch the bucket and return once its current content is applied and ``ready(self)`` holds.

        Raises ``TimeoutError`` with a one-line message when either does not happen in ``timeout_s``.
        """
        self._changed = asyncio.Condition()
        deadline = time.monotonic() + timeout_s
        js = nc.jetstream(domain=self.keys.kv_domain)
        while True:
            try:
                bucket = await js.key_value(self.keys.bucket)
                break
            except Exception as exc:  # noqa: BLE001 - no bucket or no JetStream yet: retry until the deadline
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"keys bucket {self.keys.bucket} not reachable within {timeout_s:.0f}s ({exc.__class__.__name__}):"
                        " is the key manager running?"
                    ) from None
                await asyncio.sleep(0.2)
        self._watcher = await bucket.watchall()
        self._task = asyncio.create_task(self._follow(), name=f"keys-{self.principal}")
        try:
            await asyncio.wait_for(self._wait(lambda: self._initial and (ready is None or ready(self))),
                                   max(0.1, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise TimeoutError(
                f"{self.principal}: keys not distributed within {timeout_s:.0f}s: is the key manager running?"
            ) from None

    async def _wait(self, predicate: Callable[[], bool]) -> None:
        async with self._changed:
            await self._changed.wait_for(predicate)

    async def wait_until(self, predicate: Callable[[KeyAgent], bool], timeout_s: float) -> None:
        """Wait until ``predicate(self)`` holds (e.g. a new version arrived); raise ``TimeoutError`` otherwise."""
        await asyncio.wait_for(self._wait(lambda: predicate(self)), timeout_s)

    async def _follow(self) -> None:
        async for entry in self._watcher:
            if entry is not None:
                try:
                    self.apply(entry.key, entry.value or b"", deleted=entry.operation in ("DEL", "PURGE"))
                except Exception:  # noqa: BLE001 - one bad entry must not stop key distribution
                    self.refused += 1
                    log.exception("key entry %s could not be applied", entry.key)
            else:
                self._initial = True
            async with self._changed:
                self._changed.notify_all()

    async def stop(self) -> None:
        """Stop watching; the keys already installed stay usable."""
        if self._watcher is not None:
            with contextlib.suppress(Exception):
                await self._watcher.stop()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._watcher = self._task = None


# --------------------------------------------------------------------------- hops


def request_binding(request_id: str, tenant: str, model: str, reply: str, headers: Mapping[str, str] | None) -> dict[str, str]:
    """The AAD of a request: its id, tenant, model, reply subject, and the headers that say how to read the body."""
    aad = {"rid": request_id, "tenant": tenant, "model": model, "reply": reply}
    for name, value in (headers or {}).items():
        if name.startswith(BOUND_HEADER_PREFIXES):
            aad[name] = value
    return aad


def stage_binding(request_id: str, tenant: str, stage: int, site: str, reply: str,
                  headers: Mapping[str, str] | None, *, plain_answer: bool = False) -> dict[str, str]:
    """The AAD of what a multi-stage job hands to stage ``stage`` at ``site``: the request, the stage, the site, the
    reply subject and the headers that say how to read the body; ``plain_answer`` when the client may be answered
    in clear."""
    aad = request_binding(request_id, tenant, f"stage-{stage}", reply, headers)
    aad["site"] = site
    if plain_answer:
        aad[ANSWER_FIELD] = ANSWER_PLAIN
    return aad


def check_binding(aad: Mapping[str, str], expected: Mapping[str, str]) -> None:
    """Refuse (``InvalidToken``) unless ``aad`` is ``expected``, give or take the answer mode."""
    bound = {k: v for k, v in aad.items() if k != ANSWER_FIELD}
    if bound != dict(expected) or (ANSWER_FIELD in aad and aad[ANSWER_FIELD] != ANSWER_PLAIN):
        raise InvalidToken(Reason.AAD_MISMATCH)


def result_binding(request_id: str, tenant: str, seq: int | None = None) -> dict[str, str]:
    """The AAD of a result: the request it answers and its tenant; for a token stream's chunk, its position."""
    aad = {"rid": request_id, "tenant": tenant}
    if seq is not None:
        aad["seq"] = str(seq)
    return aad


def is_sealed(headers: Mapping[str, str] | None) -> bool:
    """True when a message carries an envelope."""
    return bool(headers) and envelope.H_VERSION in headers


def without_envelope(headers: Mapping[str, str] | None) -> dict[str, str]:
    """``headers`` minus any envelope and signature headers."""
    return {k: v for k, v in (headers or {}).items()
            if not k.startswith(ENVELOPE_PREFIX) and k not in (SIGNER_HEADER, envelope.SIGNATURE_HEADER)}


def payload_size(body: bytes, headers: Mapping[str, str] | None) -> int:
    """Size of the plaintext a (possibly sealed) body carries."""
    if headers and headers.get(envelope.H_MODE) == envelope.MODE_AEAD:
        return max(0, len(body) - _AEAD_TAG_BYTES)
    return len(body)


def _signed_headers(headers: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.startswith(ENVELOPE_PREFIX) or k == SIGNER_HEADER}


class Opened:
    """An authenticated payload: its plaintext, its bound metadata and how it travelled."""

    __slots__ = ("plaintext", "_sealed", "_aad")

    def __init__(self, plaintext: bytes, sealed: Sealed) -> None:
        self.plaintext = plaintext
        self._sealed = sealed
        self._aad: dict[str, str] | None = None

    @property
    def aad(self) -> dict[str, str]:
        """The routing metadata the seal bound (parsed on first use)."""
        if self._aad is None:
            self._aad = self._sealed.aad
        return self._aad

    @property
    def sender(self) -> str:
        return self._sealed.sender

    @property
    def confidential(self) -> bool:
        return self._sealed.confidential

    @property
    def nonce(self) -> str:
        return self._sealed.nonce


class PayloadSecurity:
    """One process's payload crypto: seal and open with its ``KeyAgent``, refuse replays, count refusals by reason.

    With ``agent`` None security is off (``DIN_SECURITY=off``, for benchmark comparison only):
    nothing is sealed and ``enabled`` is False.
    """

    def __init__(self, agent: KeyAgent | None, *, replay_window_s: float = 120.0, max_entries: int = 100_000) -> None:
        self.agent = agent
        self.enabled = agent is not None
        self.replay = ReplayGuard(replay_window_s, max_entries=max_entries)
        self.refusals: Counter[str] = Counter()

    @classmethod
    def from_settings(cls, settings: SecuredServiceSettings) -> PayloadSecurity:
        """Off, or this process's agent from its key file (not yet watching)."""
        if not settings.security:
            return cls(None)
        return cls(KeyAgent(PrincipalKeys.load(settings.key_file)), replay_window_s=settings.replay_window_s,
                   max_entries=settings.replay_cache_entries)

    @property
    def principal(self) -> str:
        return self.agent.principal if self.agent else ""

    async def start(self, nc, *, readers: Callable[[KeyAgent], Iterable[str]] = lambda a: (), timeout_s: float = 60.0) -> None:
        """Watch the keys bucket until the policy and a sealing DEK of every reader in ``readers(agent)`` are here."""
        if self.agent is not None:
            await self.agent.watch(nc, ready=lambda a: a.ready_for(readers(a)), timeout_s=timeout_s)

    async def stop(self) -> None:
        if self.agent is not None:
            await self.agent.stop()

    def refused(self, error: InvalidToken) -> None:
        """Count a refusal by its reason (for health detail and telemetry only)."""
        self.refusals[error.reason.value] += 1

    def open(
        self,
        body: bytes,
        headers: Mapping[str, str] | None,
        *,
        reader: str,
        allow_integrity: bool = False,
        expected_aad: Mapping[str, str] | None = None,
        replay: bool = True,
    ) -> Opened:
        """Authenticate a sealed message for ``reader`` and return it opened; raise ``InvalidToken`` (not counted)."""
        sealed = Sealed.from_headers(body, headers)
        plaintext = envelope.open(
            sealed,
            keyring=self.agent.keyring,
            expected_reader=reader,
            expected_aad=expected_aad,
            replay_guard=self.replay if replay else None,
            allow_integrity_only=allow_integrity,
        )
        return Opened(plaintext, sealed)

    def open_from(self, body: bytes, headers: Mapping[str, str] | None, *, reader: str, **options) -> Opened:
        """``open`` letting integrity-only through when the policy allows it on the sender site's link to the hub."""
        sender = (headers or {}).get(envelope.H_SENDER, "")
        return self.open(body, headers, reader=reader, allow_integrity=self.agent.integrity_allowed(site_of(sender)),
                         **options)

    def seal(self, plaintext: bytes, *, reader: str, aad: Mapping[str, str], confidential: bool = True) -> Sealed:
        """Seal ``plaintext`` for ``reader`` as this principal; raises ``SealRefused`` without a current DEK."""
        return envelope.seal(plaintext, reader=reader, aad=aad, keyring=self.agent.keyring, sender=self.principal,
                             confidential=confidential)

    def sign_answer(self, body: bytes, headers: dict[str, str]) -> dict[str, str]:
        """Add ``Din-Signer`` and ``Din-Sig`` to ``headers``: Ed25519 over SHA-256 of ``body`` and the envelope headers."""
        headers[SIGNER_HEADER] = self.principal
        headers[envelope.SIGNATURE_HEADER] = self.agent.sign(hashlib.sha256(body).digest(), _signed_headers(headers))
        return headers

    def verify_answer(self, body: bytes, headers: Mapping[str, str]) -> str:
        """Check an answer's signature; return the signing site's principal or raise ``InvalidToken``."""
        try:
            signer = headers[SIGNER_HEADER]
            signature = headers[envelope.SIGNATURE_HEADER]
        except (KeyError, TypeError):
            raise InvalidToken(Reason.MALFORMED) from None
        public = self.agent.publics.get(signer)
        if public is None or site_of(signer) is None:
            raise InvalidToken(Reason.UNKNOWN_KEY)
        if signer in self.agent.revoked:
            raise InvalidToken(Reason.REVOKED)
        envelope.verify_result(public, hashlib.sha256(body).digest(), _signed_headers(headers), signature)
        return signer

    def detail(self) -> dict[str, str]:
        """Health detail: refusals by reason and the key versions in use."""
        out = {"security": "on" if self.enabled else "off", "auth_refused": str(sum(self.refusals.values()))}
        out.update({f"auth_refused_{reason}": str(n) for reason, n in sorted(self.refusals.items())})
        if self.agent is not None:
            out["key_versions"] = ",".join(f"{r}:{v}" for r, v in self.agent.versions().items())
            out["revoked"] = ",".join(sorted(self.agent.revoked))
            out["key_entries_refused"] = str(self.agent.refused)
        return out


def seal_to_site(
    security: PayloadSecurity, plaintext: bytes, *, site: str, aad: Mapping[str, str], sensitive: bool = False
) -> Sealed:
    """Seal a payload for ``site`` at the level the policy sets for its link: a job, or an intermediate tensor.

    Encrypted, or integrity-only where the operator's policy allows it on that site's
    link to the hub; sensitive data is always encrypted. The site opens it with
    ``PayloadSecurity.open(..., reader=site_principal(site), allow_integrity=...)``.
    """
    confidential = sensitive or not security.agent.integrity_allowed(site)
    return security.seal(plaintext, reader=site_principal(site), aad=aad, confidential=confidential)


def seal_for_audit(security: PayloadSecurity, plaintext: bytes, *, request_id: str, tenant: str,
                   kind: str = "request") -> Sealed:
    """Seal a payload for the ``audit`` reader, e.g. the body of a request recorded to Kafka.

    The record's value is ``Sealed.body`` and its headers ``Sealed.to_headers()`` (non-secret
    metadata); the AAD binds ``rid``, ``tenant`` and ``kind``. The hub site holds the audit
    DEK; whoever replays recordings opens them with the ``audit`` principal's key file
    (``din keys export-audit`` writes them as a replay key file).
    """
    return security.seal(plaintext, reader=AUDIT, aad={"rid": request_id, "tenant": tenant, "kind": kind})


# --------------------------------------------------------------------------- operator commands


_COMMAND_CONTEXT = {"Din-Keys-Command": "v1"}


def sign_key_command(operator: PrincipalKeys, command: KeyCommandV1) -> tuple[bytes, dict[str, str]]:
    """Body and headers of a key command signed by the operator principal."""
    body = command.model_dump_json().encode()
    return body, {envelope.SIGNATURE_HEADER: envelope.sign_result(operator.identity, body, _COMMAND_CONTEXT)}


def verify_key_command(
    body: bytes, headers: Mapping[str, str] | None, operator: PublicIdentity, guard: ReplayGuard,
    *, now: float | None = None,
) -> KeyCommandV1:
    """The command in a message signed by ``operator``, fresh and never seen; raises ``InvalidToken``."""
    signature = (headers or {}).get(envelope.SIGNATURE_HEADER)
    if not signature:
        raise InvalidToken(Reason.MALFORMED)
    envelope.verify_result(operator, body, _COMMAND_CONTEXT, signature)
    try:
        command = KeyCommandV1.model_validate_json(body)
    except ValueError:
        raise InvalidToken(Reason.MALFORMED) from None
    guard.check(command.nonce, command.issued_ms / 1000.0, now=now)
    return command


def new_key_command(action: KeyAction, **fields: object) -> KeyCommandV1:
    """A command stamped now with a fresh nonce."""
    return KeyCommandV1(action=action, issued_ms=int(time.time() * 1000), nonce=secrets.token_hex(12), **fields)


# --------------------------------------------------------------------------- settings


class SecuredServiceSettings(ServiceSettings):
    """Settings of a service that seals and opens payloads (its key file, replay window) on top of ``ServiceSettings``."""

    security: bool = Field(
        default=True,
        validation_alias=AliasChoices("DIN_SECURITY"),
        description="on (default): every payload sealed and authenticated; off: plaintext, for benchmark comparison only.",
    )
    key_file: Path | None = Field(
        default=None, description="This process's principal key file (written by `din up` or `din keys init`)."
    )
    replay_window_s: float = Field(
        default=120.0, gt=0, description="Messages sealed longer ago than this, or seen before, are refused."
    )
    replay_cache_entries: int = Field(
        default=200_000, gt=0,
        description="Nonces remembered for replay checks; past this, the oldest go and anything older is refused.",
    )
    keys_wait_s: float = Field(default=60.0, gt=0, description="How long start-up waits for the key manager's keys.")

    @model_validator(mode="after")
    def _key_file_when_secured(self) -> SecuredServiceSettings:
        if self.security and self.key_file is None:
            name = f"{self.model_config.get('env_prefix', '')}KEY_FILE"
            raise ValueError(f"{name} is required while DIN_SECURITY is on (or set DIN_SECURITY=off)")
        return self


__all__ = [
    "AUDIT",
    "CryptoPolicy",
    "DekState",
    "EntryKeys",
    "KEYMANAGER",
    "KEYS_BUCKET",
    "KeyAgent",
    "KeyStore",
    "Level",
    "OPERATOR",
    "Opened",
    "PayloadSecurity",
    "PrincipalKeys",
    "PayloadProtection",
    "SecuredServiceSettings",
    "check_binding",
    "init_keys",
    "key_file",
    "key_file_name",
    "key_holders",
    "stage_binding",
    "principals_of",
    "read_entry",
    "read_master_key",
    "request_binding",
    "result_binding",
    "seal_for_audit",
    "seal_to_site",
    "serving_sites",
    "new_key_command",
    "sign_entry",
    "sign_key_command",
    "site_of",
    "site_principal",
    "tenant_principal",
    "unlock_key",
    "verify_key_command",
]
