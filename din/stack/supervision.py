"""Keeping a running stack running: restart a process that exits, with capped exponential backoff.

``RestartPolicy`` decides (a pure function of how long the process ran and how
often it failed in a row); ``Supervisor`` watches a ``Stack``'s processes and
acts. A process that keeps exiting soon after each start is reported with its
log tail and given up on; the rest of the stack keeps running.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from din.stack.launcher import Stack
    from din.stack.processes import ManagedProcess


@dataclass(frozen=True)
class RestartPolicy:
    """When to restart a process that exited, and when to give up on it.

    A run shorter than ``stable_after_s`` counts as a quick failure; the
    ``n``-th quick failure in a row waits ``min(first_delay_s * 2**(n-1),
    max_delay_s)`` before the restart, and after ``max_quick_failures`` of
    them in a row the process is given up on. A run that lasted longer starts
    the count again.
    """

    first_delay_s: float = 0.5
    max_delay_s: float = 30.0
    stable_after_s: float = 10.0
    max_quick_failures: int = 5

    def quick_failures(self, ran_for_s: float, before: int) -> int:
        """Quick failures in a row once a run of ``ran_for_s`` has ended, ``before`` of them preceding it."""
        return before + 1 if ran_for_s < self.stable_after_s else 1

    def delay_s(self, quick_failures: int) -> float | None:
        """Seconds to wait before the next start, or None to give up."""
        if quick_failures > self.max_quick_failures:
            return None
        return min(self.first_delay_s * 2 ** (quick_failures - 1), self.max_delay_s)


@dataclass
class Watched:
    """What the supervisor knows of one process."""

    proc: ManagedProcess
    started_at: float
    quick_failures: int = 0
    restart_at: float | None = None
    given_up: bool = False


@dataclass
class Supervisor:
    """Watches every process of a started ``stack`` and restarts those that exit (``run`` blocks)."""

    stack: Stack
    policy: RestartPolicy = field(default_factory=RestartPolicy)
    report: Callable[[str], None] = print
    clock: Callable[[], float] = time.monotonic

    def __post_init__(self) -> None:
        now = self.clock()
        self.watched = [Watched(proc, now) for proc in self.stack.processes]

    def run(self, poll_s: float = 0.2, until: threading.Event | None = None) -> None:
        """Supervise until ``until`` is set or the run is interrupted (KeyboardInterrupt, e.g. a stop signal)."""
        while until is None or not until.is_set():
            self.check()
            time.sleep(poll_s)

    def check(self) -> None:
        """One round: note processes that exited, restart those whose backoff has passed."""
        now = self.clock()
        for entry in self.watched:
            if entry.given_up:
                continue
            if entry.restart_at is None:
                if not entry.proc.alive():
                    self._exited(entry, now)
            elif now >= entry.restart_at:
                entry.restart_at = None
                self.stack.restart(entry.proc)
                entry.started_at = self.clock()
                self.report(f"restarted {entry.proc.name} (pid {entry.proc.pid})")

    def _exited(self, entry: Watched, now: float) -> None:
        proc = entry.proc
        code = proc.popen.returncode if proc.popen else None
        ran = now - entry.started_at
        entry.quick_failures = self.policy.quick_failures(ran, entry.quick_failures)
        delay = self.policy.delay_s(entry.quick_failures)
        if delay is None:
            entry.given_up = True
            self.stack.mark_given_up(proc)
            self.report(
                f"din: error: {proc.name} exited (last code {code}) {entry.quick_failures} times in a row within "
                f"{self.policy.stable_after_s:g}s of starting; giving up on it, the rest keeps running\n"
                f"{proc.log_tail()}"
            )
            return
        entry.restart_at = now + delay
        self.report(f"{proc.name} exited with code {code} after {ran:.1f}s; restarting in {delay:g}s")
