"""Admission's front door: requests on ``din.v1.infer.<tenant>.<model>``, admitted ones on to classification.

A request must come sealed by its tenant (or in clear from a tenant the crypto
policy lets in); one that cannot be authenticated is answered ``unauthenticated``,
except a replay, which is dropped: its reply subject is the original requester's,
who gets its own answer.
"""

from __future__ import annotations

import time

from nats.aio.msg import Msg

from services.admission.gate import AdmissionGate
from services.admission.ingress import RequestOpener
from services.admission.intake import peek_request_id
from services.admission.quota import QuotaLedger
from services.admission.settings import AdmissionSettings
from shared.catalog import ModelCatalog
from shared.contracts.events import AdmissionDecisionV1, PressureV1
from shared.contracts.inference import RequestHeaders
from shared.contracts.job import JobV1
from shared.credentials import TenantVerifier, read_credentials
from shared.envelope import InvalidToken, Reason
from shared.errors import DinError, ErrorCode
from shared.naming import InvalidNameError, Subjects, Topics
from shared.runtime import ServiceRuntime
from shared.recording import record_request
from shared.security import PayloadSecurity, seal_for_audit, tenant_principal
from shared.topology import load_topology

PASSTHROUGH_PREFIXES = ("Din-Tensor-", "Content-Type")
SILENT_REASONS = (Reason.REPLAY, Reason.STALE)


def create_runtime(settings: AdmissionSettings) -> ServiceRuntime:
    """Build the admission service."""
    runtime = ServiceRuntime("admission", settings)
    topology = load_topology(settings.topology)
    gate = AdmissionGate(
        TenantVerifier(read_credentials(settings.credentials_file)),
        QuotaLedger({t.name: (t.rate_per_s, t.burst) for t in topology.tenants}),
        ModelCatalog.from_repository(settings.model_repo),
        max_payload=settings.max_payload_bytes,
        shed_factor=settings.shed_factor,
    )
    security = PayloadSecurity.from_settings(settings)
    opener = RequestOpener(security, settings.max_payload_bytes)
    counts = {"admitted": 0, "refused": 0, "unanswerable": 0}
    runtime.detail = lambda: {**counts, **security.detail()}

    @runtime.on_start
    async def keys() -> None:
        await security.start(runtime.nc, readers=lambda agent: [tenant_principal(t.name) for t in topology.tenants],
                             timeout_s=settings.keys_wait_s)

    runtime.on_drain(security.stop)

    @runtime.broker.subscriber(Subjects.PRESSURE)
    async def on_pressure(pressure: PressureV1) -> None:
        gate.pressure = pressure

    def record(request_id: str, tenant: str, model: str, intake_sla, ok: bool, reason: str, detail: str, size: int):
        runtime.events.emit(
            Topics.ADMISSION_DECISIONS,
            AdmissionDecisionV1(
                request_id=request_id,
                tenant=tenant,
                model=model,
                sla_class=intake_sla,
                admitted=ok,
                reason=reason,
                detail=detail,
                input_bytes=size,
                at_ms=time.time() * 1000.0,
            ),
            key=tenant,
        )

    def keep(job: JobV1, plaintext: bytes, passthrough: dict[str, str]) -> None:
        """Record the admitted request for replay; with security on, sealed for the audit reader only."""
        if security.enabled:
            sealed = seal_for_audit(security, plaintext, request_id=job.request_id, tenant=job.tenant)
            record_request(runtime.events, Topics.REQUESTS, job, sealed.body, {**passthrough, **sealed.to_headers()})
        else:
            record_request(runtime.events, Topics.REQUESTS, job, plaintext, passthrough)

    @runtime.hot_path(Subjects.INFER_ALL, queue="admission")
    async def on_infer(msg: Msg) -> None:
        with runtime.tracing.hop("admission admit", (msg.headers or {}).get(RequestHeaders.TRACEPARENT),
                                 subject=msg.subject) as (span, traceparent):
            await admit(msg, span, traceparent)

    async def admit(msg: Msg, span, traceparent: str | None) -> None:
        received_ms = time.time() * 1000.0
        raw_tenant, raw_model = msg.subject.split(".")[3:5]
        if not msg.reply:
            counts["unanswerable"] += 1
            record(peek_request_id(msg.headers, msg.data) or "", raw_tenant, raw_model, None, False,
                   "no_reply_subject", "request sent without a reply subject", len(msg.data))
            return
        try:
            tenant, model = Subjects.parse_infer(msg.subject)
            if not gate.knows(tenant):
                raise DinError(ErrorCode.UNKNOWN_TENANT, f"tenant {tenant!r} is not known to this network")
            unsealed = opener.unseal(tenant, model, msg.reply, msg.headers, msg.data)
            intake = gate.admit(tenant, model, msg.headers, unsealed.plaintext)
        except InvalidToken as refused:
            security.refused(refused)
            counts["refused"] += 1
            request_id = peek_request_id(msg.headers, b"")
            if refused.reason not in SILENT_REASONS:
                await runtime.answer_error(msg.reply, refused, request_id)
            record(request_id or "", raw_tenant, raw_model, None, False, refused.code.value,
                   f"envelope refused ({refused.reason.value})", len(msg.data))
            return
        except (DinError, InvalidNameError) as exc:
            error = exc if isinstance(exc, DinError) else DinError(ErrorCode.BAD_REQUEST, str(exc))
            request_id = peek_request_id(msg.headers, msg.data)
            counts["refused"] += 1
            await runtime.answer_error(msg.reply, error, request_id)
            record(request_id or "", raw_tenant, raw_model, None, False, error.code.value, error.message,
                   len(msg.data))
            return
        job = JobV1(
            request_id=intake.request_id,
            tenant=tenant,
            model=model,
            model_version=intake.model_version,
            sla_class=intake.sla_class,
            deadline_ms=intake.deadline_ms,
            reply_to=msg.reply,
            content_type=intake.content_type,
            labels=intake.labels,
            allow_degrade=intake.allow_degrade,
            min_accuracy=intake.min_accuracy,
            cascade_threshold=intake.cascade_threshold,
            cascade_target_rate=intake.cascade_target_rate,
            max_tokens=intake.max_tokens,
            split=intake.split,
            protection=intake.protection,
            traceparent=traceparent,
            received_ms=received_ms,
            stamps_ms={"admitted": time.time() * 1000.0},
        )
        passthrough = {name: value for name, value in (msg.headers or {}).items()
                       if name.startswith(PASSTHROUGH_PREFIXES)}
        body, envelope_headers = opener.forward(
            unsealed, request_id=intake.request_id, tenant=tenant, model=model, reply=msg.reply,
            passthrough=passthrough, body=msg.data,
        )
        await runtime.nc.publish(Subjects.CLASSIFY, body, headers={**job.to_headers(), **passthrough, **envelope_headers})
        counts["admitted"] += 1
        keep(job, unsealed.plaintext, passthrough)
        span.set_attributes({"din.request_id": job.request_id, "din.tenant": tenant, "din.model": model})
        record(intake.request_id, tenant, model, intake.sla_class, True, "ok", "", len(unsealed.plaintext))

    return runtime
