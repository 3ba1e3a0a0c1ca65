"""A deployment's bus credentials, provisioned from its topology: one folder (``<keys>/bus``) holding DIN's CA,
each NATS server's certificate, the NATS operator and accounts, a user per party, and the Kafka users.

``BusCredentials.provision`` is what ``din up`` and ``din keys init`` run; it is
idempotent (an existing CA, operator and users are kept; a user whose
permissions changed with the topology is reissued).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from din.shared.bus import permissions as rules
from din.shared.bus.kafka import ensure_kafka_users
from din.shared.bus.nats_auth import NATS_DIR, SYSTEM_ACCOUNT, SYSTEM_USER, NatsAuthority
from din.shared.bus.permissions import OPERATOR_USER, Permissions, tenant_user
from din.shared.bus.tls import DEFAULT_HOSTS, BusCA
from din.shared.topology import Topology
from din.stack.brokers import NatsSecurity

EXECUTOR = "executor"


def nats_server_name(site: str, index: int = 1) -> str:
    """The certificate name of ``site``'s NATS server (``index``: which server of a clustered hub, from 1)."""
    return f"nats-{site}" if index == 1 else f"nats-{site}-{index}"


def leaf_user(site: str) -> str:
    """The NATS user ``site``'s leaf connection logs in to the hub as."""
    return f"leaf-{site}"


def service_permissions(topology: Topology, service: str, site: str, user: str, instance: str | None) -> Permissions:
    """The permissions of one service instance (``instance``: an executor's id, a control plane's site)."""
    if service == EXECUTOR:
        return rules.executor(topology, site, instance or user.removeprefix("executor-"))
    return rules.SERVICE_RULES[service](topology, site, user, instance)


@dataclass(frozen=True)
class BusCredentials:
    """The bus folder of one deployment and what it issues."""

    root: Path
    topology: Topology

    @property
    def ca(self) -> BusCA:
        return BusCA(self.root)

    @property
    def nats(self) -> NatsAuthority:
        return NatsAuthority(self.root / NATS_DIR)

    @classmethod
    def provision(cls, root: Path, topology: Topology, services: Iterable[tuple[str, str, str, str | None]] = (),
                  *, hosts: dict[str, tuple[str, ...]] | None = None) -> BusCredentials:
        """Create or refresh everything ``topology`` needs under ``root``: the CA, a certificate per NATS server
        (each server of a clustered hub its own; for ``hosts[site]``, default loopback), the NATS authority, the
        operator (and its system-account user, for ``nats server`` commands), each site's leaf, each tenant, and
        each of ``services`` (``(service, site, user, instance)``); the Kafka users."""
        bus = cls(Path(root), topology)
        ca = BusCA.load_or_create(bus.root)
        for site in topology.sites:
            for index in range(1, site.servers + 1):
                ca.server_cert(nats_server_name(site.name, index), (hosts or {}).get(site.name, DEFAULT_HOSTS))
        authority = NatsAuthority.load_or_create(bus.nats.root)
        authority.ensure(OPERATOR_USER, rules.operator())
        authority.ensure(SYSTEM_USER, rules.operator(), SYSTEM_ACCOUNT)
        for site in topology.sites:
            if site.role != "hub":
                authority.ensure(leaf_user(site.name), rules.leaf(topology, site.name))
        for spec in topology.tenants:
            authority.ensure(tenant_user(spec.name), rules.tenant(topology, spec.name))
        for service, site, user, instance in services:
            authority.ensure(user, service_permissions(topology, service, site, user, instance))
        ensure_kafka_users(bus.root)
        return bus

    def creds(self, user: str) -> Path:
        """The credentials file of NATS user ``user`` (issued by ``provision`` or ``issue_executor``)."""
        path = self.nats.creds_path(user)
        if not path.exists():
            raise FileNotFoundError(f"no NATS credentials for {user!r} in {self.nats.root}: rerun `din keys init`")
        return path

    def issue_executor(self, executor_id: str, site: str) -> Path:
        """Credentials for an executor added after provisioning (its permissions are its id's and site's)."""
        user = f"executor-{executor_id}"
        return self.nats.ensure(user, service_permissions(self.topology, EXECUTOR, site, user, executor_id))

    def nats_security(self, site: str, *, client_tls: bool = False, index: int = 1) -> NatsSecurity:
        """How ``site``'s nats-server (server ``index`` of a clustered hub) is closed (a leaf logs in to the hub
        as ``leaf-<site>``)."""
        cert = self.ca.server_cert(nats_server_name(site, index))
        is_hub = site == self.topology.hub.name
        return NatsSecurity(
            trust_include=str(self.nats.trust_file), cert=str(cert.cert), key=str(cert.key),
            ca_file=str(self.ca.cert_path), account=self.nats.account_public_key(),
            leaf_creds=None if is_hub else str(self.creds(leaf_user(site))), client_tls=client_tls,
        )
