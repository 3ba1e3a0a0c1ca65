"""What an executor says about a job: the answer's body and ``served_by``, where the time went, the completion event.

No NATS and no keys here (``services.executor.sealing`` seals what this builds).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from din.services.executor.batcher import ItemResult
from din.services.executor.stages import describe
from din.shared.contracts.events import CompletionV1
from din.shared.contracts.inference import InferResponseV1, ServedByV1
from din.shared.contracts.job import JobV1
from din.shared.errors import DinError
from din.shared.lifecycle import Outcome
from din.shared.security import PayloadProtection
from din.shared.tensors import encode_outputs

HANDED_ON = (Outcome.HANDED_ON, Outcome.ESCALATED)
"""Outcomes that sent the job on instead of answering it."""


def now_ms() -> float:
    """Epoch milliseconds."""
    return time.time() * 1000.0


def rounded(timings: dict[str, float]) -> dict[str, float]:
    """Timings as they go on the wire (microsecond resolution)."""
    return {k: round(v, 3) for k, v in timings.items()}


def latency_breakdown(job: JobV1, result: ItemResult | None, now: float) -> dict[str, float]:
    """Where a job's time went, ms: admission, classification and scheduling from the stamps the job carries, a
    multi-stage job's earlier stages (``stage_<index>``: from dispatch or hand-off to their hand-off on), a
    cascade's small step (``small_stage``), then queue and compute here."""
    stamps = job.stamps_ms
    timings = {"total": now - job.received_ms}
    if {"admitted", "classified", "scheduled"} <= stamps.keys():
        timings.update(
            admission=stamps["admitted"] - job.received_ms,
            classify=stamps["classified"] - stamps["admitted"],
            schedule=stamps["scheduled"] - stamps.get("escalated", stamps["classified"]),
        )
        if "escalated" in stamps:
            timings["small_stage"] = stamps["escalated"] - stamps["classified"]
        previous = stamps["scheduled"]
        for plan_index in range(1, len(job.plan)):
            handed = stamps.get(f"stage_{plan_index}")
            if handed is not None:
                timings[f"stage_{plan_index - 1}"] = handed - previous
                previous = handed
    if result is not None:
        timings.update(queue=result.queue_ms, compute=result.compute_ms)
    return timings


def degraded(job: JobV1, model: str) -> bool:
    """Whether a smaller variant than asked for answered (not a cascade's or a plan's own choice)."""
    return model != job.model and job.cascade_stage is None and not job.plan


@dataclass(frozen=True)
class AnswerWriter:
    """Answers and completion events of the executor ``executor`` at ``site``."""

    site: str
    executor: str

    def served_by(self, job: JobV1, model: str, result: ItemResult) -> ServedByV1:
        """Who answered ``job``, with ``model`` and in the batch of ``result``."""
        return ServedByV1(
            site=self.site,
            executor=self.executor,
            model=job.model if job.plan else model,
            model_version=result.model_version or "",
            degraded=degraded(job, model),
            batch_size=result.batch_size,
            escalated=job.cascade_stage == 2,
            split_point=job.split_chosen,
            stages=[describe(stage) for stage in job.plan],
        )

    def served_without_steps(self, job: JobV1) -> ServedByV1:
        """``served_by`` of a stream that needed no decode step here (all its tokens came before)."""
        return ServedByV1(site=self.site, executor=self.executor, model=job.model, model_version="", degraded=False,
                          batch_size=1, stages=[describe(stage) for stage in job.plan])

    def response(self, job: JobV1, model: str, result: ItemResult, requested: list[str] | None) -> bytes:
        """The OIP response body of ``job``'s answer."""
        served = self.served_by(job, model, result)
        return InferResponseV1(
            model_name=served.model,
            model_version=served.model_version,
            id=job.request_id,
            outputs=encode_outputs(result.outputs, requested),
            served_by=served,
            timings_ms=rounded(latency_breakdown(job, result, now_ms())),
        ).model_dump_json().encode()

    def completion(self, job: JobV1, outcome: Outcome, *, model: str, version: str, result: ItemResult | None,
                   error: DinError | None, protection: PayloadProtection, output_bytes: int | None = None,
                   extra_timings: dict[str, float] | None = None) -> CompletionV1:
        """The completion event of ``job`` ending here in ``outcome`` (before a hand-off moves it on)."""
        now = now_ms()
        timings = {**latency_breakdown(job, result, now), **(extra_timings or {})}
        plan_step = job.plan[job.stage] if job.plan else None
        sent_on = outcome in HANDED_ON
        return CompletionV1(
            request_id=job.request_id,
            tenant=job.tenant,
            site=self.site,
            executor=self.executor,
            model=model,
            model_version=version,
            sla_class=job.sla_class,
            ok=error is None,
            error_code=error.code.value if error else None,
            batch_size=result.batch_size if result else 0,
            items=result.items if result else None,
            degraded=degraded(job, model),
            timings_ms=rounded(timings),
            at_ms=now,
            protection=protection.value,
            stage=job.cascade_stage if plan_step is None else job.stage,
            plan_stage=job.stage if plan_step is not None else None,
            cascade_step=job.cascade_stage,
            escalated=job.cascade_stage is not None and (sent_on or job.cascade_stage == 2),
            stage_kind=plan_step.kind.value if plan_step is not None else None,
            handed_on_to=job.plan[job.stage + 1].site if sent_on and plan_step is not None else None,
            output_bytes=output_bytes,
        )
