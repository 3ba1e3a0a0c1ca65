"""An executor's front door: jobs in (assigned, or pulled from the site's queue), answers straight to the client.

Every job ends in one ``shared.lifecycle.Outcome``: a result or an error to the
client (``deadline_exceeded`` within ``deadline_margin_ms`` of its deadline, also
ending a token stream: answered here, whatever became of the scheduler that
placed it; a job reached only after the deadline is left to the scheduler's
watchdog, which has answered it), its output handed on to the next
stage, handed back to the scheduler (full, or a cascade's escalation), or NAK'd
back to the site queue. The completion event closes the job at the scheduler
only when the client was answered (``shared.lifecycle.completion_headers``).

A multi-stage job's stage (see ``services.executor.stages``) that is not the last
hands its output on, sealed to the next stage's site. Generation streams its
tokens as ``StreamChunkV1`` messages (``services.executor.generation``): the
prefill stage sends the first, the decode stage (here, or at another executor)
the rest and a last ``done`` chunk. A cascade's small variant whose answer is not
confident enough goes back to the scheduler for the large variant.

Jobs arrive sealed to this executor's site and answers leave sealed to the
tenant and signed (``services.executor.sealing``); a job that cannot be
authenticated is dead-lettered and never answered.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import numpy as np
from nats.aio.msg import Msg

from din.services.executor import generation, pulling
from din.services.executor.answers import AnswerWriter, now_ms
from din.services.executor.batcher import DynamicBatcher, ItemResult
from din.services.executor.fencing import TICK_S, Continuity
from din.services.executor.repository import ModelHandle, ModelRepository
from din.services.executor.sealing import ExecutorSeals, UnreadableJob, protection
from din.services.executor.serving import ServedModels
from din.services.executor.settings import ExecutorSettings
from din.services.executor.stages import STATE_CONTENT_TYPE, DecodeState, decode_state, encode_state, intermediate
from din.shared import lifecycle
from din.shared.cascade import EscalationCalibrator, answer_confidence
from din.shared.contracts.events import HeartbeatV1, LoadModelV1
from din.shared.contracts.inference import STREAM_SEQ_HEADER, TENSOR_CONTENT_TYPE, RequestHeaders, StreamChunkV1
from din.shared.contracts.job import JobV1, StageKind
from din.shared.envelope import InvalidToken
from din.shared.errors import DinError, ErrorCode, error_reply
from din.shared.lifecycle import FenceReason, Outcome, Settlement
from din.shared.naming import Subjects, Topics
from din.shared.runtime import Service, control, endpoint, job_endpoint
from din.shared.security import ControlRefused, ControlSigner, ControlVerifier, JobFacts, Opened, PayloadSecurity
from din.shared.tensors import decode_request, validate_inputs

DRAIN_NOTICE_S = 0.2
DRAIN_WAIT_S = 10.0
JOB_PUBLISHES = ("inferReply", "completed", "execute", "work", "schedule", Topics.DEAD_LETTER, Topics.SPANS)
"""Where serving a job sends: the answer, error or stream chunks, its completion, a stage hand-off (assigned or
queued), a hand-back or escalation, a dead letter, trace spans."""


@dataclass
class Run:
    """One job being served here: the job, its plaintext body and headers, how it was opened (None with
    security off), its work-queue message when pulled, and the model and version it runs on."""

    job: JobV1
    body: bytes
    headers: dict[str, str]
    opened: Opened | None
    pulled: Msg | None
    model: str
    version: str = ""
    retry_after_ms: float | None = None
    exposed_s: float = 0.0
    limit_s: float = 0.0
    reconnects: int = 0


class Fenced(Exception):
    """The executor may no longer answer or hand on the job it holds (``shared.lifecycle.fence``)."""

    def __init__(self, reason: FenceReason) -> None:
        super().__init__(reason.value)
        self.reason = reason


class Executor(Service):
    """Runs jobs on the models it serves, batching concurrent ones, and answers each client directly."""

    name = "executor"
    publishes = ("heartbeat", *JOB_PUBLISHES)
    consumes = ("work",)

    def __init__(self, settings: ExecutorSettings) -> None:
        super().__init__(settings, instance=settings.id)
        self.repository = ModelRepository(settings.model_repo)
        self.batcher = DynamicBatcher(
            lambda model, inputs: self.models.run_batch(model, inputs),
            capacity=settings.capacity,
            max_queue_delay_ms=settings.max_queue_delay_ms,
            inline_below_ms=settings.inline_below_ms,
            tenant_weights=settings.tenant_weights(),
        )
        self.models = ServedModels(self.repository, self.batcher)
        self.security = PayloadSecurity.from_settings(settings)
        self.runtime.sign_with(self.security)
        self.seals = ExecutorSeals(self.security, settings.site)
        if self.security.enabled:
            self.runtime.bind_jobs(JobFacts(self.security, settings.site))
        self.signer = ControlSigner.of(self.security.agent)
        self.verifier = ControlVerifier(self.security.agent)
        self.answers = AnswerWriter(settings.site, settings.id)
        self.serving: set[asyncio.Task] = set()
        self.draining = False
        self.rng = np.random.default_rng()
        self.calibrators: dict[str, EscalationCalibrator] = {}
        interval = settings.heartbeat_interval_s
        self.assigned_limit_s = lifecycle.stall_limit_s(interval, lifecycle.loss_timeout_s(interval))
        self.pulled_limit_s = lifecycle.stall_limit_s(pulling.IN_PROGRESS_EVERY_S, pulling.PULL_ACK_WAIT_S)
        self.continuity = Continuity((self.assigned_limit_s, self.pulled_limit_s), time.monotonic())
        self.ticker: asyncio.Task | None = None
        self._pulled: set[str] = set()
        self._pulling = False
        self.runtime.on_start(self.start_continuity)
        self.runtime.on_start(self.start_keys)
        self.runtime.on_start(self.start_models)
        self.runtime.on_stop_accepting(self.announce_draining)
        self.runtime.on_drain(self.drain)

    def detail(self) -> dict[str, object]:
        return {
            "models": ",".join(f"{h.name}@{h.version}" for h in self.repository.loaded()),
            "completed": self.batcher.stats().completed,
            "inflight": len(self.serving),
            **self.continuity.detail(),
            **self.security.detail(),
            **self.verifier.detail(),
        }

    @job_endpoint("execute", lambda s: Subjects.execute(s.site, s.id), publishes=JOB_PUBLISHES)
    async def on_execute(self, job: JobV1, msg: Msg) -> None:
        run = self.accept(job, msg)
        if run is not None:
            self.start_serving(run)

    @endpoint("probe", lambda s: Subjects.probe(s.site), queue=lambda s: f"probe-{s.site}", publishes=("probeReply",))
    async def on_probe(self, msg: Msg) -> None:
        """Echo a link probe signed by a site's scheduler, signed by this site."""
        if not msg.reply:
            return
        try:
            self.verifier.open("probe", msg.subject, msg.data, msg.headers)
        except ControlRefused:
            return
        await self.nc.publish(msg.reply, msg.data, headers=self.signer.headers(msg.reply, msg.data))

    @endpoint("control", lambda s: Subjects.control("executor", s.id), publishes=("controlReply", "heartbeat"))
    async def on_control(self, msg: Msg) -> None:
        """Serve another model version, on the operator's signed command; anything else is answered
        ``unauthenticated`` and counted."""
        try:
            command = self.verifier.open("control", msg.subject, msg.data, msg.headers, LoadModelV1)
        except ControlRefused:
            body, headers = error_reply(InvalidToken(), None)
            await self.reply(msg, body, headers)
            return
        try:
            handle = await self.serve_model(command.model, command.version)
        except DinError as error:
            self.log.error("not serving %s: %s", command.model, error.message)
            body, headers = error_reply(error, None)
            await self.reply(msg, body, headers)
            return
        await self.send_heartbeat()
        await self.reply(msg, self.models.report(handle).model_dump_json().encode(), None)

    async def reply(self, msg: Msg, body: bytes, headers: dict[str, str] | None) -> None:
        if msg.reply:
            await self.nc.publish(msg.reply, body, headers=headers)

    @control("rollCall", lambda s: Subjects.roll_call(s.site), publishes=("heartbeat",))
    async def on_roll_call(self) -> None:
        await self.send_heartbeat()

    def accept(self, job: JobV1, msg: Msg) -> Run | None:
        """The job in ``msg`` ready to serve; None (dead-lettered) when it is not one this executor may run."""
        try:
            body, opened = self.seals.open_job(job, msg.data, msg.headers)
        except UnreadableJob as refused:
            self.runtime.dead_letter(msg, refused.reason)
            return None
        return Run(job, body, msg.headers, opened, None, job.model_chosen or job.model)

    async def take_pulled(self, msg: Msg) -> None:
        """A job pulled from the site queue: served, or termed when it is not a job (dead-lettered)."""
        job = None
        if self.runtime.authentic_job(msg):
            try:
                job = JobV1.from_headers(msg.headers)
            except ValueError:
                self.runtime.dead_letter(msg, "missing or invalid job header")
        run = self.accept(job, msg) if job is not None else None
        if run is None:
            await pulling.settle(msg, lifecycle.settlement(None))
            return
        run.pulled = msg
        self.start_serving(run)

    def start_serving(self, run: Run) -> None:
        self.hold(run)
        task = asyncio.create_task(self.traced_serve(run))
        self.serving.add(task)
        task.add_done_callback(self.serving.discard)

    async def traced_serve(self, run: Run) -> None:
        """Serve ``run`` as one hop of its trace, keeping a pulled job claimed and settling it afterwards."""
        job = run.job
        plan_step = job.plan[job.stage] if job.plan else None
        attributes = {"din.request_id": job.request_id, "din.executor": self.settings.id}
        if plan_step is not None:
            attributes.update({"din.stage": job.stage, "din.stage_kind": plan_step.kind.value})
        claim = asyncio.create_task(pulling.keep_claimed(run.pulled)) if run.pulled is not None else None
        outcome = Outcome.FAILED
        try:
            with self.runtime.tracing.hop(f"executor {plan_step.kind.value if plan_step else 'serve'}",
                                          job.traceparent, **attributes) as (_, job.traceparent):
                outcome = await self.serve(run)
        finally:
            if claim is not None:
                claim.cancel()
            how = lifecycle.settlement(outcome)
            if run.pulled is not None and how != Settlement.LEAVE:
                await pulling.settle(run.pulled, how, run.retry_after_ms)

    def hold(self, run: Run) -> None:
        """Note since when ``run``'s job may have been this executor's, under which lease, on which connection."""
        pulled = run.pulled is not None
        wall, now_s = now_ms(), time.monotonic()
        exposed = lifecycle.exposed_ms(run.job, wall, pulled=pulled, pull_wait_ms=pulling.PULL_WAIT_S * 1000.0)
        run.exposed_s = now_s - (wall - exposed) / 1000.0
        run.limit_s = self.pulled_limit_s if pulled else self.assigned_limit_s
        run.reconnects = self.nc.stats["reconnects"]

    def fence_reason(self, run: Run) -> FenceReason | None:
        """Why this executor may no longer answer or hand on ``run`` (counted), or None. A draining connection
        (SIGTERM) still delivers what is published before it closes, so it counts as connected."""
        return self.continuity.fence(exposed_s=run.exposed_s, now_s=time.monotonic(), limit_s=run.limit_s,
                                     connected=self.nc.is_connected or self.nc.is_draining,
                                     reconnected=self.nc.stats["reconnects"] != run.reconnects)

    def guard(self, run: Run) -> None:
        """Raise ``Fenced`` unless this executor may still answer or hand on ``run``."""
        reason = self.fence_reason(run)
        if reason is not None:
            raise Fenced(reason)

    async def fenced(self, run: Run, reason: FenceReason) -> Outcome:
        """Hand a fenced job back unanswered: its completion tells the scheduler; a pulled one is left unsettled
        (its nonce released, so this executor can take it again when the queue offers it)."""
        self.log.warning("job %s fenced (%s): not answered here", run.job.request_id, reason.value)
        if run.pulled is not None and run.opened is not None:
            self.security.replay.release(run.opened.nonce)
        return await self.complete(run, Outcome.FENCED,
                                   error=DinError(ErrorCode.EXECUTOR_LOST, f"executor fenced: {reason.value}"))

    async def serve(self, run: Run) -> Outcome:
        """Run one job to its single outcome."""
        try:
            return await self.compute(run)
        except Fenced as fenced:
            return await self.fenced(run, fenced.reason)
        except DinError as error:
            return await self.fail(run, error)
        except Exception as exc:
            self.log.exception("job %s failed", run.job.request_id)
            return await self.fail(run, DinError(ErrorCode.INFERENCE_FAILED,
                                                 f"inference failed: {exc.__class__.__name__}"))

    async def compute(self, run: Run) -> Outcome:
        """Run the job's model (or stage) and end it as its stage says: answered, handed on or escalated."""
        job = run.job
        plan_step = job.plan[job.stage] if job.plan else None
        handle = self.repository.handle(run.model, None if job.plan else job.model_version)
        run.version = handle.version
        config = handle.config
        if plan_step is not None and plan_step.kind == StageKind.DECODE:
            return await self.generate(run, decode_state(run.body, int(config.hidden), len(config.vocab)))
        decoded = decode_request(run.body, run.headers,
                                 content_type=TENSOR_CONTENT_TYPE if job.stage else job.content_type)
        if plan_step is not None and plan_step.kind == StageKind.PREFILL:
            inputs = generation.prefill_inputs(job, decoded.inputs, config)
        else:
            validate_inputs(decoded.inputs, handle.inputs, self.batcher.max_batch_size(run.model))
            inputs = decoded.inputs
        margin = self.settings.deadline_margin_ms
        if lifecycle.past_cutoff(job.deadline_ms, now_ms(), margin):
            raise DinError(ErrorCode.DEADLINE_EXCEEDED, "deadline reached before the job was queued")
        result = await self.batcher.submit(run.model, inputs, sla_class=job.sla_class, tenant=job.tenant,
                                           deadline_ms=lifecycle.cutoff_ms(job.deadline_ms, margin))
        run.version = result.model_version or run.version
        if lifecycle.past_cutoff(job.deadline_ms, now_ms(), margin):
            raise DinError(ErrorCode.DEADLINE_EXCEEDED, "computed too late for the deadline")
        if plan_step is not None and plan_step.kind == StageKind.SPLIT_HEAD:
            return await self.split_head_done(run, result)
        if plan_step is not None and plan_step.kind == StageKind.PREFILL:
            return await self.prefilled(run, result)
        if lifecycle.may_escalate(job) and self.unsure(job, run.model, result):
            return await self.escalate(run, result)
        return await self.answer(run, result, decoded.requested_outputs)

    async def answer(self, run: Run, result: ItemResult, requested: list[str] | None) -> Outcome:
        job = run.job
        self.guard(run)
        body, headers = self.seals.answer(job, self.answers.response(job, run.model, result, requested), run.opened)
        await self.nc.publish(job.reply_to, body, headers=headers or None)
        return await self.complete(run, Outcome.ANSWERED, result)

    async def fail(self, run: Run, error: DinError) -> Outcome:
        """End a job that failed with ``error`` as the lifecycle says: NAK'd, handed back, left or answered."""
        job = run.job
        outcome = lifecycle.outcome_of_error(error.code, pulled=run.pulled is not None,
                                             streamed=lifecycle.has_streamed(job), attempt=job.attempt,
                                             plan_stage=job.stage, past_deadline=now_ms() >= job.deadline_ms)
        reason = self.fence_reason(run) if outcome != Outcome.LEFT_TO_WATCHDOG else None
        if reason is not None:
            return await self.fenced(run, reason)
        if outcome == Outcome.REQUEUED:
            if run.opened is not None:
                self.security.replay.release(run.opened.nonce)
            run.retry_after_ms = error.retry_after_ms
        elif outcome == Outcome.GIVEN_BACK:
            lifecycle.give_back(job, self.settings.id)
            await self.hand_back(run)
        elif outcome == Outcome.FAILED:
            body, headers = self.runtime.error_answer(job.reply_to, error, job.request_id)
            await self.nc.publish(job.reply_to, body, headers=headers)
        if lifecycle.reports_completion(outcome):
            await self.complete(run, outcome, error=error)
        return outcome

    async def complete(self, run: Run, outcome: Outcome, result: ItemResult | None = None,
                       error: DinError | None = None, *, model: str | None = None, version: str | None = None,
                       output_bytes: int | None = None, extra_timings: dict[str, float] | None = None) -> Outcome:
        """Publish the completion event of ``run`` ending in ``outcome`` here; returns ``outcome``."""
        job = run.job
        event = self.answers.completion(
            job, outcome, model=model or run.model, version=run.version if version is None else version,
            result=result, error=error, protection=protection(run.opened), output_bytes=output_bytes,
            extra_timings=extra_timings)
        subject, body = Subjects.completed(self.settings.site), event.model_dump_json().encode()
        await self.nc.publish(subject, body,
                              headers=self.signer.headers(subject, body, lifecycle.completion_headers(
                                  outcome, job.request_id, lifecycle.dispatch_key(job))))
        return outcome

    def unsure(self, job: JobV1, model: str, result: ItemResult) -> bool:
        """Cascade, first step: whether the small variant's answer is below the job's threshold, fixed or
        calibrated on this executor's recent answers of ``model`` to escalate the job's target rate."""
        value = answer_confidence(result.outputs)
        calibrator = self.calibrators.setdefault(model, EscalationCalibrator())
        threshold = job.cascade_threshold
        if threshold is None and job.cascade_target_rate is not None:
            threshold = calibrator.threshold(job.cascade_target_rate)
        calibrator.observe(value)
        return threshold is not None and value < threshold

    async def escalate(self, run: Run, result: ItemResult) -> Outcome:
        """Cascade: the small variant was not sure; hand the job back to be placed on the large variant."""
        self.guard(run)
        await self.complete(run, Outcome.ESCALATED, result)
        lifecycle.escalate(run.job, now_ms())
        await self.hand_back(run)
        return Outcome.ESCALATED

    async def hand_back(self, run: Run) -> None:
        """Give the job back to the scheduler that placed it (escalated or full here); that scheduler's watchdog
        answers it if it is not placed again, so this executor answers only a scheduler that is not running."""
        body, headers = self.seals.hand_back(run.job, run.body, run.headers, run.opened)
        scheduler_site = run.job.scheduler_site or self.settings.site
        await self.runtime.hand_on(Subjects.schedule(scheduler_site), body, headers, run.job,
                                   f"scheduler at site {scheduler_site}", to_site=scheduler_site, owns_answer=False)

    async def split_head_done(self, run: Run, result: ItemResult) -> Outcome:
        self.guard(run)
        payload, payload_headers = intermediate(run.job, result.outputs, self.rng)
        await self.complete(run, Outcome.HANDED_ON, result, output_bytes=len(payload))
        await self.hand_on(run, payload, payload_headers)
        return Outcome.HANDED_ON

    async def hand_on(self, run: Run, payload: bytes, payload_headers: dict[str, str]) -> None:
        """Send a stage's output to the next stage as the plan says: to its executor, or to its site's queue."""
        following = lifecycle.hand_on(run.job, now_ms())
        body, headers = self.seals.hand_off(run.job, following, payload, payload_headers, run.opened)
        self.runtime.tag_job(headers, following.site)
        if following.executor is not None:
            await self.nc.publish(Subjects.execute(following.site, following.executor), body, headers=headers)
        else:
            await self.nc.jetstream().publish(Subjects.work(following.site, following.model), body, headers=headers,
                                              timeout=2.0)

    async def prefilled(self, run: Run, result: ItemResult) -> Outcome:
        """The prompt is in: stream the first token, then decode here (co-located) or hand the state on."""
        job = run.job
        state = generation.prefill_state(result)
        vocab = self.repository.handle(run.model).config.vocab
        await self.send_chunk(run, generation.token_chunk(job, 0, state.token, vocab))
        job.stamps_ms[lifecycle.FIRST_TOKEN_STAMP] = now_ms()
        job.stamps_ms["prefill_compute"] = result.compute_ms
        payload = encode_state(state)
        self.guard(run)
        await self.complete(run, Outcome.HANDED_ON, result, output_bytes=len(payload))
        following = job.plan[job.stage + 1]
        if lifecycle.runs_here(following, self.settings.site, self.settings.id, self.repository.has(following.model)):
            job.stage += 1
            job.model_chosen = following.model
            job.stamps_ms["decode_start"] = now_ms()
            return await self.generate(run, state)
        await self.hand_on(run, payload, {RequestHeaders.CONTENT_TYPE: STATE_CONTENT_TYPE})
        return Outcome.HANDED_ON

    async def generate(self, run: Run, state: DecodeState) -> Outcome:
        """Decode: stream one token per step, then the closing chunk."""
        job = run.job
        model = job.plan[job.stage].model
        vocab = self.repository.handle(model).config.vocab
        job.stamps_ms.setdefault("decode_start", now_ms())
        cutoff = lifecycle.cutoff_ms(job.deadline_ms, self.settings.deadline_margin_ms)
        result, last_token_ms = None, job.stamps_ms[lifecycle.FIRST_TOKEN_STAMP]
        async for step in generation.decode_steps(self.batcher, model, job, state, cutoff):
            await self.send_chunk(run, generation.token_chunk(job, step.seq, step.token, vocab))
            result, last_token_ms = step.result, now_ms()
        timings = generation.stream_timings(job, last_token_ms, now_ms())
        served = self.answers.served_by(job, model, result) if result is not None \
            else self.answers.served_without_steps(job)
        await self.send_chunk(run, generation.last_chunk(job, served, timings))
        return await self.complete(run, Outcome.ANSWERED, result, model=model, version=served.model_version,
                                   extra_timings={k: v for k, v in timings.items() if k != "total"})

    async def send_chunk(self, run: Run, chunk: StreamChunkV1) -> None:
        job = run.job
        self.guard(run)
        body, headers = self.seals.answer(job, chunk.model_dump_json(exclude_none=True).encode(), run.opened,
                                          seq=chunk.seq)
        await self.nc.publish(job.reply_to, body, headers={**headers, RequestHeaders.REQUEST_ID: job.request_id,
                                                           STREAM_SEQ_HEADER: str(chunk.seq)})

    def heartbeat(self) -> HeartbeatV1:
        stats = self.batcher.stats()
        return HeartbeatV1(
            executor=self.settings.id,
            site=self.settings.site,
            models=self.models.reports(stats.compute_ms_per_item),
            capacity=self.settings.capacity,
            capacity_by_class=stats.capacity_by_class,
            queue_depth=stats.queue_depth,
            inflight=stats.inflight,
            recent_latency_ms=stats.recent_latency_ms,
            draining=stats.draining or self.draining,
            interval_s=self.settings.heartbeat_interval_s,
            sent_ms=now_ms(),
        )

    async def send_heartbeat(self) -> None:
        subject = Subjects.heartbeat(self.settings.site, self.settings.id)
        body = self.heartbeat().model_dump_json().encode()
        await self.nc.publish(subject, body, headers=self.signer.headers(subject, body))

    async def heartbeats(self) -> None:
        while True:
            await self.send_heartbeat()
            await asyncio.sleep(self.settings.heartbeat_interval_s)

    async def start_continuity(self) -> None:
        self.ticker = asyncio.create_task(self.watch_continuity(), name="continuity")

    async def watch_continuity(self) -> None:
        """Beat the continuity ticker for the life of the executor (through its drain)."""
        while True:
            self.continuity.tick(time.monotonic())
            await asyncio.sleep(TICK_S)

    async def start_keys(self) -> None:
        await self.security.start(self.nc, readers=lambda agent: [self.seals.site_reader],
                                  timeout_s=self.settings.keys_wait_s)

    async def start_models(self) -> None:
        """Load, configure and warm up every model to serve, then start batching, heartbeats and pulling. A model
        that cannot be served (unknown, invalid config, corrupt graph, config not matching the graph) is left out
        with one error line naming it: the executor serves the others."""
        for model in self.settings.models:
            try:
                await self.serve_model(model)
            except DinError as error:
                self.log.error("not serving %s: %s", model, error.message)
        self.batcher.start()
        self.runtime.spawn(self.heartbeats(), name="heartbeats")
        if self.settings.pull:
            await pulling.ensure_work_stream(self.nc, self.settings.site, self.settings.replicas_in(self.settings.site))
            self._pulling = True
            for handle in self.repository.loaded():
                self.start_pulling(handle.name)

    async def serve_model(self, model: str, version: str | None = None) -> ModelHandle:
        """Open ``model`` at ``version`` (the newest when None), set its batching and warm it up, then make it the
        one served (batches holding the previous version finish on it); a model new here starts being pulled in
        distributed mode. ``DinError`` when it cannot be served."""
        handle = await asyncio.to_thread(self.repository.open, model, version)
        self.models.configure(handle)
        warm_ms = await asyncio.to_thread(self.models.warm, handle)
        self.repository.install(handle)
        self.log.info("serving %s version %s (%.3f ms per item warm)", handle.name, handle.version, warm_ms)
        if self._pulling:
            self.start_pulling(handle.name)
        return handle

    def start_pulling(self, model: str) -> None:
        """Distributed mode: take ``model``'s jobs from the site's work queue from now on (once per model)."""
        if model not in self._pulled:
            self._pulled.add(model)
            self.runtime.spawn(self.pull(model), name=f"pull-{model}")

    async def pull(self, model: str) -> None:
        """Distributed mode: take jobs for ``model`` from the site's work queue while there is room."""
        await pulling.pull_jobs(self.nc, self.settings.site, model,
                                room=lambda: self.settings.capacity - len(self.serving),
                                max_batch_size=lambda: self.batcher.max_batch_size(model), take=self.take_pulled)

    async def announce_draining(self) -> None:
        self.draining = True
        await self.runtime.stop_background()
        await self.send_heartbeat()
        await asyncio.sleep(DRAIN_NOTICE_S)

    async def drain(self) -> None:
        await self.batcher.drain()
        if self.serving:
            await asyncio.wait(self.serving, timeout=DRAIN_WAIT_S)
        if self.ticker is not None:
            self.ticker.cancel()
        await self.security.stop()


def create_runtime(settings: ExecutorSettings):
    """Build one executor (its runtime, for launchers that start runtimes)."""
    return Executor(settings).runtime
