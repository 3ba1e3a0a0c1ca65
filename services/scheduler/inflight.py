"""Jobs the scheduler dispatched and has not yet seen complete: the basis of "exactly one answer".

When an executor dies its jobs are dispatched again if time remains; a job
still open at its watchdog time (``shared.lifecycle.watchdog_at_ms``) is
answered with an error by the scheduler. Pure logic, no NATS.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

from din.shared.contracts.job import JobV1


@dataclass
class InflightJob:
    """A dispatched job and what is needed to dispatch it again.

    ``body`` is the plaintext (held only in memory) and ``aad`` the metadata its seal binds,
    so a dispatch again seals it afresh; ``executor`` is the executor it was assigned to
    (None when it waits in a site queue); ``counted_on`` are the executors whose load
    estimates it was added to, one per stage still to finish, in order. A multi-stage job also waits on
    ``later``: the executors of its stages still to come, in order; ``advanced`` counts its stages handed on.
    """

    job: JobV1
    body: bytes
    passthrough: dict[str, str]
    executor: str | None
    site: str
    counted_on: list[str]
    aad: dict[str, str] = field(default_factory=dict)
    later: list[str] = field(default_factory=list)
    advanced: int = 0

    @classmethod
    def dispatched(cls, job: JobV1, body: bytes, passthrough: dict[str, str], aad: dict[str, str], executor: str,
                   site: str) -> InflightJob:
        """The entry of ``job`` just sent to ``executor`` at ``site`` (assigned in centralized mode, else queued):
        counted on that executor and on each later stage's assigned executor."""
        later = [stage.executor for stage in job.plan[1:] if stage.executor]
        return cls(job, body, passthrough, job.executor_chosen, site, [executor, *later], aad, later)


class InflightTable:
    """Open jobs by request id, by executor, and by watchdog time."""

    def __init__(self) -> None:
        self._jobs: dict[str, InflightJob] = {}
        self._due: dict[str, float] = {}
        self._deadlines: list[tuple[float, str]] = []

    def __len__(self) -> int:
        return len(self._jobs)

    def add(self, entry: InflightJob, due_ms: float | None = None) -> InflightJob | None:
        """Keep ``entry`` open; the watchdog takes it at ``due_ms`` (default: its deadline), the due time of its
        latest dispatch. Returns the entry it replaces (the same request dispatched before: escalated or given
        back), if any."""
        request_id = entry.job.request_id
        due = entry.job.deadline_ms if due_ms is None else due_ms
        heapq.heappush(self._deadlines, (due, request_id))
        self._due[request_id] = due
        replaced = self._jobs.get(request_id)
        self._jobs[request_id] = entry
        return replaced

    def holds(self, request_id: str) -> bool:
        """Whether the job is still open here."""
        return request_id in self._jobs

    def get(self, request_id: str) -> InflightJob | None:
        """The open entry of ``request_id``, left in the table."""
        return self._jobs.get(request_id)

    def complete(self, request_id: str) -> InflightJob | None:
        self._due.pop(request_id, None)
        return self._jobs.pop(request_id, None)

    def advance(self, request_id: str) -> InflightJob | None:
        """A multi-stage job's stage handed on: the job now waits on its next stage's executor."""
        entry = self._jobs.get(request_id)
        if entry is not None:
            entry.advanced += 1
            entry.executor = entry.later.pop(0) if entry.later else None
        return entry

    def on_executor(self, executor_id: str) -> list[InflightJob]:
        """Remove and return the open jobs assigned to ``executor_id`` (for any stage still to run)."""
        lost = [e for e in self._jobs.values() if e.executor == executor_id or executor_id in e.later]
        for entry in lost:
            self.complete(entry.job.request_id)
        return lost

    def on_site(self, site: str) -> list[InflightJob]:
        """Open jobs queued at ``site`` (distributed mode), left in the table."""
        return [e for e in self._jobs.values() if e.site == site]

    def overdue(self, now_ms: float) -> bool:
        """Whether some open job's watchdog time has come (``due`` would return it)."""
        while self._deadlines:
            due, request_id = self._deadlines[0]
            if self._due.get(request_id) == due:
                return due <= now_ms
            heapq.heappop(self._deadlines)
        return False

    def due(self, now_ms: float) -> list[InflightJob]:
        """Remove and return open jobs whose watchdog time has come."""
        expired = []
        while self.overdue(now_ms):
            _, request_id = heapq.heappop(self._deadlines)
            expired.append(self.complete(request_id))
        return expired
