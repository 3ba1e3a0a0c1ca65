"""Weighted fair queuing between tenants, independent of any transport.

A ``FairQueue`` holds items of many tenants and hands them out so that, while
several tenants have items queued, each is served in proportion to its weight
(``TenantSpec.weight``), and an item of a tenant asking for less than its
share is served within the current round and the next (a round: each busy
tenant's items worth one unit of cost per unit of weight, in tag order, ties
by arrival). It is self-clocked fair queuing:
an item pushed by tenant *t* with cost *c* gets the finish tag
``max(V, F_t) + c / w_t``, where ``F_t`` is the tag of *t*'s previous item and
``V`` the largest tag served so far; the item with the smallest tag goes
first, ties in order of arrival.

Queues that share a ``FairClock`` share ``V`` and every tenant's ``F_t``, so
their tags compare: a caller holding one queue per batchable lane picks the
lane whose head has the smallest tag and stays fair across lanes. A clock
forgets a tenant once none of its items is queued, and restarts ``V`` when
nothing is queued, so memory is bounded by what is queued.

Costs: ``push``, ``pop``, ``drop``, ``peek`` and ``head_tag`` are (amortized)
O(log T) for T tenants with items queued, ``oldest`` amortized O(1);
``evict_for``, used only when a bounded queue is full, is O(T).
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")

DEFAULT_WEIGHT = 1.0


class FairClock:
    """Virtual time and each tenant's last finish tag, shared by the queues whose order must agree."""

    def __init__(self, weights: Mapping[str, float] | None = None, default_weight: float = DEFAULT_WEIGHT):
        if default_weight <= 0:
            raise ValueError("a tenant's weight must be positive")
        self._weights: dict[str, float] = {}
        self._default = default_weight
        self.set_weights(weights or {})
        self.virtual = 0.0
        self._finish: dict[str, float] = {}
        self._queued: dict[str, int] = {}
        self._seq = itertools.count()

    def set_weights(self, weights: Mapping[str, float]) -> None:
        """Replace the tenants' weights; a tenant not named weighs ``default_weight``."""
        if any(weight <= 0 for weight in weights.values()):
            raise ValueError("a tenant's weight must be positive")
        self._weights = dict(weights)

    def weight(self, tenant: str) -> float:
        """The weight of ``tenant``."""
        return self._weights.get(tenant, self._default)

    def tenants(self) -> set[str]:
        """Tenants with an item queued in a queue of this clock."""
        return set(self._queued)

    def stamp(self, tenant: str, cost: float) -> tuple[float, int]:
        """The finish tag and arrival number of a new item of ``tenant``."""
        tag = max(self.virtual, self._finish.get(tenant, 0.0)) + cost / self.weight(tenant)
        self._finish[tenant] = tag
        self._queued[tenant] = self._queued.get(tenant, 0) + 1
        return tag, next(self._seq)

    def served(self, tag: float) -> None:
        """An item with ``tag`` was served: virtual time moves up to it."""
        self.virtual = max(self.virtual, tag)

    def unstamp(self, tenant: str, tag: float, cost: float) -> None:
        """An item was taken back unserved (evicted): when it was the tenant's latest, its cost is refunded."""
        if self._finish.get(tenant) == tag:
            self._finish[tenant] = tag - cost / self.weight(tenant)

    def release(self, tenant: str) -> None:
        """One item of ``tenant`` left its queue (served, dropped or evicted)."""
        left = self._queued[tenant] - 1
        if left:
            self._queued[tenant] = left
            return
        del self._queued[tenant]
        del self._finish[tenant]
        if not self._queued:
            self.virtual = 0.0
            self._finish.clear()


@dataclass(eq=False, slots=True)
class _Entry(Generic[T]):
    tag: float
    seq: int
    cost: float
    item: T


@dataclass(eq=False, slots=True)
class _Backlog(Generic[T]):
    entries: deque[_Entry[T]]
    cost: float = 0.0


class FairQueue(Generic[T]):
    """Items keyed by tenant, handed out by weighted fair queuing (see the module docstring).

    Each tenant's items keep their order; ``cost`` is what an item takes from
    its tenant's share (rows of a batch item, for example).
    """

    def __init__(self, clock: FairClock | None = None):
        self.clock = clock or FairClock()
        self._backlogs: dict[str, _Backlog[T]] = {}
        self._heads: list[tuple[float, int, str]] = []
        self._arrivals: deque[tuple[int, str]] = deque()
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def __bool__(self) -> bool:
        return self._len > 0

    def queued(self, tenant: str) -> int:
        """How many items of ``tenant`` are queued here."""
        backlog = self._backlogs.get(tenant)
        return len(backlog.entries) if backlog else 0

    def tenants(self) -> list[str]:
        """Tenants with items queued here."""
        return list(self._backlogs)

    def push(self, tenant: str, item: T, cost: float = 1.0) -> None:
        """Queue ``item`` of ``tenant``."""
        if cost <= 0:
            raise ValueError("an item's cost must be positive")
        tag, seq = self.clock.stamp(tenant, cost)
        entry = _Entry(tag, seq, cost, item)
        backlog = self._backlogs.get(tenant)
        if backlog is None:
            backlog = self._backlogs[tenant] = _Backlog(deque())
            heapq.heappush(self._heads, (tag, seq, tenant))
        backlog.entries.append(entry)
        backlog.cost += cost
        self._arrivals.append((seq, tenant))
        self._len += 1

    def peek(self) -> T:
        """The item to serve next; ``IndexError`` when empty."""
        return self._head()[1].item

    def peek_tenant(self) -> str:
        """The tenant of the item to serve next; ``IndexError`` when empty."""
        return self._head()[0]

    def head_tag(self) -> float:
        """The finish tag of the item to serve next (comparable across queues of one clock)."""
        return self._head()[1].tag

    def pop(self) -> T:
        """Serve the next item: remove it and move virtual time to its tag."""
        tenant, entry = self._head()
        self._remove_head(tenant)
        self.clock.served(entry.tag)
        return entry.item

    def drop(self) -> T:
        """Remove the next item without serving it (expired or abandoned); virtual time stays."""
        tenant, _ = self._head()
        return self._remove_head(tenant).item

    def oldest(self) -> T:
        """The item queued longest; ``IndexError`` when empty.

        Arrivals are kept in order and cleaned from the front: the first one still queued is the smallest
        arrival number queued, hence its tenant's first item.
        """
        while self._arrivals:
            seq, tenant = self._arrivals[0]
            backlog = self._backlogs.get(tenant)
            if backlog is not None and backlog.entries[0].seq == seq:
                return backlog.entries[0].item
            self._arrivals.popleft()
        raise IndexError("the queue is empty")

    def evict_for(self, tenant: str, cost: float = 1.0) -> T | None:
        """Make room for an item of ``tenant``: remove and return the newest item of the tenant holding most per
        weight, if that tenant still holds at least as much per weight as ``tenant`` would with the new item;
        else None (``tenant`` already has its share of the room)."""
        own_weight = self.clock.weight(tenant)
        own = self._backlogs.get(tenant)
        wanted = ((own.cost if own else 0.0) + cost) / own_weight
        heaviest: str | None = None
        heaviest_load = 0.0
        for other, backlog in self._backlogs.items():
            if other == tenant:
                continue
            load = backlog.cost / self.clock.weight(other)
            if heaviest is None or load > heaviest_load:
                heaviest, heaviest_load = other, load
        if heaviest is None:
            return None
        backlog = self._backlogs[heaviest]
        newest = backlog.entries[-1]
        if heaviest_load - newest.cost / self.clock.weight(heaviest) < wanted:
            return None
        backlog.entries.pop()
        backlog.cost -= newest.cost
        self.clock.unstamp(heaviest, newest.tag, newest.cost)
        self._left(heaviest, backlog)
        return newest.item

    def _head(self) -> tuple[str, _Entry[T]]:
        while self._heads:
            _, seq, tenant = self._heads[0]
            backlog = self._backlogs.get(tenant)
            if backlog is not None and backlog.entries[0].seq == seq:
                return tenant, backlog.entries[0]
            heapq.heappop(self._heads)
        raise IndexError("the queue is empty")

    def _remove_head(self, tenant: str) -> _Entry[T]:
        heapq.heappop(self._heads)
        backlog = self._backlogs[tenant]
        entry = backlog.entries.popleft()
        backlog.cost -= entry.cost
        if backlog.entries:
            following = backlog.entries[0]
            heapq.heappush(self._heads, (following.tag, following.seq, tenant))
        self._left(tenant, backlog)
        return entry

    def _left(self, tenant: str, backlog: _Backlog[T]) -> None:
        self._len -= 1
        self.clock.release(tenant)
        if not backlog.entries:
            del self._backlogs[tenant]
        if len(self._arrivals) > 2 * self._len + 16:
            self._arrivals = deque(
                (seq, owner) for seq, owner in self._arrivals
                if owner in self._backlogs
                and self._backlogs[owner].entries[0].seq <= seq <= self._backlogs[owner].entries[-1].seq
            )
        if len(self._heads) > 2 * len(self._backlogs) + 16:
            self._heads = [(b.entries[0].tag, b.entries[0].seq, owner) for owner, b in self._backlogs.items()]
            heapq.heapify(self._heads)
