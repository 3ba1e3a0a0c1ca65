"""Scheduler's front door: classified jobs on ``din.v1.schedule``, dispatched to an executor or a site queue.

Each job arrives sealed to its tenant; the scheduler opens it and seals it again
to the chosen site: encrypted, or integrity-only where the crypto policy allows it
on that site's link (never for sensitive data). Revoked sites get no work. A job
that cannot be authenticated is dead-lettered, never answered: its reply subject
may belong to a legitimate request it was copied from.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from nats.aio.msg import Msg
from nats.errors import NoRespondersError, TimeoutError as NatsTimeout
from nats.js.api import RetentionPolicy, StreamConfig

from services.scheduler.inflight import InflightJob, InflightTable
from services.scheduler.links import LinkTable
from services.scheduler.placement import Placement, pick_executor
from services.scheduler.plans import is_multi_stage, make_plan
from services.scheduler.registry import ExecutorRegistry
from services.scheduler.settings import SchedulerSettings, SchedulingMode
from shared.contracts.events import HeartbeatV1, PressureV1, ProbeV1, SchedulingDecisionV1
from shared.contracts.inference import RequestHeaders
from shared.catalog import ModelCatalog
from shared.contracts.job import HEADER_PREFIX, STAGE_DONE_HEADER, JobV1
from shared.envelope import InvalidToken, SealRefused
from shared.errors import DinError, ErrorCode
from shared.naming import Subjects, Topics, work_stream
from shared.runtime import ServiceRuntime
from shared.security import (
    PayloadSecurity,
    check_binding,
    request_binding,
    seal_to_site,
    site_principal,
    tenant_principal,
    without_envelope,
)
from shared.topology import load_topology

ROLL_CALL_WAIT_S = 0.2


def now_ms() -> float:
    return time.time() * 1000.0


def create_runtime(settings: SchedulerSettings) -> ServiceRuntime:
    """Build the scheduler service."""
    runtime = ServiceRuntime("scheduler", settings)
    topology = load_topology(settings.topology)
    registry = ExecutorRegistry()
    links = LinkTable(topology, home=settings.site)
    inflight = InflightTable()
    catalog = ModelCatalog.from_repository(settings.model_repo)
    cost_limits = {t.name: t.max_cost_per_1k for t in topology.tenants}
    counts = {"scheduled": 0, "refused": 0, "degraded": 0, "redispatched": 0, "deadline_answers": 0,
              "multi_stage": 0, "streams_interrupted": 0}
    enqueues: set[asyncio.Task] = set()
    security = PayloadSecurity.from_settings(settings)
    runtime.detail = lambda: {**counts, "mode": settings.mode.value, "executors": len(registry.live()),
                              "inflight": len(inflight), **security.detail()}

    def usable(site: str) -> bool:
        return not security.enabled or site_principal(site) not in security.agent.revoked

    @runtime.on_start
    async def keys() -> None:
        await security.start(
            runtime.nc,
            readers=lambda agent: [
                *(tenant_principal(t.name) for t in topology.tenants),
                *(site_principal(s.name) for s in topology.sites if site_principal(s.name) not in agent.revoked),
            ],
            timeout_s=settings.keys_wait_s,
        )

    def record(job: JobV1, placement: Placement | None, reason: str, alternatives=()) -> None:
        runtime.events.emit(
            Topics.SCHEDULING_DECISIONS,
            SchedulingDecisionV1(
                request_id=job.request_id,
                tenant=job.tenant,
                mode=settings.mode.value,
                sla_class=job.sla_class,
                chosen_executor=placement.executor.id if placement and settings.mode == SchedulingMode.CENTRALIZED
                else None,
                chosen_site=placement.executor.site if placement else None,
                chosen_model=placement.model if placement else None,
                degraded=placement.degraded if placement else False,
                predicted_ms=round(placement.predicted_ms, 3) if placement else None,
                reason=reason,
                alternatives=list(placement.alternatives if placement else alternatives),
                attempt=job.attempt,
                at_ms=now_ms(),
                plan=job.plan,
            ),
            key=job.tenant,
        )

    def seal_for(site: str, job: JobV1, body: bytes, aad: dict[str, str]) -> tuple[bytes, dict[str, str]]:
        if not security.enabled:
            return body, {}
        sealed = seal_to_site(security, body, site=site, aad=aad,
                              sensitive=job.workload is not None and job.workload.sensitive)
        return sealed.body, sealed.to_headers()

    async def dispatch(job: JobV1, body: bytes, passthrough: dict[str, str], aad: dict[str, str]) -> None:
        """Place ``job`` and send it on, or answer it with the reason it cannot run.

        ``body`` is the plaintext and ``aad`` the metadata its seal binds (both unused with security off).
        """
        try:
            placement = place(job)
        except DinError as error:
            counts["refused"] += 1
            record(job, None, error.code.value)
            await runtime.answer_error(job.reply_to, error, job.request_id)
            return
        state = placement.executor
        centralized = settings.mode == SchedulingMode.CENTRALIZED
        try:
            wire, sealed_headers = seal_for(state.site, job, body, aad)
        except SealRefused as error:
            counts["refused"] += 1
            record(job, None, ErrorCode.INTERNAL.value)
            await runtime.answer_error(job.reply_to, DinError(ErrorCode.INTERNAL, str(error)), job.request_id)
            return
        job.model_chosen = placement.model
        job.site_chosen = state.site
        job.executor_chosen = state.id if centralized else None
        job.stamps_ms["scheduled"] = now_ms()
        headers = {**passthrough, **job.to_headers(), RequestHeaders.REQUEST_ID: job.request_id, **sealed_headers}
        later = [stage.executor for stage in job.plan[1:] if stage.executor]
        inflight.add(InflightJob(job, body, passthrough, job.executor_chosen, state.site, [state.id, *later], aad,
                                 later))
        for executor in [state.id, *later]:
            registry.note_dispatch(executor, job.sla_class)
        counts["scheduled"] += 1
        counts["degraded"] += placement.degraded
        record(job, placement, placement.reason)
        if centralized:
            await runtime.nc.publish(Subjects.execute(state.site, state.id), wire, headers=headers)
        else:
            task = asyncio.create_task(enqueue(job, wire, headers))
            enqueues.add(task)
            task.add_done_callback(enqueues.discard)

    def place(job: JobV1) -> Placement:
        """The job's (first stage's) placement; a multi-stage job gets its whole plan in ``job.plan``."""
        executors = [s for s in registry.live() if usable(s.site)]
        queue_at_site = settings.mode == SchedulingMode.DISTRIBUTED
        if not is_multi_stage(job):
            return pick_executor(job, executors, links, topology, now_ms(), cost_limits, queue_at_site=queue_at_site)

        def place_stage(model: str, sites: list[str] | None) -> Placement:
            workload = job.workload.model_copy(update={"candidates": [model], "allowed_sites": sites}) \
                if job.workload else None
            stage_job = job.model_copy(update={"model": model, "model_version": None, "workload": workload})
            return pick_executor(stage_job, executors, links, topology, now_ms(), cost_limits,
                                 queue_at_site=queue_at_site)

        plan = make_plan(job, catalog, place_stage, links, topology, queue_at_site=queue_at_site)
        job.plan, job.stage = plan.stages, 0
        job.split_chosen = plan.split_point
        counts["multi_stage"] += 1
        plan.first.reason = plan.reason
        return plan.first

    async def enqueue(job: JobV1, body: bytes, headers: dict[str, str]) -> None:
        try:
            await runtime.nc.jetstream().publish(
                Subjects.work(job.site_chosen, job.model_chosen), body, headers=headers, timeout=2.0
            )
        except Exception as exc:
            if inflight.complete(job.request_id) is not None:
                await runtime.answer_error(
                    job.reply_to,
                    DinError(ErrorCode.NO_ELIGIBLE_EXECUTOR, f"site {job.site_chosen} queue unreachable: {exc}",
                             retry_after_ms=500),
                    job.request_id,
                )

    @runtime.hot_path(Subjects.SCHEDULE, queue="scheduler")
    async def on_schedule(msg: Msg) -> None:
        try:
            job = JobV1.from_headers(msg.headers)
        except ValueError:
            runtime.dead_letter(msg, "missing or invalid job header")
            return
        with runtime.tracing.hop("scheduler place", job.traceparent, **{"din.request_id": job.request_id}) as (
                _, job.traceparent):
            await schedule(job, msg)

    async def schedule(job: JobV1, msg: Msg) -> None:
        passthrough = {k: v for k, v in without_envelope(msg.headers).items() if not k.startswith(HEADER_PREFIX)}
        if not security.enabled:
            await dispatch(job, msg.data, passthrough, {})
            return
        try:
            opened = security.open_from(msg.data, msg.headers, reader=tenant_principal(job.tenant))
            check_binding(opened.aad, request_binding(job.request_id, job.tenant, job.model, job.reply_to, passthrough))
        except InvalidToken as refused:
            security.refused(refused)
            runtime.dead_letter(msg, f"unauthenticated ({refused.reason.value})")
            return
        await dispatch(job, opened.plaintext, passthrough, opened.aad)

    @runtime.hot_path(Subjects.COMPLETED_ALL)
    async def on_completed(msg: Msg) -> None:
        headers = msg.headers or {}
        if STAGE_DONE_HEADER in headers:
            entry = inflight.advance(headers[STAGE_DONE_HEADER])
            if entry is not None and entry.counted_on:
                registry.note_completion(entry.counted_on.pop(0), entry.job.sla_class)
            return
        request_id = headers.get(RequestHeaders.REQUEST_ID)
        entry = inflight.complete(request_id) if request_id else None
        if entry is not None:
            release(entry)

    @runtime.broker.subscriber(Subjects.HEARTBEAT_ALL)
    async def on_heartbeat(heartbeat: HeartbeatV1) -> None:
        if not usable(heartbeat.site):
            if registry.get(heartbeat.executor) is not None:
                runtime.log.warning("executor %s at revoked site %s: no more work", heartbeat.executor, heartbeat.site)
                registry.forget(heartbeat.executor)
                for entry in inflight.on_executor(heartbeat.executor):
                    await redispatch(entry)
            return
        if registry.observe(heartbeat, time.monotonic()):
            runtime.log.info("discovered executor %s at %s serving %s", heartbeat.executor, heartbeat.site,
                             ", ".join(m.name for m in heartbeat.models))

    async def watchdog() -> None:
        interval = settings.watchdog_interval_ms / 1000.0
        while True:
            await asyncio.sleep(interval)
            for dead in registry.expire(time.monotonic()):
                runtime.log.warning("executor %s at %s missed its heartbeats: dropped", dead.id, dead.site)
                for entry in inflight.on_executor(dead.id):
                    await redispatch(entry)
            for entry in inflight.due(now_ms(), settings.deadline_margin_ms):
                release(entry)
                counts["deadline_answers"] += 1
                lost = entry.executor is not None and registry.get(entry.executor) is None
                code = ErrorCode.EXECUTOR_LOST if lost else ErrorCode.DEADLINE_EXCEEDED
                await runtime.answer_error(
                    entry.job.reply_to,
                    DinError(code, f"no answer from site {entry.site} before the deadline"),
                    entry.job.request_id,
                )

    def release(entry: InflightJob) -> None:
        """Take a closed job off the load estimates of the executors it still counted on."""
        for executor in entry.counted_on:
            registry.note_completion(executor, entry.job.sla_class)
        entry.counted_on = []

    async def redispatch(entry: InflightJob) -> None:
        release(entry)
        job = entry.job
        if job.max_tokens is not None and entry.advanced:
            counts["streams_interrupted"] += 1
            await runtime.answer_error(
                job.reply_to,
                DinError(ErrorCode.EXECUTOR_LOST, "the token stream was interrupted: its decode executor died"),
                job.request_id,
            )
            return
        job.attempt += 1
        job.executor_chosen = None
        job.plan, job.stage, job.split_chosen = [], 0, None
        if job.deadline_ms - now_ms() <= settings.deadline_margin_ms:
            await runtime.answer_error(
                job.reply_to, DinError(ErrorCode.EXECUTOR_LOST, "the executor died and no time is left"),
                job.request_id,
            )
            return
        counts["redispatched"] += 1
        await dispatch(job, entry.body, entry.passthrough, entry.aad)

    async def prober() -> None:
        seq = 0
        remote = [s.name for s in topology.sites if s.name != settings.site]
        while True:
            for site in remote:
                seq += 1
                links.sent(site)
                probe = ProbeV1(from_site=settings.site, to_site=site, sent_ms=now_ms(), seq=seq)
                started = time.perf_counter()
                with contextlib.suppress(NatsTimeout, NoRespondersError):
                    await runtime.nc.request(Subjects.probe(site), probe.model_dump_json().encode(), timeout=1.0)
                    links.observe_rtt(site, (time.perf_counter() - started) * 1000.0)
            await asyncio.sleep(settings.probe_interval_s)

    async def pressure() -> None:
        while True:
            await asyncio.sleep(settings.pressure_interval_s)
            live = registry.live()
            fastest = min(
                (links.rtt_ms(s.site) + min(m.compute_ms_per_item for m in s.heartbeat.models) for s in live
                 if s.heartbeat.models),
                default=0.0,
            )
            report = PressureV1(
                inflight=len(inflight),
                capacity=sum(s.heartbeat.capacity for s in live),
                fastest_ms=round(fastest, 3),
                executors=len(live),
                at_ms=now_ms(),
            )
            await runtime.nc.publish(Subjects.PRESSURE, report.model_dump_json().encode())

    @runtime.on_start
    async def start_background() -> None:
        if settings.mode == SchedulingMode.DISTRIBUTED:
            await ensure_work_streams()
        await runtime.nc.publish(Subjects.ROLL_CALL, b"")
        await asyncio.sleep(ROLL_CALL_WAIT_S)
        for loop in (watchdog, prober, pressure):
            runtime.spawn(loop(), name=loop.__name__)

    async def ensure_work_streams() -> None:
        for site in topology.sites:
            js = runtime.nc.jetstream(domain=site.name)
            config = StreamConfig(
                name=work_stream(site.name),
                subjects=[Subjects.work_all(site.name)],
                retention=RetentionPolicy.WORK_QUEUE,
                max_age=600.0,
            )
            try:
                await js.add_stream(config)
            except Exception as exc:
                runtime.log.warning("work stream of site %s not created yet: %s", site.name, exc)

    @runtime.on_drain
    async def finish_enqueues() -> None:
        if enqueues:
            await asyncio.wait(enqueues, timeout=2.0)
        await security.stop()

    return runtime
