"""Shedding on the path's real capacity, shared fairly between tenants. Pure: no NATS.

The site's scheduler reports (``PressureV1``, every 0.1 s) the rate jobs complete at, how long the completed ones
waited before their compute (in admission, classifier and scheduler and in the executors' queues; what a job
*waits*, so slow models and long generations do not look like congestion) and how many jobs wait in its own input.
The path is *congested* when jobs wait longer than ``target_ms``, or when the scheduler's queue alone would take
longer than that to place. While congested, each tenant with demand may be admitted at its weighted max-min fair
share of ``DRAIN`` times the completion rate (a tenant asking for less than its share gets all it asks for);
requests beyond a tenant's share are refused ``overloaded`` with a ``retry_after_ms``, and a request whose deadline
is nearer than the wait plus the fastest answer is refused at once rather than admitted to fail. Uncongested,
nothing is shed, so the queue oscillates around ``target_ms`` under overload (and a tenant is always let at least
one request per 0.1 s): enough work to keep executors batching, never an unbounded buffer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from din.shared.contracts.events import PressureV1
from din.shared.errors import DinError, ErrorCode

PRESSURE_STALE_MS = 2_000.0
"""A report older than this is ignored: the scheduler is gone or restarting, and requests admitted meanwhile wait
for it within their deadlines (hand-on retries) rather than being refused on figures that no longer hold."""
BACKLOG_PER_EXECUTOR = 32
"""Jobs in flight or queued per live executor below which waiting is not congestion (a key rotation or a slow
link makes jobs wait too, and refusing then would not shorten any queue)."""
OWN_BACKLOG_MS = 500.0
"""Admission's own input counts as congested past this much work (or the target, if longer): a burst of a few
hundred requests into an idle admission drains well within it, a flood it cannot keep up with does not."""
RATE_WINDOW_MS = 100.0
DRAIN = 0.8
"""While congested, tenants share this fraction of the completion rate: admitting at the full rate would keep
the queue that built up before shedding began standing (every request waiting it out); at 0.8 it drains at a
fifth of the rate, and the executors stay busy on what is queued."""
RATE_SMOOTHING = 0.3


def fair_shares(demand: Mapping[str, float], weights: Mapping[str, float],
                capacity: float) -> tuple[dict[str, float], float]:
    """Weighted max-min fair split of ``capacity`` among tenants with ``demand`` (water filling): a tenant
    asking for less than its weighted share gets its demand; what it leaves is split among the rest by weight.
    Returns the shares and the water level (a tenant's share per unit of weight once every demand is met or
    capacity runs out; ``inf`` when capacity exceeds the total demand)."""
    shares: dict[str, float] = {}
    left = max(0.0, capacity)
    waiting = {t: d for t, d in demand.items() if d > 0}
    while waiting:
        unit = left / sum(weights.get(t, 1.0) for t in waiting)
        satisfied = {t: d for t, d in waiting.items() if d <= unit * weights.get(t, 1.0)}
        if not satisfied:
            shares.update({t: unit * weights.get(t, 1.0) for t in waiting})
            return shares, unit
        for tenant, asked in satisfied.items():
            shares[tenant] = asked
            left -= asked
            del waiting[tenant]
    return shares, float("inf")


@dataclass
class _Rates:
    """Per tenant: arrivals and admissions in the current window, and smoothed demand (arrivals per second)."""

    arrived: dict[str, int] = field(default_factory=dict)
    admitted: dict[str, int] = field(default_factory=dict)
    demand: dict[str, float] = field(default_factory=dict)
    started_ms: float = 0.0


class LoadShedder:
    """Decides, per request, whether the path can take it now (see the module docstring).

    ``instances``: admissions at this site sharing its load (each takes that fraction of the completion rate).
    """

    def __init__(self, weights: Mapping[str, float], *, target_ms: float = 150.0, instances: int = 1,
                 shed_factor: float = 1.0) -> None:
        self.weights = dict(weights)
        self.target_ms = target_ms
        self.instances = max(1, instances)
        self.shed_factor = shed_factor
        self.pressure: PressureV1 | None = None
        self._rates = _Rates()
        self.shares: dict[str, float] = {}
        self.level = float("inf")
        self.path_congested = False
        self.congested = False
        self.handling_ms = 1.0

    def observe(self, pressure: PressureV1) -> None:
        """The scheduler's latest report."""
        self.pressure = pressure

    def _roll(self, now_ms: float) -> None:
        rates = self._rates
        elapsed = now_ms - rates.started_ms
        if elapsed < RATE_WINDOW_MS:
            return
        for tenant in set(rates.arrived) | set(rates.demand):
            now_rate = rates.arrived.get(tenant, 0) * 1000.0 / elapsed
            value = (1 - RATE_SMOOTHING) * rates.demand.get(tenant, now_rate) + RATE_SMOOTHING * now_rate
            if value < 0.01:
                rates.demand.pop(tenant, None)
            else:
                rates.demand[tenant] = value
        rates.arrived.clear()
        rates.admitted.clear()
        rates.started_ms = now_ms
        self._refresh(now_ms)

    def _current(self, now_ms: float) -> PressureV1 | None:
        pressure = self.pressure
        return pressure if pressure is not None and now_ms - pressure.at_ms <= PRESSURE_STALE_MS else None

    def _refresh(self, now_ms: float) -> None:
        pressure = self._current(now_ms)
        self.path_congested = pressure is not None and (
            self.excess_ms(pressure) > self.target_ms
            and pressure.inflight + pressure.queued > BACKLOG_PER_EXECUTOR * max(1, pressure.executors))
        capacity = (DRAIN * pressure.completed_per_s / self.instances
                    if pressure is not None and pressure.completed_per_s else sum(self._rates.demand.values()) / 2)
        self.shares, self.level = fair_shares(self._rates.demand, self.weights, capacity)

    def allowance(self, tenant: str) -> float:
        """Requests/s ``tenant`` may be admitted at while congested: its fair share, or what its weight would
        give it at the water level if it asks for less (so a light tenant's bursts are not cut to its mean)."""
        return max(self.shares.get(tenant, 0.0), self.level * self.weights.get(tenant, 1.0))

    @staticmethod
    def excess_ms(pressure: PressureV1) -> float:
        """How far the path is behind: what completed jobs waited, or the time the scheduler's own queue takes to
        place at the completion rate, whichever is more."""
        placing = pressure.queued * 1000.0 / pressure.completed_per_s if pressure.completed_per_s > 0 else 0.0
        return max(pressure.waited_ms, placing)

    def handled(self, took_ms: float) -> None:
        """Admission took ``took_ms`` over one request (admitted or refused): the cost its input is drained at."""
        self.handling_ms = (1 - RATE_SMOOTHING) * self.handling_ms + RATE_SMOOTHING * took_ms

    def own_wait_ms(self, pending: int) -> float:
        """How long the ``pending`` requests in admission's own input take at what each one costs it (a burst
        into an idle admission is not congestion; a flood it cannot keep up with is)."""
        return pending * self.handling_ms

    def retry_after_ms(self, behind_ms: float) -> int:
        """When a refused request might be taken: once the excess has drained to the target, at least a window."""
        return max(int(RATE_WINDOW_MS), int(behind_ms - self.target_ms + RATE_WINDOW_MS))

    def check_share(self, tenant: str, now_ms: float, pending: int = 0) -> None:
        """The first, cheap check of a request (before it is opened): while the path or admission's own input
        (``pending`` requests waiting behind this one) is congested, a tenant past its fair share is refused
        ``overloaded``. Counts the request as arrived, and as admitted when let through."""
        self._roll(now_ms)
        rates = self._rates
        rates.arrived[tenant] = rates.arrived.get(tenant, 0) + 1
        pressure = self._current(now_ms)
        own = self.own_wait_ms(pending)
        self.congested = self.path_congested or own > max(self.target_ms, OWN_BACKLOG_MS)
        if self.congested:
            allowed = self.allowance(tenant)
            if rates.admitted.get(tenant, 0) >= max(1.0, allowed * RATE_WINDOW_MS / 1000.0):
                behind = max(own, self.excess_ms(pressure) if pressure is not None else 0.0)
                raise DinError(ErrorCode.OVERLOADED, f"the network is past capacity; tenant {tenant!r} is at its "
                                                     f"share ({allowed:.0f} requests/s)",
                               retry_after_ms=self.retry_after_ms(behind))
        rates.admitted[tenant] = rates.admitted.get(tenant, 0) + 1

    def check_deadline(self, now_ms: float, deadline_ms: float) -> None:
        """Refuse a request the path cannot finish before ``deadline_ms``: ``deadline_exceeded`` when not even
        the fastest executor can, ``overloaded`` when the current wait would take it past; before any job has
        completed, ``overloaded`` once in-flight jobs fill the executors' capacity."""
        pressure = self._current(now_ms)
        if pressure is None:
            return
        budget = deadline_ms - now_ms
        if pressure.completed_per_s <= 0 and pressure.capacity and (
                pressure.inflight >= pressure.capacity * self.shed_factor):
            backlog = pressure.inflight - pressure.capacity * self.shed_factor + 1
            retry = max(5, int(backlog * max(pressure.fastest_ms, 1.0) / max(pressure.executors, 1)))
            raise DinError(ErrorCode.OVERLOADED, "the network is past capacity", retry_after_ms=retry)
        if budget < pressure.fastest_ms:
            raise DinError(ErrorCode.DEADLINE_EXCEEDED, f"the deadline leaves {budget:.0f} ms; the fastest "
                                                        f"executor needs {pressure.fastest_ms:.0f} ms")
        if self.path_congested and budget < pressure.waited_ms + pressure.fastest_ms:
            raise DinError(ErrorCode.OVERLOADED, f"the deadline leaves {budget:.0f} ms; requests wait "
                                                 f"{pressure.waited_ms:.0f} ms before compute now",
                           retry_after_ms=self.retry_after_ms(self.excess_ms(pressure)))

    def detail(self) -> dict[str, object]:
        """For health: whether shedding is on and each tenant's current share (requests/s)."""
        return {"congested": self.congested, "shares": {t: round(s, 1) for t, s in self.shares.items()}
                if self.congested else {}}
