"""How each request ended, once per request: its final completion, else its refusal; and which traffic was replayed.

A request can leave several records. A multi-stage job (split inference,
prefill/decode) records one completion per stage, a cascade one per step, an
executor that fenced a job one before the job is served again elsewhere, and an
admission that handed a request to another site's admission one decision before
that site's own. Only one of them says how the request ended:

* a completion that **hands on** (``is_hand_off``: a stage that sent its output to
  the next stage, a cascade's first step that escalated) never does: it is a stage
  figure, not a completion of the request;
* otherwise the last (by time) of its completions that are not hand-offs and of
  the scheduler's refusals of it (a forward to another site's scheduler is not one, nor
  is ``awaiting_executor``: the scheduler holding the job while a pool scales from zero;
  its later placement or its refusal at the deadline follows in its own record);
* without one, admission's refusal (a hand-over to another site's admission is not one);
* else ``no_outcome_recorded``.

**Replayed traffic** is marked by its request id: ``din replay`` sends every request
again as ``replay-<run>-<original id>`` (``replay_request_id``), and that id travels
with the request through every record it leaves (admission and scheduling
decisions, completions, the recording itself), so ``replay_run`` tells replayed from
live traffic, and one replay run from another, in any window.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from din.shared.contracts.events import AdmissionDecisionV1, CompletionV1, SchedulingDecisionV1
from din.shared.contracts.options import MAX_REQUEST_ID
from din.shared.contracts.scaling import AWAITING_EXECUTOR

NO_OUTCOME = "no_outcome_recorded"
REPLAY_ID_PREFIX = "replay-"
HANDED_OVER = "handed_over"
"""Admission's reason for a request it handed to another site's admission (which records its own decision)."""


def replay_request_id(run_id: str, request_id: str) -> str:
    """The id a replay run ``run_id`` sends recorded request ``request_id`` again as."""
    return f"{REPLAY_ID_PREFIX}{run_id}-{request_id}"[:MAX_REQUEST_ID]


def replay_run(request_id: str) -> str | None:
    """The replay run a request id belongs to, or None for live traffic."""
    if not request_id.startswith(REPLAY_ID_PREFIX):
        return None
    run, sep, rest = request_id[len(REPLAY_ID_PREFIX):].partition("-")
    return run if run and sep and rest else None


def is_hand_off(completion: CompletionV1) -> bool:
    """Whether ``completion`` is a stage that passed its request on instead of ending it: a multi-stage job's stage
    that handed its output to the next stage, or a cascade's first step that escalated to the large variant."""
    return completion.handed_on_to is not None or (completion.cascade_step == 1 and completion.escalated)


def stage_name(completion: CompletionV1) -> str:
    """What kind of stage a hand-off was (``split-head``, ``prefill``, ``cascade step 1``)."""
    if completion.stage_kind:
        return completion.stage_kind
    if completion.cascade_step is not None:
        return f"cascade step {completion.cascade_step}"
    return f"stage {completion.plan_stage}" if completion.plan_stage is not None else "stage"


def is_forward(decision: SchedulingDecisionV1) -> bool:
    """Whether a scheduling decision handed the job to another site's scheduler (whose decision follows) rather
    than placing or refusing it (records that predate ``forwarded_to`` say so in their reason)."""
    return decision.forwarded_to is not None or (
        decision.chosen_site is None and decision.reason.startswith("forwarded to "))


def is_awaiting(decision: SchedulingDecisionV1) -> bool:
    """Whether a scheduling decision holds the job while a pool scales from zero (``awaiting_executor``): not an
    end of the request; its placement, or its refusal at the deadline, is recorded after it."""
    return decision.chosen_site is None and decision.reason == AWAITING_EXECUTOR


def ends_request(decision: SchedulingDecisionV1) -> bool:
    """Whether a scheduling decision refused its request: no site chosen, and neither a forward to another site's
    scheduler nor a hold while a pool scales from zero."""
    return decision.chosen_site is None and not is_forward(decision) and not is_awaiting(decision)


@dataclass
class Outcome:
    """How one request ended; for a replayed one also how it was served (cascade escalation, split point, the
    number of chunks of a token stream)."""

    request_id: str
    tenant: str
    sla_class: str
    ok: bool
    code: str = "ok"
    latency_ms: float | None = None
    client_ms: float | None = None
    site: str | None = None
    model: str | None = None
    degraded: bool = False
    escalated: bool = False
    split_point: str | None = None
    chunks: int | None = None
    at_ms: float | None = None
    count: int = 1
    """How many requests this outcome stands for: 1, except for requests shed together at admission."""
    stage: str | None = None
    """Where it ended: ``admission``, ``scheduler``, ``executor``, or None (no outcome recorded)."""
    hand_offs: list[CompletionV1] = field(default_factory=list)
    """Its stages' completions that handed it on (stage figures, not completions of the request)."""
    awaited_executor: bool = False
    """The scheduler held it while a pool scaled from zero (an ``awaiting_executor`` record) before its outcome."""

    @property
    def run(self) -> str | None:
        """The replay run that sent it, or None for live traffic."""
        return replay_run(self.request_id)


def distinct(completions: Iterable[CompletionV1]) -> list[CompletionV1]:
    """``completions`` without the exact repeats an at-least-once relay can record (one execution, one record)."""
    seen: set[str] = set()
    kept = []
    for completion in completions:
        key = completion.model_dump_json()
        if key not in seen:
            seen.add(key)
            kept.append(completion)
    return kept


def final_outcomes(admissions: Iterable[AdmissionDecisionV1], schedulings: Iterable[SchedulingDecisionV1],
                   completions: Iterable[CompletionV1], *,
                   requests: dict[str, tuple[str, str]] | None = None) -> dict[str, Outcome]:
    """One ``Outcome`` per request, keyed by request id (see the module docstring for which record decides).

    With ``requests`` (request id -> (tenant, SLA class), e.g. the recorded requests of a window) only those
    requests, each with an outcome (``no_outcome_recorded`` when nothing was recorded about it); otherwise every
    request some record names. Requests shed together at admission (one record for many) are one outcome with
    their ``count``.
    """
    outcomes: dict[str, Outcome] = {}
    if requests is not None:
        for rid, (tenant, sla) in requests.items():
            outcomes[rid] = Outcome(rid, tenant, sla, False, NO_OUTCOME)

    def outcome(rid: str, tenant: str, sla: str | None) -> Outcome | None:
        if not rid:
            return None
        found = outcomes.get(rid)
        if found is None and requests is None:
            found = outcomes[rid] = Outcome(rid, tenant, sla or "", False, NO_OUTCOME)
        if found is not None and not found.sla_class and sla:
            found.sla_class = sla
        return found

    for d in sorted(admissions, key=lambda d: d.at_ms):
        if d.reason == HANDED_OVER:
            continue
        o = outcome(d.request_id, d.tenant, d.sla_class.value if d.sla_class else None)
        if o is not None and not d.admitted and o.stage is None:
            o.code, o.stage, o.at_ms, o.count = d.reason, "admission", d.at_ms, d.count
    ends: list[tuple[float, int, SchedulingDecisionV1 | CompletionV1]] = []
    for d in schedulings:
        if ends_request(d):
            ends.append((d.at_ms, 0, d))
            continue
        o = outcome(d.request_id, d.tenant, d.sla_class.value)
        if o is not None and is_awaiting(d):
            o.awaited_executor = True
    ends.extend((c.at_ms, 1, c) for c in distinct(completions))
    for _, _, end in sorted(ends, key=lambda e: (e[0], e[1])):
        o = outcome(end.request_id, end.tenant, end.sla_class.value)
        if o is None:
            continue
        if isinstance(end, SchedulingDecisionV1):
            o.ok, o.code, o.stage, o.at_ms, o.count = False, end.reason, "scheduler", end.at_ms, 1
            o.latency_ms = o.site = o.model = None
            o.degraded = o.escalated = False
        elif is_hand_off(end):
            o.hand_offs.append(end)
        else:
            o.ok, o.stage, o.at_ms, o.count = end.ok, "executor", end.at_ms, 1
            o.code = "ok" if end.ok else (end.error_code or "error")
            o.latency_ms = end.timings_ms.get("total")
            o.site, o.model, o.degraded = end.site, end.model, end.degraded
            o.escalated = end.cascade_step == 2
    return outcomes
