"""The executors of each pool as the autoscaler holds them: which slot runs, since when, in which phase.

A pool's slots are its executor ids (``PoolSpec.executor_ids``); a slot is free, or holds an executor that is
starting (asked for, not ready yet), ready, or draining (asked to stop). Pure bookkeeping: the service asks the
provider and the executors' health, then moves slots here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from din.shared.topology import PoolSpec

START_RETRY_MAX_S = 60.0
"""Longest wait before a pool tries again after failed starts (it doubles from the scale-out cool-down)."""


class Phase(StrEnum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"


@dataclass
class Slot:
    executor_id: str
    phase: Phase
    since_s: float


@dataclass
class PoolFleet:
    """One pool's slots and its recent history (for the policy's cool-downs and the start back-off)."""

    site: str
    pool: PoolSpec
    burst: bool
    slots: dict[str, Slot] = field(default_factory=dict)
    last_out_s: float | None = None
    last_change_s: float | None = None
    failures: int = 0
    retry_at_s: float = 0.0

    @property
    def key(self) -> tuple[str, str]:
        return self.site, self.pool.name

    def in_phase(self, phase: Phase) -> list[Slot]:
        return [s for s in self.slots.values() if s.phase is phase]

    @property
    def wanted(self) -> int:
        """Executors asked for and not asked to stop (starting and ready)."""
        return len(self.in_phase(Phase.STARTING)) + len(self.in_phase(Phase.READY))

    @property
    def running(self) -> int:
        """Executors whose processes run (draining ones too): what the pool costs now."""
        return len(self.slots)

    def free_slot(self) -> str | None:
        """The lowest executor id no executor holds."""
        return next((i for i in self.pool.executor_ids(self.site) if i not in self.slots), None)

    def to_drain(self) -> Slot | None:
        """The executor to give back first: a starting one (it serves nothing yet), else the newest ready one."""
        order = {executor_id: n for n, executor_id in enumerate(self.pool.executor_ids(self.site))}
        for phase in (Phase.STARTING, Phase.READY):
            candidates = sorted(self.in_phase(phase), key=lambda s: order[s.executor_id], reverse=True)
            if candidates:
                return candidates[0]
        return None

    def hold(self, executor_id: str, phase: Phase, now_s: float) -> None:
        self.slots[executor_id] = Slot(executor_id, phase, now_s)

    def release(self, executor_id: str) -> None:
        self.slots.pop(executor_id, None)

    def start_failed(self, now_s: float, cooldown_s: float) -> None:
        """Back off: the next start waits twice as long after each failure in a row."""
        self.failures += 1
        self.retry_at_s = now_s + min(START_RETRY_MAX_S, max(1.0, cooldown_s) * 2 ** (self.failures - 1))

    def may_start(self, now_s: float) -> bool:
        return now_s >= self.retry_at_s
