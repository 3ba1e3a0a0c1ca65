"""Rosters: how the hub's scheduler knows other sites' executors without hearing their heartbeats. Pure logic.

With a control plane per site, per-executor heartbeats stay inside their site:
the hub's NATS server carries no message per executor. The hub's scheduler still
places what summaries cannot (plans whose stages run at different sites) on named
executors, so each other site's scheduler sends it, at the summary rate, a
``SiteRosterV1``: the latest heartbeat of the few executors with the most room per
model (``sample``), and the executors it lost lately (``LostExecutors``). The
message rate is one per site per interval and its size is bounded by models,
never by executors.

**Who says an executor is dead.** The site's scheduler, which hears every
heartbeat there. At the hub an executor missing from the latest sample is only
out of view: the hub stops placing on it, but the jobs it holds stay open (their
completion or their deadline ends them) unless its site's scheduler lists it as
lost, or the site's rosters stop (the site is gone from view), when they are
dispatched again (``HubRosters.expired_is_dead``).
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable

from din.services.scheduler.registry import CLASSES, ExecutorRegistry
from din.shared.contracts.events import HeartbeatV1
from din.shared.contracts.federation import SiteRosterV1

PER_MODEL = 4
"""Executors a roster carries per (model, version) pool and SLA class: the ones with the most room."""
MISSED_ROSTERS = 3
LOST_MAX = 256
"""Lost executors a roster lists at most (the most recent)."""


def sample(registry: ExecutorRegistry, per_model: int = PER_MODEL) -> list[HeartbeatV1]:
    """The latest heartbeats of the executors first in line, per pool and SLA class, ``per_model`` each."""
    chosen: dict[str, HeartbeatV1] = {}
    for model in sorted(registry.models()):
        for pool in registry.pools(model):
            for sla in CLASSES:
                for state in itertools.islice(pool.best(sla), per_model):
                    chosen.setdefault(state.id, state.heartbeat)
    return list(chosen.values())


class LostExecutors:
    """The executors a site's scheduler dropped, kept for ``MISSED_ROSTERS`` roster intervals so that a roster
    the hub misses does not lose the news."""

    def __init__(self, keep_ms: float, limit: int = LOST_MAX) -> None:
        self.keep_ms = keep_ms
        self._lost: deque[tuple[float, str]] = deque(maxlen=limit)

    def note(self, executor_id: str, now_ms: float) -> None:
        self._lost.append((now_ms, executor_id))

    def recent(self, now_ms: float) -> list[str]:
        while self._lost and now_ms - self._lost[0][0] > self.keep_ms:
            self._lost.popleft()
        return list(dict.fromkeys(executor for _, executor in self._lost))


def roster(registry: ExecutorRegistry, lost: LostExecutors, *, site: str, instance: str, now_ms: float,
           interval_s: float) -> SiteRosterV1:
    """This site's roster (its own executors only)."""
    executors = [hb for hb in sample(registry) if hb.site == site]
    return SiteRosterV1(site=site, instance=instance, sent_ms=now_ms, interval_s=interval_s, executors=executors,
                        lost=lost.recent(now_ms))


class HubRosters:
    """At the hub's scheduler: when each other site's latest roster arrived, and what a roster changes."""

    def __init__(self, home: str) -> None:
        self.home = home
        self._received: dict[str, tuple[float, float]] = {}

    def accepts(self, roster: SiteRosterV1, known_sites: set[str]) -> bool:
        """Whether ``roster`` is one to act on: another known site's (the hub hears its own heartbeats)."""
        return roster.site != self.home and roster.site in known_sites

    def observe(self, roster: SiteRosterV1, now_ms: float) -> None:
        self._received[roster.site] = (now_ms, roster.interval_s)

    def fresh(self, site: str, now_ms: float) -> bool:
        """Whether ``site``'s rosters still arrive (the latest is younger than ``MISSED_ROSTERS`` intervals)."""
        received = self._received.get(site)
        return received is not None and now_ms - received[0] <= MISSED_ROSTERS * received[1] * 1000.0

    @staticmethod
    def news(roster: SiteRosterV1, held: Callable[[str], HeartbeatV1 | None]) -> list[HeartbeatV1]:
        """The roster's heartbeats newer than the ones held (``held(executor id)``; None: not held), of its own
        site only: a heartbeat relayed again changes nothing, so the hub's count of what it dispatched since
        survives until the executor's next heartbeat."""
        news = []
        for hb in roster.executors:
            known = held(hb.executor)
            if hb.site == roster.site and (known is None or hb.sent_ms > known.sent_ms):
                news.append(hb)
        return news

    def expired_is_dead(self, site: str, now_ms: float) -> bool:
        """Whether an executor of ``site`` that the hub stopped hearing about is dead (its jobs dispatched again):
        only when the site's rosters stopped too. Otherwise it merely left the sample, and a death would be
        listed in ``lost``."""
        return site == self.home or not self.fresh(site, now_ms)
