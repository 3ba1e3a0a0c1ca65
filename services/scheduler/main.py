"""Scheduler's front door: classified jobs on ``din.v1.schedule.<site>``, dispatched to an executor or a site queue.

Each job arrives sealed to its tenant; the scheduler opens it and seals it again
to the chosen site: encrypted, or integrity-only where the crypto policy allows it
on that site's link (never for sensitive data). Revoked sites get no work. A job
that cannot be authenticated is dead-lettered, never answered: its reply subject
may belong to a legitimate request it was copied from.

A dispatched job stays in flight until a completion event closes it; the rules
of when (and of what an executor's death, a fenced executor or the deadline does
to it) are in ``shared.lifecycle``. The watchdog declares losses and answers
overdue jobs only once the scheduler is caught up on its own input.
"""

from __future__ import annotations

import asyncio
import time
import uuid

from faststream.nats.annotations import NatsMessage
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from din.services.scheduler.coldstart import ColdStarts, Held, cold_startable
from din.services.scheduler.federation import LinkHealth, RemoteSites, SiteDecision, choose_site, summarize
from din.services.scheduler.inflight import InflightJob, InflightTable
from din.services.scheduler.links import LinkTable
from din.services.scheduler.placement import Placement, assign
from din.services.scheduler.plans import is_multi_stage, place_job
from din.services.scheduler.registry import ExecutorRegistry, finished_by
from din.services.scheduler.reports import ServiceMeter, decision_record, pressure_report
from din.services.scheduler.rosters import MISSED_ROSTERS, HubRosters, LostExecutors, roster
from din.services.scheduler.settings import SchedulerSettings, SchedulingMode
from din.shared import lifecycle
from din.shared.catalog import ModelCatalog
from din.shared.contracts.events import CompletionV1, HeartbeatV1, ProbeV1
from din.shared.contracts.federation import SiteRosterV1, SiteSummaryV1
from din.shared.contracts.inference import RequestHeaders
from din.shared.contracts.job import HEADER_PREFIX, JobV1
from din.shared.contracts.scaling import AWAITING_EXECUTOR
from din.shared.envelope import H_SENDER, InvalidToken, SealRefused
from din.shared.errors import DinError, ErrorCode
from din.shared.fair_input import job_tenant
from din.shared.lifecycle import Redispatch
from din.shared.naming import Subjects, Topics
from din.shared.runtime import Service, control, endpoint, job_endpoint
from din.shared.security import (
    ANSWER_FIELD,
    ANSWER_KEY_FIELD,
    ANSWER_PLAIN,
    CONTROL_RULES,
    ControlRefused,
    ControlSigner,
    ControlVerifier,
    JobFacts,
    Opened,
    PayloadSecurity,
    Refusal,
    check_binding,
    held_readers,
    request_binding,
    seal_to_site,
    site_of,
    site_principal,
    tenant_principal,
    verify_reply,
    without_envelope,
)
from din.shared.topology import load_topology
from din.shared.workqueue import work_stream_config

ROLL_CALL_WAIT_S = 0.2
NEWS_GAP_S = 0.1
"""After an executor appears, the summary and roster wait this long (for others starting with it), then go out:
at most ten a second while executors come and go, whatever their number."""
ENQUEUE_TIMEOUT_S = 2.0
ENQUEUE_RETRY_S = 0.2
MSG_ID_HEADER = "Nats-Msg-Id"
PROBE_TIMEOUT_S = 1.0
CATCH_UP_S = 0.5
"""Longest the watchdog waits, per tick, to be caught up on its input (else it tries again next tick)."""
CATCH_UP_POLL_S = 0.001
DEAF_AFTER_S = 0.5
"""A stall of the scheduler's own loop this long means it could not hear executors meanwhile: it pardons them."""
DISPATCH_PUBLISHES = ("execute", "work", "inferReply", Topics.SCHEDULING_DECISIONS)
"""Where placing a job sends: to its executor or its site's queue, or its refusal to the client; and the decision."""
REDISPATCH_REFUSALS = {
    Redispatch.STREAM_INTERRUPTED: "the token stream was interrupted: its decode executor died",
    Redispatch.NO_TIME_LEFT: "the executor died and no time is left",
}


def now_ms() -> float:
    return time.time() * 1000.0


def heartbeats_heard(settings: SchedulerSettings) -> str:
    """The heartbeats a scheduler listens to: its own site's when it schedules only that site or learns the
    others' executors from rosters (a control plane per site), else every site's (the hub's scheduler of a
    network with one control plane)."""
    own = settings.own_site_only is True or settings.rosters is True
    return Subjects.heartbeat_site(settings.site) if own else Subjects.HEARTBEAT_ALL


def rosters_heard(settings: SchedulerSettings) -> str:
    """Every site's rosters for the hub's scheduler of a control plane per site; a site's scheduler hears only
    its own site's (its replicas', ignored), so no roster crosses into a site."""
    return Subjects.ROSTER_ALL if settings.rosters is True else Subjects.roster(settings.site)


def completions_heard(settings: SchedulerSettings) -> str:
    """The completions a scheduler listens to: of the executors it places on (see ``heartbeats_heard``)."""
    return Subjects.completed(settings.site) if settings.own_site_only is True else Subjects.COMPLETED_ALL


class Scheduler(Service):
    """Places each job on the executor (or site queue) that answers it soonest under its constraints, and keeps
    every dispatched job to exactly one answer."""

    name = "scheduler"
    publishes = (*DISPATCH_PUBLISHES, "schedule", "probe", "pressure", "rollCall", "summary", "roster")

    def __init__(self, settings: SchedulerSettings) -> None:
        super().__init__(settings)
        self.topology = load_topology(settings.topology)
        self.runtime.fair_weights.update(self.topology.tenant_weights())
        self.sites = self.topology.scheduled_sites(settings.site)
        self.topology_sites = {site.name for site in self.topology.sites}
        self.registry = ExecutorRegistry()
        self.links = LinkTable(self.topology, home=settings.site)
        self.health = LinkHealth(self.links)
        self.remote = RemoteSites(settings.site)
        self.hub_rosters = HubRosters(settings.site)
        self.lost = LostExecutors(keep_ms=MISSED_ROSTERS * settings.summary_interval_s * 1000.0)
        self.inflight = InflightTable()
        self.meter = ServiceMeter()
        self.catalog = ModelCatalog.from_repository(settings.model_repo)
        self.cost_limits = {t.name: t.max_cost_per_1k for t in self.topology.tenants}
        self.counts = {"scheduled": 0, "refused": 0, "degraded": 0, "redispatched": 0, "deadline_answers": 0,
                       "multi_stage": 0, "streams_interrupted": 0, "forwarded": 0,
                       "expired_on_arrival": 0, "out_of_view": 0, "taken_back": 0, "pardons": 0,
                       "watchdog_deferred": 0, "watchdog_waits": 0, "awaiting_executor": 0}
        self.enqueues: set[asyncio.Task] = set()
        self.news = asyncio.Event()
        self.cold = ColdStarts()
        self.fleet_grew = False
        self.security = PayloadSecurity.from_settings(settings)
        self.runtime.sign_with(self.security)
        if self.security.enabled:
            self.runtime.bind_jobs(JobFacts(self.security, settings.site))
        self.signer = ControlSigner.of(self.security.agent)
        self.verifier = ControlVerifier(self.security.agent)
        self.runtime.on_start(self.start_keys)
        self.runtime.on_start(self.start_background)
        self.runtime.on_drain(self.release_held)
        self.runtime.on_drain(self.finish_enqueues)

    @property
    def centralized(self) -> bool:
        return self.settings.mode == SchedulingMode.CENTRALIZED

    def detail(self) -> dict[str, object]:
        return {**self.counts, "mode": self.settings.mode.value, "executors": len(self.registry.live()),
                "inflight": len(self.inflight), **self.security.detail(), **self.verifier.detail()}

    @job_endpoint("schedule", lambda s: Subjects.schedule(s.site), queue="scheduler", span="scheduler place",
                  fair_by=job_tenant,
                  publishes=(*DISPATCH_PUBLISHES, Topics.DEAD_LETTER, Topics.SPANS))
    async def on_schedule(self, job: JobV1, msg: Msg) -> None:
        """Place a job; one that arrives past its cutoff is answered ``deadline_exceeded`` and not placed (a job
        handed back to this scheduler is closed then, so its watchdog does not answer it too)."""
        expired = lifecycle.expired_on_arrival(job, now_ms(), self.settings.deadline_margin_ms)
        if expired is not None:
            self.counts["expired_on_arrival"] += 1
            self.close(job.request_id)
            await self.runtime.answer_error(job.reply_to, expired, job.request_id)
            return
        passthrough = {k: v for k, v in without_envelope(msg.headers).items() if not k.startswith(HEADER_PREFIX)}
        if not self.security.enabled:
            await self.dispatch(job, msg.data, passthrough, {})
            return
        try:
            opened = self.open_job(job, msg)
            check_binding(opened.aad, request_binding(job.request_id, job.tenant, job.model, job.reply_to,
                                                      passthrough))
        except InvalidToken as refused:
            self.security.refused(refused)
            self.runtime.dead_letter(msg, f"unauthenticated ({refused.reason.value})")
            return
        if ANSWER_KEY_FIELD not in opened.aad and opened.aad.get(ANSWER_FIELD) != ANSWER_PLAIN:
            self.close(job.request_id)
            await self.refuse(job, DinError(ErrorCode.BAD_REQUEST, "a sealed request must carry the client's answer "
                                            "key (answer_key in its binding): answers are sealed to it"))
            return
        await self.dispatch(job, opened.plaintext, passthrough, opened.aad)

    def open_job(self, job: JobV1, msg: Msg) -> Opened:
        """A job sealed for this site alone: by its client (through admission), by this site's admission (a
        request that came in clear), by an executor handing it back, or by another site's scheduler forwarding
        it."""
        sites = {site.name for site in self.topology.sites}
        client = tenant_principal(job.tenant)
        sender = (msg.headers or {}).get(H_SENDER, "")
        return self.security.open_to_me(
            msg.data, msg.headers, senders=lambda name: name == client or site_of(name) in sites,
            allow_integrity=sender != client and self.security.agent.integrity_allowed(site_of(sender)))

    @endpoint("completed", completions_heard)
    async def on_completed(self, msg: Msg) -> None:
        """A job's completion, signed by its executor's site: closes the job (or advances its plan, or takes a
        fenced job back)."""
        try:
            event = self.verifier.open("completed", msg.subject, msg.data, msg.headers)
        except ControlRefused:
            return
        self.registry.heard(event.executor, event.at_ms)
        fenced = lifecycle.fenced_job(msg.headers)
        if fenced is not None:
            await self.take_back(*fenced, sender=event.executor)
            return
        advanced = lifecycle.stage_done(msg.headers)
        if advanced is not None:
            entry = self.inflight.advance(advanced)
            if entry is not None and entry.counted_on:
                executor = entry.counted_on.pop(0)
                self.registry.note_completion(executor, entry.job.sla_class, finished_by(event, executor))
            return
        closed = lifecycle.closes_job(msg.headers)
        if closed and self.close(closed, event) is not None:
            self.meter.note(now_ms(), event.timings_ms)

    async def take_back(self, request_id: str, key: str, sender: str) -> None:
        """An executor fenced a job (``lifecycle.takes_back``): dispatched again, or answered, if it still held it."""
        entry = self.inflight.get(request_id)
        if entry is None or not lifecycle.takes_back(entry.executor, lifecycle.dispatch_key(entry.job, entry.advanced),
                                                     sender, key):
            return
        self.inflight.complete(request_id)
        self.counts["taken_back"] += 1
        await self.redispatch(entry)

    @control("heartbeat", heartbeats_heard, publishes=DISPATCH_PUBLISHES)
    async def on_heartbeat(self, message: NatsMessage) -> None:
        """An executor's heartbeat, signed by its site: it comes into view, or stays there."""
        try:
            heartbeat = self.verifier.open_message("heartbeat", message.raw_message, HeartbeatV1)
        except ControlRefused as refused:
            claimed = CONTROL_RULES["heartbeat"].parse(message.raw_message.subject)
            if refused.reason == Refusal.REVOKED and claimed and refused.signer == site_principal(claimed["site"]):
                await self.stop_using(claimed["executor"], claimed["site"])
            return
        if heartbeat.site not in self.sites:
            return
        if not self.usable(heartbeat.site):
            await self.stop_using(heartbeat.executor, heartbeat.site)
            return
        if self.registry.observe(heartbeat, time.monotonic()):
            self.log.info("discovered executor %s at %s serving %s", heartbeat.executor, heartbeat.site,
                          ", ".join(m.name for m in heartbeat.models))
            self.news.set()
            self.fleet_grew = True

    async def stop_using(self, executor: str, site: str) -> None:
        """An executor at a revoked site spoke: it gets no more work, and its jobs are placed again."""
        if self.registry.get(executor) is not None:
            self.log.warning("executor %s at revoked site %s: no more work", executor, site)
            self.registry.forget(executor)
            self.lost.note(executor, now_ms())
            await self.redispatch_all(self.inflight.on_executor(executor))

    def transit_ms(self, site: str) -> float:
        """How long a completion takes from ``site`` to this scheduler: half the link's round trip."""
        return 0.0 if site == self.settings.site else self.links.rtt_ms(site) / 2.0

    def usable(self, site: str) -> bool:
        """Whether ``site`` may get work (its key is not revoked)."""
        return not self.security.enabled or site_principal(site) not in self.security.agent.revoked

    def record(self, job: JobV1, placement: Placement | None, reason: str, forwarded_to: str | None = None) -> None:
        self.runtime.events.emit(
            Topics.SCHEDULING_DECISIONS,
            decision_record(job, placement, reason, mode=self.settings.mode.value, centralized=self.centralized,
                            now_ms=now_ms(), scheduler_site=self.settings.site, links=self.links,
                            forwarded_to=forwarded_to),
            key=job.tenant,
        )

    def place(self, job: JobV1) -> Placement:
        """The job's (first stage's) placement among the live executors at usable sites."""
        executors = self.registry.view(self.usable)
        multi_stage = is_multi_stage(job)
        placement = place_job(job, self.catalog, executors, self.links, self.topology, now_ms(), self.cost_limits,
                              queue_at_site=self.settings.mode == SchedulingMode.DISTRIBUTED)
        self.counts["multi_stage"] += multi_stage
        return placement

    def seal_for(self, site: str, job: JobV1, body: bytes, aad: dict[str, str]) -> tuple[bytes, dict[str, str]]:
        if not self.security.enabled:
            return body, {}
        sealed = seal_to_site(self.security, body, site=site, aad=aad,
                              sensitive=job.workload is not None and job.workload.sensitive)
        return sealed.body, sealed.to_headers()

    async def refuse(self, job: JobV1, error: DinError) -> None:
        self.counts["refused"] += 1
        self.record(job, None, error.code.value)
        await self.runtime.answer_error(job.reply_to, error, job.request_id)

    def hold_for_cold_start(self, job: JobV1, body: bytes, passthrough: dict[str, str], aad: dict[str, str]) -> bool:
        """Hold a job no live executor can take while a pool may start one for it (``coldstart``); False when it
        may not wait (no such pool, past its cutoff, too many held)."""
        until = lifecycle.cutoff_ms(job.deadline_ms, self.settings.deadline_margin_ms)
        if until <= now_ms() or not cold_startable(job, self.topology, self.sites):
            return False
        first = job.request_id not in self.cold.held
        if not self.cold.hold(Held(job, body, passthrough, aad, until)):
            return False
        if first:
            self.counts["awaiting_executor"] += 1
            self.record(job, None, AWAITING_EXECUTOR)
        return True

    async def try_held(self, now: float) -> None:
        """Held jobs: placed once an executor of their models came into view, refused at their cutoff."""
        for held in self.cold.due(now):
            await self.refuse(held.job, DinError(ErrorCode.NO_ELIGIBLE_EXECUTOR, "no executor of "
                                                 f"{held.job.model} started before the deadline"))
        if self.fleet_grew and self.cold:
            self.fleet_grew = False
            live = set(self.registry.models())
            for held in self.cold.servable(live.__contains__):
                await self.dispatch(held.job, held.body, held.passthrough, held.aad)

    async def release_held(self) -> None:
        """Stopping: the held jobs are answered ``unavailable`` (nobody else would answer them)."""
        for held in self.cold.take_all():
            await self.runtime.answer_error(held.job.reply_to, DinError(
                ErrorCode.UNAVAILABLE, "the scheduler stopped while the job waited for an executor to start"),
                held.job.request_id)

    async def dispatch(self, job: JobV1, body: bytes, passthrough: dict[str, str], aad: dict[str, str]) -> None:
        """Place ``job`` and send it on, or answer it with the reason it cannot run.

        ``body`` is the plaintext and ``aad`` the metadata its seal binds (both unused with security off).
        """
        try:
            placement = await self.place_or_forward(job, body, passthrough, aad)
            if placement is None:
                return
            wire, sealed_headers = self.seal_for(placement.executor.site, job, body, aad)
        except DinError as error:
            if not (error.code is ErrorCode.NO_ELIGIBLE_EXECUTOR and self.hold_for_cold_start(job, body, passthrough,
                                                                                          aad)):
                await self.refuse(job, error)
            return
        except SealRefused as error:
            await self.refuse(job, DinError(ErrorCode.INTERNAL, str(error)))
            return
        executor = placement.executor
        assign(job, placement, centralized=self.centralized, now_ms=now_ms())
        job.scheduler_site = self.settings.site
        headers = self.runtime.tag_job({**passthrough, **job.to_headers(), RequestHeaders.REQUEST_ID: job.request_id,
                                        **sealed_headers}, executor.site)
        entry = InflightJob.dispatched(job, body, passthrough, aad, executor.id, executor.site)
        replaced = self.inflight.add(entry, lifecycle.watchdog_at_ms(job.deadline_ms, self.transit_ms(executor.site)))
        if replaced is not None:
            self.release(replaced)
        for counted in entry.counted_on:
            self.registry.note_dispatch(counted, job.sla_class)
        self.counts["scheduled"] += 1
        self.counts["degraded"] += placement.degraded
        self.record(job, placement, placement.reason)
        if self.centralized:
            await self.nc.publish(Subjects.execute(executor.site, executor.id), wire, headers=headers)
        else:
            task = asyncio.create_task(self.enqueue(job, wire, headers))
            self.enqueues.add(task)
            task.add_done_callback(self.enqueues.discard)

    async def place_or_forward(self, job: JobV1, body: bytes, passthrough: dict[str, str],
                               aad: dict[str, str]) -> Placement | None:
        """Local first (``federation.choose_site``): the local placement, or None once the job went to another
        site's scheduler; raises the refusal. The hub's scheduler, which places across every site, never
        forwards. What no summary shows a site for (a multi-stage plan across sites, a site not heard from yet)
        goes to the hub's, which refuses it if nothing can serve it."""
        try:
            local, local_error = self.place(job), None
        except DinError as error:
            local, local_error = None, error
        if self.settings.site == self.topology.hub.name or not self.topology.federated:
            if local is None:
                raise local_error
            return local
        choice = choose_site(job, local, self.remote, self.health, self.topology, now_ms(), local_error=local_error)
        if choice.decision == SiteDecision.LOCAL:
            return local
        hub = self.topology.hub.name
        if choice.decision == SiteDecision.FORWARD:
            await self.forward(job, choice.site, body, passthrough, aad, choice.reason)
            return None
        error = choice.error()
        if job.forwarded_from is None and error.code != ErrorCode.UNAVAILABLE:
            await self.forward(job, hub, body, passthrough, aad, f"forwarded to {hub}: {error.message}")
            return None
        raise error

    async def forward(self, job: JobV1, site: str, body: bytes, passthrough: dict[str, str], aad: dict[str, str],
                      reason: str) -> None:
        """Send ``job`` to ``site``'s scheduler, sealed for that site alone; that scheduler answers it from now on
        (placing it at its own executors only)."""
        job.forwarded_from = self.settings.site
        job.stamps_ms["forwarded"] = now_ms()
        wire, sealed_headers = body, {}
        if self.security.enabled:
            sealed = self.security.seal_to(body, to=site_principal(site), aad=aad, confidential=True)
            wire, sealed_headers = sealed.body, sealed.to_headers()
        self.counts["forwarded"] += 1
        self.record(job, None, reason, forwarded_to=site)
        await self.runtime.hand_on(Subjects.schedule(site), wire, {**passthrough, **job.to_headers(), **sealed_headers},
                                   job, f"scheduler at site {site} reachable from site {self.settings.site}",
                                   to_site=site)

    async def enqueue(self, job: JobV1, body: bytes, headers: dict[str, str]) -> None:
        """Distributed mode: put the job in its site's work queue, asking again while the queue cannot take it
        (a clustered stream electing a leader) and time remains; answer it when the queue stays unreachable.
        One message id for this enqueue and its retries lets the stream drop a copy whose acknowledgement was lost
        (and only that: the same request enqueued again, escalated, replayed or dispatched anew, is a new one)."""
        headers = {**headers, MSG_ID_HEADER: f"{job.request_id}.{uuid.uuid4().hex}"}
        while True:
            try:
                await self.nc.jetstream().publish(Subjects.work(job.site_chosen, job.model_chosen), body,
                                                  headers=headers, timeout=ENQUEUE_TIMEOUT_S)
                return
            except Exception as exc:
                time_left_ms = lifecycle.cutoff_ms(job.deadline_ms, self.settings.deadline_margin_ms) - now_ms()
                if time_left_ms > ENQUEUE_RETRY_S * 1000.0 and self.inflight.holds(job.request_id):
                    await asyncio.sleep(ENQUEUE_RETRY_S)
                    continue
                if self.close(job.request_id) is not None:
                    await self.runtime.answer_error(
                        job.reply_to,
                        DinError(ErrorCode.NO_ELIGIBLE_EXECUTOR, f"site {job.site_chosen} queue unreachable: {exc}",
                                 retry_after_ms=500),
                        job.request_id,
                    )
                return

    def close(self, request_id: str, event: CompletionV1 | None = None) -> InflightJob | None:
        """Close a job's entry and take it off the executors' load (``release``); the entry, or None when none
        was open."""
        entry = self.inflight.complete(request_id)
        if entry is not None:
            self.release(entry, event)
        return entry

    def release(self, entry: InflightJob, event: CompletionV1 | None = None) -> None:
        """Take a closed job off the load estimates of the executors it still counted on (``event``: its
        completion, which says when its executor held it)."""
        for executor in entry.counted_on:
            self.registry.note_completion(executor, entry.job.sla_class, event and finished_by(event, executor))
        entry.counted_on = []

    async def redispatch_all(self, entries: list[InflightJob]) -> None:
        for entry in entries:
            await self.redispatch(entry)

    async def redispatch(self, entry: InflightJob) -> None:
        """A lost executor's job: placed again, or answered when it cannot be (``lifecycle.may_redispatch``)."""
        self.release(entry)
        job = entry.job
        verdict = lifecycle.may_redispatch(job, entry.advanced, now_ms(), self.settings.deadline_margin_ms)
        if verdict != Redispatch.DISPATCH_AGAIN:
            self.counts["streams_interrupted"] += verdict == Redispatch.STREAM_INTERRUPTED
            await self.runtime.answer_error(job.reply_to, DinError(ErrorCode.EXECUTOR_LOST,
                                                                   REDISPATCH_REFUSALS[verdict]), job.request_id)
            return
        lifecycle.reset_for_redispatch(job)
        self.counts["redispatched"] += 1
        await self.dispatch(job, entry.body, entry.passthrough, entry.aad)

    async def on_expired(self, executor_id: str, site: str) -> None:
        """An executor no longer heard of: dead, its jobs dispatched again; or, for an executor the hub knows only
        from its site's rosters, out of view while those rosters still arrive (its site lists it when it dies)."""
        if self.settings.rosters and not self.hub_rosters.expired_is_dead(site, now_ms()):
            self.counts["out_of_view"] += 1
            return
        self.log.warning("executor %s at %s missed its heartbeats: dropped", executor_id, site)
        self.lost.note(executor_id, now_ms())
        await self.redispatch_all(self.inflight.on_executor(executor_id))

    async def answer_overdue(self, now: float) -> None:
        """The watchdog's answer to every open job no executor answered (``lifecycle.watchdog_at_ms``), once its
        executor, if still in view, is heard from past the deadline (``lifecycle.watchdog_may_answer``: checked
        again each tick until then); an executor that is draining (leaving) counts as lost."""
        for entry in self.inflight.due(now):
            state = self.registry.get(entry.executor) if entry.executor is not None else None
            if not lifecycle.watchdog_may_answer(entry.job.deadline_ms, state and state.heard_ms):
                self.counts["watchdog_waits"] += 1
                self.inflight.add(entry, now + self.settings.watchdog_interval_ms)
                continue
            self.release(entry)
            self.counts["deadline_answers"] += 1
            code = lifecycle.watchdog_error(entry.executor, state is not None and not state.heartbeat.draining)
            await self.runtime.answer_error(
                entry.job.reply_to, DinError(code, f"no answer from site {entry.site} before the deadline"),
                entry.job.request_id,
            )

    async def watchdog(self) -> None:
        """Drop executors that missed their heartbeats (their jobs dispatched again), answer overdue jobs: as of
        the tick's start, once caught up on what the bus had sent by then (``caught_up``); after the scheduler
        was deaf (its connection dropped, its own loop stalled) every executor is pardoned instead."""
        interval = self.settings.watchdog_interval_ms / 1000.0
        reconnects = self.nc.stats["reconnects"]
        while True:
            slept = time.monotonic()
            await asyncio.sleep(interval)
            now_s, now = time.monotonic(), now_ms()
            deaf = self.nc.stats["reconnects"] != reconnects or now_s - slept - interval > DEAF_AFTER_S
            reconnects = self.nc.stats["reconnects"]
            if deaf:
                self.counts["pardons"] += 1
                self.registry.pardon(now_s)
            elif self.registry.overdue(now_s) or self.inflight.overdue(now):
                if await self.caught_up():
                    for dead in self.registry.expire(now_s):
                        await self.on_expired(dead.id, dead.site)
                    await self.answer_overdue(now)
                else:
                    self.counts["watchdog_deferred"] += 1
            self.remote.expire(now_ms())
            if self.cold:
                await self.try_held(now_ms())

    async def caught_up(self) -> bool:
        """Whether every heartbeat and completion the bus had sent this scheduler by now has reached its handler
        (a ping's round trip puts what came before the pong in the subscriptions' buffers, which then drain):
        it is not behind on its own input. False while disconnected or still behind after ``CATCH_UP_S``."""
        if not self.nc.is_connected:
            return False
        started = time.monotonic()
        try:
            await self.nc.flush(timeout=CATCH_UP_S)
        except Exception:
            return False
        subjects = {subject for pattern in (heartbeats_heard(self.settings), completions_heard(self.settings))
                    for subject in Subjects.per_site(pattern, self._sites())}
        while self.runtime.pending_on(subjects):
            if time.monotonic() - started > CATCH_UP_S:
                return False
            await asyncio.sleep(CATCH_UP_POLL_S)
        return True

    async def prober(self) -> None:
        """Measure each remote site's link round trip with an echoed probe."""
        seq = 0
        remote = [s.name for s in self.topology.sites if s.name != self.settings.site]
        while True:
            for site in remote:
                seq += 1
                await self.probe_link(site, seq)
            await asyncio.sleep(self.settings.probe_interval_s)

    async def probe_link(self, site: str, seq: int) -> None:
        """One probe of ``site``'s link; its round trip is observed when it is echoed."""
        self.links.sent(site)
        self.health.probed(site, now_ms())
        probe = ProbeV1(from_site=self.settings.site, to_site=site, sent_ms=now_ms(), seq=seq)
        started = time.perf_counter()
        try:
            subject, body = Subjects.probe(site), probe.model_dump_json().encode()
            echo = await self.nc.request(subject, body, headers=self.signer.headers(subject, body),
                                         timeout=PROBE_TIMEOUT_S)
        except (NatsTimeout, NoRespondersError):
            pass
        else:
            if not verify_reply(self.verifier, site_principal(site), echo.subject, echo.data, echo.headers):
                return
            self.links.observe_rtt(site, (time.perf_counter() - started) * 1000.0)
            self.health.answered(site, now_ms())
        if asyncio.current_task().cancelling():
            # Python 3.11's wait_for (inside nats-py's request) loses a cancellation that arrives with the
            # reply (often "no responders"); without this the prober outlives shutdown.
            raise asyncio.CancelledError
    async def pressure(self) -> None:
        """Tell admission the network's load, periodically."""
        while True:
            await asyncio.sleep(self.settings.pressure_interval_s)
            report = pressure_report(self.registry.live(), self.links, len(self.inflight), now_ms(),
                                     queued=self.runtime.pending_on({Subjects.schedule(self.settings.site)}),
                                     meter=self.meter)
            await self.publish_signed(Subjects.pressure(self.settings.site), report.model_dump_json().encode())

    async def summaries(self) -> None:
        """Tell the other sites' schedulers what this site can take (a control plane per site): every interval,
        and soon after an executor appears, so that new capacity (a restarted site, a started executor) is in
        view elsewhere before the next interval."""
        while True:
            try:
                async with asyncio.timeout(self.settings.summary_interval_s):
                    await self.news.wait()
                await asyncio.sleep(NEWS_GAP_S)
            except TimeoutError:
                pass
            self.news.clear()
            summary = summarize(self.registry, self.health, self.settings.site, instance=self.runtime.instance,
                                topology=self.topology, now_ms=now_ms(), interval_s=self.settings.summary_interval_s)
            await self.publish_signed(Subjects.summary(self.settings.site), summary.model_dump_json().encode())
            if self.settings.site != self.topology.hub.name:
                sample = roster(self.registry, self.lost, site=self.settings.site, instance=self.runtime.instance,
                                now_ms=now_ms(), interval_s=self.settings.summary_interval_s)
                await self.publish_signed(Subjects.roster(self.settings.site), sample.model_dump_json().encode())

    async def publish_signed(self, subject: str, body: bytes) -> None:
        """Publish a control message signed by this site."""
        await self.nc.publish(subject, body, headers=self.signer.headers(subject, body))

    @control("summary", Subjects.SUMMARY_ALL)
    async def on_summary(self, message: NatsMessage) -> None:
        """Keep the latest word from every other site's scheduler, signed by that site."""
        try:
            summary = self.verifier.open_message("summary", message.raw_message, SiteSummaryV1)
        except ControlRefused:
            return
        if summary.site != self.settings.site and summary.site in self.topology_sites:
            self.remote.observe(summary, now_ms())

    @control("roster", rosters_heard)
    async def on_roster(self, message: NatsMessage) -> None:
        """The hub's scheduler: another site's executors with room come into view; the ones it lost are dead.
        Signed by that site."""
        if not self.settings.rosters:
            return
        try:
            sample = self.verifier.open_message("roster", message.raw_message, SiteRosterV1)
        except ControlRefused:
            return
        if not self.hub_rosters.accepts(sample, self.topology_sites):
            return
        self.hub_rosters.observe(sample, now_ms())
        if not self.usable(sample.site):
            return
        for heartbeat in self.hub_rosters.news(sample, self.registry.heartbeat_of):
            self.registry.observe(heartbeat, time.monotonic())
        for executor_id in sample.lost:
            self.registry.forget(executor_id)
            await self.redispatch_all(self.inflight.on_executor(executor_id))

    async def start_keys(self) -> None:
        held = held_readers(self.topology, self.settings.site)
        await self.security.start(
            self.nc,
            readers=lambda agent: [
                *(tenant_principal(t.name) for t in self.topology.tenants if tenant_principal(t.name) in held),
                *(site_principal(s) for s in self.sites if site_principal(s) not in agent.revoked),
            ],
            timeout_s=self.settings.keys_wait_s,
        )

    async def start_background(self) -> None:
        if self.settings.mode == SchedulingMode.DISTRIBUTED:
            await self.ensure_work_streams()
        for site in self.sites:
            await self.nc.publish(Subjects.roll_call(site), b"")
        await asyncio.sleep(ROLL_CALL_WAIT_S)
        loops = [self.watchdog, self.prober, self.pressure]
        if self.topology.federated:
            loops.append(self.summaries)
        for loop in loops:
            self.runtime.spawn(loop(), name=loop.__name__)

    async def ensure_work_streams(self) -> None:
        for site in self.sites:
            try:
                await self.nc.jetstream(domain=site).add_stream(
                    work_stream_config(site, self.settings.replicas_in(site)))
            except Exception as exc:
                self.log.warning("work stream of site %s not created yet: %s", site, exc)

    async def finish_enqueues(self) -> None:
        if self.enqueues:
            await asyncio.wait(self.enqueues, timeout=2.0)
        await self.security.stop()


def create_runtime(settings: SchedulerSettings):
    """Build the scheduler service (its runtime, for launchers that start runtimes)."""
    return Scheduler(settings).runtime
