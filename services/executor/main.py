"""An executor's front door: jobs in (assigned directly, or pulled from the site's queue), answers straight to the client.

Every job ends in exactly one of: a result to the client, an error to the
client, or, when it is within ``deadline_margin_ms`` of its deadline, silence
(the scheduler answers it). A completion event tells telemetry; it closes the
job at the scheduler in the first two cases only, so in the third the
scheduler's deadline watchdog still answers (also ending a token stream).

A multi-stage job's stage (see ``services.executor.stages``) that is not the last
hands its output on, sealed to the next stage's site, and reports a completion
with a ``Din-Stage-Done`` header (the job stays open). Generation streams its
tokens as ``StreamChunkV1`` messages: the prefill stage sends the first, the
decode stage (here, or at another executor) the rest and a last ``done`` chunk.

A cascade job's first stage (the small variant) whose answer is not confident
enough is not answered here: it goes back to the scheduler for the large
variant, whose executor answers; its completion event then says ``escalated``
and carries no request-id header, so the scheduler keeps the job open.

Jobs arrive sealed to this executor's site; the result is sealed to the tenant
and signed with the site's key (unsealed, still signed, for a tenant the policy
lets send in clear). A job that cannot be authenticated is dead-lettered and
never answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import numpy as np
from faststream.nats import NatsResponse
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import ConsumerConfig, RetentionPolicy, StreamConfig

from services.executor.batcher import BatchOutput, DynamicBatcher, ItemResult
from services.executor.repository import ModelRepository
from services.executor.settings import ExecutorSettings
from shared.cascade import EscalationCalibrator, answer_confidence
from shared.contracts.events import CompletionV1, HeartbeatV1, LoadModelV1, ModelLoadedV1
from services.executor.stages import (
    STATE_CONTENT_TYPE,
    DecodeState,
    decode_state,
    describe,
    encode_state,
    intermediate,
    next_token,
    prompt_tokens,
)
from shared.contracts.inference import (
    STREAM_SEQ_HEADER,
    TENSOR_CONTENT_TYPE,
    InferResponseV1,
    RequestHeaders,
    ServedByV1,
    StreamChunkV1,
)
from shared.contracts.job import HEADER_PREFIX as JOB_HEADER_PREFIX
from shared.contracts.job import STAGE_DONE_HEADER, JobV1, StageKind
from shared.envelope import InvalidToken, SealRefused
from shared.errors import DinError, ErrorCode, error_reply
from shared.naming import Subjects, work_stream
from shared.runtime import ServiceRuntime
from shared.security import (
    ANSWER_FIELD,
    ANSWER_PLAIN,
    Opened,
    PayloadSecurity,
    PayloadProtection,
    check_binding,
    request_binding,
    result_binding,
    site_principal,
    stage_binding,
    tenant_principal,
    without_envelope,
)
from shared.tensors import DYNAMIC_DIM, WIRE_DTYPES, decode_request, encode_outputs, validate_inputs

PULL_ACK_WAIT_S = 3.0
IN_PROGRESS_EVERY_S = 1.0
PULL_MAX_DELIVER = 50
PULL_WAIT_S = 1.0
PULL_MORE_WAIT_S = 0.001
DRAIN_NOTICE_S = 0.2
MAX_ATTEMPTS = 3
WARM_UP_RUNS = 20
NO_WINDOW_ROLES = ("autoregressive", "prefill", "tail")
"""Model roles that run without a batching window: token steps (continuous batching) and split tails, whose
requests already waited for a window at their head."""


def now_ms() -> float:
    return time.time() * 1000.0


def stage_timings(job: JobV1, result: ItemResult | None) -> dict[str, float]:
    """Where a job's time went, ms: each stage from the stamps it carries (``stage_<k>``: a multi-stage job's
    earlier stages, from dispatch or hand-off to their hand-off on), then queue and compute here."""
    stamps = job.stamps_ms
    timings = {"total": now_ms() - job.received_ms}
    if {"admitted", "classified", "scheduled"} <= stamps.keys():
        timings.update(
            admission=stamps["admitted"] - job.received_ms,
            classify=stamps["classified"] - stamps["admitted"],
            schedule=stamps["scheduled"] - stamps.get("escalated", stamps["classified"]),
        )
        if "escalated" in stamps:
            timings["small_stage"] = stamps["escalated"] - stamps["classified"]
        previous = stamps["scheduled"]
        for stage in range(1, len(job.plan)):
            handed = stamps.get(f"stage_{stage}")
            if handed is not None:
                timings[f"stage_{stage - 1}"] = handed - previous
                previous = handed
    if result is not None:
        timings.update(queue=result.queue_ms, compute=result.compute_ms)
    return timings


def warm_up(handle, runs: int = WARM_UP_RUNS) -> float:
    """Run a one-item batch of zeros a few times; return the mean ms of the warm runs.

    The first heartbeats then carry a measured compute time, so the scheduler prices a new executor
    fairly instead of on a guess, and the first real request does not pay the session's cold start.
    """
    inputs = {
        spec.name: np.zeros([1 if dim == DYNAMIC_DIM else dim for dim in spec.shape], WIRE_DTYPES[spec.datatype])
        for spec in handle.inputs
    }
    handle.run(inputs)
    started = time.perf_counter()
    for _ in range(runs):
        handle.run(inputs)
    return (time.perf_counter() - started) * 1000.0 / runs


def create_runtime(settings: ExecutorSettings) -> ServiceRuntime:
    """Build one executor."""
    runtime = ServiceRuntime("executor", settings, instance=settings.id)
    repository = ModelRepository(settings.model_repo)

    def run_batch(model: str, inputs):
        handle = repository.current(model)
        return BatchOutput(handle.run(inputs), handle.version)

    batcher = DynamicBatcher(
        run_batch,
        capacity=settings.capacity,
        max_queue_delay_ms=settings.max_queue_delay_ms,
        inline_below_ms=settings.inline_below_ms,
    )
    serving: set[asyncio.Task] = set()
    announced = {"draining": False}
    warm_ms: dict[str, float] = {}
    security = PayloadSecurity.from_settings(settings)
    site_reader = site_principal(settings.site)
    rng = np.random.default_rng()
    calibrators: dict[str, EscalationCalibrator] = {}
    runtime.detail = lambda: {
        "models": ",".join(f"{h.name}@{h.version}" for h in repository.loaded()),
        "completed": batcher.stats().completed,
        "inflight": len(serving),
        **security.detail(),
    }

    def protection(opened: Opened | None) -> PayloadProtection:
        if opened is None:
            return PayloadProtection.OFF
        if opened.aad.get(ANSWER_FIELD) == ANSWER_PLAIN:
            return PayloadProtection.CLIENT_PLAINTEXT
        return PayloadProtection.ENCRYPTED if opened.confidential else PayloadProtection.INTEGRITY

    def open_job(msg: Msg) -> tuple[JobV1, bytes, Opened | None] | None:
        """The job in ``msg``, authenticated; None (dead-lettered) when it is not one."""
        try:
            job = JobV1.from_headers(msg.headers)
        except ValueError:
            runtime.dead_letter(msg, "missing or invalid job header")
            return None
        if job.plan and not (0 <= job.stage < len(job.plan) and job.plan[job.stage].site == settings.site):
            runtime.dead_letter(msg, f"stage {job.stage} of the job's plan is not for site {settings.site}")
            return None
        if not security.enabled:
            return job, msg.data, None
        if job.stage > 0:
            reader = tenant_principal(job.tenant)
            expected = stage_binding(job.request_id, job.tenant, job.stage, settings.site, job.reply_to, msg.headers)
        else:
            reader = site_reader
            expected = request_binding(job.request_id, job.tenant, job.model, job.reply_to, msg.headers)
        try:
            opened = security.open(msg.data, msg.headers, reader=reader,
                                   allow_integrity=security.agent.integrity_allowed(settings.site))
            check_binding(opened.aad, expected)
        except InvalidToken as refused:
            security.refused(refused)
            runtime.dead_letter(msg, f"unauthenticated ({refused.reason.value})")
            return None
        return job, opened.plaintext, opened

    def answer(job: JobV1, result: bytes, opened: Opened | None, seq: int | None = None) -> tuple[bytes, dict[str, str]]:
        """The result (or stream chunk ``seq``) as it goes to the client: sealed to the tenant (or plain) and signed
        by this site."""
        if opened is None:
            return result, {}
        if opened.aad.get(ANSWER_FIELD) == ANSWER_PLAIN:
            return result, security.sign_answer(result, {})
        try:
            sealed = security.seal(result, reader=tenant_principal(job.tenant),
                                   aad=result_binding(job.request_id, job.tenant, seq), confidential=opened.confidential)
        except SealRefused as refused:
            raise DinError(ErrorCode.INTERNAL, f"cannot seal the result: {refused.message}") from None
        return sealed.body, security.sign_answer(sealed.body, sealed.to_headers())

    def heartbeat() -> HeartbeatV1:
        stats = batcher.stats()
        return HeartbeatV1(
            executor=settings.id,
            site=settings.site,
            models=[
                ModelLoadedV1(
                    name=h.name,
                    version=h.version,
                    max_batch_size=batcher.max_batch_size(h.name),
                    compute_ms_per_item=stats.compute_ms_per_item.get(h.name, warm_ms.get(h.name, 0.2)),
                    accuracy=h.accuracy,
                )
                for h in repository.loaded()
            ],
            capacity=settings.capacity,
            capacity_by_class=stats.capacity_by_class,
            queue_depth=stats.queue_depth,
            inflight=stats.inflight,
            recent_latency_ms=stats.recent_latency_ms,
            draining=stats.draining or announced["draining"],
            interval_s=settings.heartbeat_interval_s,
            sent_ms=now_ms(),
        )

    async def send_heartbeat() -> None:
        await runtime.nc.publish(
            Subjects.heartbeat(settings.site, settings.id), heartbeat().model_dump_json().encode()
        )

    async def complete(job: JobV1, model: str, version: str, result: ItemResult | None, error: DinError | None,
                       opened: Opened | None, *, handed_on: bool = False, output_bytes: int | None = None,
                       extra_timings: dict[str, float] | None = None):
        """Report the job closed here; ``handed_on``: a cascade's first stage that escalated, or a multi-stage
        job's stage that sent its output on (the job stays open)."""
        timings = {**stage_timings(job, result), **(extra_timings or {})}
        stage = job.plan[job.stage] if job.plan else None
        handed_to = job.plan[job.stage + 1].site if handed_on and stage is not None else None
        event = CompletionV1(
            request_id=job.request_id,
            tenant=job.tenant,
            site=settings.site,
            executor=settings.id,
            model=model,
            model_version=version,
            sla_class=job.sla_class,
            ok=error is None,
            error_code=error.code.value if error else None,
            batch_size=result.batch_size if result else 0,
            degraded=model != job.model and job.cascade_stage is None and not job.plan,
            timings_ms={k: round(v, 3) for k, v in timings.items()},
            at_ms=now_ms(),
            protection=protection(opened).value,
            stage=job.cascade_stage if stage is None else job.stage,
            escalated=job.cascade_stage is not None and (handed_on or job.cascade_stage == 2),
            stage_kind=stage.kind.value if stage is not None else None,
            handed_on_to=handed_to,
            output_bytes=output_bytes,
        )
        left_to_scheduler = error is not None and error.code == ErrorCode.DEADLINE_EXCEEDED
        if handed_to is not None:
            headers = {STAGE_DONE_HEADER: job.request_id}
        else:
            headers = None if handed_on or left_to_scheduler else {RequestHeaders.REQUEST_ID: job.request_id}
        await runtime.nc.publish(Subjects.completed(settings.site), event.model_dump_json().encode(), headers=headers)

    def served_by(job: JobV1, model: str, result: ItemResult) -> ServedByV1:
        return ServedByV1(
            site=settings.site,
            executor=settings.id,
            model=job.model if job.plan else model,
            model_version=result.model_version or "",
            degraded=model != job.model and job.cascade_stage is None and not job.plan,
            batch_size=result.batch_size,
            escalated=job.cascade_stage == 2,
            split_point=job.split_chosen,
            stages=[describe(stage) for stage in job.plan],
        )

    def response(job: JobV1, model: str, result: ItemResult, requested: list[str] | None) -> bytes:
        timings = stage_timings(job, result)
        served = served_by(job, model, result)
        return InferResponseV1(
            model_name=served.model,
            model_version=served.model_version,
            id=job.request_id,
            outputs=encode_outputs(result.outputs, requested),
            served_by=served,
            timings_ms={k: round(v, 3) for k, v in timings.items()},
        ).model_dump_json().encode()

    async def serve(
        job: JobV1, body: bytes, headers: dict[str, str], pulled: Msg | None = None, opened: Opened | None = None
    ) -> None:
        """Run one job to its single outcome; ``pulled`` is its work-queue message when it came from one.

        ``body`` is the plaintext; ``opened`` says how it travelled (None with security off).
        """
        model = job.model_chosen or job.model
        cutoff = job.deadline_ms - settings.deadline_margin_ms
        version = ""
        stage = job.plan[job.stage] if job.plan else None
        try:
            handle = repository.handle(model, None if job.plan else job.model_version)
            version = handle.version
            if stage is not None and stage.kind == StageKind.DECODE:
                await generate(job, decode_state(body, int(handle.config["hidden"]), len(handle.config["vocab"])),
                               opened)
                return
            decoded = decode_request(body, headers, content_type=TENSOR_CONTENT_TYPE if job.stage else job.content_type)
            if stage is not None and stage.kind == StageKind.PREFILL:
                tokens = prompt_tokens(decoded.inputs, handle.config["vocab"])
                job.prompt_tokens = tokens.shape[1]
                inputs = {"tokens": tokens, "state": np.zeros((1, int(handle.config["hidden"])), np.float32)}
            else:
                validate_inputs(decoded.inputs, handle.inputs, batcher.max_batch_size(model))
                inputs = decoded.inputs
            if now_ms() >= cutoff:
                raise DinError(ErrorCode.DEADLINE_EXCEEDED, "deadline reached before the job was queued")
            result = await batcher.submit(model, inputs, sla_class=job.sla_class, deadline_ms=cutoff)
            version = result.model_version or version
            if now_ms() >= cutoff:
                raise DinError(ErrorCode.DEADLINE_EXCEEDED, "computed too late for the deadline")
            if stage is not None and stage.kind == StageKind.SPLIT_HEAD:
                payload, payload_headers = intermediate(job, result.outputs, rng)
                await complete(job, model, version, result, None, opened, handed_on=True, output_bytes=len(payload))
                await forward(job, payload, payload_headers, opened)
                return
            if stage is not None and stage.kind == StageKind.PREFILL:
                await prefilled(job, model, version, result, opened)
                return
            if job.cascade_stage == 1 and job.escalate_to and unsure(job, model, result):
                await complete(job, model, version, result, None, opened, handed_on=True)
                await escalate(job, body, headers, opened)
                return
            answer_body, answer_headers = answer(job, response(job, model, result, decoded.requested_outputs), opened)
            await runtime.nc.publish(job.reply_to, answer_body, headers=answer_headers or None)
            await complete(job, model, version, result, None, opened)
        except DinError as error:
            streamed = "first_token" in job.stamps_ms
            if error.code == ErrorCode.OVERLOADED and pulled is not None and not streamed:
                if opened is not None:
                    security.replay.release(opened.nonce)
                await pulled.nak(delay=(error.retry_after_ms or 10) / 1000.0)
                pulled = None
                return
            if error.code == ErrorCode.OVERLOADED and job.attempt < MAX_ATTEMPTS and job.stage == 0 and not streamed:
                await give_back(job, body, headers, opened)
                return
            if error.code != ErrorCode.DEADLINE_EXCEEDED:
                body_out, err_headers = error_reply(error, job.request_id)
                await runtime.nc.publish(job.reply_to, body_out, headers=err_headers)
            await complete(job, model, version, None, error, opened)
        except Exception as exc:
            runtime.log.exception("job %s failed", job.request_id)
            error = DinError(ErrorCode.INFERENCE_FAILED, f"inference failed: {exc.__class__.__name__}")
            body_out, err_headers = error_reply(error, job.request_id)
            await runtime.nc.publish(job.reply_to, body_out, headers=err_headers)
            await complete(job, model, version, None, error, opened)
        finally:
            if pulled is not None:
                await pulled.ack()

    def unsure(job: JobV1, model: str, result: ItemResult) -> bool:
        """Cascade, first stage: whether the small variant's answer is below the job's threshold, fixed or
        calibrated on this executor's recent answers of ``model`` to escalate the job's target rate."""
        value = answer_confidence(result.outputs)
        calibrator = calibrators.setdefault(model, EscalationCalibrator())
        threshold = job.cascade_threshold
        if threshold is None and job.cascade_target_rate is not None:
            threshold = calibrator.threshold(job.cascade_target_rate)
        calibrator.observe(value)
        return threshold is not None and value < threshold

    async def send_chunk(job: JobV1, chunk: StreamChunkV1, opened: Opened | None) -> None:
        body, chunk_headers = answer(job, chunk.model_dump_json(exclude_none=True).encode(), opened, seq=chunk.seq)
        await runtime.nc.publish(job.reply_to, body, headers={**chunk_headers, RequestHeaders.REQUEST_ID: job.request_id,
                                                              STREAM_SEQ_HEADER: str(chunk.seq)})

    async def prefilled(job: JobV1, model: str, version: str, result: ItemResult, opened: Opened | None) -> None:
        """The prompt is in: stream the first token, then decode here (co-located) or hand the state on."""
        handle = repository.handle(model)
        token = next_token(result.outputs["logits"])
        await send_chunk(job, StreamChunkV1(id=job.request_id, seq=0, text=handle.config["vocab"][token],
                                            token=token), opened)
        job.stamps_ms["first_token"] = now_ms()
        job.stamps_ms["prefill_compute"] = result.compute_ms
        state = DecodeState(result.outputs["state_out"], token, 1)
        payload = encode_state(state)
        await complete(job, model, version, result, None, opened, handed_on=True, output_bytes=len(payload))
        nxt = job.plan[job.stage + 1]
        if nxt.site == settings.site and nxt.executor in (None, settings.id) and repository.has(nxt.model):
            job.stage += 1
            job.model_chosen = nxt.model
            job.stamps_ms["decode_start"] = now_ms()
            await generate(job, state, opened)
            return
        await forward(job, payload, {RequestHeaders.CONTENT_TYPE: STATE_CONTENT_TYPE}, opened)

    async def generate(job: JobV1, state: DecodeState, opened: Opened | None) -> None:
        """Decode: one token per step (steps of concurrent streams batch together), each streamed as it comes."""
        model = job.plan[job.stage].model
        vocab = repository.handle(model).config["vocab"]
        job.stamps_ms.setdefault("decode_start", now_ms())
        cutoff = job.deadline_ms - settings.deadline_margin_ms
        result = None
        last_ms = job.stamps_ms["first_token"]
        for seq in range(state.made, job.max_tokens):
            if now_ms() >= cutoff:
                raise DinError(ErrorCode.DEADLINE_EXCEEDED, "the deadline came before the last token")
            result = await batcher.submit(model, {"token": np.array([state.token], np.int64), "state": state.state},
                                          sla_class=job.sla_class, deadline_ms=cutoff)
            token = next_token(result.outputs["logits"])
            state = DecodeState(result.outputs["state_out"], token, seq + 1)
            await send_chunk(job, StreamChunkV1(id=job.request_id, seq=seq, text=vocab[token], token=token), opened)
            last_ms = now_ms()
        stamps = job.stamps_ms
        timings = {
            "ttft": stamps["first_token"] - job.received_ms,
            "tpot": (last_ms - stamps["first_token"]) / max(1, job.max_tokens - 1),
            "prefill": stamps.get("prefill_compute", 0.0),
            "state_transfer": stamps["decode_start"] - stamps["first_token"],
            "total": now_ms() - job.received_ms,
        }
        served = served_by(job, model, result) if result is not None else ServedByV1(
            site=settings.site, executor=settings.id, model=job.model, model_version="", degraded=False, batch_size=1,
            stages=[describe(stage) for stage in job.plan])
        await send_chunk(job, StreamChunkV1(id=job.request_id, seq=job.max_tokens, text="", done=True,
                                            finish_reason="length", served_by=served,
                                            prompt_tokens=job.prompt_tokens, completion_tokens=job.max_tokens,
                                            timings_ms={k: round(v, 3) for k, v in timings.items()}), opened)
        await complete(job, model, served.model_version, result, None, opened,
                       extra_timings={k: v for k, v in timings.items() if k != "total"})

    async def forward(job: JobV1, payload: bytes, payload_headers: dict[str, str], opened: Opened | None) -> None:
        """Send a stage's output to the next stage as the plan says, sealed to the tenant and bound to that stage's
        site (a site holds only the keys of tenants it may serve, so no new site learns a key)."""
        nxt = job.plan[job.stage + 1]
        job.stage += 1
        job.model_chosen, job.site_chosen, job.executor_chosen = nxt.model, nxt.site, nxt.executor
        job.stamps_ms[f"stage_{job.stage}"] = now_ms()
        body, sealed_headers = payload, {}
        if opened is not None:
            aad = stage_binding(job.request_id, job.tenant, job.stage, nxt.site, job.reply_to, payload_headers,
                                plain_answer=opened.aad.get(ANSWER_FIELD) == ANSWER_PLAIN)
            sensitive = bool(job.workload and job.workload.sensitive)
            sealed = security.seal(payload, reader=tenant_principal(job.tenant), aad=aad,
                                   confidential=sensitive or not security.agent.integrity_allowed(nxt.site))
            body, sealed_headers = sealed.body, sealed.to_headers()
        out = {**payload_headers, **job.to_headers(), RequestHeaders.REQUEST_ID: job.request_id, **sealed_headers}
        if nxt.executor is not None:
            await runtime.nc.publish(Subjects.execute(nxt.site, nxt.executor), body, headers=out)
        else:
            await runtime.nc.jetstream().publish(Subjects.work(nxt.site, nxt.model), body, headers=out, timeout=2.0)

    async def give_back(job: JobV1, body: bytes, headers: dict[str, str], opened: Opened | None) -> None:
        """Full: hand the job back to the scheduler to place elsewhere, instead of failing it."""
        job.attempt += 1
        job.avoid.append(settings.id)
        await hand_back(job, body, headers, opened)

    async def escalate(job: JobV1, body: bytes, headers: dict[str, str], opened: Opened | None) -> None:
        """Cascade: the small variant was not sure; hand the job back to be placed on the large variant."""
        job.cascade_stage = 2
        if job.workload is not None:
            job.workload.candidates = [job.escalate_to]
        job.model_chosen = job.site_chosen = job.executor_chosen = None
        job.avoid = []
        job.stamps_ms["escalated"] = now_ms()
        await hand_back(job, body, headers, opened)

    async def hand_back(job: JobV1, body: bytes, headers: dict[str, str], opened: Opened | None) -> None:
        """Send ``job`` back to the scheduler with its original body, sealed again to the tenant."""
        passthrough = {k: v for k, v in without_envelope(headers).items() if not k.startswith(JOB_HEADER_PREFIX)}
        sealed_headers: dict[str, str] = {}
        if opened is not None:
            sealed = security.seal(body, reader=tenant_principal(job.tenant), aad=opened.aad,
                                   confidential=opened.confidential)
            body, sealed_headers = sealed.body, sealed.to_headers()
        await runtime.nc.publish(Subjects.SCHEDULE, body, headers={**passthrough, **job.to_headers(), **sealed_headers})

    async def keep_claimed(pulled: Msg) -> None:
        """Tell JetStream a pulled job is still being worked on, so only a dead executor's job is redelivered
        (after ``PULL_ACK_WAIT_S``) to another executor of the site."""
        while True:
            await asyncio.sleep(IN_PROGRESS_EVERY_S)
            with contextlib.suppress(Exception):
                await pulled.in_progress()

    async def traced_serve(job: JobV1, body: bytes, headers: dict[str, str], pulled: Msg | None,
                           opened: Opened | None) -> None:
        attributes = {"din.request_id": job.request_id, "din.executor": settings.id}
        if job.plan:
            attributes.update({"din.stage": job.stage, "din.stage_kind": job.plan[job.stage].kind.value})
        claim = asyncio.create_task(keep_claimed(pulled)) if pulled is not None else None
        try:
            with runtime.tracing.hop(f"executor {job.plan[job.stage].kind.value if job.plan else 'serve'}",
                                     job.traceparent, **attributes) as (_, job.traceparent):
                await serve(job, body, headers, pulled, opened)
        finally:
            if claim is not None:
                claim.cancel()

    def start_serving(job: JobV1, body: bytes, headers: dict[str, str], pulled: Msg | None = None,
                      opened: Opened | None = None) -> None:
        task = asyncio.create_task(traced_serve(job, body, headers, pulled, opened))
        serving.add(task)
        task.add_done_callback(serving.discard)

    @runtime.hot_path(Subjects.execute(settings.site, settings.id))
    async def on_job(msg: Msg) -> None:
        opened_job = open_job(msg)
        if opened_job is not None:
            job, body, opened = opened_job
            start_serving(job, body, msg.headers, opened=opened)

    @runtime.hot_path(Subjects.probe(settings.site), queue=f"probe-{settings.site}")
    async def on_probe(msg: Msg) -> None:
        if msg.reply:
            await runtime.nc.publish(msg.reply, msg.data)

    @runtime.broker.subscriber(Subjects.control("executor", settings.id))
    async def on_control(command: LoadModelV1) -> ModelLoadedV1 | NatsResponse:
        try:
            handle = await asyncio.to_thread(repository.load, command.model, command.version)
        except DinError as error:
            body, headers = error_reply(error, None)
            return NatsResponse(body, headers=headers)
        runtime.log.info("now serving %s version %s", handle.name, handle.version)
        await send_heartbeat()
        return ModelLoadedV1(
            name=handle.name,
            version=handle.version,
            max_batch_size=batcher.max_batch_size(handle.name),
            compute_ms_per_item=batcher.stats().compute_ms_per_item.get(handle.name, warm_ms.get(handle.name, 0.2)),
            accuracy=handle.accuracy,
        )

    @runtime.broker.subscriber(Subjects.ROLL_CALL)
    async def on_roll_call() -> None:
        await send_heartbeat()

    async def heartbeats() -> None:
        while True:
            await send_heartbeat()
            await asyncio.sleep(settings.heartbeat_interval_s)

    async def pull(model: str) -> None:
        """Distributed mode: take jobs for ``model`` from the site's work queue while there is room.

        The pull subscription is unsubscribed explicitly on the way out: draining the connection would
        otherwise wait forever on a ``next_msg``-style subscription's internal queue (nats-py).
        """
        js = runtime.nc.jetstream()
        subscription = await js.pull_subscribe(
            Subjects.work(settings.site, model),
            durable=f"work-{model}",
            stream=work_stream(settings.site),
            config=ConsumerConfig(ack_wait=PULL_ACK_WAIT_S, max_deliver=PULL_MAX_DELIVER),
        )
        try:
            while True:
                room = settings.capacity - len(serving)
                if room <= 0:
                    await asyncio.sleep(0.001)
                    continue
                try:
                    msgs = await subscription.fetch(1, timeout=PULL_WAIT_S)
                except (NatsTimeout, asyncio.TimeoutError):
                    continue
                more = min(room, batcher.max_batch_size(model)) - 1
                if more > 0:
                    with contextlib.suppress(NatsTimeout, asyncio.TimeoutError):
                        msgs += await subscription.fetch(more, timeout=PULL_MORE_WAIT_S)
                for msg in msgs:
                    opened_job = open_job(msg)
                    if opened_job is None:
                        await msg.term()
                        continue
                    job, body, opened = opened_job
                    start_serving(job, body, msg.headers, pulled=msg, opened=opened)
        finally:
            await subscription.unsubscribe()

    async def ensure_work_stream() -> None:
        config = StreamConfig(
            name=work_stream(settings.site),
            subjects=[Subjects.work_all(settings.site)],
            retention=RetentionPolicy.WORK_QUEUE,
            max_age=600.0,
        )
        js = runtime.nc.jetstream()
        with contextlib.suppress(Exception):
            await js.add_stream(config)

    @runtime.on_start
    async def keys() -> None:
        await security.start(runtime.nc, readers=lambda agent: [site_reader], timeout_s=settings.keys_wait_s)

    @runtime.on_start
    async def load_models() -> None:
        for model in settings.models:
            handle = await asyncio.to_thread(repository.load, model)
            batcher.set_max_batch_size(model, int(handle.config.get("max_batch_size", 64)))
            if handle.config.get("role") in NO_WINDOW_ROLES:
                batcher.set_queue_delay(model, 0.0)
            warm_ms[model] = await asyncio.to_thread(warm_up, handle)
            runtime.log.info("loaded %s version %s (%.3f ms per item warm)", handle.name, handle.version,
                             warm_ms[model])
        batcher.start()
        runtime.spawn(heartbeats(), name="heartbeats")
        if settings.pull:
            await ensure_work_stream()
            for model in settings.models:
                runtime.spawn(pull(model), name=f"pull-{model}")

    @runtime.on_stop_accepting
    async def announce_draining() -> None:
        announced["draining"] = True
        await runtime.stop_background()
        await send_heartbeat()
        await asyncio.sleep(DRAIN_NOTICE_S)

    @runtime.on_drain
    async def drain() -> None:
        await batcher.drain()
        if serving:
            await asyncio.wait(serving, timeout=10.0)
        await security.stop()

    return runtime
