"""How far behind the completion relay is, per site, and when that is a gap worth an alert.

Telemetry relays each site's completion stream (``shared.completionstream``) to
Kafka. After every look at a site's relay consumer it records here how many
completions are not yet relayed (``pending``: not delivered yet, or delivered
and not acknowledged) and how old the oldest of them is. A site whose oldest
unrelayed completion is older than ``lag_alert_s`` is lagging: the state
change is logged and reported in health and on ``/metrics``
(``din_completion_relay_*``, which the Prometheus rule in
``ops/prometheus/rules/din.yml`` alerts on). Nothing here knows NATS or Kafka.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class RelayState(StrEnum):
    """A site's completion relay as last seen."""

    STARTING = "starting"
    RELAYING = "relaying"
    LAGGING = "lagging"
    UNREACHABLE = "unreachable"


def relay_state(pending: int, oldest_s: float | None, lag_alert_s: float) -> RelayState:
    """``lagging`` when some completion has waited longer than ``lag_alert_s`` to be relayed, else ``relaying``."""
    if pending > 0 and oldest_s is not None and oldest_s > lag_alert_s:
        return RelayState.LAGGING
    return RelayState.RELAYING


@dataclass
class SiteRelay:
    """One site's relay: completions relayed by this process, and the backlog at the last look."""

    relayed: int = 0
    pending: int = 0
    oldest_s: float | None = None
    state: RelayState = RelayState.STARTING


class RelayLedger:
    """Every site's relay; ``seen`` returns the new state when it changed (to log), else None."""

    def __init__(self, sites: list[str], lag_alert_s: float) -> None:
        self.lag_alert_s = lag_alert_s
        self.sites = {site: SiteRelay() for site in sites}

    def relayed(self, site: str, count: int = 1) -> None:
        """Count ``count`` completions of ``site`` that Kafka acknowledged."""
        self.sites[site].relayed += count

    def seen(self, site: str, pending: int, oldest_s: float | None) -> RelayState | None:
        """Record a look at ``site``'s consumer: ``pending`` unrelayed, the oldest ``oldest_s`` old."""
        relay = self.sites[site]
        relay.pending, relay.oldest_s = pending, (oldest_s if pending else None)
        return self._move(relay, relay_state(pending, oldest_s, self.lag_alert_s))

    def unreachable(self, site: str) -> RelayState | None:
        """``site``'s JetStream did not answer (cut off, or its server is down): the backlog is not known."""
        return self._move(self.sites[site], RelayState.UNREACHABLE)

    @staticmethod
    def _move(relay: SiteRelay, state: RelayState) -> RelayState | None:
        before, relay.state = relay.state, state
        return state if state is not before else None

    def lagging(self) -> list[str]:
        """Sites whose relay is lagging or whose backlog is unknown."""
        return [site for site, relay in self.sites.items()
                if relay.state in (RelayState.LAGGING, RelayState.UNREACHABLE)]

    def detail(self) -> dict[str, object]:
        """Health detail: each site's state and backlog, the oldest unrelayed completion's age, what was relayed."""
        oldest = [r.oldest_s for r in self.sites.values() if r.oldest_s is not None]
        return {
            "relay": ",".join(f"{site}:{r.state.value}:{r.pending}" for site, r in sorted(self.sites.items())),
            "relay_pending": sum(r.pending for r in self.sites.values()),
            "relay_oldest_s": round(max(oldest), 3) if oldest else 0.0,
            "relay_lagging": ",".join(self.lagging()),
            "relayed": sum(r.relayed for r in self.sites.values()),
        }
