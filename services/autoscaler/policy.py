"""How big each pool should be: pure rules over a pool's signals, with hysteresis, cool-downs, bounds and bursting.

``size_pools`` takes every pool's ``PoolView`` (what it runs now, what it saw, when it last changed) and returns
a ``Verdict`` per pool: the size it should have and why. The rules, in order:

1. **From zero**: a pool at 0, with no other executor of its models at its site, starts one when requests for
   its models wait (the scheduler holds them, ``awaiting_executor``) or are refused for want of capacity.
2. **Out**: the site's executors of the pool's models are needed at ``ceil(busy / target_utilisation)`` (busy:
   executors' worth of compute over the window); a pool grows to cover what its site lacks, or by one when jobs
   wait in executors' queues past ``max_wait_ms``, or when requests are refused for capacity while its executors
   work (not when they idle: then the bottleneck is elsewhere and more executors would not help). Not within
   ``scale_out_cooldown_s`` of its last growth.
3. **In**: below ``scale_in_utilisation`` per executor, nothing waiting and nothing refused, a pool gives back one
   executor, if the rest would still be under ``target_utilisation`` (the band between the two is the
   hysteresis); not within ``scale_in_cooldown_s`` of its last change. It keeps its last executor when that is
   the only one of its models at its site (only rule 4 stops it); a burst pool gives back all it can, and
   first: an on-prem pool of the same model waits while a burst pool of it runs above its min.
4. **To zero**: a pool with ``min: 0`` whose models saw nothing for ``idle_to_zero_s`` stops its last executor.

Pools at one site serving one model share its need: what a pool is granted in a look counts as already
serving for the pools after it. Beyond their max, the rest is the shortfall:

5. **Bursting**: burst pools do not follow rule 2 on their own; they grow by what the on-prem pools of their
   models wanted beyond their ``max`` (the shortfall), within their max and their site's ``max_executors``, and
   only while the burst executors already running are at ``target_utilisation`` (else the rented capacity
   there is still absorbing the shortfall).

Everything is clamped to ``[min, max]``. Sensitive data never reaching a burst site is the classifier's rule
(``Topology.allowed_sites``); the autoscaler only sizes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, replace

from din.shared.contracts.scaling import PoolSignalsV1
from din.shared.topology import PoolSpec, ScalingSpec, Topology


@dataclass(frozen=True)
class PoolView:
    """One pool as the autoscaler holds it at a look."""

    site: str
    pool: PoolSpec
    burst: bool
    wanted: int
    """The size it asked for last (ready, starting and asked-for executors)."""
    fixed: int
    """The site's other executors serving any of the pool's models: fixed ones and other pools' wanted ones."""
    signals: PoolSignalsV1
    last_out_s: float | None = None
    last_change_s: float | None = None

    @property
    def key(self) -> tuple[str, str]:
        return self.site, self.pool.name


@dataclass(frozen=True)
class Verdict:
    """The size a pool should have and why (``reason`` is empty when it keeps its size)."""

    size: int
    reason: str = ""


def _needed(signals: PoolSignalsV1, target: float) -> int:
    return math.ceil(round(signals.busy / target, 6))


def _wants_out(view: PoolView, spec: ScalingSpec, now_s: float) -> Verdict | None:
    s, total = view.signals, view.fixed + view.wanted
    if view.last_out_s is not None and now_s - view.last_out_s < spec.scale_out_cooldown_s:
        return None
    if total == 0:
        if s.refused_per_s > 0:
            return Verdict(1, f"cold start: {s.refused_per_s:g}/s waiting or refused for capacity, no executor "
                              "of the models here")
        return None
    needed = _needed(s, spec.target_utilisation)
    if needed > total:
        return Verdict(view.wanted + needed - total,
                       f"busy {s.busy:g} executors' worth needs {needed} at {spec.target_utilisation:g} "
                       f"utilisation, {total} serve")
    if s.queue_wait_ms > spec.max_wait_ms:
        return Verdict(view.wanted + 1, f"jobs waited {s.queue_wait_ms:g} ms in queues (max {spec.max_wait_ms:g})")
    if s.refused_per_s > 0 and total and s.busy / total >= spec.scale_in_utilisation:
        return Verdict(view.wanted + 1, f"{s.refused_per_s:g}/s refused for capacity while the executors are "
                                        f"{s.busy / total:.3g} busy each")
    return None


def _wants_in(view: PoolView, spec: ScalingSpec, now_s: float) -> Verdict | None:
    s, total = view.signals, view.fixed + view.wanted
    if view.wanted == 0 or (view.last_change_s is not None and now_s - view.last_change_s < spec.scale_in_cooldown_s):
        return None
    if view.pool.min == 0 and s.idle_s is not None and s.idle_s >= spec.idle_to_zero_s:
        return Verdict(0, f"idle for {s.idle_s:g} s (idle_to_zero_s {spec.idle_to_zero_s:g})")
    floor = view.pool.min if view.burst or view.fixed else max(1, view.pool.min)
    if view.wanted <= floor or s.refused_per_s > 0 or s.queue_wait_ms > spec.max_wait_ms / 2:
        return None
    if s.busy / total < spec.scale_in_utilisation and (total == 1 or s.busy / (total - 1) < spec.target_utilisation):
        return Verdict(view.wanted - 1, f"executors {s.busy / total:.3g} busy each (below "
                                        f"{spec.scale_in_utilisation:g}), nothing waiting or refused")
    return None


def _clamp(view: PoolView, verdict: Verdict) -> Verdict:
    size = max(view.pool.min, min(view.pool.max, verdict.size))
    return Verdict(size, verdict.reason if size != view.wanted else "")


def size_pools(views: Iterable[PoolView], topology: Topology, now_s: float) -> dict[tuple[str, str], Verdict]:
    """Every pool's verdict (see the module's rules)."""
    spec = topology.scaling
    views = list(views)
    verdicts: dict[tuple[str, str], Verdict] = {}
    shortfall: dict[str, int] = {}
    granted: dict[tuple[str, str], int] = {}
    for view in (v for v in views if not v.burst):
        more = max((granted.get((view.site, m), 0) for m in view.pool.models), default=0)
        if more:
            view = replace(view, fixed=view.fixed + more)
        out = _wants_out(view, spec, now_s)
        if out is not None:
            verdicts[view.key] = _clamp(view, out)
            for model in view.pool.models:
                granted[(view.site, model)] = granted.get((view.site, model), 0) + verdicts[view.key].size - view.wanted
            beyond = out.size - view.pool.max
            if beyond > 0:
                for model in view.pool.models:
                    shortfall[model] = shortfall.get(model, 0) + beyond
    burst_running = {m for v in views if v.burst and v.wanted > v.pool.min for m in v.pool.models}
    for view in (v for v in views if not v.burst and v.key not in verdicts):
        inward = _wants_in(view, spec, now_s)
        if inward is not None and not (burst_running & set(view.pool.models)):
            verdicts[view.key] = _clamp(view, inward)
    rented: dict[str, int] = {}
    for view in (v for v in views if v.burst):
        rented[view.site] = rented.get(view.site, 0) + view.wanted
    for view in (v for v in views if v.burst):
        short = max((shortfall.get(m, 0) for m in view.pool.models), default=0)
        room = topology.site(view.site).burst.max_executors - rented[view.site]
        own = view.signals
        saturated = view.wanted == 0 or own.busy / max(1, view.wanted) >= spec.target_utilisation
        if short > 0 and room > 0 and saturated and (view.last_out_s is None
                                                     or now_s - view.last_out_s >= spec.scale_out_cooldown_s):
            grow = min(short, room)
            verdicts[view.key] = _clamp(view, Verdict(view.wanted + grow, f"on-prem pools of "
                                                      f"{', '.join(view.pool.models)} at their max, {short} short"))
            rented[view.site] += verdicts[view.key].size - view.wanted
        elif short == 0:
            inward = _wants_in(view, spec, now_s)
            if inward is not None:
                verdicts[view.key] = _clamp(view, inward)
    return {v.key: verdicts.get(v.key, Verdict(max(v.pool.min, min(v.pool.max, v.wanted)))) for v in views}
