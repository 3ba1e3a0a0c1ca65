"""Choosing where to cut a model between the data's site and a tail site (Neurosurgeon-style).

Options, each with a predicted latency for a batch:

* ``local``: the whole model runs at the data's site; nothing crosses a link.
* ``no-split``: the raw input is shipped and the whole model runs at the tail site.
* a split point: the head runs at the data's site, the intermediate tensor
  crosses the link, the tail runs at the tail site.

Predicted latency = head compute + transfer (round trip plus bytes over the
bandwidth, both ways) + queueing at the tail site + tail compute, the same
shape as the scheduler's placement prediction. The lowest feasible option
wins; ties go to the option that keeps more at the data's site.

Constraints: the raw input may only reach the data's own site or an allowed
site (sovereignty), so ``no-split`` needs an allowed tail site; an
intermediate may be refused when its measured leakage (what a model-inversion
attack recovers from it, see ``bench.privacy``) is above a limit (privacy).
Pure logic, for the scheduler and for offline what-if analysis.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from din.services.scheduler.links import LinkTable
from din.shared.errors import DinError, ErrorCode

LOCAL = "local"
NO_SPLIT = "no-split"

SOVEREIGNTY = "sovereignty"
PRIVACY = "privacy"
UNAVAILABLE = "unavailable"


@dataclass(frozen=True)
class SplitCandidate:
    """One place to cut: the bytes that cross per item, compute per item on each side, and what it leaks.

    ``leakage`` is a measured score in [0, 1], higher leaking more (e.g. the
    share of the input's variance an inversion attack recovers); None when unmeasured.
    """

    point: str
    intermediate_bytes: float
    head_ms: float
    tail_ms: float
    leakage: float | None = None


@dataclass(frozen=True)
class LinkEstimate:
    """The link from the data's site to the tail site: round trip and bandwidth."""

    rtt_ms: float
    bandwidth_mbps: float

    def transfer_ms(self, bytes_out: float, bytes_back: float = 0.0) -> float:
        """One round trip plus the time to push ``bytes_out`` there and ``bytes_back`` back."""
        return self.rtt_ms + (bytes_out + bytes_back) * 8.0 / (self.bandwidth_mbps * 1000.0)

    @classmethod
    def from_links(cls, links: LinkTable, tail_site: str, bandwidth_mbps: float) -> LinkEstimate:
        """The measured RTT (jitter and loss priced in) from ``links``' home site, which must be the data's site."""
        return cls(rtt_ms=links.rtt_ms(tail_site), bandwidth_mbps=bandwidth_mbps)


@dataclass(frozen=True)
class SplitContext:
    """Everything but the candidates: sites, link, sizes, whole-model compute and the constraints.

    ``full_ms_at_data`` / ``full_ms_at_tail`` are the whole model's compute per
    item at each site, None where that site does not serve it.
    ``allowed_sites`` None means the raw input may go anywhere;
    ``max_leakage`` None means any intermediate may cross.
    """

    data_site: str
    tail_site: str
    link: LinkEstimate
    input_bytes: float
    output_bytes: float = 0.0
    full_ms_at_data: float | None = None
    full_ms_at_tail: float | None = None
    allowed_sites: Collection[str] | None = None
    max_leakage: float | None = None
    batch: int = 1
    tail_queue_ms: float = 0.0

    @property
    def same_site(self) -> bool:
        """True when the tail runs where the data is, so nothing crosses a link."""
        return self.data_site == self.tail_site

    def raw_input_may_reach_tail(self) -> bool:
        """Whether shipping the raw input to the tail site respects the data's allowed sites."""
        return self.allowed_sites is None or self.same_site or self.tail_site in self.allowed_sites


@dataclass(frozen=True)
class SplitAlternative:
    """One option considered: its predicted latency and parts, or why it was excluded."""

    point: str
    predicted_ms: float | None
    excluded_by: str | None = None
    head_ms: float = 0.0
    transfer_ms: float = 0.0
    tail_ms: float = 0.0
    bytes_sent: float = 0.0
    note: str = ""


@dataclass(frozen=True)
class SplitDecision:
    """The chosen option, its predicted latency, why, and every option considered."""

    point: str
    predicted_ms: float
    reason: str
    alternatives: list[SplitAlternative] = field(default_factory=list)

    @property
    def chosen(self) -> SplitAlternative:
        """The alternative that was chosen."""
        return next(a for a in self.alternatives if a.point == self.point)


def candidates_from_layers(
    points: Sequence[str],
    bytes_per_point: Sequence[float],
    data_layer_ms: Sequence[float],
    tail_layer_ms: Sequence[float],
) -> list[SplitCandidate]:
    """Split candidates from per-layer compute at each site, as Neurosurgeon profiles them.

    Point ``k`` follows layer ``k``: the head is layers ``0..k`` at the data's
    site, the tail the remaining layers at the tail site. There is one more
    layer than there are points.
    """
    if not len(points) == len(bytes_per_point) == len(data_layer_ms) - 1 == len(tail_layer_ms) - 1:
        raise ValueError("need one size per point and one more layer than points, at each site")
    return [
        SplitCandidate(
            point=point,
            intermediate_bytes=size,
            head_ms=float(sum(data_layer_ms[: index + 1])),
            tail_ms=float(sum(tail_layer_ms[index + 1 :])),
        )
        for index, (point, size) in enumerate(zip(points, bytes_per_point))
    ]


def _transfer(context: SplitContext, bytes_out: float) -> float:
    if context.same_site:
        return 0.0
    return context.link.transfer_ms(bytes_out, context.output_bytes * context.batch)


def _local(context: SplitContext) -> SplitAlternative:
    if context.full_ms_at_data is None:
        return SplitAlternative(LOCAL, None, UNAVAILABLE, note=f"{context.data_site} does not serve the whole model")
    compute = context.full_ms_at_data * context.batch
    return SplitAlternative(LOCAL, compute, head_ms=compute, note=f"whole model at {context.data_site}")


def _no_split(context: SplitContext) -> SplitAlternative:
    if context.full_ms_at_tail is None:
        return SplitAlternative(NO_SPLIT, None, UNAVAILABLE, note=f"{context.tail_site} does not serve the whole model")
    if not context.raw_input_may_reach_tail():
        return SplitAlternative(
            NO_SPLIT, None, SOVEREIGNTY, note=f"raw input may not leave for {context.tail_site}"
        )
    sent = context.input_bytes * context.batch
    transfer = _transfer(context, sent)
    compute = context.full_ms_at_tail * context.batch
    return SplitAlternative(
        NO_SPLIT,
        transfer + context.tail_queue_ms + compute,
        transfer_ms=transfer,
        tail_ms=context.tail_queue_ms + compute,
        bytes_sent=sent,
        note=f"raw input to {context.tail_site}",
    )


def _split(context: SplitContext, candidate: SplitCandidate) -> SplitAlternative:
    limit = context.max_leakage
    if limit is not None and not context.same_site:
        if candidate.leakage is None:
            return SplitAlternative(candidate.point, None, PRIVACY, note="leakage not measured and a limit is set")
        if candidate.leakage > limit:
            return SplitAlternative(
                candidate.point, None, PRIVACY, note=f"leakage {candidate.leakage:.3f} > limit {limit:.3f}"
            )
    head = candidate.head_ms * context.batch
    sent = candidate.intermediate_bytes * context.batch
    transfer = _transfer(context, sent)
    tail = context.tail_queue_ms + candidate.tail_ms * context.batch
    return SplitAlternative(
        candidate.point,
        head + transfer + tail,
        head_ms=head,
        transfer_ms=transfer,
        tail_ms=tail,
        bytes_sent=sent,
        note=f"head at {context.data_site}, tail at {context.tail_site}",
    )


def _describe(option: SplitAlternative) -> str:
    if option.point == LOCAL:
        return f"local: {option.predicted_ms:.3f} ms compute at the data's site"
    what = f"{NO_SPLIT} (raw input shipped)" if option.point == NO_SPLIT else f"split at {option.point}"
    return (
        f"{what}: {option.head_ms:.3f} ms head + {option.transfer_ms:.3f} ms transfer "
        f"({option.bytes_sent:.0f} B) + {option.tail_ms:.3f} ms tail = {option.predicted_ms:.3f} ms"
    )


def choose_split_point(candidates: Sequence[SplitCandidate], context: SplitContext) -> SplitDecision:
    """The option with the lowest predicted latency under the constraints, with every alternative and why.

    Raises ``DinError(NO_ELIGIBLE_EXECUTOR)`` when no option is feasible.
    """
    if context.batch < 1:
        raise DinError(ErrorCode.BAD_REQUEST, f"batch must be at least 1, not {context.batch}")
    options = [_local(context), *(_split(context, c) for c in candidates), _no_split(context)]
    feasible = [o for o in options if o.excluded_by is None]
    if not feasible:
        reasons = "; ".join(f"{o.point}: {o.excluded_by} ({o.note})" for o in options)
        raise DinError(ErrorCode.NO_ELIGIBLE_EXECUTOR, f"no way to run the model under the constraints: {reasons}")
    best = min(feasible, key=lambda o: o.predicted_ms)
    reason = "lowest predicted latency: " + _describe(best)
    runners = sorted((o for o in feasible if o is not best), key=lambda o: o.predicted_ms)
    if runners:
        reason += f"; next best {runners[0].point} at {runners[0].predicted_ms:.3f} ms"
    excluded = [o for o in options if o.excluded_by is not None and o.excluded_by != UNAVAILABLE]
    if excluded:
        reason += "; excluded " + ", ".join(f"{o.point} ({o.excluded_by}: {o.note})" for o in excluded)
    return SplitDecision(best.point, best.predicted_ms, reason, options)
