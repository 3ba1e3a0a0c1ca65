"""Who is who: the principals of a network and, for each DEK reader, who holds its key."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from din.shared.naming import token
from din.shared.topology import Topology

KEYMANAGER = "keymanager"
OPERATOR = "operator"
AUDIT = "audit"
SITE_PREFIX = "site-"
TENANT_PREFIX = "tenant-"


def site_principal(site: str) -> str:
    """The principal (and DEK reader) of a site."""
    return token(SITE_PREFIX + site, what="site principal")


def tenant_principal(tenant: str) -> str:
    """The principal (and DEK reader) of a tenant."""
    return token(TENANT_PREFIX + tenant, what="tenant principal")


def site_of(principal: str) -> str | None:
    """The site a ``site-<site>`` principal names, else None."""
    return principal[len(SITE_PREFIX):] if principal.startswith(SITE_PREFIX) else None


def serving_sites(topology: Topology, tenant: str) -> list[str]:
    """Sites that may run ``tenant``'s requests: its sensitive sites if all its data is sensitive, else every site."""
    spec = topology.tenant(tenant)
    if spec.always_sensitive and spec.sensitive_sites:
        return list(spec.sensitive_sites)
    return [s.name for s in topology.sites]


@dataclass(frozen=True)
class TenantSites:
    """Where one tenant's requests may be served and where they are admitted, as the key manager tells the
    tenant's clients (a signed bucket entry): every site that serves the tenant, the sites its sensitive data is
    confined to (None: anywhere it is served), and for each site the control-plane site whose admission opens
    the requests sent there, ordinary and sensitive ones (``entries``: ``(site, ordinary, sensitive)``; ``hub``
    for a client that names no site). A client refuses a result signed by any site not allowed, and seals each
    request for its entry site alone."""

    serving: frozenset[str]
    sensitive: frozenset[str] | None = None
    entries: tuple[tuple[str, str, str], ...] = ()
    hub: str | None = None

    @classmethod
    def of(cls, topology: Topology, tenant: str) -> TenantSites:
        spec = topology.tenant(tenant)
        entries = []
        for site in topology.sites:
            here = topology.control_site_for(site.name)
            entries.append((site.name, topology.opening_site(here, tenant, False) or here,
                            topology.opening_site(here, tenant, True) or here))
        return cls(frozenset(serving_sites(topology, tenant)),
                   frozenset(spec.sensitive_sites) if spec.sensitive_sites else None, tuple(sorted(entries)),
                   topology.hub.name)

    def allowed(self, sensitive: bool) -> frozenset[str]:
        """The sites that may answer a request (a sensitive one: only its confined sites)."""
        return self.sensitive if sensitive and self.sensitive is not None else self.serving

    def entry(self, site: str | None, sensitive: bool = False) -> str | None:
        """The site whose admission opens a request sent at ``site`` (None: at the hub), a ``sensitive`` one or
        not; None when unknown."""
        wanted = site or self.hub
        return next((opens[1] if sensitive else opens[0] for name, *opens in self.entries if name == wanted), None)

    def to_dict(self) -> dict:
        sensitive = None if self.sensitive is None else sorted(self.sensitive)
        return {"serving": sorted(self.serving), "sensitive": sensitive,
                "entries": {site: [ordinary, confined] for site, ordinary, confined in self.entries}, "hub": self.hub}

    @classmethod
    def from_dict(cls, body: dict) -> TenantSites:
        sensitive = body["sensitive"]
        entries = body.get("entries") or {}
        return cls(frozenset(str(s) for s in body["serving"]),
                   None if sensitive is None else frozenset(str(s) for s in sensitive),
                   tuple(sorted((str(site), str(ordinary), str(confined))
                                for site, (ordinary, confined) in entries.items())),
                   None if body.get("hub") is None else str(body["hub"]))


def audit_reader(topology: Topology, site: str) -> str:
    """The DEK an admission at ``site`` seals its request records with: ``audit`` at the hub, ``audit-<site>``
    elsewhere, so a site can open only the records it wrote itself; the ``audit`` principal holds them all."""
    return AUDIT if site == topology.hub.name else f"{AUDIT}-{site}"


def principals_of(topology: Topology) -> list[str]:
    """Every principal of a network, key manager first."""
    return [
        KEYMANAGER,
        OPERATOR,
        AUDIT,
        *(site_principal(s.name) for s in topology.sites),
        *(tenant_principal(t.name) for t in topology.tenants),
    ]


def key_holders(topology: Topology, revoked: Iterable[str] = ()) -> dict[str, frozenset[str]]:
    """For each DEK reader, the principals that receive its DEK (least privilege; revoked ones left out)."""
    hub = site_principal(topology.hub.name)
    readers: dict[str, set[str]] = {}
    for site in topology.sites:
        readers[site_principal(site.name)] = {site_principal(site.name), hub}
    control = set(topology.control_sites())
    for tenant in topology.tenants:
        sites = {site_principal(s) for s in serving_sites(topology, tenant.name) if s in control}
        readers[tenant_principal(tenant.name)] = {tenant_principal(tenant.name), hub, *sites}
    readers[AUDIT] = {AUDIT, hub}
    for site in topology.control_sites():
        if site != topology.hub.name:
            readers[audit_reader(topology, site)] = {AUDIT, site_principal(site)}
    gone = set(revoked) - {KEYMANAGER}
    return {reader: frozenset((holders - gone) | {KEYMANAGER}) for reader, holders in readers.items()}


def held_readers(topology: Topology, site: str, revoked: Iterable[str] = ()) -> frozenset[str]:
    """The readers whose DEK the principal of ``site`` holds: what services at that site can open and seal for."""
    me = site_principal(site)
    return frozenset(reader for reader, holders in key_holders(topology, revoked).items() if me in holders)
