"""One process's payload crypto: seal and open each hop's payload with its key agent, sign and verify answers."""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Iterable, Mapping

from din.shared import envelope
from din.shared.envelope import Identity, InvalidToken, PairKeys, Reason, ReplayGuard, Sealed, SealRefused
from din.shared.security import b64url
from din.shared.security.agent import KeyAgent
from din.shared.security.headers import SIGNER_HEADER, signed_headers
from din.shared.security.keyfiles import PrincipalKeys
from din.shared.security.principals import AUDIT, site_of, site_principal
from din.shared.security.settings import SecuredServiceSettings


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
        self._pairs: PairKeys | None = None

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

    async def start(self, nc, *, readers: Callable[[KeyAgent], Iterable[str]] = lambda a: (),
                    timeout_s: float = 60.0) -> None:
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

    def seal(self, plaintext: bytes, *, reader: str, aad: Mapping[str, str], confidential: bool = True) -> Sealed:
        """Seal ``plaintext`` for ``reader`` as this principal; raises ``SealRefused`` without a current DEK."""
        return envelope.seal(plaintext, reader=reader, aad=aad, keyring=self.agent.keyring, sender=self.principal,
                             confidential=confidential)

    @property
    def pairs(self) -> PairKeys:
        """This principal's pairwise keys (``envelope.seal_pair``)."""
        if self._pairs is None:
            self._pairs = PairKeys(self.agent.keys.identity)
        return self._pairs

    def _peer(self, principal: str) -> bytes | None:
        public = self.agent.publics.get(principal)
        return None if public is None or principal in self.agent.revoked else public.x25519

    def _sender(self, principal: str, accepted: bool) -> bytes | None:
        """The public key of a sender ``accepted`` here; a revoked one is refused as such."""
        if accepted and principal in self.agent.revoked:
            raise InvalidToken(Reason.REVOKED)
        return self._peer(principal) if accepted else None

    def seal_to(self, plaintext: bytes, *, to: str, aad: Mapping[str, str], confidential: bool = True) -> Sealed:
        """Seal ``plaintext`` for principal ``to`` alone (its pairwise key with this one); raises ``SealRefused``
        when ``to`` is unknown or revoked."""
        peer = self._peer(to)
        if peer is None:
            raise SealRefused(f"no public key of {to}")
        return envelope.seal_pair(plaintext, pairs=self.pairs, reader=to, reader_x25519=peer, aad=aad,
                                  confidential=confidential, now=self.agent.keyring.clock())

    def seal_answer(self, plaintext: bytes, *, answer_key: str, aad: Mapping[str, str],
                    confidential: bool = True) -> Sealed:
        """Seal an answer for the client that sent ``answer_key`` with its request (``answer_keys``); raises
        ``InvalidToken`` for a key that is not one."""
        return envelope.seal_pair(plaintext, pairs=self.pairs, reader=ANSWER_READER,
                                  reader_x25519=decode_answer_key(answer_key), aad=aad, confidential=confidential,
                                  now=self.agent.keyring.clock())

    def open_to_me(self, body: bytes, headers: Mapping[str, str] | None, *, senders: Callable[[str], bool],
                   allow_integrity: bool = False, expected_aad: Mapping[str, str] | None = None,
                   replay: bool = True) -> Opened:
        """Authenticate a message sealed for this principal alone by a sender ``senders`` accepts (known, not
        revoked); raise ``InvalidToken`` (not counted)."""
        sealed = Sealed.from_headers(body, headers)
        plaintext = envelope.open_pair(
            sealed, pairs=self.pairs, expected_reader=self.principal,
            sender_x25519=lambda name: self._sender(name, senders(name)), now=self.agent.keyring.clock(),
            expected_aad=expected_aad, replay_guard=self.replay if replay else None,
            allow_integrity_only=allow_integrity,
        )
        return Opened(plaintext, sealed)

    def open_answer(self, body: bytes, headers: Mapping[str, str] | None, *, answer: PairKeys, signer: str,
                    allow_integrity: bool = False, expected_aad: Mapping[str, str] | None = None) -> Opened:
        """Authenticate an answer sealed by ``signer`` (the site whose signature it carries) to the client's
        ``answer`` key; raise ``InvalidToken`` (not counted)."""
        sealed = Sealed.from_headers(body, headers)
        plaintext = envelope.open_pair(
            sealed, pairs=answer, expected_reader=ANSWER_READER,
            sender_x25519=lambda name: self._sender(name, name == signer), now=self.agent.keyring.clock(),
            expected_aad=expected_aad, allow_integrity_only=allow_integrity,
        )
        return Opened(plaintext, sealed)

    def sign_answer(self, body: bytes, headers: dict[str, str]) -> dict[str, str]:
        """Add ``Din-Signer`` and ``Din-Sig`` to ``headers``: Ed25519 over SHA-256 of the body and envelope headers."""
        headers[SIGNER_HEADER] = self.principal
        headers[envelope.SIGNATURE_HEADER] = self.agent.sign(hashlib.sha256(body).digest(), signed_headers(headers))
        return headers

    def sign_error(self, body: bytes, headers: dict[str, str], reply_to: str) -> dict[str, str]:
        """Add ``Din-Signer`` and ``Din-Sig`` to an error answer's ``headers``: Ed25519 over SHA-256 of the reply
        subject and the body (``error_digest``), so the error answers that one request and no other."""
        headers[SIGNER_HEADER] = self.principal
        headers[envelope.SIGNATURE_HEADER] = self.agent.sign(error_digest(reply_to, body), signed_headers(headers))
        return headers

    def verify_error(self, body: bytes, headers: Mapping[str, str], reply_to: str) -> str:
        """Check an error answer's signature for the request answered on ``reply_to``; return the signing site's
        principal or raise ``InvalidToken``."""
        return self._verify(error_digest(reply_to, body), headers)

    def verify_answer(self, body: bytes, headers: Mapping[str, str]) -> str:
        """Check an answer's signature; return the signing site's principal or raise ``InvalidToken``."""
        return self._verify(hashlib.sha256(body).digest(), headers)

    def _verify(self, digest: bytes, headers: Mapping[str, str]) -> str:
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
        envelope.verify_result(public, digest, signed_headers(headers), signature)
        return signer

    def detail(self) -> dict[str, str]:
        """Health detail: refusals by reason and the key versions in use."""
        out = {"security": "on" if self.enabled else "off", "auth_refused": str(sum(self.refusals.values()))}
        out.update({f"auth_refused_{reason}": str(n) for reason, n in sorted(self.refusals.items())})
        if self.agent is not None:
            out["key_versions"] = ",".join(f"{r}:{v}" for r, v in self.agent.versions().items())
            out["revoked"] = ",".join(sorted(self.agent.revoked))
            out["key_entries_refused"] = str(self.agent.refused)
            out.update({f"key_entries_refused_{reason}": str(n) for reason, n in sorted(self.agent.refusals.items())})
            out["key_source"] = self.agent.source or ""
        return out


ANSWER_READER = "answer"
"""The reader an answer sealed to a client's answer key names."""


def answer_keys() -> PairKeys:
    """A client's answer key: made for its session, its public half sent bound in every request it seals
    (``ANSWER_KEY_FIELD``), so only that client opens the answers."""
    return PairKeys(Identity.generate(ANSWER_READER))


def encode_answer_key(answer: PairKeys) -> str:
    """The public half of an answer key as it travels in a request's binding."""
    return b64url.encode(answer.identity.public.x25519)


def decode_answer_key(text: str) -> bytes:
    """Inverse of ``encode_answer_key``; ``InvalidToken`` (malformed) for anything else."""
    try:
        key = b64url.decode(text)
    except (ValueError, TypeError, UnicodeError):
        raise InvalidToken(Reason.MALFORMED) from None
    if len(key) != 32:
        raise InvalidToken(Reason.MALFORMED)
    return key


def error_digest(reply_to: str, body: bytes) -> bytes:
    """What an error answer's signature covers: the reply subject it answers on, and its body."""
    return hashlib.sha256(b"din-error\0" + reply_to.encode() + b"\0" + body).digest()


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
                   kind: str = "request", reader: str = AUDIT) -> Sealed:
    """Seal a payload for an audit reader, e.g. the body of a request recorded to Kafka.

    The record's value is ``Sealed.body`` and its headers ``Sealed.to_headers()`` (non-secret
    metadata); the AAD binds ``rid``, ``tenant`` and ``kind``. ``reader`` is the sealing site's audit DEK
    (``principals.audit_reader``: ``audit`` at the hub, ``audit-<site>`` at another control-plane site);
    the ``audit`` principal holds every one, so whoever replays recordings opens them all with its key file
    (``din keys export-audit`` writes them as a replay key file).
    """
    return security.seal(plaintext, reader=reader, aad={"rid": request_id, "tenant": tenant, "kind": kind})
