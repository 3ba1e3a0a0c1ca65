"""Conditions of the links between sites, measured by probes: RTT, jitter, loss and path type."""

from __future__ import annotations

from dataclasses import dataclass

from din.shared.topology import PathType, Topology

SAME_SITE_RTT_MS = 0.1
UNMEASURED_RTT_MS = 5.0
EWMA_WEIGHT = 0.2
LOSS_WINDOW = 100


@dataclass
class LinkState:
    """One directed link's recent conditions."""

    path: PathType | None
    rtt_ms: float = UNMEASURED_RTT_MS
    jitter_ms: float = 0.0
    sent: int = 0
    received: int = 0
    measured: bool = False

    @property
    def loss(self) -> float:
        return 0.0 if self.sent == 0 else max(0.0, 1.0 - self.received / self.sent)


class LinkTable:
    """RTT, jitter and loss from the scheduler's site to every other site, and paths between any two."""

    def __init__(self, topology: Topology, home: str) -> None:
        self.home = home
        self._topology = topology
        self._links = {site.name: LinkState(path=topology.path_between(home, site.name)) for site in topology.sites}

    def sent(self, site: str) -> None:
        link = self._links[site]
        link.sent += 1
        if link.sent >= LOSS_WINDOW:
            link.sent, link.received = link.sent // 2, link.received // 2

    def observe_rtt(self, site: str, rtt_ms: float) -> None:
        link = self._links[site]
        link.received += 1
        if not link.measured:
            link.rtt_ms, link.measured = rtt_ms, True
            return
        link.jitter_ms += EWMA_WEIGHT * (abs(rtt_ms - link.rtt_ms) - link.jitter_ms)
        link.rtt_ms += EWMA_WEIGHT * (rtt_ms - link.rtt_ms)

    def state(self, site: str) -> LinkState:
        return self._links[site]

    def rtt_ms(self, site: str) -> float:
        """Expected round trip from the scheduler's site to ``site``, with jitter and loss priced in."""
        if site == self.home:
            return SAME_SITE_RTT_MS
        link = self._links.get(site)
        if link is None:
            return UNMEASURED_RTT_MS
        return (link.rtt_ms + 2 * link.jitter_ms) / max(0.05, 1.0 - link.loss)

    def priced_rtts(self) -> dict[str, float]:
        """``rtt_ms`` of every site, rounded to the µs: what placement priced each link at just now."""
        return {site: round(self.rtt_ms(site), 3) for site in self._links}

    def path(self, a: str, b: str) -> PathType | None:
        return self._topology.path_between(a, b)

    def snapshot(self) -> dict[str, dict[str, float | str | None]]:
        return {
            site: {
                "path": link.path.value if link.path else None,
                "rtt_ms": round(link.rtt_ms, 3),
                "jitter_ms": round(link.jitter_ms, 3),
                "loss": round(link.loss, 4),
            }
            for site, link in self._links.items()
        }
