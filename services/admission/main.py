"""Admission's front door: requests on ``din.v1.infer.<tenant>.<model>``, admitted ones on to classification.

A request must come sealed by its tenant (or in clear from a tenant the crypto
policy lets in); one that cannot be authenticated is answered ``unauthenticated``,
except a replay, which is dropped: its reply subject is the original requester's,
who gets its own answer.

With a control plane at every site, each site's admission serves the clients of
its own NATS server (NATS prefers the local member of the ``admission`` queue
group) and hands the job to its own site's classifier. A request this site may
not open (its tenant's data is confined to other sites, or its ``Din-Labels``
mark it sensitive and this is not one of the tenant's sensitive sites) is handed
on unopened to the admission of the nearest site that may (``din.v1.admit.*``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from faststream.nats.annotations import NatsMessage
from nats.aio.msg import Msg

from din.services.admission.gate import AdmissionGate, Replayed
from din.services.admission.ingress import RequestOpener, Unsealed
from din.services.admission.intake import Intake, admitted_job, peek_request_id
from din.services.admission.nonces import SharedNonces
from din.services.admission.quota import QuotaLedger, daily_budgets, quota_shares
from din.services.admission.refusals import RefusalTally
from din.services.admission.settings import AdmissionSettings
from din.services.admission.shedding import LoadShedder
from din.shared.bus.permissions import is_tenant_reply
from din.shared.catalog import ModelCatalog
from din.shared.contracts.events import AdmissionDecisionV1, PressureV1
from din.shared.contracts.inference import RequestHeaders, SlaClass
from din.shared.contracts.job import JobV1
from din.shared.credentials import TenantVerifier, read_credentials
from din.shared.envelope import H_NONCE, InvalidToken, Reason
from din.shared.errors import DinError, ErrorCode
from din.shared.fair_input import request_tenant
from din.shared.naming import InvalidNameError, Subjects, Topics
from din.shared.recording import record_request
from din.shared.runtime import Service, control, endpoint
from din.shared.security import (
    ControlRefused,
    ControlVerifier,
    JobFacts,
    PayloadSecurity,
    audit_reader,
    held_readers,
    seal_for_audit,
    site_principal,
    tenant_principal,
)
from din.shared.sensitivity import header_labels, marks_sensitive
from din.shared.topology import load_topology

PASSTHROUGH_PREFIXES = ("Din-Tensor-", "Content-Type")
SILENT_REASONS = (Reason.REPLAY, Reason.STALE)
SHED_RECORD_EVERY_S = 0.25


@dataclass(frozen=True)
class Admitted:
    """A request that passed the gate: where it goes, what it asked for, and its opened body."""

    tenant: str
    model: str
    unsealed: Unsealed
    intake: Intake


class Admission(Service):
    """Authenticates, validates and rate-limits every request, records it, and sends it on to the classifier."""

    name = "admission"
    publishes = (Topics.ADMISSION_DECISIONS,)

    def __init__(self, settings: AdmissionSettings) -> None:
        super().__init__(settings)
        self.topology = load_topology(settings.topology)
        self.gate = AdmissionGate(
            TenantVerifier(read_credentials(settings.credentials_file)),
            QuotaLedger(quota_shares(self.topology, settings.site), daily=daily_budgets(self.topology, settings.site)),
            ModelCatalog.from_repository(settings.model_repo),
            max_payload=settings.max_payload_bytes,
            shedder=LoadShedder(self.topology.tenant_weights(), target_ms=settings.shed_target_ms,
                                instances=self.topology.replicas_at(settings.site), shed_factor=settings.shed_factor),
            models={t.name: frozenset(t.models) for t in self.topology.tenants if t.models is not None},
            proof_window_s=settings.proof_window_s, bearer_tokens=settings.bearer_tokens,
        )
        self.runtime.fair_weights.update(self.topology.tenant_weights())
        self.security = PayloadSecurity.from_settings(settings)
        self.runtime.sign_with(self.security)
        if self.security.enabled:
            self.runtime.bind_jobs(JobFacts(self.security, settings.site))
        self.verifier = ControlVerifier(self.security.agent)
        self.audit = audit_reader(self.topology, settings.site)
        self.opener = RequestOpener(self.security, settings.max_payload_bytes)
        self.counts = {"admitted": 0, "refused": 0, "shed": 0, "unanswerable": 0, "handed_over": 0,
                       "foreign_reply": 0}
        self.refusals = RefusalTally()
        replicated = self.topology.replicas_at(settings.site) > 1 and self.security.enabled
        self.request_inputs = {Subjects.INFER_ALL, Subjects.admit_all(settings.site)}
        self.nonces = (SharedNonces(settings.site, settings.replay_window_s, settings.replicas_in(settings.site))
                       if replicated else None)
        self.runtime.on_start(self._start_keys)
        self.runtime.on_start(self._start_refusals)
        self.runtime.on_drain(self.security.stop)
        self.runtime.on_drain(self._record_refusals)

    def detail(self) -> dict[str, object]:
        return {**self.counts, **self.gate.shedder.detail(), **self.gate.credential_detail(), **self.security.detail(),
                **self.verifier.detail()}

    async def _start_keys(self) -> None:
        if self.nonces is not None:
            await self.nonces.start(self.nc)
        held = held_readers(self.topology, self.settings.site)
        readers = [self.audit, site_principal(self.settings.site),
                   *(tenant_principal(t.name) for t in self.topology.tenants if tenant_principal(t.name) in held)]
        await self.security.start(
            self.nc, readers=lambda agent: readers,
            timeout_s=self.settings.keys_wait_s,
        )

    async def _start_refusals(self) -> None:
        self.runtime.spawn(self._record_refusals_every(SHED_RECORD_EVERY_S), name="record_refusals")

    async def _record_refusals_every(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            await self._record_refusals(force=False)

    async def _record_refusals(self, force: bool = True) -> None:
        """Record the shed requests of every closed window (of every window at shutdown)."""
        for decision in self.refusals.due(time.time() * 1000.0, force=force):
            self.runtime.events.emit(Topics.ADMISSION_DECISIONS, decision, key=decision.tenant)

    @control("pressure", lambda s: Subjects.pressure(s.site))
    async def on_pressure(self, message: NatsMessage) -> None:
        """Keep the scheduler's latest view of network load, signed by this site: the gate sheds on it."""
        try:
            self.gate.shedder.observe(self.verifier.open_message("pressure", message.raw_message, PressureV1))
        except ControlRefused:
            return

    @endpoint("infer", Subjects.INFER_ALL, queue="admission", fair_by=request_tenant,
              publishes=("classify", "admit", "inferReply", Topics.ADMISSION_DECISIONS, Topics.REQUESTS))
    async def on_infer(self, msg: Msg) -> None:
        """A client's request: handed on when this site may not open it, else admitted here."""
        if msg.reply and await self._hand_over(msg):
            return
        await self._receive(msg, Subjects.parse_infer)

    @endpoint("admit", lambda s: Subjects.admit_all(s.site), queue="admission", fair_by=request_tenant,
              publishes=("classify", "inferReply", Topics.ADMISSION_DECISIONS, Topics.REQUESTS))
    async def on_admit(self, msg: Msg) -> None:
        """A request another site's admission handed here to be opened (never handed on again)."""
        await self._receive(msg, Subjects.parse_admit)

    async def _receive(self, msg: Msg, parse: Callable[[str], tuple[str, str]]) -> None:
        """Admit one request (or answer and record its refusal), as one hop of its trace; shed it first if the
        path is congested and its tenant past its share."""
        received_ms = time.time() * 1000.0
        try:
            if await self._shed(msg, parse, received_ms):
                return
            with self.runtime.tracing.hop("admission admit", (msg.headers or {}).get(RequestHeaders.TRACEPARENT),
                                          subject=msg.subject) as (span, traceparent):
                if not msg.reply:
                    self._unanswerable(msg)
                    return
                if self.settings.nats_creds_file is not None and not self._own_reply(msg, parse):
                    return
                admitted = await self._admit(msg, parse)
                if admitted is None:
                    return
                job = self._job(admitted, msg.reply, traceparent, received_ms)
                await self._forward(job, admitted, msg)
                span.set_attributes({"din.request_id": job.request_id, "din.tenant": job.tenant,
                                     "din.model": job.model})
        finally:
            self.gate.shedder.handled(time.time() * 1000.0 - received_ms)

    async def _shed(self, msg: Msg, parse: Callable[[str], tuple[str, str]], now_ms: float) -> bool:
        """The first, cheap check of a request, before it is traced, opened or read: while the path or this
        admission's input is congested, a tenant past its fair share is answered ``overloaded`` at once and only
        counted (``RefusalTally``), so shedding costs far less than serving. A request this cannot judge (no
        reply subject or someone else's, a bad subject, an unknown tenant) goes the whole way and is refused
        there for its own reason. False when the request goes on."""
        if not msg.reply:
            return False
        try:
            tenant, model = parse(msg.subject)
        except InvalidNameError:
            return False
        if not self.gate.knows(tenant) or (self.settings.nats_creds_file is not None
                                           and not is_tenant_reply(tenant, msg.reply)):
            return False
        try:
            self.gate.shedder.check_share(tenant, now_ms, self.runtime.pending_on(self.request_inputs))
        except DinError as error:
            request_id = (msg.headers or {}).get(RequestHeaders.REQUEST_ID)
            self.counts["refused"] += 1
            self.counts["shed"] += 1
            await self.runtime.answer_error(msg.reply, error, request_id)
            self.refusals.add(tenant, model, error, request_id or "", len(msg.data), now_ms)
            return True
        return False

    async def _admit(self, msg: Msg, parse: Callable[[str], tuple[str, str]]) -> Admitted | None:
        """The request opened and through the gate; ``None`` once a refusal has been answered and recorded."""
        try:
            tenant, model = parse(msg.subject)
            if not self.gate.knows(tenant):
                raise DinError(ErrorCode.UNKNOWN_TENANT, f"tenant {tenant!r} is not known to this network")
            unsealed = self.opener.unseal(tenant, model, msg.reply, msg.headers, msg.data)
            await self._claim(unsealed)
            sealed = unsealed.envelope.get(H_NONCE) is not None
            intake = self.gate.admit(tenant, model, msg.headers, unsealed.plaintext, reply=msg.reply, sealed=sealed)
            await self._claim_proof(intake, sealed)
            return Admitted(tenant, model, unsealed, intake)
        except InvalidToken as refused:
            await self._refuse_envelope(msg, refused)
        except Replayed as replayed:
            self._replayed(msg, replayed)
        except (DinError, InvalidNameError) as exc:
            await self._refuse(msg, exc if isinstance(exc, DinError) else DinError(ErrorCode.BAD_REQUEST, str(exc)))
        return None

    def _hand_over_site(self, tenant: str, headers: dict[str, str] | None) -> str | None:
        """The site whose admission must open this request instead of this one, or None to open it here."""
        if not self.topology.federated or not self.gate.knows(tenant):
            return None
        labels = header_labels((headers or {}).get(RequestHeaders.LABELS))
        sensitive = marks_sensitive(labels, self.settings.sensitive_labels)
        here = self.settings.site
        revoked = self.security.agent.revoked if self.security.enabled else ()
        target = self.topology.opening_site(here, tenant, sensitive, lambda site: site_principal(site) not in revoked)
        if target is None:
            raise DinError(ErrorCode.NO_ELIGIBLE_EXECUTOR,
                           f"tenant {tenant!r}'s sensitive data may be opened at no usable site with a control plane")
        return None if target == here else target

    async def _hand_over(self, msg: Msg) -> bool:
        """Hand a request this site may not open to the nearest site that may; False when it stays here."""
        try:
            tenant, model = Subjects.parse_infer(msg.subject)
            target = self._hand_over_site(tenant, msg.headers)
        except InvalidNameError:
            return False
        except DinError as error:
            await self._refuse(msg, error)
            return True
        if target is None:
            return False
        await self.nc.publish(Subjects.admit(target, tenant, model), msg.data, reply=msg.reply, headers=msg.headers)
        self.counts["handed_over"] += 1
        self._decision(peek_request_id(msg.headers, b"") or "", tenant, model, None, False, "handed_over",
                       f"opened at site {target}, not here", len(msg.data))
        return True

    async def _claim(self, unsealed: Unsealed) -> None:
        """With several admissions at this site, a nonce is accepted once by all of them."""
        nonce = unsealed.envelope.get(H_NONCE)
        if self.nonces is not None and nonce is not None and not await self.nonces.claim(nonce):
            raise InvalidToken(Reason.REPLAY)

    async def _claim_proof(self, intake: Intake, sealed: bool) -> None:
        """With several admissions at this site, an unsealed request's token proof is accepted once by all."""
        proof = intake.credential.nonce if intake.credential is not None else None
        if self.nonces is not None and proof is not None and not sealed and not await self.nonces.claim(f"p{proof}"):
            raise self.gate.refused_replay()

    def _replayed(self, msg: Msg, replayed: Replayed) -> None:
        """A request whose proof was used before: counted and recorded, not answered (the reply subject is the
        original requester's)."""
        self.counts["refused"] += 1
        raw_tenant, raw_model = self._raw_target(msg)
        self._decision(peek_request_id(msg.headers, msg.data) or "", raw_tenant, raw_model, None, False,
                       replayed.code.value, "token proof used before", len(msg.data))

    def _job(self, admitted: Admitted, reply_to: str, traceparent: str | None, received_ms: float) -> JobV1:
        """The job of an admitted request: every option it asked for, and where its answer goes."""
        return admitted_job(admitted.intake, tenant=admitted.tenant, model=admitted.model, reply_to=reply_to,
                            traceparent=traceparent, received_ms=received_ms, admitted_ms=time.time() * 1000.0)

    async def _forward(self, job: JobV1, admitted: Admitted, msg: Msg) -> None:
        """Send the job on to the classifier, record the request and the admission."""
        passthrough = {name: value for name, value in (msg.headers or {}).items()
                       if name.startswith(PASSTHROUGH_PREFIXES)}
        body, envelope_headers = self.opener.forward(
            admitted.unsealed, request_id=job.request_id, tenant=job.tenant, model=job.model, reply=msg.reply,
            passthrough=passthrough, body=msg.data,
        )
        await self.runtime.hand_on(Subjects.classify(self.settings.site), body,
                                   {**job.to_headers(), **passthrough, **envelope_headers}, job,
                                   f"classifier at site {self.settings.site}", to_site=self.settings.site)
        self.counts["admitted"] += 1
        self._keep(job, admitted.unsealed.plaintext, passthrough)
        self._decision(job.request_id, job.tenant, job.model, job.sla_class, True, "ok", "",
                       len(admitted.unsealed.plaintext))

    def _unanswerable(self, msg: Msg) -> None:
        """A request without a reply subject: nobody to answer, so only counted and recorded."""
        raw_tenant, raw_model = self._raw_target(msg)
        self.counts["unanswerable"] += 1
        self._decision(peek_request_id(msg.headers, msg.data) or "", raw_tenant, raw_model, None, False,
                       "no_reply_subject", "request sent without a reply subject", len(msg.data))

    def _own_reply(self, msg: Msg, parse: Callable[[str], tuple[str, str]]) -> bool:
        """Whether the reply subject is the sending tenant's own inbox; a request naming anyone else's (another
        tenant's, a service's acknowledgement handle) is not answered there: only counted and recorded."""
        try:
            tenant, _ = parse(msg.subject)
        except InvalidNameError:
            return True
        if is_tenant_reply(tenant, msg.reply):
            return True
        raw_tenant, raw_model = self._raw_target(msg)
        self.counts["foreign_reply"] += 1
        self.runtime.log.warning("request on %s names a reply subject outside the tenant's inboxes: dropped",
                                 msg.subject)
        self._decision(peek_request_id(msg.headers, msg.data) or "", raw_tenant, raw_model, None, False,
                       "foreign_reply_subject", "reply subject outside the tenant's own inboxes", len(msg.data))
        return False

    async def _refuse_envelope(self, msg: Msg, refused: InvalidToken) -> None:
        """An envelope that does not open: answered (unless it is a replay or stale), counted and recorded."""
        self.security.refused(refused)
        self.counts["refused"] += 1
        request_id = peek_request_id(msg.headers, b"")
        if refused.reason not in SILENT_REASONS:
            await self.runtime.answer_error(msg.reply, refused, request_id)
        raw_tenant, raw_model = self._raw_target(msg)
        self._decision(request_id or "", raw_tenant, raw_model, None, False, refused.code.value,
                       f"envelope refused ({refused.reason.value})", len(msg.data))

    async def _refuse(self, msg: Msg, error: DinError) -> None:
        """A request the gate refused: answered with the error, counted and recorded."""
        request_id = peek_request_id(msg.headers, msg.data)
        self.counts["refused"] += 1
        await self.runtime.answer_error(msg.reply, error, request_id)
        raw_tenant, raw_model = self._raw_target(msg)
        self._decision(request_id or "", raw_tenant, raw_model, None, False, error.code.value, error.message,
                       len(msg.data))

    @staticmethod
    def _raw_target(msg: Msg) -> tuple[str, str]:
        parts = msg.subject.split(".")
        tenant, model = parts[4:6] if parts[2:3] == ["admit"] else parts[3:5]
        return tenant, model

    def _decision(self, request_id: str, tenant: str, model: str, sla_class: SlaClass | None, admitted: bool,
                  reason: str, detail: str, size: int) -> None:
        self.runtime.events.emit(
            Topics.ADMISSION_DECISIONS,
            AdmissionDecisionV1(
                request_id=request_id, tenant=tenant, model=model, sla_class=sla_class, admitted=admitted,
                reason=reason, detail=detail, input_bytes=size, at_ms=time.time() * 1000.0,
            ),
            key=tenant,
        )

    def _keep(self, job: JobV1, plaintext: bytes, passthrough: dict[str, str]) -> None:
        """Record the admitted request for replay; with security on, sealed for the audit reader only."""
        if self.security.enabled:
            sealed = seal_for_audit(self.security, plaintext, request_id=job.request_id, tenant=job.tenant,
                                    reader=self.audit)
            record_request(self.runtime.events, Topics.REQUESTS, job, sealed.body,
                           {**passthrough, **sealed.to_headers()})
        else:
            record_request(self.runtime.events, Topics.REQUESTS, job, plaintext, passthrough)


def create_runtime(settings: AdmissionSettings):
    """Build the admission service (its runtime, for launchers that start runtimes)."""
    return Admission(settings).runtime
