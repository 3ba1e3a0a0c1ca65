"""Whether this executor may still answer a job it holds: the continuity of its event loop and of its connection.

A ticker beats every ``TICK_S``; a gap between beats longer than a lease's stall
limit (``shared.lifecycle.stall_limit_s``) is a stall (a SIGSTOP, a swamped
loop), and the end of the last one is kept per limit. A job whose lease may have
lapsed since it reached the executor is fenced (``shared.lifecycle.fence``).
No NATS here: the executor passes in its connection's state.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from din.shared import lifecycle
from din.shared.lifecycle import FenceReason

TICK_S = 0.02
"""How often the event loop proves it is running (well under the shortest stall limit)."""


@dataclass
class Continuity:
    """Beats of one event loop, and the end of its last stall longer than each of ``limits_s`` (monotonic s)."""

    limits_s: tuple[float, ...]
    last_tick_s: float
    stall_ends_s: dict[float, float] = field(default_factory=dict)
    fenced: Counter = field(default_factory=Counter)

    def tick(self, now_s: float) -> None:
        """The loop ran at ``now_s``: a gap since the last beat longer than a limit is a stall of that limit."""
        gap = now_s - self.last_tick_s
        for limit in self.limits_s:
            if gap > limit:
                self.stall_ends_s[limit] = now_s
        self.last_tick_s = now_s

    def fence(self, *, exposed_s: float, now_s: float, limit_s: float, connected: bool,
              reconnected: bool) -> FenceReason | None:
        """Why a job held since ``exposed_s`` under a lease of stall limit ``limit_s`` may not be answered now
        (counted), or None."""
        reason = lifecycle.fence(exposed_s=exposed_s, now_s=now_s, last_tick_s=self.last_tick_s,
                                 last_stall_end_s=self.stall_ends_s.get(limit_s), limit_s=limit_s,
                                 connected=connected, reconnected=reconnected)
        if reason is not None:
            self.fenced[reason] += 1
        return reason

    def detail(self) -> dict[str, int]:
        """Health fields: answers fenced, in all and by reason."""
        return {"answers_fenced": sum(self.fenced.values()),
                **{f"answers_fenced_{reason.value}": self.fenced[reason] for reason in FenceReason}}
