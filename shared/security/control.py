"""Signed control messages: heartbeats, pressure, summaries, rosters, completions, link probes and load commands.

The closed bus limits which NATS user may publish on which subject; these signatures add *who* and *when*. Every
control message carries its sender principal's Ed25519 signature over the channel, the subject, its time, a nonce,
its ``Din-*`` headers and its body (``Din-Ctl-*`` headers). The receiver checks, in order:

1. it is signed at all, by a principal whose public identity the ``DIN_KEYS`` bucket holds and who is not revoked,
   and the signature verifies;
2. the signer may speak on that subject (``CONTROL_RULES``): a site's key only for its own site's heartbeats,
   pressure, summaries, rosters and completions; a link probe only from a site's scheduler, about itself; a load
   command only from the operator (or the key manager);
3. it is fresh: sent no more than ``MAX_SKEW_S`` before or after the receiver's clock, and its nonce not seen before
   (``shared.envelope.ReplayGuard``, one per signer, so that one site's flood cannot push out another's nonces; a
   replay within the window is refused, an older one is stale);
4. what the body claims fits the subject and stays in range (``claims_refusal``): a heartbeat names the executor and
   site of its subject and an ``interval_s`` within ``MIN_INTERVAL_S``..``MAX_INTERVAL_S``; pressure figures are
   bounded; a summary, roster or completion names its subject's site.

Anything refused is dropped and counted by ``Refusal`` in the receiving service's health detail
(``control_refused_<reason>``); nothing is answered, except a refused load command, which gets the one
``unauthenticated`` error. With security off (``DIN_SECURITY=off``) nothing is signed and the signature checks are
skipped, while the claims and ranges are still checked.
"""

from __future__ import annotations

import secrets
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from din.shared import envelope
from din.shared.contracts.events import CompletionV1, HeartbeatV1, LoadModelV1, PressureV1, ProbeV1
from din.shared.contracts.federation import SiteRosterV1, SiteSummaryV1
from din.shared.envelope import Identity, InvalidToken, ReplayGuard
from din.shared.naming import Subjects
from din.shared.security.agent import KeyAgent
from din.shared.security.principals import KEYMANAGER, OPERATOR, site_of, site_principal

SIGNER_HEADER = "Din-Ctl-Signer"
"""Principal that signed a control message."""
TIME_HEADER = "Din-Ctl-Ms"
"""When it was signed, integer Unix ms."""
NONCE_HEADER = "Din-Ctl-Nonce"
"""A random token, so that the receiver can refuse a replay within the skew window."""
SIG_HEADER = "Din-Ctl-Sig"
"""Ed25519 signature, base64url."""
CONTROL_HEADERS = (SIGNER_HEADER, TIME_HEADER, NONCE_HEADER, SIG_HEADER)
COVERED_PREFIX = "Din-"
"""Headers a control signature covers besides its own: every ``Din-*`` header (a completion's ``Din-Request-Id``
closes the job it names, so it must be the sender's)."""

MAX_SKEW_S = 30.0
"""How far a control message's time may lie from the receiver's clock, either way. Heartbeats and reports go out
every fraction of a second, so this bounds the clock difference between hosts, not delivery; NTP keeps hosts well
inside it. A message older than this is stale, one seen within it is a replay."""
MIN_INTERVAL_S = 0.01
MAX_INTERVAL_S = 60.0
"""The range of a claimed heartbeat, summary or roster ``interval_s``: a liveness claim longer than a minute would
keep a dead executor (or site) in view for minutes after it died."""
MAX_PRESSURE_COUNT = 1_000_000
MAX_PRESSURE_MS = 600_000.0
"""Bounds of a pressure report's counts and of its ``fastest_ms`` (no prediction exceeds the longest deadline)."""
REPLAY_ENTRIES = 200_000
"""Nonces a receiver keeps per process (about a minute of completions at 3,000/s); past this the oldest go and
anything older than them is refused."""
_CONTEXT = {"Din-Control": "v1"}


class Refusal(StrEnum):
    """Why a control message was dropped: for health detail only, never told to its sender."""

    UNSIGNED = "unsigned"
    MALFORMED = "malformed"
    UNKNOWN_SIGNER = "unknown_signer"
    REVOKED = "revoked"
    BAD_SIGNATURE = "bad_signature"
    NOT_ALLOWED = "not_allowed"
    STALE = "stale"
    REPLAY = "replay"
    OUT_OF_RANGE = "out_of_range"


class ControlRefused(Exception):
    """A control message that is dropped, with the reason it is counted under (and, when it was signed by a
    revoked principal, that principal: a scheduler stops using a revoked site's executors at their next word)."""

    def __init__(self, reason: Refusal, signer: str | None = None) -> None:
        super().__init__(reason.value)
        self.reason = reason
        self.signer = signer


Message = TypeVar("Message", bound=BaseModel)


# --------------------------------------------------------------------------- the rules


def _site_speaks(tokens: Mapping[str, str]) -> frozenset[str]:
    return frozenset({site_principal(tokens["site"])})


def _any_site(tokens: Mapping[str, str]) -> None:
    return None


def _operator_speaks(tokens: Mapping[str, str]) -> frozenset[str]:
    return frozenset({OPERATOR, KEYMANAGER})


@dataclass(frozen=True)
class ControlRule:
    """One control channel: its message, how its subject is built from named tokens, who may sign it."""

    model: type[BaseModel]
    subject: Callable[..., str]
    tokens: tuple[str, ...]
    signers: Callable[[Mapping[str, str]], frozenset[str] | None]
    """The principals that may sign a message on a subject with these tokens; None: any site principal (whose
    claims ``claims_refusal`` ties to its own site)."""

    def parse(self, subject: str) -> dict[str, str] | None:
        """The subject's tokens by name, or None when ``subject`` is not one of this channel's."""
        parts = subject.split(".")
        if len(parts) <= len(self.tokens):
            return None
        values = parts[len(parts) - len(self.tokens):]
        try:
            if self.subject(*values) != subject:
                return None
        except ValueError:
            return None
        return dict(zip(self.tokens, values, strict=True))


CONTROL_RULES: dict[str, ControlRule] = {
    "heartbeat": ControlRule(HeartbeatV1, Subjects.heartbeat, ("site", "executor"), _site_speaks),
    "pressure": ControlRule(PressureV1, Subjects.pressure, ("site",), _site_speaks),
    "summary": ControlRule(SiteSummaryV1, Subjects.summary, ("site",), _site_speaks),
    "roster": ControlRule(SiteRosterV1, Subjects.roster, ("site",), _site_speaks),
    "completed": ControlRule(CompletionV1, Subjects.completed, ("site",), _site_speaks),
    "probe": ControlRule(ProbeV1, Subjects.probe, ("site",), _any_site),
    "control": ControlRule(LoadModelV1, lambda instance: Subjects.control("executor", instance), ("instance",),
                           _operator_speaks),
}
"""Who may say what: a site's key speaks only for its own site; load commands only the operator (or key manager)."""


def may_sign(channel: str, subject: str, signer: str) -> bool:
    """Whether ``signer`` may sign a ``channel`` message on ``subject`` (pure; ``CONTROL_RULES``)."""
    rule = CONTROL_RULES[channel]
    tokens = rule.parse(subject)
    if tokens is None:
        return False
    allowed = rule.signers(tokens)
    return site_of(signer) is not None if allowed is None else signer in allowed


def _interval_ok(interval_s: float) -> bool:
    return MIN_INTERVAL_S <= interval_s <= MAX_INTERVAL_S


def _heartbeat_ok(beat: HeartbeatV1, site: str, executor: str | None = None) -> bool:
    return beat.site == site and (executor is None or beat.executor == executor) and _interval_ok(beat.interval_s)


def _pressure_ok(report: PressureV1) -> bool:
    counts = (report.inflight, report.capacity, report.executors, report.queued, report.completed_per_s)
    times = (report.fastest_ms, report.waited_ms)
    return all(0 <= n <= MAX_PRESSURE_COUNT for n in counts) and all(0.0 <= t <= MAX_PRESSURE_MS for t in times)


def claims_refusal(channel: str, tokens: Mapping[str, str], message: BaseModel, signer: str | None) -> Refusal | None:
    """Why what ``message`` claims does not fit its subject (or its signer) or is out of range; None when it fits.

    ``signer`` is None with security off: then only the subject and the ranges are checked.
    """
    site = tokens.get("site")
    if channel == "heartbeat":
        fits = _heartbeat_ok(message, site, tokens["executor"])
    elif channel == "pressure":
        fits = _pressure_ok(message)
    elif channel == "summary":
        fits = message.site == site and _interval_ok(message.interval_s)
    elif channel == "roster":
        fits = (message.site == site and _interval_ok(message.interval_s)
                and all(_heartbeat_ok(beat, site) for beat in message.executors))
    elif channel == "completed":
        fits = message.site == site
    elif channel == "probe":
        fits = message.to_site == site and (signer is None or site_principal(message.from_site) == signer)
    else:
        fits = True
    return None if fits else Refusal.OUT_OF_RANGE


# --------------------------------------------------------------------------- signing and verifying


def _signed(subject: str, headers: Mapping[str, str]) -> dict[str, str]:
    covered = {k: v for k, v in headers.items() if k.startswith(COVERED_PREFIX) and k != SIG_HEADER}
    return {**covered, **_CONTEXT, "Din-Ctl-Subject": subject}


class ControlSigner:
    """Signs the control messages one process sends, as its principal; with no identity (security off), a no-op."""

    def __init__(self, identity: Identity | None, *, clock: Callable[[], float] = time.time) -> None:
        self.identity = identity
        self.clock = clock

    @classmethod
    def of(cls, agent: KeyAgent | None) -> ControlSigner:
        """The signer of a process with this key agent (None: security off)."""
        return cls(agent.keys.identity if agent is not None else None)

    def headers(self, subject: str, body: bytes, headers: Mapping[str, str] | None = None) -> dict[str, str] | None:
        """``headers`` plus the control signature over ``subject``, ``body`` and every ``Din-*`` header."""
        out = dict(headers or {})
        if self.identity is None:
            return out or None
        out[SIGNER_HEADER] = self.identity.name
        out[TIME_HEADER] = str(int(self.clock() * 1000))
        out[NONCE_HEADER] = secrets.token_urlsafe(12)
        out[SIG_HEADER] = envelope.sign_result(self.identity, body, _signed(subject, out))
        return out


class ControlVerifier:
    """Checks the control messages one process receives and counts what it drops, by ``Refusal``.

    With no agent (security off) messages need no signature; their claims and ranges are still checked.
    """

    def __init__(self, agent: KeyAgent | None, *, skew_s: float = MAX_SKEW_S, clock: Callable[[], float] = time.time,
                 max_entries: int = REPLAY_ENTRIES) -> None:
        self.agent = agent
        self.skew_s = skew_s
        self.clock = clock
        self.max_entries = max_entries
        self.replays: dict[str, ReplayGuard] = {}
        self.refusals: Counter[str] = Counter()

    def authenticate(self, subject: str, body: bytes, headers: Mapping[str, str] | None) -> str:
        """The known, unrevoked principal whose fresh signature this message on ``subject`` carries; raises
        ``ControlRefused`` (not counted)."""
        headers = headers or {}
        if SIG_HEADER not in headers:
            raise ControlRefused(Refusal.UNSIGNED)
        try:
            signer, sent_ms, nonce = headers[SIGNER_HEADER], int(headers[TIME_HEADER]), headers[NONCE_HEADER]
        except (KeyError, ValueError):
            raise ControlRefused(Refusal.MALFORMED) from None
        public = self.agent.publics.get(signer)
        if public is None:
            raise ControlRefused(Refusal.UNKNOWN_SIGNER)
        try:
            envelope.verify_result(public, body, _signed(subject, headers), headers[SIG_HEADER])
        except InvalidToken:
            raise ControlRefused(Refusal.BAD_SIGNATURE) from None
        if signer in self.agent.revoked:
            raise ControlRefused(Refusal.REVOKED, signer)
        try:
            self._replay(signer).check(nonce, sent_ms / 1000.0)
        except InvalidToken as refused:
            raise ControlRefused(Refusal.REPLAY if refused.reason == envelope.Reason.REPLAY else Refusal.STALE) \
                from None
        return signer

    def _replay(self, signer: str) -> ReplayGuard:
        """The replay guard of one (known) signer."""
        guard = self.replays.get(signer)
        if guard is None:
            guard = self.replays[signer] = ReplayGuard(self.skew_s, self.clock, max_entries=self.max_entries)
        return guard

    def signer(self, channel: str, subject: str, body: bytes, headers: Mapping[str, str] | None) -> str:
        """``authenticate``, and the signer may send ``channel`` messages on ``subject`` (``CONTROL_RULES``)."""
        signer = self.authenticate(subject, body, headers)
        if not may_sign(channel, subject, signer):
            raise ControlRefused(Refusal.NOT_ALLOWED)
        return signer

    def open(self, channel: str, subject: str, body: bytes, headers: Mapping[str, str] | None,
             model: type[Message] | None = None) -> Message:
        """The message on ``subject`` decoded, once its signer, freshness and claims are checked.

        Raises ``ControlRefused`` after counting it. ``model`` defaults to the channel's contract.
        """
        rule = CONTROL_RULES[channel]
        try:
            tokens = rule.parse(subject)
            if tokens is None:
                raise ControlRefused(Refusal.NOT_ALLOWED)
            signer = self.signer(channel, subject, body, headers) if self.agent is not None else None
            try:
                message = (model or rule.model).model_validate_json(body)
            except ValidationError:
                raise ControlRefused(Refusal.MALFORMED) from None
            refusal = claims_refusal(channel, tokens, message, signer)
            if refusal is not None:
                raise ControlRefused(refusal)
            return message
        except ControlRefused as refused:
            self.refusals[refused.reason.value] += 1
            raise

    def open_message(self, channel: str, msg, model: type[Message] | None = None) -> Message:
        """``open`` on a nats-py message (its subject, data and headers)."""
        return self.open(channel, msg.subject, msg.data, msg.headers, model)

    def detail(self) -> dict[str, str]:
        """Health detail: control messages dropped, in all and by reason."""
        out = {"control_refused": str(sum(self.refusals.values()))}
        out.update({f"control_refused_{reason}": str(n) for reason, n in sorted(self.refusals.items())})
        return out


def verify_reply(verifier: ControlVerifier, principal: str, reply_subject: str, body: bytes,
                 headers: Mapping[str, str] | None) -> bool:
    """Whether an echo or answer on ``reply_subject`` is signed by ``principal`` (always true with security off);
    a refusal is counted. A link probe's echo is signed by the echoing site, so a forged one does not count as
    the link's round trip."""
    if verifier.agent is None:
        return True
    try:
        if verifier.authenticate(reply_subject, body, headers) != principal:
            raise ControlRefused(Refusal.NOT_ALLOWED)
    except ControlRefused as refused:
        verifier.refusals[refused.reason.value] += 1
        return False
    return True
