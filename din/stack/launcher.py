"""The whole DIN network on one machine: brokers first, then every service as its own OS process.

``Stack`` starts a NATS hub at the hub site and one leaf server per edge site
(JetStream everywhere, one domain per site), Kafka in KRaft mode, then the
services: admission, classifier, scheduler, telemetry and keymanager once at
the hub site, and one executor per executor in the topology, each connected to
its own site's NATS server. Before any service starts it writes the run's key
files (``shared.security.init_keys``: a master key, the key store, one key file
per principal) under ``<run>/keys``; each service is given only its own. It
returns only when every service answers its health subject with ``ready=true``;
anything else stops what was started and raises ``StackError`` with the failing
process's log tail.

``service_environments`` is the single place that decides each service's
environment; ``docker-compose.yml`` must match it, and a test compares them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields, replace
from datetime import UTC, datetime
from pathlib import Path, PurePath

import yaml

from din.services.autoscaler.providers import recorded_executors
from din.services.telemetry.settings import TelemetrySettings
from din.services.telemetry.topics import ensure_topics, topic_plan
from din.shared.bus.connect import nats_options, nats_servers
from din.shared.bus.files import write_secret
from din.shared.bus.kafka import OPERATOR, KafkaAccess, apply_acls
from din.shared.bus.nats_auth import NATS_DIR, NatsAuthority
from din.shared.bus.permissions import OPERATOR_USER
from din.shared.bus.tls import CA_CERT
from din.shared.completionstream import MIB, completions_stream_config
from din.shared.credentials import write_credentials
from din.shared.naming import Subjects
from din.shared.security import (
    KEYSTORE_FILE,
    MASTER_KEY_FILE,
    CryptoPolicy,
    PrincipalKeys,
    init_keys,
    key_file,
    key_file_name,
    site_principal,
    tenant_principal,
)
from din.shared.topology import ExecutorSpec, Topology
from din.stack.brokers import (
    DEFAULT_KAFKA_LIBS,
    REPO_ROOT,
    KafkaSpec,
    KafkaStore,
    NatsServerSpec,
    nats_server_binary,
    require_java,
    start_nats,
)
from din.stack.bus import BusCredentials
from din.stack.processes import (
    ManagedProcess,
    StackError,
    port_is_free,
    same_process,
    start_time,
    stop_all,
    terminate_group,
    wait_for_port,
)
from din.stack.wan import ToxiproxyClient, ToxiproxySpec, WanLink, toxiproxy_binary, wan_links

DIN_DIR_ENV = "DIN_DIR"
DEFAULT_DIN_DIR = Path(os.environ.get(DIN_DIR_ENV) or REPO_ROOT / ".din")
"""Where ``din`` keeps its runs, ``stack.json``, the kept data and the model zoo: ``.din`` in the checkout, or
``$DIN_DIR``."""
DEFAULT_MODEL_REPO = DEFAULT_DIN_DIR / "models"
DEFAULT_TOPOLOGY = REPO_ROOT / "ops" / "topology" / "default.yaml"
STATE_FILE_NAME = "stack.json"

SCHEDULER_MODES = ("centralized", "distributed")
# Start order: back ends before the front door, so stopping in reverse closes admission first.
TELEMETRY = "telemetry"
SINGLETON_SERVICES = ("keymanager", TELEMETRY)
"""Services that run once, at the hub."""
CONTROL_SERVICES = ("scheduler", "classifier", "admission")
"""Services that run at every site with a control plane (only at the hub with ``control_plane: hub``)."""
EXECUTOR = "executor"
AUTOSCALER = "autoscaler"
"""The autoscaler: once, at the hub, in a topology with pools; it starts and stops the pools' executors."""
GATEWAY = "gateway"
"""The HTTP gateway: one at every site with a control plane, started after its admission."""
SERVICE_KINDS = (*SINGLETON_SERVICES, EXECUTOR, AUTOSCALER, *CONTROL_SERVICES, GATEWAY)
SECURED_SERVICES = ("keymanager", "telemetry", "admission", "classifier", "scheduler", EXECUTOR, AUTOSCALER)
POOL_ENVIRONMENTS = "pools.json"
"""In a run's folder: every pool executor's environment, for the autoscaler's local provider."""
AUTOSCALER_STATE = "autoscaler"
"""In a run's folder: where the autoscaler's local provider keeps its executors' pids and logs."""
"""Services that hold keys; ``DIN_SECURITY`` switches them all on or off together."""


# --------------------------------------------------------------------------- ports


@dataclass(frozen=True)
class PortPlan:
    """Every TCP port the stack listens on.

    Edge sites take ports in topology order: the ``i``-th edge site's NATS
    client port is ``leaf_clients[i]`` when given, else ``hub_client + 1 + i``;
    monitor ports likewise from ``hub_monitor``, and the proxy of its WAN link
    to the hub (``din up`` without ``--no-wan``) from ``leafnode``.

    A clustered hub (``servers`` > 1 at the hub site) also takes, for its server
    ``k`` (from 1), a route port ``hub_routes[k-1]`` (else ``6222 + k - 1``); its
    servers after the first take their client, monitor and leafnode ports from
    ``hub_clients``/``hub_monitors``/``hub_leafnodes`` (index ``k-2``; else the
    first server's plus ``100 * (k-1)``), and edge site ``i``'s proxy to server
    ``k`` listens on ``hub_wan_links[(k-2) * edges + i]`` (else that server's
    leafnode port ``+ 1 + i``).
    """

    hub_client: int = 4222
    leaf_clients: tuple[int, ...] = ()
    leafnode: int = 7422
    hub_monitor: int = 8222
    leaf_monitors: tuple[int, ...] = ()
    kafka: int = 9092
    kafka_controller: int = 9093
    telemetry_metrics: int = 9464
    toxiproxy_api: int = 8474
    wan_links: tuple[int, ...] = ()
    hub_routes: tuple[int, ...] = ()
    hub_clients: tuple[int, ...] = ()
    hub_monitors: tuple[int, ...] = ()
    hub_leafnodes: tuple[int, ...] = ()
    hub_wan_links: tuple[int, ...] = ()
    gateway: int = 8000
    gateways: tuple[int, ...] = ()
    """HTTP port of the gateway at the ``i``-th site with a control plane (topology order): ``gateways[i]`` when
    given, else ``gateway + i``."""
    gateway_grpc: int = 8100
    gateways_grpc: tuple[int, ...] = ()
    """gRPC port of the gateway at the ``i``-th site with a control plane, likewise."""

    def offset(self, n: int) -> PortPlan:
        """The same plan with every port moved by ``n``."""
        if n == 0:
            return self
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            moved[f.name] = tuple(p + n for p in value) if isinstance(value, tuple) else value + n
        plan = PortPlan(**moved)
        bad = [p for p in plan.all_ports() if not 0 < p < 65536]
        if bad:
            raise StackError(f"--port-offset {n} moves port {bad[0]} outside 1-65535: pick a smaller offset")
        return plan

    @classmethod
    def free(cls, edge_sites: int = 4, hub_servers: int = 1) -> PortPlan:
        """A plan of ephemeral ports that are free right now (for tests and benchmarks), for ``hub_servers``
        hub servers."""
        extra = hub_servers - 1
        cluster = (hub_servers + 3 * extra + extra * edge_sites) if hub_servers > 1 else 0
        doors = 1 + edge_sites
        count = 7 + 3 * edge_sites + cluster + 2 * doors
        socks = []
        try:
            for _ in range(count):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.bind(("127.0.0.1", 0))
                socks.append(sock)
            ports = [s.getsockname()[1] for s in socks]
        finally:
            for sock in socks:
                sock.close()
        return cls(
            hub_client=ports[0],
            leafnode=ports[1],
            hub_monitor=ports[2],
            kafka=ports[3],
            kafka_controller=ports[4],
            telemetry_metrics=ports[5],
            toxiproxy_api=ports[6],
            leaf_clients=tuple(ports[7 : 7 + edge_sites]),
            leaf_monitors=tuple(ports[7 + edge_sites : 7 + 2 * edge_sites]),
            wan_links=tuple(ports[7 + 2 * edge_sites : 7 + 3 * edge_sites]),
            **cls._cluster_ports(ports[7 + 3 * edge_sites : count - 2 * doors], hub_servers, edge_sites),
            gateway=ports[count - 2 * doors],
            gateways=tuple(ports[count - 2 * doors : count - doors]),
            gateway_grpc=ports[count - doors],
            gateways_grpc=tuple(ports[count - doors :]),
        )

    @staticmethod
    def _cluster_ports(ports: list[int], hub_servers: int, edge_sites: int) -> dict[str, tuple[int, ...]]:
        if hub_servers == 1:
            return {}
        extra = hub_servers - 1
        cuts = [0, hub_servers, hub_servers + extra, hub_servers + 2 * extra, hub_servers + 3 * extra, len(ports)]
        names = ("hub_routes", "hub_clients", "hub_monitors", "hub_leafnodes", "hub_wan_links")
        return {name: tuple(ports[a:b]) for name, a, b in zip(names, cuts[:-1], cuts[1:], strict=True)}

    def leaf_client(self, index: int) -> int:
        return self._indexed(self.leaf_clients, self.hub_client, index, "leaf client")

    def leaf_monitor(self, index: int) -> int:
        return self._indexed(self.leaf_monitors, self.hub_monitor, index, "leaf monitor")

    def wan_link(self, index: int) -> int:
        """Port the proxy of the ``index``-th edge site's link to the hub listens on."""
        return self._indexed(self.wan_links, self.leafnode, index, "WAN link")

    def hub_route(self, server: int) -> int:
        """Route port of hub server ``server`` (from 1)."""
        return self._listed(self.hub_routes, server - 1, 6222 + server - 1, "hub route")

    def hub_server_ports(self, server: int) -> tuple[int, int, int]:
        """Client, monitor and leafnode port of hub server ``server`` (from 1)."""
        if server == 1:
            return self.hub_client, self.hub_monitor, self.leafnode
        step = 100 * (server - 1)
        return (self._listed(self.hub_clients, server - 2, self.hub_client + step, "hub client"),
                self._listed(self.hub_monitors, server - 2, self.hub_monitor + step, "hub monitor"),
                self._listed(self.hub_leafnodes, server - 2, self.leafnode + step, "hub leafnode"))

    def hub_wan_link(self, server: int, index: int, edges: int) -> int:
        """Port the proxy of the ``index``-th (of ``edges``) edge site's link to hub server ``server`` listens on."""
        if server == 1:
            return self.wan_link(index)
        leafnode = self.hub_server_ports(server)[2]
        return self._listed(self.hub_wan_links, (server - 2) * edges + index, leafnode + 1 + index, "hub WAN link")

    @staticmethod
    def _listed(explicit: tuple[int, ...], index: int, default: int, what: str) -> int:
        if not explicit:
            return default
        if index >= len(explicit):
            raise StackError(f"port plan has {len(explicit)} {what} ports but the topology's hub needs more")
        return explicit[index]

    @staticmethod
    def _indexed(explicit: tuple[int, ...], base: int, index: int, what: str) -> int:
        if not explicit:
            return base + 1 + index
        if index >= len(explicit):
            raise StackError(f"port plan has {len(explicit)} {what} ports but the topology needs more edge sites")
        return explicit[index]

    def gateway_port(self, index: int) -> int:
        """HTTP port of the gateway at the ``index``-th site with a control plane."""
        return self.gateways[index] if index < len(self.gateways) else self.gateway + index

    def gateway_grpc_port(self, index: int) -> int:
        """gRPC port of the gateway at the ``index``-th site with a control plane."""
        return self.gateways_grpc[index] if index < len(self.gateways_grpc) else self.gateway_grpc + index

    def all_ports(self) -> list[int]:
        single = [self.hub_client, self.leafnode, self.hub_monitor, self.kafka, self.kafka_controller,
                  self.telemetry_metrics, self.toxiproxy_api]
        return [*single, *self.leaf_clients, *self.leaf_monitors, *self.wan_links, *self.hub_routes,
                *self.hub_clients, *self.hub_monitors, *self.hub_leafnodes, *self.hub_wan_links,
                *(self.gateways or (self.gateway,)), *(self.gateways_grpc or (self.gateway_grpc,))]


# --------------------------------------------------------------------------- plan of processes


@dataclass(frozen=True)
class ServiceInstance:
    """One service process the stack runs.

    ``name`` is unique in the stack (``admission``, ``admission-factory``,
    ``executor-cloud-1``) and names its log; ``service`` is its kind (one of
    ``SERVICE_KINDS``); ``instance`` is the executor id for executors, the site
    for a control-plane service, else None. The hub's control plane keeps the
    plain service names.
    """

    name: str
    service: str
    site: str
    instance: str | None = None

    @property
    def health_subject(self) -> str:
        return Subjects.health(self.service, self.instance)


def shown_path(path: Path | str) -> str:
    path = Path(path)
    with contextlib.suppress(ValueError):
        return str(path.relative_to(Path.cwd()))
    return str(path)


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    """Columns padded to their widest cell."""
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [headers, *rows]]
    return "\n".join(lines)


def replica_instance(site: str, n: int) -> str:
    """The instance id of replica ``n`` (from 1) of a control-plane service at ``site``: the site, then site-2..."""
    return site if n == 1 else f"{site}-{n}"


def control_process_name(service: str, site: str, hub: str, n: int) -> str:
    """``scheduler`` (the hub's first), ``scheduler-factory``, ``scheduler-factory-2``..."""
    base = service if site == hub else f"{service}-{site}"
    return base if n == 1 else f"{base}-{n}"


def service_instances(topology: Topology, services: Iterable[str] | None = None) -> list[ServiceInstance]:
    """Service processes of ``topology`` in start order, limited to the kinds in ``services`` (None: all)."""
    wanted = set(SERVICE_KINDS if services is None else services)
    unknown = wanted - set(SERVICE_KINDS)
    if unknown:
        raise StackError(f"unknown service {sorted(unknown)[0]!r}: choose from {', '.join(SERVICE_KINDS)}")
    hub = topology.hub.name
    out = [ServiceInstance(name, name, hub) for name in SINGLETON_SERVICES if name in wanted]
    if EXECUTOR in wanted:
        for site in topology.sites:
            for executor in site.executors:
                out.append(ServiceInstance(f"executor-{executor.id}", EXECUTOR, site.name, executor.id))
    if AUTOSCALER in wanted and topology.elastic:
        out.append(ServiceInstance(AUTOSCALER, AUTOSCALER, hub))
    for name in CONTROL_SERVICES:
        if name in wanted:
            out += [ServiceInstance(control_process_name(name, site, hub, n), name, site, replica_instance(site, n))
                    for site in topology.control_sites() for n in range(1, topology.replicas_at(site) + 1)]
    if GATEWAY in wanted:
        out += [ServiceInstance(control_process_name(GATEWAY, site, hub, 1), GATEWAY, site, site)
                for site in topology.control_sites()]
    return out


def pool_instances(topology: Topology) -> list[ServiceInstance]:
    """Every executor the topology's pools may run (the autoscaler starts them; the stack issues their
    credentials up front)."""
    return [ServiceInstance(f"executor-{executor_id}", EXECUTOR, site.name, executor_id)
            for site in topology.sites for executor_id in site.pool_executor_ids]


def executors_in_view(topology: Topology, instances: Iterable[ServiceInstance]) -> dict[str, int]:
    """How many executors each scheduler instance must count before the stack is ready: the ones the stack runs
    at the sites it places on, and the pools' minimums there when it runs the autoscaler. A scheduler that
    answers ready has opened its subscriptions but not yet heard the fleet; a request sent then would be refused
    ``no_eligible_executor``."""
    instances = list(instances)
    executors = [i for i in instances if i.service == EXECUTOR]
    scaled = any(i.service == AUTOSCALER for i in instances)
    return {i.name: sum(1 for e in executors if e.site in topology.scheduled_sites(i.site))
            + (sum(p.min for s in topology.sites if s.name in topology.scheduled_sites(i.site) for p in s.pools)
               if scaled else 0)
            for i in instances if i.service == "scheduler"}


def gateway_ports(topology: Topology, ports: PortPlan) -> dict[str, tuple[int, int]]:
    """The gateway's HTTP and gRPC ports at each site with a control plane."""
    return {site: (ports.gateway_port(i), ports.gateway_grpc_port(i))
            for i, site in enumerate(topology.control_sites())}


def service_environments(
    topology: Topology,
    *,
    nats_urls: Mapping[str, str],
    kafka_bootstrap: str,
    topology_path: str | Path,
    credentials_path: str | Path,
    model_repo: str | Path = DEFAULT_MODEL_REPO,
    mode: str = "centralized",
    telemetry_metrics_port: int = 9464,
    telemetry_metrics_host: str = "127.0.0.1",
    topic_scope: str | None = None,
    services: Iterable[str] | None = None,
    keys_dir: str | Path | None = None,
    security: bool = True,
    security_policy: CryptoPolicy | None = None,
    kafka_bus_dir: str | Path | None = None,
    bus_dir: str | Path | None = None,
    gateway_http_ports: Mapping[str, tuple[int, int]] | None = None,
    gateway_http_host: str = "127.0.0.1",
    run_dir: str | Path | None = None,
    pools: bool = False,
) -> dict[str, dict[str, str]]:
    """Environment of every service process, keyed by process name (see ``service_instances``).

    ``nats_urls`` maps each site to the NATS URL its processes use (a clustered
    hub's: every server's, comma-separated, see ``shared.bus.connect.nats_servers``);
    the hub site's URL serves the singleton services. A topology whose hub is a
    cluster gives every service ``DIN_JETSTREAM_REPLICAS`` (the replicas of what it
    creates per JetStream domain). ``keys_dir`` holds the key files
    (default: ``keys`` beside the credentials file): the key manager gets the key
    store and master key, every other service its own site's key file. ``kafka_bus_dir``: the bus folder of a
    secure Kafka (its CA and users); each service then logs in as its own Kafka user (its kind). ``bus_dir``: the
    bus folder of closed NATS servers; each instance then connects as its own NATS user (its process name).
    ``gateway_http_ports``: each control site's gateway HTTP and gRPC ports (default: the default port plan's).
    ``run_dir``: the run's folder, where the autoscaler finds the pool executors' environments
    (``POOL_ENVIRONMENTS``) and keeps its state; without one it runs with the Kubernetes provider (decides only).
    ``pools``: the environments of the pools' executors instead (``pool_instances``).
    ``din up`` and ``docker-compose.yml`` both follow this function.
    """
    if mode not in SCHEDULER_MODES:
        raise StackError(f"unknown scheduler mode {mode!r}: use {' or '.join(SCHEDULER_MODES)}")
    missing = [s.name for s in topology.sites if s.name not in nats_urls]
    if missing:
        raise StackError(f"no NATS URL for site {missing[0]!r}")
    executors = {e.id: e for s in topology.sites for e in s.executors}
    executors.update({executor_id: ExecutorSpec(id=executor_id, models=pool.models, capacity=pool.capacity)
                      for s in topology.sites for pool in s.pools for executor_id in pool.executor_ids(s.name)})
    keys = PurePath(keys_dir) if keys_dir is not None else PurePath(credentials_path).parent / "keys"
    policy = (security_policy or CryptoPolicy(**topology.security.model_dump())).model_dump_json()
    kafka = KafkaAccess(kafka_bootstrap, Path(kafka_bus_dir) if kafka_bus_dir is not None else None)
    http_ports = gateway_http_ports or gateway_ports(topology, PortPlan())
    envs: dict[str, dict[str, str]] = {}
    for inst in pool_instances(topology) if pools else service_instances(topology, services):
        env = {
            "DIN_NATS_URL": nats_urls[inst.site],
            "DIN_KAFKA_BOOTSTRAP": kafka_bootstrap,
            "DIN_SITE": inst.site,
            "DIN_TOPOLOGY": str(topology_path),
            "DIN_MODEL_REPO": str(model_repo),
        }
        env.update(kafka.environment(inst.service))
        if bus_dir is not None:
            env["DIN_NATS_CREDS"] = str(PurePath(bus_dir) / NATS_DIR / "users" / f"{inst.name}.creds")
            env["DIN_BUS_CA_FILE"] = str(PurePath(bus_dir) / CA_CERT)
            env["DIN_BUS_SITES"] = ",".join(s.name for s in topology.sites)
        if topic_scope:
            env["DIN_TOPIC_SCOPE"] = topic_scope
        if inst.instance is not None and inst.service != EXECUTOR:
            env["DIN_INSTANCE"] = inst.instance
        if topology.stream_replicas():
            env["DIN_JETSTREAM_REPLICAS"] = json.dumps(topology.stream_replicas())
        site_keys = str(keys / key_file_name(site_principal(inst.site)))
        if inst.service in SECURED_SERVICES:
            env["DIN_SECURITY"] = "on" if security else "off"
        if inst.service == "keymanager":
            env["DIN_KEYMANAGER_KEYSTORE"] = str(keys / KEYSTORE_FILE)
            env["DIN_KEYMANAGER_MASTER_KEY_FILE"] = str(keys / MASTER_KEY_FILE)
            env["DIN_KEYMANAGER_POLICY"] = policy
        elif inst.service == "admission":
            env["DIN_ADMISSION_CREDENTIALS_FILE"] = str(credentials_path)
            env["DIN_ADMISSION_KEY_FILE"] = site_keys
        elif inst.service == "classifier":
            env["DIN_CLASSIFIER_KEY_FILE"] = site_keys
        elif inst.service == "scheduler":
            env["DIN_SCHEDULER_MODE"] = mode
            env["DIN_SCHEDULER_KEY_FILE"] = site_keys
            env["DIN_SCHEDULER_OWN_SITE_ONLY"] = str(topology.scheduled_sites(inst.site) == [inst.site]).lower()
            env["DIN_SCHEDULER_ROSTERS"] = str(topology.hears_rosters(inst.site)).lower()
        elif inst.service == "telemetry":
            env["DIN_TELEMETRY_METRICS_PORT"] = str(telemetry_metrics_port)
            env["DIN_TELEMETRY_METRICS_HOST"] = telemetry_metrics_host
            env["DIN_TELEMETRY_KEY_FILE"] = site_keys
            if topology.hears_rosters(inst.site):
                env["DIN_TELEMETRY_HEARTBEAT_SITE"] = inst.site
        elif inst.service == AUTOSCALER:
            env["DIN_AUTOSCALER_KEY_FILE"] = site_keys
            if run_dir is None:
                env["DIN_AUTOSCALER_PROVIDER"] = "kubernetes"
            else:
                env["DIN_AUTOSCALER_PROVIDER"] = "local"
                env["DIN_AUTOSCALER_POOL_ENVIRONMENTS"] = str(PurePath(run_dir) / POOL_ENVIRONMENTS)
                env["DIN_AUTOSCALER_STATE_DIR"] = str(PurePath(run_dir) / AUTOSCALER_STATE)
                env["DIN_AUTOSCALER_LOG_DIR"] = str(PurePath(run_dir) / "logs")
        elif inst.service == GATEWAY:
            env["DIN_GATEWAY_HTTP_PORT"] = str(http_ports[inst.site][0])
            env["DIN_GATEWAY_GRPC_PORT"] = str(http_ports[inst.site][1])
            env["DIN_GATEWAY_HTTP_HOST"] = gateway_http_host
        elif inst.service == EXECUTOR:
            spec = executors[inst.instance]
            env["DIN_EXECUTOR_ID"] = spec.id
            env["DIN_EXECUTOR_MODELS"] = ",".join(spec.models)
            env["DIN_EXECUTOR_MODEL_REPO"] = str(model_repo)
            env["DIN_EXECUTOR_CAPACITY"] = str(spec.capacity)
            env["DIN_EXECUTOR_KEY_FILE"] = site_keys
            # Distributed scheduling hands work to each site's JetStream queue, which executors pull.
            env["DIN_EXECUTOR_PULL"] = "true" if mode == "distributed" else "false"
        envs[inst.name] = env
    return envs


def default_service_command(instance: ServiceInstance) -> list[str]:
    """``python -m din.services.<kind>``, run from the repository root."""
    return [sys.executable, "-m", f"din.services.{instance.service}"]


def _edge_sites(topology: Topology) -> list[str]:
    return [s.name for s in topology.sites if s.role == "edge"]


def nats_specs(topology: Topology, ports: PortPlan, *, wan: bool = False) -> list[NatsServerSpec]:
    """The hub's nats-servers (one, or a cluster of the hub site's ``servers``) and one leaf per edge site, in
    topology order.

    A clustered hub's servers route to each other on loopback; each leaf lists every hub server's leafnode
    port, and with ``wan`` dials each through its own proxy of the site's WAN link rather than directly.
    """
    hub = topology.hub
    count = hub.servers
    routes = [ports.hub_route(k) for k in range(1, count + 1)] if count > 1 else []
    specs = []
    for k in range(1, count + 1):
        client, monitor, leafnode = ports.hub_server_ports(k)
        specs.append(NatsServerSpec(
            hub.name, client, monitor, leaf_listen_port=leafnode, index=k,
            cluster_port=routes[k - 1] if routes else None,
            route_ports=tuple(p for j, p in enumerate(routes, start=1) if j != k)))
    edges = _edge_sites(topology)
    for i, site in enumerate(edges):
        hub_ports = [ports.hub_wan_link(k, i, len(edges)) if wan else ports.hub_server_ports(k)[2]
                     for k in range(1, count + 1)]
        specs.append(NatsServerSpec(site, ports.leaf_client(i), ports.leaf_monitor(i), hub_leaf_port=hub_ports[0],
                                    other_hub_leaf_ports=tuple(hub_ports[1:])))
    return specs


def stack_wan_links(topology: Topology, ports: PortPlan) -> list[WanLink]:
    """The proxied link of every edge site to the hub, with the topology's conditions: one proxy per (edge
    site, hub server), the first server's named after the site (``WanLink.name``)."""
    edges = len(_edge_sites(topology))
    out = []
    for k in range(1, topology.hub.servers + 1):
        listen = [ports.hub_wan_link(k, i, edges) for i in range(edges)]
        out += [replace(link, server=k) for link in wan_links(topology, listen, ports.hub_server_ports(k)[2])]
    return out


def port_roles(
    topology: Topology, ports: PortPlan, *, kafka: bool = True, telemetry: bool = True, wan: bool = False,
    gateway: bool = True,
) -> list[tuple[int, str]]:
    """Every port the stack will listen on, with a human description of its role."""
    roles: list[tuple[int, str]] = []
    for spec in nats_specs(topology, ports):
        kind = "hub" if spec.is_hub else "leaf"
        server = f" server {spec.name}" if topology.hub.servers > 1 and spec.is_hub else ""
        roles.append((spec.client_port, f"NATS client port of {kind} site {spec.site}{server}"))
        roles.append((spec.monitor_port, f"NATS monitor port of {kind} site {spec.site}{server}"))
        if spec.is_hub:
            roles.append((spec.leaf_listen_port, f"NATS leafnode port of hub site {spec.site}{server}"))
        if spec.cluster_port is not None:
            roles.append((spec.cluster_port, f"NATS route port of hub site {spec.site}{server}"))
    if wan:
        roles.append((ports.toxiproxy_api, "toxiproxy API port"))
        for link in stack_wan_links(topology, ports):
            to = f"hub server {link.server}" if topology.hub.servers > 1 else "the hub"
            roles.append((link.listen_port, f"WAN link proxy from site {link.site} to {to}"))
    if kafka:
        roles.append((ports.kafka, "Kafka broker port"))
        roles.append((ports.kafka_controller, "Kafka controller port"))
    if telemetry:
        roles.append((ports.telemetry_metrics, "telemetry metrics port"))
    if gateway:
        for site, (http, grpc) in gateway_ports(topology, ports).items():
            roles += [(http, f"gateway HTTP port of site {site}"), (grpc, f"gateway gRPC port of site {site}")]
    return roles


def check_ports(roles: list[tuple[int, str]]) -> None:
    """Raise a one-line ``StackError`` for the first planned port that repeats or is taken."""
    seen: dict[int, str] = {}
    for port, role in roles:
        if port in seen:
            raise StackError(f"port {port} is planned twice ({seen[port]} and {role}): fix the port plan")
        seen[port] = role
    for port, role in roles:
        if not port_is_free(port):
            raise StackError(
                f"port {port} ({role}) is already in use: stop what holds it (`din down` for an old stack) "
                f"or pass --port-offset N to move every port"
            )


# --------------------------------------------------------------------------- async helpers


def _run_async(coro):
    """Run ``coro`` to completion, also when called from inside a running event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


async def _await_health(
    pending: list[tuple[ServiceInstance, ManagedProcess, str]], timeout_s: float,
    options: Callable[[str], dict] = lambda url: {},
    executors_wanted: Mapping[str, int] | None = None,
) -> None:
    """Ask each instance's health subject until it answers ready (and, for an instance ``executors_wanted`` names,
    counts at least that many live executors); raise on exit or timeout. ``options`` gives the connect options
    for a server URL (the operator's credentials on a closed bus)."""
    import nats
    from nats.errors import NoRespondersError
    from nats.errors import TimeoutError as NatsTimeout

    from din.shared.contracts.events import HealthV1

    connections = {}
    try:
        for url in {url for _, _, url in pending}:
            connections[url] = await nats.connect(nats_servers(url), connect_timeout=5, max_reconnect_attempts=3,
                                                  **options(url))

        async def one(inst: ServiceInstance, proc: ManagedProcess, url: str) -> None:
            deadline = time.monotonic() + timeout_s
            last = f"no answer on {inst.health_subject}"
            while True:
                if not proc.alive():
                    code = proc.popen.returncode if proc.popen else None
                    raise StackError(f"{inst.name} exited with code {code} during start-up\n{proc.log_tail()}")
                if time.monotonic() > deadline:
                    raise StackError(f"{inst.name} not ready within {timeout_s:.0f}s ({last})\n{proc.log_tail()}")
                try:
                    reply = await connections[url].request(inst.health_subject, b"{}", timeout=1.0)
                    health = HealthV1.model_validate_json(reply.data)
                    wanted = (executors_wanted or {}).get(inst.name, 0)
                    counted = int(health.detail.get("executors", 0))
                    if health.ready and counted >= wanted:
                        return
                    last = (f"ready, counting {counted} of its {wanted} executors" if health.ready
                            else f"answered ready=false {health.detail or ''}".strip())
                except (TimeoutError, NoRespondersError, NatsTimeout):
                    pass
                except ValueError as exc:
                    last = f"health answer is not a HealthV1: {str(exc).splitlines()[0]}"
                await asyncio.sleep(0.2)

        tasks = [asyncio.ensure_future(one(*p)) for p in pending]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                if task.exception() is not None:
                    raise task.exception()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        for nc in connections.values():
            try:
                await nc.close()
            except Exception:  # noqa: BLE001 - closing a broken connection must not hide the real error
                pass


async def _kafka_answers(bootstrap: str, client_kwargs: Mapping) -> bool:
    from aiokafka.client import AIOKafkaClient

    client = AIOKafkaClient(bootstrap_servers=bootstrap, request_timeout_ms=3000, **client_kwargs)
    try:
        await client.bootstrap()
        return bool(client.cluster.brokers())
    except Exception:  # noqa: BLE001 - any failure means "not ready yet"
        return False
    finally:
        await client.close()


def wait_kafka_ready(spec: KafkaSpec, proc: ManagedProcess, timeout_s: float) -> None:
    """Wait until the broker listens and answers a metadata request (as the operator, on a secure broker)."""
    deadline = time.monotonic() + timeout_s
    wait_for_port(spec.port, timeout_s, proc)
    kwargs = spec.access().client_kwargs(OPERATOR)
    while time.monotonic() < deadline:
        if not proc.alive():
            raise StackError(f"kafka exited during start-up\n{proc.log_tail()}")
        if _run_async(_kafka_answers(spec.bootstrap, kwargs)):
            return
        time.sleep(0.2)
    raise StackError(f"kafka did not answer metadata requests within {timeout_s:.0f}s\n{proc.log_tail()}")


def prepare_kafka(access: KafkaAccess, plan: list, *, topic_scope: str | None, acls: bool) -> None:
    """Ready a Kafka for a run: DIN's ACLs (``acls``: this stack runs the broker and it is secure), then every
    recorded topic of ``plan`` under the run's ``topic_scope``, created by the operator (services may not)."""

    async def prepare() -> None:
        if acls:
            await apply_acls(access.bootstrap, access.bus_dir)
        await ensure_topics(access.bootstrap, plan, scope=topic_scope, client_id="din-operator",
                            client_kwargs=access.client_kwargs(OPERATOR))

    try:
        _run_async(prepare())
    except Exception as exc:  # noqa: BLE001 - every failure here stops the start with its reason
        raise StackError(f"could not prepare Kafka at {access.bootstrap} (ACLs, topics): {exc}") from exc


def prepare_completion_streams(url: str, options: dict, topology: Topology, settings: TelemetrySettings,
                               timeout_s: float) -> None:
    """Create every site's completion stream in its own JetStream domain (``shared.completionstream``, the limits
    telemetry's ``settings`` give it), so completions are kept from the first one on, also before telemetry runs.
    A domain whose JetStream is not answering yet (just started, or reached over a WAN link) is asked again until
    ``timeout_s``."""

    async def prepare() -> None:
        import nats

        nc = await nats.connect(servers=nats_servers(url), **options)
        deadline = time.monotonic() + timeout_s
        try:
            for site in topology.sites:
                config = completions_stream_config(site.name, max_age_s=settings.relay_max_age_h * 3600.0,
                                                   max_bytes=settings.relay_max_mb * MIB,
                                                   replicas=site.jetstream_replicas)
                while True:
                    try:
                        await nc.jetstream(domain=site.name, timeout=2.0).add_stream(config)
                        break
                    except Exception:
                        if time.monotonic() > deadline:
                            raise
                        await asyncio.sleep(0.2)
        finally:
            await nc.close()

    try:
        _run_async(prepare())
    except Exception as exc:  # noqa: BLE001 - every failure here stops the start with its reason
        raise StackError(f"could not create the completion streams: {exc}") from exc


def _http_json(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, {}
    except (OSError, ValueError):
        return 0, {}


def wait_nats_mesh(specs: list[NatsServerSpec], procs: list[ManagedProcess], timeout_s: float) -> None:
    """Wait until every server's JetStream is healthy, a clustered hub's servers are routed to each other and
    every leaf is connected to the hub (to one of its servers)."""
    deadline = time.monotonic() + timeout_s
    by_site = dict(zip((s.name for s in specs), procs))
    hubs = [s for s in specs if s.is_hub]
    hub = hubs[0]
    leaves = len(specs) - len(hubs)
    for spec in specs:
        while True:
            proc = by_site[spec.name]
            if not proc.alive():
                raise StackError(f"{proc.name} exited during start-up\n{proc.log_tail()}")
            status, _ = _http_json(f"http://127.0.0.1:{spec.monitor_port}/healthz")
            if status == 200:
                break
            if time.monotonic() > deadline:
                raise StackError(f"{proc.name} not healthy within {timeout_s:.0f}s\n{proc.log_tail()}")
            time.sleep(0.1)
    while True:
        joined = sum(len(_http_json(f"http://127.0.0.1:{s.monitor_port}/leafz")[1].get("leafs") or []) for s in hubs)
        routed = all(_http_json(f"http://127.0.0.1:{s.monitor_port}/routez")[1].get("num_routes", 0)
                     >= len(s.route_ports) for s in hubs)
        if joined >= leaves and routed:
            return
        if time.monotonic() > deadline:
            proc = by_site[hub.name]
            raise StackError(
                f"only {joined} of {leaves} leaf servers joined the hub within {timeout_s:.0f}s"
                f"{'' if routed else ' (its servers are not all routed to each other)'}\n{proc.log_tail()}"
            )
        time.sleep(0.1)


# --------------------------------------------------------------------------- state file


def read_state(state_file: Path) -> dict | None:
    """The state of the running stack, or None when there is none."""
    try:
        return json.loads(Path(state_file).read_text())
    except FileNotFoundError:
        return None
    except ValueError:
        raise StackError(f"state file {state_file} is unreadable: delete it after checking no stack runs") from None


def state_nats(state: dict, site: str | None = None, user: str = OPERATOR_USER) -> tuple[str, dict]:
    """The NATS URL of ``site`` (default: the hub's, the first) in a running stack's ``state`` and the connect
    options of NATS user ``user`` there (none when the stack runs ``--insecure``)."""
    urls = state["urls"]["nats"]
    if site is not None and site not in urls:
        raise StackError(f"site {site!r} is not in this network: {', '.join(urls)}")
    site = site or next(iter(urls))
    bus_dir = state.get("bus_dir")
    if not bus_dir:
        return urls[site], {}
    creds = NatsAuthority(Path(bus_dir) / NATS_DIR).creds_path(user)
    if not creds.exists():
        raise StackError(f"no NATS credentials for {user!r} in {bus_dir}")
    return urls[site], nats_options(urls[site], site, creds, Path(bus_dir) / CA_CERT)


def state_processes_alive(state: dict) -> list[dict]:
    """Entries of ``state['processes']`` (and the supervisor) whose process still runs."""
    alive = [p for p in state.get("processes", []) if same_process(p["pid"], p.get("start_time"))]
    sup = state.get("supervisor")
    if sup and sup["pid"] != os.getpid() and same_process(sup["pid"], sup.get("start_time")):
        alive.append({"name": "din up (supervisor)", **sup})
    return alive


def stop_from_state(state_file: Path, timeout_s: float = 10.0) -> list[str]:
    """Stop the stack described by ``state_file`` (``din down``); return the names of processes stopped."""
    state = read_state(state_file)
    if state is None:
        return []
    stopped = []
    sup = state.get("supervisor")
    if sup and sup["pid"] != os.getpid() and same_process(sup["pid"], sup.get("start_time")):
        # A foreground `din up` stops its own processes cleanly on SIGTERM.
        os.kill(sup["pid"], signal.SIGTERM)
        deadline = time.monotonic() + timeout_s * 3
        while time.monotonic() < deadline and same_process(sup["pid"], sup.get("start_time")):
            time.sleep(0.1)
        stopped.append("din up (supervisor)")
    for entry in reversed(state.get("processes", [])):
        if same_process(entry["pid"], entry.get("start_time")):
            terminate_group(entry["pid"], timeout_s)
            stopped.append(entry["name"])
    stopped += _stop_left_pool_executors(state)
    Path(state_file).unlink(missing_ok=True)
    return stopped


def _stop_left_pool_executors(state: dict) -> list[str]:
    """Pool executors an autoscaler left running (it was killed, so it could not drain them itself)."""
    run_dir = state.get("run_dir")
    left = recorded_executors(Path(run_dir, AUTOSCALER_STATE), forget=True) if run_dir else {}
    for pid in left.values():
        terminate_group(pid)
    return [f"executor-{executor_id}" for executor_id in left]


# --------------------------------------------------------------------------- the stack


@dataclass
class ProcessRow:
    """One line of the table ``din up`` prints."""

    site: str
    process: str
    address: str
    log: Path
    pid: int | None = None
    restarts: int = 0
    given_up: bool = False


DATA_DIR_NAME = "data"
"""The folder under the din dir holding what ``din up`` keeps across runs (the Kafka log)."""


def kept_data_dir(din_dir: Path) -> Path:
    """Where ``din up`` and ``din demo`` keep the network's data across runs."""
    return Path(din_dir) / DATA_DIR_NAME


def forget_data(din_dir: Path) -> Path | None:
    """Delete the data kept under ``din_dir`` (``din up --fresh``); refused while a stack runs from it. Returns the
    folder deleted, None when nothing was kept."""
    state = read_state(Path(din_dir) / STATE_FILE_NAME)
    if state is not None and state_processes_alive(state):
        raise StackError(f"a stack is running from {state.get('run_dir')}: run `din down` before `din up --fresh`")
    target = kept_data_dir(din_dir)
    if not target.exists():
        return None
    shutil.rmtree(target)
    return target


class Stack:
    """A DIN network on this machine: brokers, then services, each its own OS process.

    Use as ``with Stack(topology).start() as stack:`` or call ``start()``/``stop()``.
    ``services`` limits which service kinds run (None: all, ``()``: brokers only);
    ``service_command`` builds the argv of a service (tests pass a fake).
    A foreground ``din up`` sets ``supervisor_pid`` before ``start()`` so that
    ``din down`` from another shell signals it rather than its children; it then
    keeps the stack running with ``din.stack.supervision.Supervisor``, which calls
    ``restart``. With ``wan`` every leaf reaches the hub through a Toxiproxy proxy
    per link (``din.stack.wan``); without it, over plain loopback. The bus is closed (``din.stack.bus``: every
    connection authenticated, leaf links over TLS, Kafka SASL_SSL with ACLs) unless ``insecure``; with
    ``client_tls`` client connections run TLS too (as under compose, where they leave the machine).
    """

    def __init__(
        self,
        topology: Topology,
        *,
        topology_file: Path | None = None,
        ports: PortPlan | None = None,
        din_dir: Path = DEFAULT_DIN_DIR,
        mode: str = "centralized",
        services: Iterable[str] | None = None,
        kafka: bool = True,
        service_command: Callable[[ServiceInstance], list[str]] = default_service_command,
        model_repo: Path = DEFAULT_MODEL_REPO,
        kafka_libs: Path = DEFAULT_KAFKA_LIBS,
        ready_timeout_s: float = 60.0,
        broker_timeout_s: float = 60.0,
        write_state: bool = True,
        topic_scope: str | None = None,
        external_kafka: str | None = None,
        security: bool = True,
        security_policy: CryptoPolicy | None = None,
        wan: bool = False,
        insecure: bool = False,
        bus_dir: Path | None = None,
        client_tls: bool = False,
        data_dir: Path | None = None,
    ) -> None:
        if mode not in SCHEDULER_MODES:
            raise StackError(f"unknown scheduler mode {mode!r}: use {' or '.join(SCHEDULER_MODES)}")
        self.topology = topology
        self.topology_file = Path(topology_file) if topology_file else None
        self.ports = ports or PortPlan()
        self.din_dir = Path(din_dir)
        self.mode = mode
        self.instances = service_instances(topology, services)
        self.kafka_enabled = kafka and external_kafka is None
        self.external_kafka = KafkaAccess(external_kafka) if isinstance(external_kafka, str) else external_kafka
        self.insecure = insecure
        self.client_tls = client_tls and not insecure
        self._bus_dir = Path(bus_dir) if bus_dir is not None else None
        self.service_command = service_command
        self.model_repo = Path(model_repo)
        self.kafka_libs = Path(kafka_libs)
        self.ready_timeout_s = ready_timeout_s
        self.broker_timeout_s = broker_timeout_s
        self.state_file = self.din_dir / STATE_FILE_NAME if write_state else None
        self.topic_scope = topic_scope
        self.security = security
        self.security_policy = security_policy
        self.wan = wan
        self.nats = nats_specs(topology, self.ports, wan=wan)
        self.links = stack_wan_links(topology, self.ports) if wan else []
        self.toxiproxy = ToxiproxySpec(self.ports.toxiproxy_api) if wan else None
        self.data_dir = Path(data_dir) if data_dir is not None else None
        """The network's data kept across runs (``kafka/``: ``KafkaStore``); None keeps it in the run folder."""
        self.kafka = KafkaSpec(self.ports.kafka, self.ports.kafka_controller, libs=self.kafka_libs, insecure=insecure,
                               store=None if self.data_dir is None else KafkaStore(self.data_dir / "kafka"))
        self.supervisor_pid: int | None = None
        self.bus: BusCredentials | None = None
        self.run_dir: Path | None = None
        self.processes: list[ManagedProcess] = []
        self.broker_processes = 0
        """How many of ``processes`` (the first ones) are brokers."""
        self.rows: list[ProcessRow] = []
        self._started_at: str | None = None

    @classmethod
    def brokers_only(cls, topology: Topology, *, ports: PortPlan | None = None, din_dir: Path = DEFAULT_DIN_DIR,
                     kafka: bool = True, write_state: bool = False, **kwargs) -> Stack:
        """NATS hub, leaves and Kafka without services, on free ports unless ``ports`` is given."""
        edges = sum(1 for s in topology.sites if s.role == "edge")
        ports = ports or PortPlan.free(edges, hub_servers=topology.hub.servers)
        return cls(topology, ports=ports, din_dir=din_dir, services=(), kafka=kafka, write_state=write_state,
                   **kwargs)

    # -- addresses

    @property
    def nats_urls(self) -> dict[str, str]:
        """NATS URL of each site's server; a clustered hub's lists every server's, comma-separated
        (``shared.bus.connect.nats_servers`` splits it)."""
        urls: dict[str, list[str]] = {}
        for spec in self.nats:
            urls.setdefault(spec.site, []).append(spec.url)
        return {site: ",".join(each) for site, each in urls.items()}

    @property
    def hub_url(self) -> str:
        return self.nats_urls[self.topology.hub.name]

    @property
    def kafka_bootstrap(self) -> str:
        return self.external_kafka.bootstrap if self.external_kafka is not None else self.kafka.bootstrap

    @property
    def kafka_access(self) -> KafkaAccess:
        """The Kafka this stack records to and how to log in to it (an external one's own, else this run's)."""
        if self.external_kafka is not None:
            return self.external_kafka
        return KafkaAccess(self.kafka.bootstrap, None if self.insecure else self.bus_dir)

    @property
    def bus_dir(self) -> Path:
        """The run's bus credentials (CA, server certificates, NATS and Kafka users): the one given, else an
        external secure Kafka's (one CA for the whole bus), else ``keys/bus``."""
        if self._bus_dir is not None:
            return self._bus_dir
        if self.external_kafka is not None and self.external_kafka.bus_dir is not None:
            return Path(self.external_kafka.bus_dir)
        return self.keys_dir / "bus"

    @property
    def credentials_file(self) -> Path:
        """The tenants' token secrets of this run (written by ``start``)."""
        assert self.run_dir is not None, "credentials_file needs the run dir: call start() first"
        return self.run_dir / "credentials.json"

    @property
    def keys_dir(self) -> Path:
        """The key files of this run (written by ``start``): master key, key store, one file per principal."""
        assert self.run_dir is not None, "keys_dir needs the run dir: call start() first"
        return self.run_dir / "keys"

    def tenant_keys(self, tenant: str) -> PrincipalKeys:
        """The key material a client of ``tenant`` connects with."""
        return PrincipalKeys.load(key_file(self.keys_dir, tenant_principal(tenant)))

    @property
    def runs_autoscaler(self) -> bool:
        """Whether this stack runs the autoscaler (its topology has pools)."""
        return any(i.service == AUTOSCALER for i in self.instances)

    def describe(self) -> str:
        """A table of where every process runs and logs."""
        rows = [[r.site, r.process, str(r.pid), r.address, shown_path(r.log)] for r in self.rows]
        return format_table(["SITE", "PROCESS", "PID", "ADDRESS", "LOG"], rows)

    def environments(self, pools: bool = False) -> dict[str, dict[str, str]]:
        """Environment of each service process of this stack (``pools``: of each pool executor instead)."""
        assert self.run_dir is not None, "environments() needs the run dir: call start() first"
        return service_environments(
            self.topology,
            nats_urls=self.nats_urls,
            kafka_bootstrap=self.kafka_bootstrap,
            topology_path=self.run_dir / "topology.yaml",
            credentials_path=self.credentials_file,
            model_repo=self.model_repo,
            mode=self.mode,
            telemetry_metrics_port=self.ports.telemetry_metrics,
            topic_scope=self.topic_scope,
            services={i.service for i in self.instances},
            keys_dir=self.keys_dir,
            security=self.security,
            security_policy=self.security_policy,
            kafka_bus_dir=self.kafka_access.bus_dir,
            bus_dir=None if self.bus is None else self.bus.root,
            gateway_http_ports=gateway_ports(self.topology, self.ports),
            run_dir=self.run_dir,
            pools=pools,
        )

    # -- lifecycle

    def preflight(self) -> None:
        """Check everything start() needs before starting anything."""
        if self.state_file is not None:
            state = read_state(self.state_file)
            if state is not None:
                if state_processes_alive(state):
                    raise StackError(
                        f"a stack is already running from {state.get('run_dir')}: run `din down` first"
                    )
                self.state_file.unlink(missing_ok=True)
        nats_server_binary()
        if self.wan:
            toxiproxy_binary()
        if self.kafka_enabled:
            require_java()
            if not (self.kafka_libs / ".complete").exists():
                raise StackError(f"Kafka jars not found in {self.kafka_libs}: run `bash ops/setup.sh` first")
            if self.kafka.store is not None:
                self.kafka.store.check(secure=not self.insecure)
        check_ports(
            port_roles(
                self.topology,
                self.ports,
                kafka=self.kafka_enabled,
                telemetry=any(i.service == "telemetry" for i in self.instances),
                wan=self.wan,
                gateway=any(i.service == GATEWAY for i in self.instances),
            )
        )

    def _new_run_dir(self) -> Path:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        runs = self.din_dir / "runs"
        runs.mkdir(parents=True, exist_ok=True)
        for n in range(1000):
            candidate = runs / (stamp if n == 0 else f"{stamp}-{n}")
            try:
                candidate.mkdir()
                return candidate
            except FileExistsError:
                continue
        raise StackError(f"cannot create a run folder under {runs}")

    def _write_topology(self, run_dir: Path) -> Path:
        target = run_dir / "topology.yaml"
        if self.topology_file is not None:
            shutil.copyfile(self.topology_file, target)
        else:
            target.write_text(yaml.safe_dump(self.topology.model_dump(mode="json"), sort_keys=False))
        return target

    def start(self) -> Stack:
        """Start brokers, then services; return when all are ready or raise ``StackError`` having stopped all."""
        self.preflight()
        self.run_dir = self._new_run_dir()
        self._started_at = datetime.now(UTC).isoformat()
        try:
            self._write_topology(self.run_dir)
            write_credentials(self.credentials_file, [t.name for t in self.topology.tenants])
            init_keys(self.keys_dir, self.topology)
            self._provision_bus()
            self._start_brokers()
            self._start_services()
        except BaseException:
            self.stop()
            raise
        return self

    def _provision_bus(self) -> None:
        """Issue the run's bus credentials and close every NATS server with them (unless ``insecure``)."""
        if self.insecure:
            return
        issued = [*self.instances, *(pool_instances(self.topology) if self.runs_autoscaler else [])]
        self.bus = BusCredentials.provision(
            self.bus_dir, self.topology, [(i.service, i.site, i.name, i.instance) for i in issued])
        for spec in self.nats:
            spec.security = self.bus.nats_security(spec.site, client_tls=self.client_tls, index=spec.index)

    def nats_options(self, site: str | None = None, user: str = OPERATOR_USER) -> dict:
        """nats-py ``connect`` options for NATS user ``user`` at ``site`` (default: the hub) of this run."""
        site = site or self.topology.hub.name
        if self.bus is None:
            return {}
        return nats_options(self.nats_urls[site], site, self.bus.creds(user), self.bus.ca.cert_path)

    def _track(self, proc: ManagedProcess, site: str, address: str) -> ManagedProcess:
        self.processes.append(proc)
        self.rows.append(ProcessRow(site, proc.name, address, proc.log_path, proc.pid))
        self._save_state()
        return proc

    def _start_brokers(self) -> None:
        hub_site = self.topology.hub.name
        kafka_proc = None
        if self.kafka_enabled:
            # The JVM is slowest: launch it first and let NATS start meanwhile.
            self.kafka.bus_dir = self.bus_dir
            kafka_proc = self._track(self.kafka.process(self.run_dir).start(), hub_site, self.kafka_bootstrap)
        if self.toxiproxy is not None:
            proxy_proc = self._track(self.toxiproxy.process(self.run_dir).start(), hub_site, self.toxiproxy.api_url)
            self._configure_links(proxy_proc)
        nats_procs = start_nats(self.nats, self.run_dir, timeout_s=self.broker_timeout_s)
        for spec, proc in zip(sorted(self.nats, key=lambda s: not s.is_hub), nats_procs):
            extra = f" (leafnodes :{spec.leaf_listen_port})" if spec.is_hub else ""
            if spec.cluster_port is not None:
                extra = f" ({spec.name}: leafnodes :{spec.leaf_listen_port}, routes :{spec.cluster_port})"
            self._track(proc, spec.site, f"{spec.url}{extra} monitor http://127.0.0.1:{spec.monitor_port}")
        wait_nats_mesh(sorted(self.nats, key=lambda s: not s.is_hub), nats_procs, self.broker_timeout_s)
        prepare_completion_streams(self.hub_url, self.nats_options(), self.topology, self._telemetry_settings(),
                                   self.broker_timeout_s)
        if kafka_proc is not None:
            wait_kafka_ready(self.kafka, kafka_proc, self.broker_timeout_s)
            self.kafka.add_pending_users()
        if kafka_proc is not None or self.external_kafka is not None:
            prepare_kafka(self.kafka_access, topic_plan(self._telemetry_settings()), topic_scope=self.topic_scope,
                          acls=kafka_proc is not None and self.kafka_access.secure)
        self.broker_processes = len(self.processes)

    def _telemetry_settings(self) -> TelemetrySettings:
        """Telemetry's settings as this stack gives them (the recorded topics' partitions and retention)."""
        return TelemetrySettings(nats_url=self.hub_url, kafka_bootstrap=self.kafka_bootstrap,
                                 site=self.topology.hub.name)

    def _configure_links(self, proc: ManagedProcess) -> None:
        """Once toxiproxy listens, create every link's proxy with the topology's conditions."""
        wait_for_port(self.toxiproxy.api_port, self.broker_timeout_s, proc)
        ToxiproxyClient(self.toxiproxy.api_url).populate(self.links)

    def _row(self, proc: ManagedProcess) -> ProcessRow:
        return next(r for r in self.rows if r.process == proc.name)

    def restart(self, proc: ManagedProcess) -> None:
        """Start ``proc`` again (after it exited) with the same command, environment and log; record the restart.

        What is left of its process group is stopped first. A restarted toxiproxy
        gets every link back with the topology's conditions (changes made with
        ``din links`` since start-up are not kept).
        """
        if proc.pid is not None:
            terminate_group(proc.pid, 1.0)
        proc.start()
        row = self._row(proc)
        row.pid = proc.pid
        row.restarts += 1
        self._save_state()
        if self.toxiproxy is not None and proc.name == "toxiproxy":
            self._configure_links(proc)

    def mark_given_up(self, proc: ManagedProcess) -> None:
        """Record that the supervisor stopped restarting ``proc``."""
        self._row(proc).given_up = True
        self._save_state()

    def _start_services(self) -> None:
        if not self.instances:
            return
        envs = self.environments()
        if self.runs_autoscaler:
            pools = {i.instance: self.environments(pools=True)[i.name] for i in pool_instances(self.topology)}
            write_secret(self.run_dir / POOL_ENVIRONMENTS, json.dumps(pools, indent=1))
        pending = []
        for inst in self.instances:
            env = {**envs[inst.name], "PYTHONUNBUFFERED": "1"}
            proc = ManagedProcess(
                name=inst.name,
                argv=self.service_command(inst),
                log_path=self.run_dir / "logs" / f"{inst.name}.log",
                env=env,
                cwd=REPO_ROOT,
            ).start()
            address = env["DIN_NATS_URL"]
            if inst.service == "telemetry":
                address += f" metrics http://127.0.0.1:{self.ports.telemetry_metrics}/metrics"
            if inst.service == GATEWAY:
                address += (f" http http://127.0.0.1:{env['DIN_GATEWAY_HTTP_PORT']}/v2"
                            f" grpc 127.0.0.1:{env['DIN_GATEWAY_GRPC_PORT']}")
            self._track(proc, inst.site, address)
            pending.append((inst, proc, env["DIN_NATS_URL"]))
        sites = {url: site for site, url in self.nats_urls.items()}
        _run_async(_await_health(pending, self.ready_timeout_s, lambda url: self.nats_options(sites[url]),
                                 executors_in_view(self.topology, self.instances)))

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the services together (SIGTERM: each drains its own work; SIGKILL after ``timeout_s``), telemetry
        last (it relays the completions the others left in the sites' streams to Kafka before the run's JetStream
        is gone), then the brokers in reverse start order, and remove the state file."""
        brokers = self.processes[:self.broker_processes]
        services = list(reversed(self.processes[self.broker_processes:]))
        relays = {i.name for i in self.instances if i.service == TELEMETRY}
        stop_all([p for p in services if p.name not in relays], timeout_s)
        if self.run_dir is not None:
            _stop_left_pool_executors({"run_dir": str(self.run_dir)})
        stop_all([p for p in services if p.name in relays], timeout_s)
        for proc in reversed(brokers):
            try:
                proc.stop(timeout_s)
            except Exception:  # noqa: BLE001 - keep stopping the others
                if proc.pid is not None:
                    terminate_group(proc.pid, 0.5)
        if self.state_file is not None and self.run_dir is not None:
            state = read_state(self.state_file)
            if state is not None and state.get("run_dir") == str(self.run_dir):
                self.state_file.unlink(missing_ok=True)

    def watch(self, poll_s: float = 0.5) -> ManagedProcess:
        """Block until one of the stack's processes exits, and return it."""
        while True:
            for proc in self.processes:
                if not proc.alive():
                    return proc
            time.sleep(poll_s)

    def __enter__(self) -> Stack:
        if self.run_dir is None:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- state

    def state(self) -> dict:
        """What ``din status`` and ``din down`` need to find this stack again."""
        sup = None
        if self.supervisor_pid is not None:
            sup = {"pid": self.supervisor_pid, "start_time": start_time(self.supervisor_pid)}
        return {
            "version": 1,
            "started_at": self._started_at,
            "run_dir": str(self.run_dir),
            "topology": str(self.run_dir / "topology.yaml") if self.run_dir else None,
            "mode": self.mode,
            "supervisor": sup,
            "urls": {
                "nats": self.nats_urls,
                "kafka": self.kafka_bootstrap if self.kafka_enabled else None,
                "toxiproxy": self.toxiproxy.api_url if self.toxiproxy is not None else None,
            },
            "kafka_bus_dir": str(self.bus_dir) if self.kafka_enabled and not self.insecure else None,
            "kafka_data": str(self.kafka.store.root) if self.kafka_enabled and self.kafka.store else None,
            "bus_dir": str(self.bus.root) if self.bus is not None else None,
            "links": [
                {"site": link.site, "hub": link.hub, "path": link.path, "listen": link.proxy["listen"],
                 "upstream": link.proxy["upstream"]}
                for link in self.links if link.server == 1
            ],
            "ports": {f.name: getattr(self.ports, f.name) for f in fields(self.ports)},
            "processes": [
                {
                    "name": row.process,
                    "site": row.site,
                    "pid": row.pid,
                    "start_time": start_time(row.pid) if row.pid else None,
                    "address": row.address,
                    "log": str(row.log),
                    "restarts": row.restarts,
                    "given_up": row.given_up,
                }
                for row in self.rows
            ],
        }

    def _save_state(self) -> None:
        if self.state_file is None:
            return
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state(), indent=2) + "\n")
        tmp.replace(self.state_file)


__all__ = [
    "DEFAULT_DIN_DIR",
    "DEFAULT_MODEL_REPO",
    "DEFAULT_TOPOLOGY",
    "EXECUTOR",
    "PortPlan",
    "ProcessRow",
    "SCHEDULER_MODES",
    "SERVICE_KINDS",
    "CONTROL_SERVICES",
    "SINGLETON_SERVICES",
    "ServiceInstance",
    "Stack",
    "StackError",
    "check_ports",
    "default_service_command",
    "executors_in_view",
    "nats_specs",
    "port_roles",
    "read_state",
    "service_environments",
    "service_instances",
    "stack_wan_links",
    "state_processes_alive",
    "state_nats",
    "stop_from_state",
    "prepare_kafka",
    "wait_kafka_ready",
    "wait_nats_mesh",
]
