"""Classifier's front door: jobs from admission on ``din.v1.classify``, classified jobs on to the scheduler.

The classifier decides from the job header alone: it holds no keys and passes the
sealed body and its envelope on untouched.
"""

from __future__ import annotations

import time

from nats.aio.msg import Msg

from services.classifier.policy import WorkloadPolicy
from services.classifier.settings import ClassifierSettings
from shared.catalog import ModelCatalog
from shared.contracts.events import ClassificationV1
from shared.contracts.job import HEADER_PREFIX, JobV1
from shared.errors import DinError, ErrorCode
from shared.naming import Subjects, Topics
from shared.runtime import ServiceRuntime
from shared.security import payload_size
from shared.topology import load_topology


def create_runtime(settings: ClassifierSettings) -> ServiceRuntime:
    """Build the classifier service."""
    runtime = ServiceRuntime("classifier", settings)
    topology = load_topology(settings.topology)
    policy = WorkloadPolicy(topology.tenants, ModelCatalog.from_repository(settings.model_repo), settings.sensitive_labels)
    counts = {"classified": 0}
    runtime.detail = lambda: counts

    @runtime.hot_path(Subjects.CLASSIFY, queue="classifier")
    async def on_classify(msg: Msg) -> None:
        try:
            job = JobV1.from_headers(msg.headers)
        except ValueError:
            runtime.dead_letter(msg, "missing or invalid job header")
            return
        with runtime.tracing.hop("classifier classify", job.traceparent, **{"din.request_id": job.request_id}) as (
                _, job.traceparent):
            await classify(job, msg)

    async def classify(job: JobV1, msg: Msg) -> None:
        try:
            job.workload = policy.classify(job, payload_size(msg.data, msg.headers))
            stages = policy.cascade_stages(job)
            if stages is not None:
                job.escalate_to, job.cascade_stage = stages[1], 1
        except KeyError as exc:
            await runtime.answer_error(job.reply_to, DinError(ErrorCode.INTERNAL, f"no policy for {exc}"), job.request_id)
            return
        now_ms = time.time() * 1000.0
        job.stamps_ms["classified"] = now_ms
        headers = {k: v for k, v in msg.headers.items() if not k.startswith(HEADER_PREFIX)}
        headers.update(job.to_headers())
        await runtime.nc.publish(Subjects.SCHEDULE, msg.data, headers=headers)
        counts["classified"] += 1
        runtime.events.emit(
            Topics.CLASSIFICATIONS,
            ClassificationV1(request_id=job.request_id, tenant=job.tenant, workload=job.workload, at_ms=now_ms),
            key=job.tenant,
        )

    return runtime
