"""How a job ends: the rules the executor and the scheduler share, without NATS.

At an executor every job it takes ends in one ``Outcome``: a result or an error
to the client (``deadline_exceeded`` too, when it gives up at its cutoff, before
the deadline: the job's answer does not depend on the scheduler that placed it
being alive), silence for a job it reaches only after the deadline itself (the
scheduler's watchdog has answered it or will), its output handed on to the next
stage of its plan, handed back to the scheduler because the executor is full,
escalated by a cascade, or (pulled from a site queue) NAK'd so the queue offers
it again. Its completion event closes
the job at the scheduler (``Din-Request-Id``) only when the client was answered;
a hand-off carries ``Din-Stage-Done`` instead and keeps the job open.

At the scheduler a job stays in flight until a completion closes it or the
watchdog answers it, at ``watchdog_at_ms``: after the deadline, later than the
executor gives up (its cutoff, the deadline minus its margin) by at least the
completion's way back, so the watchdog speaks only for a job no executor
answered: lost on the way, its executor dead with no time left, or reached by
its executor only after the deadline (a paused or swamped executor, a job
pulled late from a site queue), which therefore stays silent. One party
answers in each case; a job is unanswered only when its executor is late and
the scheduler that placed it is dead. An
executor's death dispatches its open jobs again while time remains, except a
token stream whose first token has already gone to the client.

Ownership of an answer moves only at defined points, so a paused, re-dispatched
or reconnected executor cannot answer twice. An executor holds a job under a
lease: its heartbeats (an assigned job: its scheduler counts it lost after
``loss_timeout_s``) or its claims on a pulled message (the queue offers it again
after the ack wait). It answers, or hands on, only while the lease cannot have
lapsed: its event loop never stalled longer than ``stall_limit_s`` (half the
lease's slack) and its connection never dropped since the job may have reached it
(``exposed_ms``). Otherwise the job is ``FENCED``: nothing goes to the client, and
its completion (``Din-Fenced``, with the ``dispatch_key``) hands it back to the
scheduler, which takes it only if it still names that executor and dispatch
(``takes_back``); a pulled one is left unsettled for the queue to offer again.
The scheduler decides losses and fires the watchdog only once it has handled
everything the bus had sent it (it is not behind on its own input) and did not
lose its own connection meanwhile.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum

from din.shared.contracts.inference import RequestHeaders
from din.shared.contracts.job import FENCED_HEADER, STAGE_DONE_HEADER, JobV1, StageV1
from din.shared.errors import DinError, ErrorCode

MAX_ATTEMPTS = 3
"""Dispatches a job may have before a full executor fails it instead of handing it back."""

FIRST_TOKEN_STAMP = "first_token"
"""``JobV1.stamps_ms`` key set when a generation's first token went to the client."""

MISSED_BEATS = 3
"""Heartbeat intervals an executor may stay silent before its scheduler counts it lost."""

EXPOSURE_SLACK_MS = 100.0
"""How much earlier than its dispatch stamp a job is taken to have possibly reached its executor: the clocks of
the scheduler that stamped it and of the executor may differ by this much."""


class Outcome(StrEnum):
    """How one job ended at one executor."""

    LEFT_TO_WATCHDOG = "left-to-watchdog"
    """Reached after the deadline itself: not answered here, the scheduler's watchdog answers."""
    ANSWERED = "answered"
    """The result went to the client."""
    FAILED = "failed"
    """An error went to the client."""
    HANDED_ON = "handed-on"
    """A multi-stage job's stage sent its output to the next stage (the job stays open)."""
    ESCALATED = "escalated"
    """A cascade's small variant was not sure: back to the scheduler for the large variant."""
    GIVEN_BACK = "given-back"
    """The executor was full: back to the scheduler to be placed elsewhere."""
    REQUEUED = "requeued"
    """Pulled from a site queue and NAK'd because full: the queue offers it again."""
    FENCED = "fenced"
    """The executor's lease on the job may have lapsed (it stalled, or its connection dropped): not answered
    here, handed back to the scheduler (or, pulled, left for the queue to offer again)."""


class Settlement(StrEnum):
    """What an executor tells its site's work queue about a pulled message."""

    ACK = "ack"
    """Done with (whatever the outcome): the queue forgets it."""
    NAK = "nak"
    """Not taken: offer it again after a delay."""
    TERM = "term"
    """Not a job this executor can read: never offer it again."""
    LEAVE = "leave"
    """Fenced: neither acked nor NAK'd (a NAK could end another executor's claim on it); its claim lapses and
    the queue offers it again."""


class Redispatch(StrEnum):
    """What the scheduler does with an open job whose executor died."""

    DISPATCH_AGAIN = "dispatch-again"
    """Place it afresh (a multi-stage job gets a new plan)."""
    STREAM_INTERRUPTED = "stream-interrupted"
    """A token stream already under way: answer ``EXECUTOR_LOST`` (tokens cannot be taken back)."""
    NO_TIME_LEFT = "no-time-left"
    """Within the deadline margin: answer ``EXECUTOR_LOST``."""


class FenceReason(StrEnum):
    """Why an executor may no longer answer a job it holds."""

    STALLED = "stalled"
    """Its event loop stalled longer than the lease allows (paused, swamped): it may have been counted lost."""
    RECONNECTED = "reconnected"
    """Its connection dropped: what it publishes now would be buffered and sent late, after others answered."""


def loss_timeout_s(heartbeat_interval_s: float) -> float:
    """How long a scheduler hears nothing from an executor before it counts it lost and takes its jobs back."""
    return MISSED_BEATS * heartbeat_interval_s


def stall_limit_s(renew_every_s: float, lapse_s: float) -> float:
    """The longest stall after which an executor may still answer a job held under a lease renewed every
    ``renew_every_s`` that lapses after ``lapse_s`` without renewal: half the slack, the other half left for the
    renewal's way to whoever counts it (heartbeats: the scheduler; claims: the work queue)."""
    return (lapse_s - renew_every_s) / 2.0


def dispatched_ms(job: JobV1) -> float:
    """When the job was last sent on to an executor (epoch ms): its stage's hand-off, else its placement, else
    its admission."""
    stamps = job.stamps_ms
    if job.stage and f"stage_{job.stage}" in stamps:
        return stamps[f"stage_{job.stage}"]
    return stamps.get("scheduled", job.received_ms)


def exposed_ms(job: JobV1, now_ms: float, *, pulled: bool, pull_wait_ms: float) -> float:
    """The earliest moment (epoch ms) the job may have been this executor's: from its dispatch (less the clock
    slack) on; a pulled job no earlier than the longest a pull waits for its messages before ``now_ms``."""
    exposed = dispatched_ms(job) - EXPOSURE_SLACK_MS
    if pulled:
        exposed = max(exposed, now_ms - pull_wait_ms - EXPOSURE_SLACK_MS)
    return min(exposed, now_ms)


def fence(*, exposed_s: float, now_s: float, last_tick_s: float, last_stall_end_s: float | None,
          limit_s: float, connected: bool, reconnected: bool) -> FenceReason | None:
    """Why an executor must not answer (or hand on) a job that may have been its own since ``exposed_s`` (all
    monotonic seconds), or None: its connection is down or dropped since (``reconnected``), or its event loop,
    last seen running at ``last_tick_s``, is stalled now or had a stall longer than ``limit_s`` ending at
    ``last_stall_end_s`` after the job reached it."""
    if not connected or reconnected:
        return FenceReason.RECONNECTED
    if now_s - last_tick_s > limit_s or (last_stall_end_s is not None and last_stall_end_s > exposed_s):
        return FenceReason.STALLED
    return None


def dispatch_key(job: JobV1, stage: int | None = None) -> str:
    """Which dispatch of a request a job is: its attempt, cascade step and plan stage (``stage``, default the
    job's own; the scheduler passes the stages it saw handed on). The same request placed again is another."""
    return f"{job.attempt}.{job.cascade_stage or 0}.{job.stage if stage is None else stage}"


def fenced_job(headers: Mapping[str, str] | None) -> tuple[str, str] | None:
    """The request id and dispatch key a completion event hands back as fenced, if any."""
    value = (headers or {}).get(FENCED_HEADER)
    if not value or ";" not in value:
        return None
    request_id, key = value.split(";", 1)
    return (request_id, key) if request_id else None


def takes_back(held_by: str | None, held_key: str, sender: str, key: str) -> bool:
    """Whether the scheduler takes back a job its executor ``sender`` fenced as dispatch ``key``: only while its
    open entry still names that executor and dispatch (not once it was dispatched again, elsewhere or there)."""
    return held_by is not None and held_by == sender and held_key == key


def cutoff_ms(deadline_ms: float, margin_ms: float) -> float:
    """The last moment work on a job is worth doing: ``margin_ms`` before its deadline."""
    return deadline_ms - margin_ms


DEADLINE_MARGIN_MS = 5.0
"""How long before a job's deadline work on it stops being worth starting (services' default margin)."""


UNTAKEN_GRACE_MS = 250.0
"""How long past a handed-on job's deadline its sender still waits for the acknowledgement before it answers the
job itself: the acknowledgement of a job taken just before the deadline is on its way back."""


def untaken_answer_at_ms(deadline_ms: float) -> float:
    """When the sender of a handed-on job nobody acknowledged answers it ``deadline_exceeded``."""
    return deadline_ms + UNTAKEN_GRACE_MS


def left_to_sender(job: JobV1, now_ms: float) -> bool:
    """Whether a job handed on with an acknowledgement awaited reached its stage at or past its deadline: the
    stage neither answers nor acknowledges it, and its sender, still its owner, answers it at
    ``untaken_answer_at_ms``. (An acknowledgement sent this late could reach the sender after it answered.)"""
    return now_ms >= job.deadline_ms


def expired_on_arrival(job: JobV1, now_ms: float, margin_ms: float = DEADLINE_MARGIN_MS) -> DinError | None:
    """The answer to a job that reached a stage past its cutoff (but before its deadline, ``left_to_sender``),
    or None when there is time to work on it. The stage answers it itself (and does no work): having taken the
    job, it owns its answer."""
    if not past_cutoff(job.deadline_ms, now_ms, margin_ms):
        return None
    return DinError(ErrorCode.DEADLINE_EXCEEDED, "the request's deadline passed before it could be served")


def watchdog_at_ms(deadline_ms: float, transit_ms: float) -> float:
    """When the scheduler's watchdog answers a job still open: at its deadline plus ``transit_ms``, the time a
    completion takes from the job's site to the scheduler. The executor gives up its margin before the
    deadline and answers, so its completion arrives first and the two never both answer."""
    return deadline_ms + transit_ms


def past_cutoff(deadline_ms: float, now_ms: float, margin_ms: float) -> bool:
    """Whether a job is within ``margin_ms`` of its deadline: the executor gives up on it (answering
    ``deadline_exceeded``), a scheduler drops it on arrival, and a lost executor's job is not dispatched
    again."""
    return now_ms >= cutoff_ms(deadline_ms, margin_ms)


def has_streamed(job: JobV1) -> bool:
    """Whether a token of the job's generation already went to the client (it can no longer move)."""
    return FIRST_TOKEN_STAMP in job.stamps_ms


def outcome_of_error(code: ErrorCode, *, pulled: bool, streamed: bool, attempt: int, plan_stage: int,
                     past_deadline: bool = False) -> Outcome:
    """How a job that failed with ``code`` at an executor ends.

    A full executor (``OVERLOADED``) NAKs a pulled job, or hands a first-stage job back while it has attempts
    left, unless a token has streamed; ``DEADLINE_EXCEEDED`` is answered when the executor gives up before the
    deadline and left to the scheduler's watchdog once the deadline itself has passed (``past_deadline``), so
    the two never both answer; anything else is answered as an error.
    """
    if code == ErrorCode.OVERLOADED and not streamed:
        if pulled:
            return Outcome.REQUEUED
        if attempt < MAX_ATTEMPTS and plan_stage == 0:
            return Outcome.GIVEN_BACK
    if code == ErrorCode.DEADLINE_EXCEEDED and past_deadline:
        return Outcome.LEFT_TO_WATCHDOG
    return Outcome.FAILED


def may_escalate(job: JobV1) -> bool:
    """Whether an answer of this job may escalate instead of going to the client: a cascade's first step
    with a large variant to go to."""
    return job.cascade_stage == 1 and bool(job.escalate_to)


def reports_completion(outcome: Outcome) -> bool:
    """Whether the executor publishes a completion event: not for a job it handed back or NAK'd, which
    another executor completes."""
    return outcome not in (Outcome.GIVEN_BACK, Outcome.REQUEUED)


def completion_headers(outcome: Outcome, request_id: str, dispatch: str = "") -> dict[str, str] | None:
    """Headers of the completion event: ``Din-Request-Id`` closes the job at the scheduler (the client was
    answered), ``Din-Stage-Done`` marks a stage hand-off (the job stays open), ``Din-Fenced`` hands a fenced job
    (its ``dispatch`` key) back; an escalation and a job left to the watchdog carry none, so the scheduler keeps
    the job (the large variant, or its watchdog, answers)."""
    if outcome in (Outcome.ANSWERED, Outcome.FAILED):
        return {RequestHeaders.REQUEST_ID: request_id}
    if outcome == Outcome.HANDED_ON:
        return {STAGE_DONE_HEADER: request_id}
    if outcome == Outcome.FENCED:
        return {FENCED_HEADER: f"{request_id};{dispatch}"}
    if outcome in (Outcome.ESCALATED, Outcome.LEFT_TO_WATCHDOG):
        return None
    raise ValueError(f"a job {outcome.value} reports no completion")


def settlement(outcome: Outcome | None) -> Settlement:
    """What to tell the work queue about a pulled message; ``outcome`` None: it was not a readable job."""
    if outcome is None:
        return Settlement.TERM
    if outcome == Outcome.FENCED:
        return Settlement.LEAVE
    return Settlement.NAK if outcome == Outcome.REQUEUED else Settlement.ACK


def give_back(job: JobV1, executor_id: str) -> None:
    """Mark ``job`` handed back by a full ``executor_id``: one more attempt, elsewhere."""
    job.attempt += 1
    job.avoid.append(executor_id)


def escalate(job: JobV1, now_ms: float) -> None:
    """Turn a cascade's first step into its second: the large variant only, placed afresh."""
    job.cascade_stage = 2
    if job.workload is not None:
        job.workload.candidates = [job.escalate_to]
    job.model_chosen = job.site_chosen = job.executor_chosen = None
    job.avoid = []
    job.stamps_ms["escalated"] = now_ms


def hand_on(job: JobV1, now_ms: float) -> StageV1:
    """Move ``job`` to the next stage of its plan, to be sent there; the stage's hand-off time is stamped
    (``stage_<index>``). Returns that stage."""
    following = job.plan[job.stage + 1]
    job.stage += 1
    job.model_chosen, job.site_chosen, job.executor_chosen = following.model, following.site, following.executor
    job.stamps_ms[f"stage_{job.stage}"] = now_ms
    return following


def runs_here(stage: StageV1, site: str, executor_id: str, serves_model: bool) -> bool:
    """Whether this executor may run ``stage`` itself instead of sending it on (a co-located decode)."""
    return stage.site == site and stage.executor in (None, executor_id) and serves_model


def stage_done(headers: Mapping[str, str] | None) -> str | None:
    """The request id a completion event marks as one stage handed on (its job stays open), if any."""
    return (headers or {}).get(STAGE_DONE_HEADER)


def closes_job(headers: Mapping[str, str] | None) -> str | None:
    """The request id whose in-flight job a completion event closes at the scheduler, if any."""
    headers = headers or {}
    if STAGE_DONE_HEADER in headers:
        return None
    return headers.get(RequestHeaders.REQUEST_ID) or None


def may_redispatch(job: JobV1, stages_done: int, now_ms: float, margin_ms: float) -> Redispatch:
    """What to do with an open job whose executor died; ``stages_done`` counts its stages handed on."""
    if job.max_tokens is not None and stages_done:
        return Redispatch.STREAM_INTERRUPTED
    if past_cutoff(job.deadline_ms, now_ms, margin_ms):
        return Redispatch.NO_TIME_LEFT
    return Redispatch.DISPATCH_AGAIN


def reset_for_redispatch(job: JobV1) -> None:
    """Make a lost executor's job new again for placement: one more attempt, no executor, no plan."""
    job.attempt += 1
    job.executor_chosen = None
    job.plan, job.stage, job.split_chosen = [], 0, None


def watchdog_may_answer(deadline_ms: float, heard_ms: float | None) -> bool:
    """Whether the watchdog may answer an overdue job whose executor is still in view, having last heard from it
    a message the executor sent at ``heard_ms`` (its own clock; None: not in view, answer).

    An executor never answers a job at or past its deadline by its own clock, and NATS delivers one
    connection's messages in the order they were published: once the scheduler has taken a heartbeat or
    completion the executor sent at or after the deadline, any answer it gave the job was published earlier, so
    its completion has arrived already (``caught_up``). Until then the executor may still be writing an answer it
    decided on in time (a loaded event loop can hold written messages back for hundreds of ms), so the watchdog
    waits; an executor that stays silent is lost after its heartbeats stop, and its jobs are answered then."""
    return heard_ms is None or heard_ms >= deadline_ms


def watchdog_error(assigned_executor: str | None, executor_alive: bool) -> ErrorCode:
    """The code the watchdog answers an open job with (``watchdog_at_ms``): ``EXECUTOR_LOST`` when the
    executor it was assigned to has gone, else ``DEADLINE_EXCEEDED``."""
    if assigned_executor is not None and not executor_alive:
        return ErrorCode.EXECUTOR_LOST
    return ErrorCode.DEADLINE_EXCEEDED
