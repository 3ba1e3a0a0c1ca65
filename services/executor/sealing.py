"""What an executor seals and opens: jobs in, answers and stream chunks out, stage hand-offs and hand-backs.

Least knowledge: everything an executor sends is sealed for its one reader. A job
arrives sealed to this executor's site by the scheduler (a later stage of a
multi-stage job: by the previous stage's site, for this site alone, bound to this
stage and site); the answer goes out sealed to the client's answer key and signed
by the site (unsealed, still signed, for a tenant the policy lets send in clear).
A stage's output is sealed for the next stage's site alone; a job handed back is
sealed for the site of the scheduler that placed it, with its original binding.
No tenant key is used, so a site opens only what it serves. With security off
everything passes in clear (``opened`` is None). No NATS here: callers publish
what this returns.
"""

from __future__ import annotations

from din.shared.contracts.inference import RequestHeaders
from din.shared.contracts.job import HEADER_PREFIX as JOB_HEADER_PREFIX
from din.shared.contracts.job import JobV1, StageV1
from din.shared.envelope import InvalidToken, SealRefused
from din.shared.errors import DinError, ErrorCode
from din.shared.security import (
    ANSWER_FIELD,
    ANSWER_KEY_FIELD,
    ANSWER_PLAIN,
    Opened,
    PayloadProtection,
    PayloadSecurity,
    check_binding,
    request_binding,
    result_binding,
    site_of,
    site_principal,
    stage_binding,
    without_envelope,
)

Message = tuple[bytes, dict[str, str]]
"""A body and its headers, ready to publish."""


class UnreadableJob(Exception):
    """A message that is not a job this executor may run: dead-letter it, never answer it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def protection(opened: Opened | None) -> PayloadProtection:
    """How the job travelled, as its completion event reports it."""
    if opened is None:
        return PayloadProtection.OFF
    if opened.aad.get(ANSWER_FIELD) == ANSWER_PLAIN:
        return PayloadProtection.CLIENT_PLAINTEXT
    return PayloadProtection.ENCRYPTED if opened.confidential else PayloadProtection.INTEGRITY


def _plain_answer(opened: Opened) -> bool:
    return opened.aad.get(ANSWER_FIELD) == ANSWER_PLAIN


class ExecutorSeals:
    """The executor's side of payload security, for the executor at ``site``."""

    def __init__(self, security: PayloadSecurity, site: str) -> None:
        self.security = security
        self.site = site
        self.site_reader = site_principal(site)

    def open_job(self, job: JobV1, body: bytes, headers: dict[str, str]) -> tuple[bytes, Opened | None]:
        """The plaintext of ``job``'s body and how it was opened; ``UnreadableJob`` when it is not for this site
        or cannot be authenticated."""
        if job.plan and not (0 <= job.stage < len(job.plan) and job.plan[job.stage].site == self.site):
            raise UnreadableJob(f"stage {job.stage} of the job's plan is not for site {self.site}")
        allowed = job.plan[job.stage].sites if job.plan else job.workload and job.workload.allowed_sites
        if allowed is not None and self.site not in allowed:
            raise UnreadableJob(f"the job may not run at site {self.site}")
        security = self.security
        if not security.enabled:
            return body, None
        allow_integrity = security.agent.integrity_allowed(self.site)
        try:
            if job.stage > 0:
                previous = job.plan[job.stage - 1].site
                opened = security.open_to_me(
                    body, headers, senders=lambda sender: previous is not None and site_of(sender) == previous,
                    allow_integrity=allow_integrity)
                expected = stage_binding(job.request_id, job.tenant, job.stage, self.site, job.reply_to, headers)
            else:
                opened = security.open(body, headers, reader=self.site_reader, allow_integrity=allow_integrity)
                expected = request_binding(job.request_id, job.tenant, job.model, job.reply_to, headers)
            check_binding(opened.aad, expected)
        except InvalidToken as refused:
            security.refused(refused)
            raise UnreadableJob(f"unauthenticated ({refused.reason.value})") from None
        return opened.plaintext, opened

    def answer(self, job: JobV1, result: bytes, opened: Opened | None, seq: int | None = None) -> Message:
        """The result (or stream chunk ``seq``) as it goes to the client: sealed to its answer key (or plain) and
        signed by this site."""
        if opened is None:
            return result, {}
        if _plain_answer(opened):
            return result, self.security.sign_answer(result, {})
        answer_key = opened.aad.get(ANSWER_KEY_FIELD)
        if answer_key is None:
            raise DinError(ErrorCode.BAD_REQUEST, "a sealed request must carry the client's answer key")
        try:
            sealed = self.security.seal_answer(result, answer_key=answer_key,
                                               aad=result_binding(job.request_id, job.tenant, seq),
                                               confidential=opened.confidential)
        except InvalidToken:
            raise DinError(ErrorCode.BAD_REQUEST, "the request's answer key is not an X25519 public key") from None
        return sealed.body, self.security.sign_answer(sealed.body, sealed.to_headers())

    def hand_off(self, job: JobV1, following: StageV1, payload: bytes, payload_headers: dict[str, str],
                 opened: Opened | None) -> Message:
        """A stage's output for ``following`` (``job`` already moved to it), sealed for that stage's site alone
        and bound to it, the answer key carried on."""
        body, sealed_headers = payload, {}
        if opened is not None:
            aad = stage_binding(job.request_id, job.tenant, job.stage, following.site, job.reply_to, payload_headers,
                                plain_answer=_plain_answer(opened), answer_key=opened.aad.get(ANSWER_KEY_FIELD))
            sensitive = bool(job.workload and job.workload.sensitive)
            try:
                sealed = self.security.seal_to(payload, to=site_principal(following.site), aad=aad,
                                               confidential=sensitive or not self.security.agent.integrity_allowed(
                                                   following.site))
            except SealRefused as refused:
                raise DinError(ErrorCode.INTERNAL, f"cannot seal the hand-off: {refused.message}") from None
            body, sealed_headers = sealed.body, sealed.to_headers()
        return body, {**payload_headers, **job.to_headers(), RequestHeaders.REQUEST_ID: job.request_id,
                      **sealed_headers}

    def hand_back(self, job: JobV1, body: bytes, headers: dict[str, str], opened: Opened | None) -> Message:
        """``job`` with its original body for the scheduler that placed it, sealed for that scheduler's site alone."""
        passthrough = {k: v for k, v in without_envelope(headers).items() if not k.startswith(JOB_HEADER_PREFIX)}
        sealed_headers: dict[str, str] = {}
        if opened is not None:
            sealed = self.security.seal_to(body, to=site_principal(job.scheduler_site or self.site), aad=opened.aad,
                                           confidential=opened.confidential)
            body, sealed_headers = sealed.body, sealed.to_headers()
        return body, {**passthrough, **job.to_headers(), **sealed_headers}
