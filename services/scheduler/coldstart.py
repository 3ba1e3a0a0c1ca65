"""Jobs held while a pool scales from zero: the first request for a model no executor serves yet waits for the
autoscaler to start one, instead of being refused ``no_eligible_executor``.

A job is held only when a pool with ``min: 0`` (``shared.topology.PoolSpec``) at a site this scheduler places on,
and the job may run at, serves one of its candidate models (``cold_startable``). The scheduler records it as
``awaiting_executor`` (the autoscaler's cue to start one), tries it again as soon as an executor of its models
comes into view, and answers it ``no_eligible_executor`` at its cutoff if none did. Pure bookkeeping here; the
scheduler does the placing and answering. It owns the job's answer meanwhile: it acknowledged the job.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from din.shared.contracts.job import JobV1
from din.shared.topology import Topology

MAX_HELD = 10_000
"""Most jobs held at once; past it a job is refused at once as before (a flood for a model that is not running
must not fill the scheduler's memory)."""


def cold_startable(job: JobV1, topology: Topology, sites: Iterable[str]) -> bool:
    """Whether a pool that may scale from zero, at one of ``sites`` the job may run at, serves one of its
    candidates (single-stage jobs only)."""
    if job.plan:
        return False
    workload = job.workload
    candidates = set(workload.candidates if workload and workload.candidates else [job.model])
    allowed = set(workload.allowed_sites) if workload and workload.allowed_sites else None
    return any(pool.min == 0 and candidates & set(pool.models)
               for site in topology.sites if site.name in sites and (allowed is None or site.name in allowed)
               for pool in site.pools)


@dataclass
class Held:
    job: JobV1
    body: bytes
    passthrough: dict[str, str]
    aad: dict[str, str]
    until_ms: float


@dataclass
class ColdStarts:
    """The held jobs, by request id."""

    held: dict[str, Held] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.held)

    def hold(self, entry: Held) -> bool:
        """Hold ``entry``; False when full (refuse it instead)."""
        if len(self.held) >= MAX_HELD and entry.job.request_id not in self.held:
            return False
        self.held[entry.job.request_id] = entry
        return True

    def due(self, now_ms: float) -> list[Held]:
        """Take the held jobs whose cutoff has come."""
        out = [h for h in self.held.values() if h.until_ms <= now_ms]
        for h in out:
            del self.held[h.job.request_id]
        return out

    def servable(self, serves: Callable[[str], bool]) -> list[Held]:
        """Take the held jobs one of whose candidates ``serves`` now says a live executor serves."""
        out = [h for h in self.held.values()
               if any(serves(m) for m in (h.job.workload.candidates if h.job.workload else None) or [h.job.model])]
        for h in out:
            del self.held[h.job.request_id]
        return out

    def take_all(self) -> list[Held]:
        out = list(self.held.values())
        self.held.clear()
        return out
