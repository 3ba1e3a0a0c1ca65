"""The live registry of executors, built from their heartbeats.

An executor is usable from its first heartbeat and dropped once it has been
silent for ``MISSED_BEATS`` heartbeat intervals. Between heartbeats the
scheduler counts what it dispatched itself, so two requests arriving in the
same millisecond do not both see an empty queue, and counts what completed since,
which may take the count below zero: those jobs were still in the heartbeat's
snapshot.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shared.contracts.events import HeartbeatV1
from shared.contracts.inference import SlaClass

MISSED_BEATS = 3


@dataclass
class ExecutorState:
    """What the scheduler knows about one executor."""

    heartbeat: HeartbeatV1
    last_seen: float
    dispatched: dict[SlaClass, int] = field(default_factory=lambda: {c: 0 for c in SlaClass})

    @property
    def id(self) -> str:
        return self.heartbeat.executor

    @property
    def site(self) -> str:
        return self.heartbeat.site

    def queued(self, sla: SlaClass) -> int:
        """Jobs ahead of a new ``sla`` job: its own class and every class served before it."""
        ahead = [c for c in SlaClass][: list(SlaClass).index(sla) + 1]
        return max(0, sum(self.heartbeat.queue_depth.get(c.value, 0) + self.dispatched[c] for c in ahead))

    def capacity_for(self, sla: SlaClass) -> int:
        """Load at which the executor refuses ``sla`` jobs."""
        return self.heartbeat.capacity_by_class.get(sla.value, self.heartbeat.capacity)

    def load(self) -> int:
        queued = sum(self.heartbeat.queue_depth.values())
        return max(0, self.heartbeat.inflight + queued + sum(self.dispatched.values()))


class ExecutorRegistry:
    """Executors by id, with liveness by heartbeat age."""

    def __init__(self) -> None:
        self._executors: dict[str, ExecutorState] = {}

    def observe(self, heartbeat: HeartbeatV1, now: float) -> bool:
        """Record a heartbeat; return True when the executor is new."""
        state = self._executors.get(heartbeat.executor)
        if state is None:
            self._executors[heartbeat.executor] = ExecutorState(heartbeat=heartbeat, last_seen=now)
            return True
        state.heartbeat = heartbeat
        state.last_seen = now
        state.dispatched = {c: 0 for c in SlaClass}
        return False

    def expire(self, now: float) -> list[ExecutorState]:
        """Drop and return executors silent for ``MISSED_BEATS`` intervals."""
        dead = [
            s for s in self._executors.values() if now - s.last_seen > MISSED_BEATS * s.heartbeat.interval_s
        ]
        for state in dead:
            del self._executors[state.id]
        return dead

    def forget(self, executor_id: str) -> None:
        self._executors.pop(executor_id, None)

    def live(self) -> list[ExecutorState]:
        return [s for s in self._executors.values() if not s.heartbeat.draining]

    def get(self, executor_id: str) -> ExecutorState | None:
        return self._executors.get(executor_id)

    def note_dispatch(self, executor_id: str, sla: SlaClass) -> None:
        state = self._executors.get(executor_id)
        if state is not None:
            state.dispatched[sla] += 1

    def note_completion(self, executor_id: str, sla: SlaClass) -> None:
        state = self._executors.get(executor_id)
        if state is not None:
            state.dispatched[sla] -= 1
