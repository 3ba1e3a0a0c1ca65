"""Classifier's front door: jobs from admission on ``din.v1.classify``, classified jobs on to the scheduler.

The classifier decides from the job header alone: it opens no payload and passes the
sealed body and its envelope on untouched. It takes only jobs whose header admission
tagged, and tags the header it hands on (``shared.security.JobFacts``), with its site's
data key, the only one it holds; its site's identity signs the errors it answers (a job
that expired on the way, a tenant without policy), as every service that answers
clients does.
"""

from __future__ import annotations

import time

from nats.aio.msg import Msg

from din.services.classifier.policy import WorkloadPolicy
from din.services.classifier.settings import ClassifierSettings
from din.shared import lifecycle
from din.shared.catalog import ModelCatalog
from din.shared.contracts.events import ClassificationV1
from din.shared.contracts.job import HEADER_PREFIX, JobV1
from din.shared.errors import DinError, ErrorCode
from din.shared.fair_input import job_tenant
from din.shared.naming import Subjects, Topics
from din.shared.runtime import Service, job_endpoint
from din.shared.security import JobFacts, PayloadSecurity, payload_size, site_principal
from din.shared.topology import load_topology


class Classifier(Service):
    """Labels each admitted job with its workload class (task, SLA, size, sensitivity, candidate models)."""

    name = "classifier"
    publishes = (Topics.CLASSIFICATIONS,)

    def __init__(self, settings: ClassifierSettings) -> None:
        super().__init__(settings)
        self.security = PayloadSecurity.from_settings(settings)
        self.runtime.sign_with(self.security)
        if self.security.enabled:
            self.runtime.bind_jobs(JobFacts(self.security, settings.site))
        self.runtime.on_start(self._start_keys)
        self.runtime.on_drain(self.security.stop)
        topology = load_topology(settings.topology)
        self.runtime.fair_weights.update(topology.tenant_weights())
        self.policy = WorkloadPolicy(
            topology, ModelCatalog.from_repository(settings.model_repo), settings.sensitive_labels
        )
        self.counts = {"classified": 0, "expired_on_arrival": 0}

    def detail(self) -> dict[str, object]:
        return {**self.counts, **self.security.detail()}

    async def _start_keys(self) -> None:
        site = site_principal(self.settings.site)
        await self.security.start(self.nc, readers=lambda agent: [site], timeout_s=self.settings.keys_wait_s)

    @job_endpoint("classify", lambda s: Subjects.classify(s.site), queue="classifier", span="classifier classify",
                  fair_by=job_tenant,
                  publishes=("schedule", "inferReply"))
    async def on_classify(self, job: JobV1, msg: Msg) -> None:
        expired = lifecycle.expired_on_arrival(job, time.time() * 1000.0)
        if expired is not None:
            self.counts["expired_on_arrival"] += 1
            await self.runtime.answer_error(job.reply_to, expired, job.request_id)
            return
        try:
            job.workload = self.policy.classify(job, payload_size(msg.data, msg.headers))
            stages = self.policy.cascade_stages(job)
            if stages is not None:
                job.escalate_to, job.cascade_stage = stages[1], 1
        except KeyError as exc:
            await self.runtime.answer_error(job.reply_to, DinError(ErrorCode.INTERNAL, f"no policy for {exc}"),
                                            job.request_id)
            return
        now_ms = time.time() * 1000.0
        job.stamps_ms["classified"] = now_ms
        headers = {k: v for k, v in msg.headers.items() if not k.startswith(HEADER_PREFIX)}
        headers.update(job.to_headers())
        await self.runtime.hand_on(Subjects.schedule(self.settings.site), msg.data, headers, job,
                                   f"scheduler at site {self.settings.site}", to_site=self.settings.site)
        self.counts["classified"] += 1
        self.runtime.events.emit(
            Topics.CLASSIFICATIONS,
            ClassificationV1(request_id=job.request_id, tenant=job.tenant, workload=job.workload, at_ms=now_ms),
            key=job.tenant,
        )


def create_runtime(settings: ClassifierSettings):
    """Build the classifier service (its runtime, for launchers that start runtimes)."""
    return Classifier(settings).runtime
