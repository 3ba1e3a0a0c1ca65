"""Topology files: the sites of a DIN network, their executors, the links between them and the tenants.

A topology is YAML validated here; any mistake becomes one ``TopologyError``
line that names the file, the place and what to do.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from din.shared.naming import token


class TopologyError(ValueError):
    """A topology file that cannot describe a network."""


class PathType(StrEnum):
    """Kind of network path between two sites; the crypto policy keys off it."""

    DEDICATED = "dedicated"
    VPN = "vpn"
    INTERNET = "internet"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ExecutorSpec(_Strict):
    """One executor process at a site."""

    id: str = Field(description="Executor id, unique in the network.")
    models: list[str] = Field(min_length=1, description="Models it loads from the repository.")
    capacity: int = Field(default=256, ge=1, description="Jobs it queues before it sheds load.")

    @field_validator("id")
    @classmethod
    def _token(cls, value: str) -> str:
        return token(value, what="executor id")


class PoolSpec(_Strict):
    """Executors of one kind at a site that the autoscaler starts and stops, between ``min`` and ``max``.

    Its executors are named ``<site>-<pool>-<n>`` (n from 1 to ``max``); each is an ordinary executor
    once started (heartbeats, placement, draining). ``min: 0`` lets the model scale to zero when idle.
    """

    name: str = Field(description="Pool name, a subject token (unique at its site).")
    models: list[str] = Field(min_length=1, description="Models each of its executors loads.")
    min: int = Field(default=1, ge=0, description="Executors kept running at all times (0: scale to zero).")
    max: int = Field(ge=1, le=64, description="Most executors the pool may run.")
    capacity: int = Field(default=256, ge=1, description="Jobs each executor queues before it sheds load.")

    @field_validator("name")
    @classmethod
    def _token(cls, value: str) -> str:
        return token(value, what="pool name")

    @model_validator(mode="after")
    def _bounds(self) -> PoolSpec:
        if self.min > self.max:
            raise ValueError(f"pool {self.name!r}: min {self.min} exceeds max {self.max}")
        return self

    def executor_id(self, site: str, n: int) -> str:
        """The id of the pool's ``n``-th executor (from 1)."""
        return f"{site}-{self.name}-{n}"

    def executor_ids(self, site: str) -> list[str]:
        """Every id the pool may use, in start order."""
        return [self.executor_id(site, n) for n in range(1, self.max + 1)]


class BurstSpec(_Strict):
    """A site that is a provider's rented capacity (a cloud region): the autoscaler starts executors there only
    when the on-prem sites cannot meet demand, for the models and tenants allowed to burst; sensitive data never
    goes there."""

    startup_s: float = Field(default=10.0, ge=0, description="How long the provider takes to start an executor, "
                             "seconds (expected; the autoscaler measures the real one).")
    max_executors: int = Field(default=8, ge=1, le=256, description="Most executors the provider rents out here "
                               "at once, over all the site's pools.")


class SiteSpec(_Strict):
    """A site: the hub (cloud/HQ) or an edge site with its own NATS leaf server."""

    name: str = Field(description="Site name, a subject token.")
    role: str = Field(description="'hub' for the one cloud/HQ site, 'edge' for leaf sites.")
    executors: list[ExecutorSpec] = Field(default_factory=list, description="Executors at the site.")
    pools: list[PoolSpec] = Field(default_factory=list, description="Executors the autoscaler starts and stops "
                                  "here, by pool.")
    cost_per_1k: float = Field(default=0.0, ge=0, description="Relative cost of 1,000 requests here.")
    executor_hour_cost: float = Field(default=1.0, ge=0, description="Relative cost of running one executor here "
                                      "for an hour (on-prem: the hardware's share; a burst site: the provider's "
                                      "price).")
    burst: BurstSpec | None = Field(default=None, description="Set when the site is rented capacity to burst to.")
    control_plane: bool = Field(
        default=True,
        description="With control_plane 'per-site': whether this site runs its own admission, classifier and "
        "scheduler (a site without one is served by the hub's).",
    )
    replicas: int = Field(
        default=1, ge=1, le=8,
        description="Instances of each control-plane service at this site (queue groups share the work; a "
        "tenant's quota is split evenly among the site's admissions; one instance dying leaves the others "
        "serving).",
    )
    servers: int = Field(
        default=1, ge=1, le=7,
        description="The hub only: how many nats-servers it runs as one cluster (routes between them, JetStream "
        "clustered in the hub's domain, its streams and buckets replicated min(3, servers) times). 1, or 3 and "
        "more: JetStream's RAFT groups need a majority, so two servers would stop when either fails.",
    )

    @field_validator("name")
    @classmethod
    def _token(cls, value: str) -> str:
        return token(value, what="site name")

    @field_validator("role")
    @classmethod
    def _role(cls, value: str) -> str:
        if value not in ("hub", "edge"):
            raise ValueError("role must be 'hub' or 'edge'")
        return value

    @model_validator(mode="after")
    def _cluster_size(self) -> SiteSpec:
        if self.servers == 2:
            raise ValueError("servers must be 1 or at least 3: a 2-server JetStream cluster loses its quorum when "
                             "either server fails")
        if self.servers > 1 and self.role != "hub":
            raise ValueError(f"site {self.name!r}: only the hub runs as a cluster (servers > 1)")
        pools = [p.name for p in self.pools]
        if len(set(pools)) != len(pools):
            raise ValueError(f"site {self.name!r}: pool names repeat: {pools}")
        if self.burst is not None and self.role == "hub":
            raise ValueError(f"site {self.name!r}: the hub cannot be a burst site")
        if self.burst is not None and sum(p.min for p in self.pools) > self.burst.max_executors:
            raise ValueError(f"site {self.name!r}: its pools' min executors exceed burst.max_executors")
        return self

    @property
    def pool_executor_ids(self) -> list[str]:
        """Every executor id the site's pools may use."""
        return [executor_id for pool in self.pools for executor_id in pool.executor_ids(self.name)]

    @property
    def jetstream_replicas(self) -> int:
        """Replicas of each stream and bucket in this site's JetStream domain: min(3, servers)."""
        return min(3, self.servers)


MAX_LOSS_PERCENT = 50.0
"""Beyond this a TCP connection makes next to no progress: cut the link instead (``din links cut``)."""
TCP_RTO_MIN_MS = 200
"""Linux's floor on the retransmission timeout's variation term (``TCP_RTO_MIN``)."""


class LinkConditions(_Strict):
    """What a link does to traffic, one way: delay, its jitter, a bandwidth cap and packet loss.

    ``din up`` applies them to each direction of a leaf's connection to the hub
    (through Toxiproxy), so a request-reply across the link pays twice the latency.
    The leaf connection is TCP, so a lost segment is never lost data: it is
    retransmitted, and the stream behind it stalls (``din.stack.wan``): one round
    trip (fast retransmit) when more data follows, else the retransmission timeout.
    """

    latency_ms: int = Field(ge=0, description="One-way delay added to all data, milliseconds.")
    jitter_ms: int = Field(default=0, ge=0, description="The delay varies by up to this much either way, ms.")
    bandwidth_kb_s: int | None = Field(
        default=None, ge=1, description="Most kilobytes per second each direction carries; None: no cap."
    )
    loss_percent: float = Field(
        default=0.0, ge=0, le=MAX_LOSS_PERCENT,
        description="Share of TCP segments lost each way, percent; each is retransmitted, stalling the stream.",
    )

    @model_validator(mode="after")
    def _jitter_within_latency(self) -> LinkConditions:
        if self.jitter_ms > self.latency_ms:
            raise ValueError(f"jitter_ms {self.jitter_ms} exceeds latency_ms {self.latency_ms}")
        return self

    @property
    def round_trip_ms(self) -> int:
        """A round trip across the link: twice the one-way delay."""
        return 2 * self.latency_ms

    @property
    def retransmit_timeout_ms(self) -> int:
        """TCP's retransmission timeout on this link as Linux computes it: the smoothed round trip plus
        max(4 x its variation, 200 ms), the variation taken as the jitter of both directions."""
        return self.round_trip_ms + max(4 * 2 * self.jitter_ms, TCP_RTO_MIN_MS)


DEFAULT_LINK_CONDITIONS: dict[PathType, LinkConditions] = {
    PathType.DEDICATED: LinkConditions(latency_ms=2),
    PathType.VPN: LinkConditions(latency_ms=10),
    PathType.INTERNET: LinkConditions(latency_ms=40, jitter_ms=10, loss_percent=0.1),
}
"""Conditions of a link that names only its path type. Only the internet loses packets by default: 0.1 % is
the loss of a healthy public path at busy hours, enough that its tail (p99.9) shows retransmission stalls; a
dedicated line or a provider's VPN loses next to nothing."""


class LinkSpec(_Strict):
    """A network link between two sites, the kind of path it takes and, optionally, its conditions.

    Any of ``latency_ms``, ``jitter_ms``, ``bandwidth_kb_s`` and ``loss_percent`` left
    out takes the default of the path type (``DEFAULT_LINK_CONDITIONS``).
    """

    between: tuple[str, str] = Field(description="The two sites it joins.")
    path: PathType = Field(description="dedicated, vpn or internet.")
    latency_ms: int | None = Field(default=None, ge=0, description="One-way delay, ms; None: the path's default.")
    jitter_ms: int | None = Field(default=None, ge=0, description="Delay jitter, ms; None: the path's default.")
    bandwidth_kb_s: int | None = Field(
        default=None, ge=1, description="Bandwidth cap per direction, KB/s; None: the path's default (no cap)."
    )
    loss_percent: float | None = Field(
        default=None, ge=0, le=MAX_LOSS_PERCENT,
        description="Share of segments lost each way, percent; None: the path's default.",
    )

    @model_validator(mode="after")
    def _valid_conditions(self) -> LinkSpec:
        self.conditions()
        return self

    def conditions(self) -> LinkConditions:
        """The link's conditions, with the path type's defaults for what it leaves out."""
        base = DEFAULT_LINK_CONDITIONS[self.path]
        given = {
            "latency_ms": self.latency_ms,
            "jitter_ms": self.jitter_ms,
            "bandwidth_kb_s": self.bandwidth_kb_s,
            "loss_percent": self.loss_percent,
        }
        return LinkConditions.model_validate(base.model_dump() | {k: v for k, v in given.items() if v is not None})


class TenantSpec(_Strict):
    """A tenant: its quota and where its sensitive data may run."""

    name: str = Field(description="Tenant name, a subject token.")
    rate_per_s: float = Field(default=500.0, gt=0, description="Token-bucket refill rate, requests/s.")
    burst: int = Field(default=1000, ge=1, description="Token-bucket size.")
    weight: float = Field(
        default=1.0, gt=0, le=1000,
        description="Share of contended capacity: when the network is overloaded, each tenant with demand gets "
        "capacity in proportion to its weight (weighted max-min fairness at admission, deficit round robin at the "
        "executors' queues); a tenant asking for less than its share gets all it asks for.",
    )
    sensitive_sites: list[str] | None = Field(
        default=None, description="Sites allowed for its sensitive data; None means any site."
    )
    always_sensitive: bool = Field(default=False, description="Treat every request as sensitive.")
    may_burst: bool = Field(default=True, description="Whether its requests that are not sensitive may run at "
                            "burst sites (rented capacity); sensitive requests never do.")
    max_cost_per_1k: float | None = Field(default=None, description="Most it may pay per 1,000 requests.")
    models: list[str] | None = Field(
        default=None, description="The models the tenant may call (and cascade or degrade to); None: every model a "
        "tenant may call. Internal parts (split heads and tails, prefill graphs) are never callable.",
    )
    queries_per_day: int | None = Field(
        default=None, ge=1,
        description="Most requests per model a day at each site (a slow token bucket beside the rate limit): "
        "extracting a model by querying it takes that many days per budget; None: no such budget.",
    )
    max_leakage: float | None = Field(
        default=None, ge=0.0, le=1.0,
        description="Split inference: the most of the input's variance an inversion attack may recover from an "
        "intermediate that leaves the data's site (as the model zoo measures it per split point); None: no limit.",
    )

    @field_validator("name")
    @classmethod
    def _token(cls, value: str) -> str:
        return token(value, what="tenant name")


class SecuritySpec(_Strict):
    """The operator's crypto policy for this network (see ``shared.security.CryptoPolicy``)."""

    paths: dict[str, str] = Field(
        default_factory=dict,
        description="Assurance level per path type (local, dedicated, vpn, internet): encrypted or integrity.",
    )
    plaintext_ingress: list[str] = Field(
        default_factory=list, description="Tenants allowed to send unsealed requests (plain NATS clients)."
    )


class ScalingSpec(_Strict):
    """How the autoscaler sizes the pools (``services/autoscaler``): its targets, hysteresis and cool-downs."""

    interval_s: float = Field(default=2.0, gt=0, le=60, description="Seconds between the autoscaler's looks.")
    window_s: float = Field(default=10.0, gt=0, le=600, description="Seconds of recent traffic each look weighs.")
    target_utilisation: float = Field(default=0.6, gt=0, lt=1, description="Busy share of an executor the pools "
                                      "are sized for.")
    scale_in_utilisation: float = Field(default=0.25, ge=0, lt=1, description="Below this busy share (and with "
                                        "no queue) a pool gives back an executor: the gap to target_utilisation "
                                        "is the hysteresis that keeps a flapping load from flapping the fleet.")
    max_wait_ms: float = Field(default=50.0, gt=0, description="Mean wait in an executor's queue above which a "
                               "pool grows whatever its utilisation says.")
    scale_out_cooldown_s: float = Field(default=6.0, ge=0, description="Seconds after a pool grew before it "
                                        "grows again (the new executor's effect must show first).")
    scale_in_cooldown_s: float = Field(default=20.0, ge=0, description="Seconds after any change to a pool before "
                                       "it shrinks.")
    idle_to_zero_s: float = Field(default=60.0, gt=0, description="Seconds without a request before a pool with "
                                  "min 0 stops its last executor.")
    start_timeout_s: float = Field(default=60.0, gt=0, description="Seconds an executor may take to report ready "
                                   "before the autoscaler counts the start as failed and stops it.")

    @model_validator(mode="after")
    def _hysteresis(self) -> ScalingSpec:
        if self.scale_in_utilisation >= self.target_utilisation:
            raise ValueError("scale_in_utilisation must be below target_utilisation (the hysteresis band)")
        return self


ControlPlane = Literal["per-site", "hub"]


class Topology(_Strict):
    """A whole network: sites, links and tenants."""

    name: str = Field(description="Name of the topology.")
    sites: list[SiteSpec] = Field(min_length=1, description="Sites; exactly one has role 'hub'.")
    links: list[LinkSpec] = Field(default_factory=list, description="Links between sites.")
    tenants: list[TenantSpec] = Field(min_length=1, description="Tenants allowed to send requests.")
    security: SecuritySpec = Field(default_factory=SecuritySpec, description="Crypto policy per path type.")
    scaling: ScalingSpec = Field(default_factory=ScalingSpec, description="The autoscaler's policy (used when a "
                                 "site has pools).")
    control_plane: ControlPlane = Field(
        default="per-site",
        description="'per-site': every site with control_plane true runs admission, classifier and scheduler on "
        "its own NATS server and places locally first, forwarding to another site only what it cannot serve in "
        "time (federated); 'hub': one control plane at the hub schedules every site (centralized).",
    )

    @model_validator(mode="after")
    def _consistent(self) -> Topology:
        names = [s.name for s in self.sites]
        if len(set(names)) != len(names):
            raise ValueError(f"site names repeat: {names}")
        hubs = [s.name for s in self.sites if s.role == "hub"]
        if len(hubs) != 1:
            raise ValueError(f"exactly one site needs role 'hub', found {len(hubs)}")
        executor_ids = [e.id for s in self.sites for e in s.executors] + [i for s in self.sites
                                                                           for i in s.pool_executor_ids]
        if len(set(executor_ids)) != len(executor_ids):
            raise ValueError(f"executor ids repeat: {executor_ids}")
        for link in self.links:
            for end in link.between:
                if end not in names:
                    raise ValueError(f"link {list(link.between)} names unknown site {end!r}")
            if link.between[0] == link.between[1]:
                raise ValueError(f"link joins site {link.between[0]!r} to itself")
        burst = set(self.burst_sites())
        for tenant in self.tenants:
            for site in tenant.sensitive_sites or []:
                if site not in names:
                    raise ValueError(f"tenant {tenant.name!r} allows unknown site {site!r}")
                if site in burst:
                    raise ValueError(f"tenant {tenant.name!r} names burst site {site!r} for sensitive data: "
                                     "sensitive data never bursts")
        tenant_names = [t.name for t in self.tenants]
        for tenant in self.security.plaintext_ingress:
            if tenant not in tenant_names:
                raise ValueError(f"security.plaintext_ingress names unknown tenant {tenant!r}")
        if len(set(tenant_names)) != len(tenant_names):
            raise ValueError(f"tenant names repeat: {tenant_names}")
        return self

    @property
    def hub(self) -> SiteSpec:
        return next(s for s in self.sites if s.role == "hub")

    @property
    def federated(self) -> bool:
        """Whether sites run control planes of their own."""
        return self.control_plane == "per-site"

    def control_sites(self) -> list[str]:
        """Sites that run a control plane (admission, classifier, scheduler), the hub first."""
        if not self.federated:
            return [self.hub.name]
        sites = [s.name for s in self.sites if s.control_plane or s.role == "hub"]
        return sorted(sites, key=lambda name: name != self.hub.name)

    def control_site_for(self, site: str) -> str:
        """The site whose control plane serves clients and executors at ``site``."""
        return site if site in self.control_sites() else self.hub.name

    def scheduled_sites(self, control_site: str) -> list[str]:
        """The sites whose executors the scheduler at ``control_site`` places on directly: every site for the
        hub's (it also places what a site forwards), its own site for another site's."""
        if control_site == self.hub.name:
            return [s.name for s in self.sites]
        return [control_site]

    def hears_rosters(self, control_site: str) -> bool:
        """Whether the scheduler and telemetry at ``control_site`` see other sites' executors only through their
        schedulers' rosters and summaries, never their heartbeats: the hub's, with a control plane per site."""
        return self.federated and control_site == self.hub.name

    def replicas_at(self, site: str) -> int:
        """Instances of each control-plane service at ``site`` (0 when it runs none)."""
        return self.site(site).replicas if site in self.control_sites() else 0

    def stream_replicas(self) -> dict[str, int]:
        """Replicas per JetStream domain (a site) whose streams are replicated (empty: every domain has 1)."""
        return {s.name: s.jetstream_replicas for s in self.sites if s.jetstream_replicas > 1}

    def tenant_weights(self) -> dict[str, float]:
        """Each tenant's ``TenantSpec.weight``: its share of contended capacity."""
        return {tenant.name: tenant.weight for tenant in self.tenants}

    def tenant(self, name: str) -> TenantSpec:
        return next(t for t in self.tenants if t.name == name)

    @property
    def elastic(self) -> bool:
        """Whether any site has pools (the network then runs an autoscaler)."""
        return any(site.pools for site in self.sites)

    def burst_sites(self) -> list[str]:
        """Sites that are rented capacity (``SiteSpec.burst``)."""
        return [s.name for s in self.sites if s.burst is not None]

    def pool_of(self, executor_id: str) -> tuple[SiteSpec, PoolSpec] | None:
        """The site and pool an executor id belongs to, or None for a fixed executor or an unknown id."""
        for site in self.sites:
            for pool in site.pools:
                if executor_id in pool.executor_ids(site.name):
                    return site, pool
        return None

    def allowed_sites(self, tenant: str, sensitive: bool) -> list[str] | None:
        """The sites a request of ``tenant`` may run at (None: any): a sensitive one only at the tenant's sensitive
        sites, and never at a burst site; one whose tenant may not burst, nowhere rented."""
        spec = self.tenant(tenant)
        sensitive = sensitive or spec.always_sensitive
        burst = set(self.burst_sites())
        if sensitive and spec.sensitive_sites:
            return [s for s in spec.sensitive_sites if s not in burst]
        if burst and (sensitive or not spec.may_burst):
            return [s.name for s in self.sites if s.name not in burst]
        return None

    def may_open(self, site: str, tenant: str, sensitive: bool) -> bool:
        """Whether a request of ``tenant`` may be opened at ``site``: its data is confined to its sensitive sites
        when it is sensitive (or the tenant's always is), and never opened at a burst site unless it may run
        there."""
        allowed = self.allowed_sites(tenant, sensitive)
        return allowed is None or site in allowed

    def opening_site(self, here: str, tenant: str, sensitive: bool,
                     usable: Callable[[str], bool] = lambda site: True) -> str | None:
        """The control-plane site whose admission opens a request of ``tenant`` that reached the admission at
        ``here``: ``here`` when it may, else the nearest ``usable`` control-plane site that may (None: none)."""
        if not self.federated or self.may_open(here, tenant, sensitive):
            return here
        allowed = [s for s in self.control_sites() if self.may_open(s, tenant, sensitive) and usable(s)]
        return min(allowed, key=lambda site: (self.bus_one_way_ms(here, site), site)) if allowed else None

    def bus_one_way_ms(self, a: str, b: str) -> float:
        """The configured one-way latency of NATS traffic between two sites: leaf servers reach each other only
        through the hub, so an edge-to-edge message pays both hub links (0 at the same site)."""
        if a == b:
            return 0.0
        hub = self.hub.name
        return sum(float(self.hub_link(s).conditions().latency_ms) for s in (a, b) if s != hub)

    def site(self, name: str) -> SiteSpec:
        return next(s for s in self.sites if s.name == name)

    def link_between(self, a: str, b: str) -> LinkSpec | None:
        """The direct link between two sites, or None when there is none."""
        for link in self.links:
            if set(link.between) == {a, b}:
                return link
        return None

    def path_between(self, a: str, b: str) -> PathType | None:
        """Path type of the direct link between two sites, or None when there is none (same site)."""
        link = self.link_between(a, b)
        return link.path if link is not None else None

    def hub_link(self, site: str) -> LinkSpec:
        """The link an edge site's leaf server reaches the hub over; the internet when the topology names none."""
        link = self.link_between(site, self.hub.name)
        return link if link is not None else LinkSpec(between=(site, self.hub.name), path=PathType.INTERNET)


def load_topology(path: Path) -> Topology:
    """Read and validate a topology file; raise ``TopologyError`` with a one-line message."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise TopologyError(f"topology file {path} not found: pass an existing file with --topology") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise TopologyError(f"topology file {path} is not valid YAML{where}: fix the syntax") from None
    if not isinstance(raw, dict):
        raise TopologyError(f"topology file {path} must hold a mapping with name, sites, links, tenants")
    try:
        return Topology.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "top level"
        raise TopologyError(f"topology file {path}: {where}: {first['msg']}") from None
