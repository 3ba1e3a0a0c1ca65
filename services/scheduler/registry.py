"""The live registry of executors, built from their heartbeats, indexed for placement.

An executor is usable from its first heartbeat and dropped once it has been
silent for ``shared.lifecycle.loss_timeout_s`` (``MISSED_BEATS`` of its heartbeat
intervals) while the scheduler was listening: after the scheduler itself was
deaf (its connection dropped, its loop stalled) every executor is pardoned. Between heartbeats the
scheduler counts what it dispatched itself, so two requests arriving in the
same millisecond do not both see an empty queue, and counts what completed since,
which may take the count below zero: those jobs were still in the heartbeat's
snapshot. A heartbeat is handled after completions its executor sent later (they
travel on other subscriptions): a completion already counted whose job the
snapshot still holds (queued by its executor before the snapshot, done after it,
both on the executor's clock) is taken off the new count again, so a stale
snapshot does not make an idle executor look full until its next heartbeat.

Placement never scans the fleet. The registry keeps one ``ExecutorPool`` per
(model, version, site): the executors there that serve that version and are not
draining, each pool ordered, per SLA class, by the executor's predicted queueing
plus compute time for a new job of that class (``ExecutorState.queue_ms``; the
link's round trip is the same for the whole pool, so this order is the order of
predicted completion). A heartbeat moves an executor between pools only when its
site, model set or draining flag changed; otherwise it re-sorts the executor
within its pools, and only for the classes whose figure changed. Dispatches and
completions re-sort the same way. Expiry pops a heap of deadlines, so a
watchdog tick costs the executors that expire, not the fleet.
"""

from __future__ import annotations

import heapq
import random
from bisect import bisect_left, insort
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from din.shared.contracts.events import CompletionV1, HeartbeatV1
from din.shared.contracts.inference import SlaClass
from din.shared.lifecycle import loss_timeout_s

CLASSES = tuple(SlaClass)
"""SLA classes in the order executors serve them."""
_CLASS_VALUES = tuple((c, c.value) for c in CLASSES)
MIN_PER_ITEM_MS = 0.01

RECENT_COMPLETIONS = 256
"""Completions kept per executor to correct a heartbeat handled after them (``ExecutorState.observe``)."""


@dataclass(frozen=True)
class Finished:
    """A job its executor finished: queued at ``queued_ms``, done at ``done_ms`` (the executor's clock)."""

    sla: SlaClass
    queued_ms: float
    done_ms: float


def finished_by(event: CompletionV1, executor_id: str) -> Finished | None:
    """When ``event``'s job was in its executor's queue, if ``executor_id`` sent it (a plan's other executors
    are not timed by it)."""
    if event.executor != executor_id:
        return None
    queued = event.timings_ms.get("queue", 0.0) + event.timings_ms.get("compute", 0.0)
    return Finished(event.sla_class, event.at_ms - queued, event.at_ms)


@dataclass
class ExecutorState:
    """What the scheduler knows about one executor."""

    heartbeat: HeartbeatV1
    last_seen: float
    dispatched: dict[SlaClass, int] = field(default_factory=lambda: {c: 0 for c in SlaClass})
    finished: deque[Finished] = field(default_factory=lambda: deque(maxlen=RECENT_COMPLETIONS))
    completed_ms: float = 0.0
    """When the executor sent the latest completion taken from it (its clock, epoch ms)."""

    @property
    def heard_ms(self) -> float:
        """When the executor sent the latest message taken from it, heartbeat or completion (its clock)."""
        return max(self.heartbeat.sent_ms, self.completed_ms)

    @property
    def id(self) -> str:
        return self.heartbeat.executor

    @property
    def site(self) -> str:
        return self.heartbeat.site

    def queued(self, sla: SlaClass) -> int:
        """Jobs ahead of a new ``sla`` job: its own class and every class served before it."""
        depth, dispatched = self.heartbeat.queue_depth, self.dispatched
        ahead = 0
        for c, value in _CLASS_VALUES:
            ahead += depth.get(value, 0) + dispatched[c]
            if c is sla:
                break
        return max(0, ahead)

    def per_item_ms(self, model: str) -> float:
        """Compute per batch item of ``model`` as reported (floored at ``MIN_PER_ITEM_MS``)."""
        loaded = next(m for m in self.heartbeat.models if m.name == model)
        return max(loaded.compute_ms_per_item, MIN_PER_ITEM_MS)

    def queue_ms(self, model: str, sla: SlaClass) -> float:
        """Predicted wait plus compute of a new ``sla`` job of ``model`` here (completion minus the link)."""
        per_item = self.per_item_ms(model)
        return (self.queued(sla) + self.heartbeat.inflight) * per_item + per_item

    def queue_ms_by_class(self, model: str) -> dict[SlaClass, float]:
        """``queue_ms`` of ``model`` for every class at once (what a pool sorts by)."""
        per_item = self.per_item_ms(model)
        depth, dispatched, inflight = self.heartbeat.queue_depth, self.dispatched, self.heartbeat.inflight
        keys, ahead = {}, 0
        for c, value in _CLASS_VALUES:
            ahead += depth.get(value, 0) + dispatched[c]
            keys[c] = (max(0, ahead) + inflight) * per_item + per_item
        return keys

    def observe(self, heartbeat: HeartbeatV1, now: float) -> None:
        """Take ``heartbeat``'s snapshot; what was dispatched since is in it, except completions counted already
        whose job it still holds."""
        self.heartbeat, self.last_seen = heartbeat, now
        self.dispatched = {c: 0 for c in SlaClass}
        snapshot = heartbeat.sent_ms
        while self.finished and self.finished[0].done_ms <= snapshot:
            self.finished.popleft()
        for job in self.finished:
            if job.queued_ms <= snapshot:
                self.dispatched[job.sla] -= 1

    def capacity_for(self, sla: SlaClass) -> int:
        """Load at which the executor refuses ``sla`` jobs."""
        return self.heartbeat.capacity_by_class.get(sla.value, self.heartbeat.capacity)

    def load(self) -> int:
        heartbeat = self.heartbeat
        return max(0, heartbeat.inflight + sum(heartbeat.queue_depth.values()) + sum(self.dispatched.values()))


PoolKey = tuple[str, str, str]
"""(model, version, site)."""


class ExecutorPool:
    """The executors at one site serving one model version, ordered per SLA class by ``queue_ms``.

    Ties are broken by a random rank drawn when the executor joins, so equally good executors are not always
    offered in the same (alphabetical) order.
    """

    def __init__(self, model: str, version: str, site: str) -> None:
        self.model, self.version, self.site = model, version, site
        self._members: list[ExecutorState] = []
        self._position: dict[str, int] = {}
        self._order: dict[SlaClass, list[tuple[float, float, str]]] = {c: [] for c in CLASSES}
        self._keys: dict[str, tuple[float, dict[SlaClass, float]]] = {}
        self._states: dict[str, ExecutorState] = {}

    def __len__(self) -> int:
        return len(self._members)

    def _enter(self, state: ExecutorState, rank: float) -> dict[SlaClass, float]:
        """Make ``state`` a member; its queue keys per class, for the caller to place in the orders."""
        self._position[state.id] = len(self._members)
        self._members.append(state)
        self._states[state.id] = state
        keys = state.queue_ms_by_class(self.model)
        self._keys[state.id] = (rank, keys)
        return keys

    def add(self, state: ExecutorState, rank: float) -> None:
        keys = self._enter(state, rank)
        for c in CLASSES:
            insort(self._order[c], (keys[c], rank, state.id))

    def add_all(self, states: list[ExecutorState], rng: random.Random) -> None:
        """Add many executors at once (one sort per class instead of one insertion per executor)."""
        for state in states:
            rank = rng.random()
            keys = self._enter(state, rank)
            for c in CLASSES:
                self._order[c].append((keys[c], rank, state.id))
        for order in self._order.values():
            order.sort()

    def remove(self, executor_id: str) -> None:
        index = self._position.pop(executor_id)
        last = self._members.pop()
        if last.id != executor_id:
            self._members[index] = last
            self._position[last.id] = index
        del self._states[executor_id]
        rank, keys = self._keys.pop(executor_id)
        for c in CLASSES:
            self._discard(c, (keys[c], rank, executor_id))

    def rekey(self, state: ExecutorState) -> None:
        """Re-sort ``state`` after its load or compute changed (only the classes whose figure moved)."""
        self._states[state.id] = state
        self._members[self._position[state.id]] = state
        rank, keys = self._keys[state.id]
        for c, new in state.queue_ms_by_class(self.model).items():
            old = keys[c]
            if new != old:
                self._discard(c, (old, rank, state.id))
                insort(self._order[c], (new, rank, state.id))
                keys[c] = new

    def _discard(self, sla: SlaClass, entry: tuple[float, float, str]) -> None:
        order = self._order[sla]
        i = bisect_left(order, entry)
        if i < len(order) and order[i] == entry:
            del order[i]

    def best(self, sla: SlaClass) -> Iterator[ExecutorState]:
        """Executors from the lowest predicted queueing plus compute for ``sla`` up."""
        states = self._states
        return (states[executor_id] for _, _, executor_id in self._order[sla])

    def floor_ms(self, sla: SlaClass) -> float:
        """The lowest ``queue_ms`` for ``sla`` in the pool (a lower bound on any member's)."""
        order = self._order[sla]
        return order[0][0] if order else float("inf")

    def members(self) -> list[ExecutorState]:
        """Every executor in the pool, in no particular order."""
        return list(self._members)

    def sample(self, k: int, rng: random.Random) -> list[ExecutorState]:
        """Up to ``k`` distinct members drawn uniformly."""
        if len(self._members) <= k:
            return list(self._members)
        return rng.sample(self._members, k)


class PoolSource(Protocol):
    """What placement looks executors up in: the pools of one model (optionally one version)."""

    def pools(self, model: str, version: str | None) -> list[ExecutorPool]: ...


def _membership(heartbeat: HeartbeatV1) -> tuple[str, bool, frozenset[tuple[str, str]]]:
    return heartbeat.site, heartbeat.draining, frozenset((m.name, m.version) for m in heartbeat.models)


class ExecutorRegistry:
    """Executors by id, with liveness by heartbeat age, and their pools by (model, version, site)."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._executors: dict[str, ExecutorState] = {}
        self._membership: dict[str, tuple[str, bool, frozenset[tuple[str, str]]]] = {}
        self._pools: dict[str, dict[PoolKey, ExecutorPool]] = {}
        self._deadlines: list[tuple[float, float, str]] = []
        self._rng = rng or random.Random()

    def observe(self, heartbeat: HeartbeatV1, now: float) -> bool:
        """Record a heartbeat; return True when the executor is new."""
        state = self._executors.get(heartbeat.executor)
        new = state is None
        if new:
            state = ExecutorState(heartbeat=heartbeat, last_seen=now)
            self._executors[heartbeat.executor] = state
        else:
            state.observe(heartbeat, now)
        heapq.heappush(self._deadlines, (now + loss_timeout_s(heartbeat.interval_s), now, heartbeat.executor))
        membership = _membership(heartbeat)
        if self._membership.get(heartbeat.executor) == membership:
            self._rekey(state)
            return new
        self._leave_pools(heartbeat.executor)
        self._membership[heartbeat.executor] = membership
        site, draining, models = membership
        if not draining:
            rank = self._rng.random()
            for model, version in models:
                self._pool(model, version, site).add(state, rank)
        return new

    def expire(self, now: float) -> list[ExecutorState]:
        """Drop and return executors silent for their loss timeout."""
        dead = []
        while self.overdue(now):
            _, _, executor_id = heapq.heappop(self._deadlines)
            dead.append(self._executors[executor_id])
            self.forget(executor_id)
        return dead

    def overdue(self, now: float) -> bool:
        """Whether some executor has been silent for its loss timeout (``expire`` would drop it)."""
        while self._deadlines:
            _, seen, executor_id = self._deadlines[0]
            state = self._executors.get(executor_id)
            if state is None or state.last_seen != seen:
                heapq.heappop(self._deadlines)
                continue
            return now - state.last_seen > loss_timeout_s(state.heartbeat.interval_s)
        return False

    def pardon(self, now: float) -> None:
        """Count every executor as heard from at ``now``: the scheduler could not hear them until then."""
        for state in self._executors.values():
            state.last_seen = now
            heapq.heappush(self._deadlines, (now + loss_timeout_s(state.heartbeat.interval_s), now, state.id))

    def forget(self, executor_id: str) -> None:
        if self._executors.pop(executor_id, None) is not None:
            self._leave_pools(executor_id)
            self._membership.pop(executor_id, None)

    def live(self) -> list[ExecutorState]:
        return [s for s in self._executors.values() if not s.heartbeat.draining]

    def get(self, executor_id: str) -> ExecutorState | None:
        return self._executors.get(executor_id)

    def heartbeat_of(self, executor_id: str) -> HeartbeatV1 | None:
        """The latest heartbeat held of ``executor_id``, or None."""
        state = self._executors.get(executor_id)
        return None if state is None else state.heartbeat

    def __len__(self) -> int:
        return len(self._executors)

    def note_dispatch(self, executor_id: str, sla: SlaClass) -> None:
        state = self._executors.get(executor_id)
        if state is not None:
            state.dispatched[sla] += 1
            self._rekey(state)

    def heard(self, executor_id: str, sent_ms: float) -> None:
        """A completion ``executor_id`` sent at ``sent_ms`` (its clock) was taken (``ExecutorState.heard_ms``)."""
        state = self._executors.get(executor_id)
        if state is not None and sent_ms > state.completed_ms:
            state.completed_ms = sent_ms

    def note_completion(self, executor_id: str, sla: SlaClass, finished: Finished | None = None) -> None:
        """A job counted on ``executor_id`` is off it; ``finished`` says when it was there, when its own
        completion says so (not for the other executors of a plan)."""
        state = self._executors.get(executor_id)
        if state is not None:
            state.dispatched[sla] -= 1
            if finished is not None:
                state.finished.append(finished)
            self._rekey(state)

    def pools(self, model: str, version: str | None = None) -> list[ExecutorPool]:
        """Non-empty pools of ``model`` (of ``version`` only, when given), one per site and version."""
        by_key = self._pools.get(model, {})
        return [p for p in by_key.values() if p and (version is None or p.version == version)]

    def models(self) -> list[str]:
        """Names of the models some live, not draining executor serves."""
        return [model for model, by_key in self._pools.items() if any(by_key.values())]

    def view(self, site_ok: Callable[[str], bool]) -> RegistryView:
        """The registry as placement should see it: only the pools at sites ``site_ok`` accepts."""
        return RegistryView(self, site_ok)

    def _pool(self, model: str, version: str, site: str) -> ExecutorPool:
        by_key = self._pools.setdefault(model, {})
        pool = by_key.get((model, version, site))
        if pool is None:
            pool = by_key[(model, version, site)] = ExecutorPool(model, version, site)
        return pool

    def _joined(self, executor_id: str) -> list[ExecutorPool]:
        membership = self._membership.get(executor_id)
        if membership is None or membership[1]:
            return []
        site, _, models = membership
        return [self._pools[model][(model, version, site)] for model, version in models]

    def _leave_pools(self, executor_id: str) -> None:
        for pool in self._joined(executor_id):
            pool.remove(executor_id)

    def _rekey(self, state: ExecutorState) -> None:
        for pool in self._joined(state.id):
            pool.rekey(state)


@dataclass
class RegistryView:
    """A registry restricted to sites that may get work (e.g. not revoked), for ``pick_executor``."""

    registry: ExecutorRegistry
    site_ok: Callable[[str], bool]

    def pools(self, model: str, version: str | None = None) -> list[ExecutorPool]:
        return [p for p in self.registry.pools(model, version) if self.site_ok(p.site)]


class ListSource:
    """Pools built on the fly from a plain list of executors (offline what-if, tests, callers holding a list).

    Costs a pass over the list per model looked up; the live scheduler passes its registry (or a view) instead.
    """

    def __init__(self, executors: list[ExecutorState], rng: random.Random | None = None) -> None:
        self._executors = executors
        self._rng = rng or random.Random(0)
        self._cache: dict[str, list[ExecutorPool]] = {}

    def pools(self, model: str, version: str | None = None) -> list[ExecutorPool]:
        if model not in self._cache:
            members: dict[PoolKey, dict[str, ExecutorState]] = {}
            for state in self._executors:
                for m in state.heartbeat.models:
                    if m.name == model:
                        members.setdefault((model, m.version, state.site), {})[state.id] = state
            pools = []
            for key, states in members.items():
                pool = ExecutorPool(*key)
                pool.add_all(list(states.values()), self._rng)
                pools.append(pool)
            self._cache[model] = pools
        return [p for p in self._cache[model] if version is None or p.version == version]
