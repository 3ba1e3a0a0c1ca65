"""``docker-compose.yml`` and its configs, generated so they cannot drift from ``din up``; the compose init steps.

``render_compose`` builds, from the default topology, the committed files (none holds a secret):

* ``docker-compose.yml``: a NATS hub and one leaf per edge site, each leaf dialing the hub through its WAN
  link's proxy in the ``toxiproxy`` service (DIN's server with the loss toxic, built from ``ops/toxiproxy``)
  whose conditions the one-shot ``links-init`` step (``din links apply``) sets from the topology, as ``din up``
  does; Kafka in KRaft mode (the ``apache/kafka`` image), every DIN service and executor (``service_instances``)
  with exactly the environment ``service_environments`` gives it for the containers' addresses and paths,
  Prometheus, Grafana, the one-shot ``keys-init`` and ``kafka-init`` steps and a ``cli`` tool service (profile
  ``tools``) for operator commands;
* ``ops/compose/nats/<site>.conf``: each site's nats-server config, the one ``din up`` writes
  (``NatsServerSpec.config`` with ``NatsSecurity``) with container addresses and paths: it includes the
  deployment's trust file relative to the config (``bus/trust.conf``), runs TLS on client and leafnode
  connections, and a leaf logs in to the hub with its own credentials;
* ``ops/compose/kafka/start.sh``: how the Kafka container formats its storage (creating the SCRAM users) and
  starts the broker from the files ``keys-init`` wrote.

The secret parts are made on the first ``docker compose up`` by ``din compose init`` (the ``keys-init``
service, ``init_compose``): the keys ``din keys init`` writes, the bus (CA, certificates for the compose host
names, NATS users, Kafka users), the tenants' credentials, the Kafka broker's files and Grafana's admin password,
each consumer's share in its own volume owned by the user its container runs as. ``din compose prepare-kafka``
(the ``kafka-init`` service, ``prepare_compose_kafka``) applies DIN's ACLs and creates the recorded topics as the
operator once the broker answers, as ``din up`` does. ``din compose`` writes the committed files; a unit test
fails when they differ from a fresh render.
"""

from __future__ import annotations

import base64
import os
import secrets
import shutil
import time
import uuid
from pathlib import Path, PurePosixPath

import yaml

from din.commands.links import topology_links
from din.generated import drifted_files, stale_files, write_files
from din.probe import PROBE_USER
from din.shared.bus.files import write_secret
from din.shared.bus.kafka import BROKER_USER, KafkaAccess, KafkaLogin, KafkaUsers
from din.shared.bus.nats_auth import NATS_DIR
from din.shared.bus.permissions import ANY, REST, SERVICE_INBOX_ROOT, Permissions, pattern
from din.shared.bus.tls import CA_CERT, DEFAULT_HOSTS
from din.shared.naming import Subjects
from din.shared.topology import Topology, load_topology
from din.stack.brokers import REPO_ROOT, KafkaSpec, NatsSecurity, NatsServerSpec
from din.stack.launcher import (
    DEFAULT_TOPOLOGY,
    PortPlan,
    ServiceInstance,
    pool_instances,
    service_environments,
    service_instances,
)
from din.stack.wan import TOXIPROXY_VERSION, WanLink

COMPOSE_FILE = "docker-compose.yml"
NATS_CONF_DIR = "ops/compose/nats"
KAFKA_START_SCRIPT = "ops/compose/kafka/start.sh"
PROMETHEUS_CONFIG = "ops/prometheus/prometheus.yml"
PROMETHEUS_RULES = "ops/prometheus/rules"
GRAFANA_PROVISIONING = "ops/grafana/provisioning"
GRAFANA_DASHBOARDS = "ops/grafana/dashboards"

DIN_IMAGE = "din:local"
NATS_IMAGE = "nats:2.11-alpine"
KAFKA_IMAGE = "apache/kafka:3.9.1"
PROMETHEUS_IMAGE = "prom/prometheus:v3.5.0"
GRAFANA_IMAGE = "grafana/grafana:11.6.0"
TOXIPROXY_IMAGE = f"din-toxiproxy:{TOXIPROXY_VERSION}-loss"
"""DIN's Toxiproxy server, built from ``ops/toxiproxy`` (the official image has no loss toxic)."""

BIND_ADDRESS = "${DIN_BIND_ADDRESS:-127.0.0.1}"
"""Host address every published port binds: loopback unless the operator sets ``DIN_BIND_ADDRESS``."""

DIN_UID = 10001
"""The ``din`` user of DIN's image (``Dockerfile``)."""
NATS_UID = 10100
"""The user the NATS containers run as (the image would run as root)."""
KAFKA_UID = 1000
"""``appuser`` of the ``apache/kafka`` image."""
GRAFANA_UID = 472
"""``grafana`` of the Grafana image."""

APP_DIR = PurePosixPath("/app")
CONTAINER_TOPOLOGY = APP_DIR / DEFAULT_TOPOLOGY.relative_to(REPO_ROOT).as_posix()
CONTAINER_MODEL_REPO = APP_DIR / ".din" / "models"
"""Where the image holds the model zoo its build trains (the checkout's default repository, whatever ``$DIN_DIR``)."""
CONTAINER_RUN = PurePosixPath("/run/din")
"""The ``din-keys`` volume in DIN's containers: laid out like a ``din up`` run (``keys/``, ``credentials.json``,
``topology.yaml``), so operator commands take its ``keys`` folder as ``--keys-dir``."""
CONTAINER_KEYS = CONTAINER_RUN / "keys"
CONTAINER_BUS = CONTAINER_KEYS / "bus"
CONTAINER_CREDENTIALS = CONTAINER_RUN / "credentials.json"
INIT_DIR = PurePosixPath("/run/din-init")
"""Where ``keys-init`` mounts the other containers' volumes (``<INIT_DIR>/<volume>``)."""
KEYS_INIT = "keys-init"
KAFKA_INIT = "kafka-init"
LINKS_INIT = "links-init"
WAN_PROXY_HOST = "toxiproxy"
"""The WAN links' proxy service; the hub's certificate names it too, since leaves dial the hub through it."""
TOXIPROXY_DIR = "ops/toxiproxy"
TOXIPROXY_UID = 10200
"""The user DIN's Toxiproxy image runs as (``ops/toxiproxy/Dockerfile``)."""
CLI = "cli"
KEYS_VOLUME = "din-keys"
NATS_ETC = PurePosixPath("/etc/nats")
NATS_CONF_IN_CONTAINER = NATS_ETC / "nats.conf"
NATS_BUS = NATS_ETC / "bus"
"""A NATS container's own bus files (its volume ``nats-<site>-bus``): trust, certificate, CA, leaf login."""
NATS_DATA_DIR = PurePosixPath("/data/jetstream")
NATS_ACCOUNT_VARIABLE = "DIN_ACCOUNT"
KAFKA_HOST = "kafka"
KAFKA_CERT_HOSTS = (KAFKA_HOST, *DEFAULT_HOSTS)
KAFKA_DATA_DIR = PurePosixPath("/var/lib/kafka/data")
KAFKA_CONF = PurePosixPath("/etc/kafka/din")
"""The Kafka container's files (volume ``kafka-bus``): properties, keystore, CA, SCRAM format arguments."""
KAFKA_START_IN_CONTAINER = PurePosixPath("/opt/din/kafka-start.sh")
GRAFANA_SECRETS = PurePosixPath("/run/secrets/din")
GRAFANA_PASSWORD = "admin-password"
GRAFANA_DASHBOARDS_IN_CONTAINER = "/var/lib/grafana/dashboards"
PROBE_CREDS = CONTAINER_BUS / NATS_DIR / "users" / f"{PROBE_USER}.creds"
PORTS = PortPlan()
LOOPBACK = "127.0.0.1"


def probe_permissions() -> Permissions:
    """The ``health-probe`` user's (``din.probe``): ask any health subject, hear the replies in its own inboxes
    at any site; nothing else. Not a party of the network's own table (``shared.bus.permissions``): only the
    compose healthchecks use it."""
    return Permissions(publish=(pattern(Subjects.health, ANY), pattern(Subjects.health, ANY, ANY)),
                       subscribe=(f"{SERVICE_INBOX_ROOT}.{ANY}.{PROBE_USER}.{REST}",))


class _NoAliases(yaml.SafeDumper):
    """Plain YAML: repeated values are written out, never as anchors."""

    def ignore_aliases(self, data) -> bool:
        return True


def nats_host(site: str) -> str:
    """Compose service (and host) name of a site's NATS server; also its certificate name."""
    return f"nats-{site}"


def nats_bus_volume(site: str) -> str:
    return f"{nats_host(site)}-bus"


def nats_urls(topology: Topology) -> dict[str, str]:
    """NATS URL of each site inside the compose network: TLS, since the connections leave the container."""
    return {s.name: f"tls://{nats_host(s.name)}:{PORTS.hub_client}" for s in topology.sites}


def kafka_bootstrap() -> str:
    """Kafka bootstrap address inside the compose network."""
    return f"{KAFKA_HOST}:{PORTS.kafka}"


def compose_wan_links(topology: Topology) -> list[WanLink]:
    """Each edge site's link as the ``toxiproxy`` service runs it: ``din up``'s ports, listening on all of the
    container's interfaces, to the hub's leafnode port."""
    return topology_links(topology, listen_host="0.0.0.0", hub_host=nats_host(topology.hub.name))


def toxiproxy_api_url() -> str:
    """The ``toxiproxy`` service's API inside the compose network (not published: it has no authentication)."""
    return f"http://{WAN_PROXY_HOST}:{PORTS.toxiproxy_api}"


def published(port: int) -> str:
    """A published port, on ``DIN_BIND_ADDRESS`` (default loopback)."""
    return f"{BIND_ADDRESS}:{port}:{port}"


def compose_environments(topology: Topology, *, topology_path: PurePosixPath | str = CONTAINER_TOPOLOGY,
                         pools: bool = False) -> dict[str, dict[str, str]]:
    """``service_environments`` for the containers' addresses and paths, keyed by compose service name (``pools``:
    of the pools' executors instead, see ``pool_instances``)."""
    return service_environments(
        topology,
        nats_urls=nats_urls(topology),
        kafka_bootstrap=kafka_bootstrap(),
        topology_path=topology_path,
        pools=pools,
        credentials_path=CONTAINER_CREDENTIALS,
        model_repo=CONTAINER_MODEL_REPO,
        telemetry_metrics_port=PORTS.telemetry_metrics,
        telemetry_metrics_host="0.0.0.0",
        gateway_http_host="0.0.0.0",
        keys_dir=CONTAINER_KEYS,
        kafka_bus_dir=CONTAINER_BUS,
        bus_dir=CONTAINER_BUS,
    )


# --------------------------------------------------------------------------- NATS


def nats_config(topology: Topology, site: str) -> str:
    """``din up``'s closed nats-server config of ``site`` with the container's paths: client and leafnode ports
    on all interfaces with TLS, monitoring on the container's loopback only, leaves dialing the hub's host. The
    deployment's parts (trust, the DIN account a leaf binds) are files ``keys-init`` writes, included relative to
    the config. A leaf dials the hub through its WAN link's proxy (``compose_wan_links``)."""
    hub = topology.hub.name
    is_hub = site == hub
    leaf_host, leaf_port = nats_host(hub), PORTS.leafnode
    security = NatsSecurity(
        trust_include=str(NATS_BUS / "trust.conf"), cert=str(NATS_BUS / "server.pem"),
        key=str(NATS_BUS / "server-key.pem"), ca_file=str(NATS_BUS / CA_CERT),
        account=f"${NATS_ACCOUNT_VARIABLE}", leaf_creds=None if is_hub else str(NATS_BUS / "leaf.creds"),
        client_tls=True,
    )
    if is_hub:
        spec = NatsServerSpec(site, PORTS.hub_client, PORTS.hub_monitor, leaf_listen_port=PORTS.leafnode,
                              security=security)
    else:
        leaf_host = WAN_PROXY_HOST
        leaf_port = next(link.listen_port for link in compose_wan_links(topology) if link.site == site)
        spec = NatsServerSpec(site, PORTS.hub_client, PORTS.hub_monitor, hub_leaf_port=leaf_port,
                              security=security)
    text = (
        spec.config(Path(NATS_DATA_DIR), Path(NATS_ETC))
        .replace(f"listen: {LOOPBACK}:", "listen: 0.0.0.0:")
        .replace(f"tls://{LOOPBACK}:{leaf_port}", f"tls://{leaf_host}:{leaf_port}")
        # A variable, defined in the included account file: quoted it would be the literal string.
        .replace(f'account: "${NATS_ACCOUNT_VARIABLE}"', f"account: ${NATS_ACCOUNT_VARIABLE}")
    )
    if not is_hub:
        trust = text.splitlines()[0]
        text = text.replace(trust, f'{trust}\ninclude "bus/account.conf"', 1)
    rest = [line for line in text.splitlines() if LOOPBACK in line and not line.startswith(f"http: {LOOPBACK}:")]
    if rest:
        raise ValueError(f"NATS config of {site} still names {LOOPBACK} after translation: {rest}")
    return text


# --------------------------------------------------------------------------- Kafka


def kafka_spec() -> KafkaSpec:
    return KafkaSpec(PORTS.kafka, PORTS.kafka_controller, cert_hosts=KAFKA_CERT_HOSTS)


def kafka_properties(users: KafkaUsers) -> str:
    """``din up``'s secure ``server.properties`` with the container's listeners and paths (secret: it holds the
    broker's password). Clients reach ``SASL_SSL`` on all interfaces; the controller listener stays on the
    container's loopback (one node: only the broker itself talks to it)."""
    spec = kafka_spec()
    security = spec.security_properties(users, keystore=Path(KAFKA_CONF / "keystore.pem"),
                                        truststore=Path(KAFKA_CONF / CA_CERT))
    props = dict(line.split("=", 1) for line in spec.properties(Path(KAFKA_DATA_DIR), security).splitlines() if line)
    props.update({
        "controller.quorum.voters": f"1@{LOOPBACK}:{PORTS.kafka_controller}",
        "listeners": f"{spec.listener}://0.0.0.0:{PORTS.kafka},CONTROLLER://{LOOPBACK}:{PORTS.kafka_controller}",
        "advertised.listeners": f"{spec.listener}://{kafka_bootstrap()}",
    })
    return "".join(f"{key}={value}\n" for key, value in props.items())


def kafka_start_script() -> str:
    """The Kafka container's entrypoint: format the storage once with every SCRAM user, then run the broker."""
    return f"""#!/bin/sh
# Generated by `din compose` (din/compose.py). Do not edit.
# Entrypoint of the Kafka container: every file it reads is in {KAFKA_CONF}, written by `din compose init`
# (the keys-init service). The first start formats the storage creating every SCRAM user (format.args: one
# argument per line, secret); later starts find it formatted. Then the broker runs: SASL_SSL, SCRAM, ACLs.
set -eu
conf={KAFKA_CONF}
set --
while IFS= read -r arg; do
  set -- "$@" "$arg"
done < "$conf/format.args"
/opt/kafka/bin/kafka-storage.sh format --ignore-formatted --cluster-id "$(cat "$conf/cluster.id")" \\
  --config "$conf/server.properties" "$@"
exec /opt/kafka/bin/kafka-server-start.sh "$conf/server.properties"
"""


def _cluster_id() -> str:
    while True:  # like Kafka's Uuid.randomUuid: never starting with '-'
        value = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not value.startswith("-"):
            return value


# --------------------------------------------------------------------------- services


def _health(test: list[str], *, interval: str = "10s", retries: int = 6, start_period: str = "30s") -> dict:
    return {"test": test, "interval": interval, "timeout": "5s", "retries": retries, "start_period": start_period,
            "start_interval": "2s"}


def _wget_health(port: int, path: str) -> dict:
    return _health(["CMD", "wget", "-q", "-O", "/dev/null", f"http://{LOOPBACK}:{port}{path}"])


def din_healthcheck(inst: ServiceInstance) -> dict:
    """Ask the instance's health subject over its site's NATS as the ``health-probe`` user (``din.probe``)."""
    test = ["CMD", "python", "-m", "din.probe", "--creds", str(PROBE_CREDS), inst.health_subject]
    return {"test": test, "interval": "30s", "timeout": "10s", "retries": 3, "start_period": "180s",
            "start_interval": "5s"}


def _din_image() -> dict:
    return {"image": DIN_IMAGE, "build": {"context": ".", "dockerfile": "Dockerfile"}}


def _din_service(inst: ServiceInstance, env: dict[str, str]) -> dict:
    service: dict = {
        **_din_image(),
        "command": ["python", "-m", f"din.services.{inst.service}"],
        "environment": env,
        "depends_on": {
            nats_host(inst.site): {"condition": "service_healthy"},
            KAFKA_INIT: {"condition": "service_completed_successfully"},
            KEYS_INIT: {"condition": "service_completed_successfully"},
        },
        "restart": "on-failure",
        "volumes": [f"{KEYS_VOLUME}:{CONTAINER_RUN}:ro"],
        "healthcheck": din_healthcheck(inst),
    }
    if inst.service == "telemetry":
        service["ports"] = [published(int(env["DIN_TELEMETRY_METRICS_PORT"]))]
    if inst.service == "gateway":
        service["ports"] = [published(int(env["DIN_GATEWAY_HTTP_PORT"])), published(int(env["DIN_GATEWAY_GRPC_PORT"]))]
    return service


def init_volumes(topology: Topology) -> dict[str, int]:
    """Volumes ``keys-init`` fills (mounted at ``<INIT_DIR>/<volume>``) or hands to their user, with that uid:
    each NATS server's bus files and data, Kafka's files and data, Grafana's password."""
    volumes: dict[str, int] = {}
    for site in topology.sites:
        volumes[nats_bus_volume(site.name)] = NATS_UID
        volumes[nats_host(site.name)] = NATS_UID
    volumes["kafka-bus"] = KAFKA_UID
    volumes[KAFKA_HOST] = KAFKA_UID
    volumes["grafana-secrets"] = GRAFANA_UID
    return volumes


def _keys_init_service(topology: Topology) -> dict:
    """One-shot, as root (it hands each volume to its container's user): ``din compose init``."""
    volumes = [f"{KEYS_VOLUME}:{CONTAINER_RUN}"]
    volumes += [f"{name}:{INIT_DIR / name}" for name in init_volumes(topology)]
    return {
        **_din_image(),
        "user": "0",
        "command": ["din", "compose", "init", "--topology", str(CONTAINER_TOPOLOGY)],
        "volumes": volumes,
    }


def _kafka_init_service() -> dict:
    """One-shot, once the broker answers: DIN's ACLs and the recorded topics, as the operator."""
    return {
        **_din_image(),
        "command": ["din", "compose", "prepare-kafka", "--topology", str(CONTAINER_TOPOLOGY)],
        "volumes": [f"{KEYS_VOLUME}:{CONTAINER_RUN}:ro"],
        "depends_on": {KAFKA_HOST: {"condition": "service_healthy"}},
    }


def _toxiproxy_service(topology: Topology) -> dict:
    """The WAN links' proxy: one proxy per edge site (made by ``links-init``), API and listeners unpublished."""
    return {
        "image": TOXIPROXY_IMAGE,
        "build": {"context": f"./{TOXIPROXY_DIR}", "dockerfile": "Dockerfile"},
        "user": f"{TOXIPROXY_UID}:{TOXIPROXY_UID}",
        "command": ["-host", "0.0.0.0", "-port", str(PORTS.toxiproxy_api)],
        "depends_on": {nats_host(topology.hub.name): {"condition": "service_healthy"}},
        "healthcheck": _wget_health(PORTS.toxiproxy_api, "/version"),
    }


def _links_init_service(topology: Topology) -> dict:
    """One-shot, once toxiproxy answers: every edge site's proxy with the topology's link conditions, through
    ``din links apply`` (the code ``din up`` and ``din links set`` use)."""
    return {
        **_din_image(),
        "command": ["din", "links", "apply", "--toxiproxy", toxiproxy_api_url(), "--topology",
                    str(CONTAINER_TOPOLOGY), "--listen-host", "0.0.0.0", "--hub-host", nats_host(topology.hub.name)],
        "depends_on": {WAN_PROXY_HOST: {"condition": "service_healthy"}},
    }


def _cli_service(topology: Topology) -> dict:
    """``docker compose run --rm cli <din command>``: operator commands inside the network, with the key folder."""
    from din.commands.target import KAFKA_ENV, KEYS_DIR_ENV, NATS_URL_ENV

    return {
        **_din_image(),
        "profiles": ["tools"],
        "entrypoint": ["din"],
        "command": ["--help"],
        "environment": {
            NATS_URL_ENV: nats_urls(topology)[topology.hub.name],
            KAFKA_ENV: kafka_bootstrap(),
            KEYS_DIR_ENV: str(CONTAINER_KEYS),
            "DIN_MODEL_REPO": str(CONTAINER_MODEL_REPO),
        },
        "volumes": [f"{KEYS_VOLUME}:{CONTAINER_RUN}:ro"],
    }


def compose_document(topology: Topology) -> dict:
    """The docker-compose document of ``topology``."""
    hub = topology.hub.name
    services: dict[str, dict] = {KEYS_INIT: _keys_init_service(topology)}
    volumes: dict[str, dict] = {KEYS_VOLUME: {}}
    for site in sorted(topology.sites, key=lambda s: s.name != hub):
        host = nats_host(site.name)
        services[host] = {
            "image": NATS_IMAGE,
            "user": f"{NATS_UID}:{NATS_UID}",
            "command": ["-c", str(NATS_CONF_IN_CONTAINER)],
            "volumes": [
                f"./{NATS_CONF_DIR}/{site.name}.conf:{NATS_CONF_IN_CONTAINER}:ro",
                f"{nats_bus_volume(site.name)}:{NATS_BUS}:ro",
                f"{host}:{NATS_DATA_DIR.parent}",
            ],
            "depends_on": {KEYS_INIT: {"condition": "service_completed_successfully"}},
            "healthcheck": _wget_health(PORTS.hub_monitor, "/healthz"),
        }
        if site.name == hub:
            services[host]["ports"] = [published(PORTS.hub_client)]
            services[WAN_PROXY_HOST] = _toxiproxy_service(topology)
            services[LINKS_INIT] = _links_init_service(topology)
        else:
            services[host]["depends_on"][nats_host(hub)] = {"condition": "service_healthy"}
            services[host]["depends_on"][LINKS_INIT] = {"condition": "service_completed_successfully"}
        volumes[nats_bus_volume(site.name)] = {}
        volumes[host] = {}
    services[KAFKA_HOST] = {
        "image": KAFKA_IMAGE,
        "user": f"{KAFKA_UID}:{KAFKA_UID}",
        "entrypoint": ["sh", str(KAFKA_START_IN_CONTAINER)],
        "environment": {"LOG_DIR": "/tmp/kafka-logs", "KAFKA_HEAP_OPTS": "-Xmx512m -Xms256m"},
        "volumes": [
            f"./{KAFKA_START_SCRIPT}:{KAFKA_START_IN_CONTAINER}:ro",
            f"kafka-bus:{KAFKA_CONF}:ro",
            f"{KAFKA_HOST}:{KAFKA_DATA_DIR}",
        ],
        "depends_on": {KEYS_INIT: {"condition": "service_completed_successfully"}},
        "healthcheck": _health(
            ["CMD-SHELL", f"/opt/kafka/bin/kafka-broker-api-versions.sh --bootstrap-server {kafka_bootstrap()} "
                          f"--command-config {KAFKA_CONF}/health.properties > /dev/null 2>&1"],
            retries=12),
    }
    volumes["kafka-bus"] = {}
    volumes[KAFKA_HOST] = {}
    services[KAFKA_INIT] = _kafka_init_service()
    envs = compose_environments(topology)
    for inst in service_instances(topology):
        services[inst.name] = _din_service(inst, envs[inst.name])
    services["prometheus"] = {
        "image": PROMETHEUS_IMAGE,
        "volumes": [f"./{PROMETHEUS_CONFIG}:/etc/prometheus/prometheus.yml:ro",
                    f"./{PROMETHEUS_RULES}:/etc/prometheus/rules:ro"],
        "ports": [published(9090)],
        "depends_on": {"telemetry": {"condition": "service_healthy"}},
        "healthcheck": _wget_health(9090, "/-/ready"),
    }
    services["grafana"] = {
        "image": GRAFANA_IMAGE,
        "environment": {
            "GF_SECURITY_ADMIN_USER": "admin",
            "GF_SECURITY_ADMIN_PASSWORD__FILE": str(GRAFANA_SECRETS / GRAFANA_PASSWORD),
            "GF_AUTH_ANONYMOUS_ENABLED": "false",
            "GF_USERS_ALLOW_SIGN_UP": "false",
        },
        "volumes": [
            f"./{GRAFANA_PROVISIONING}:/etc/grafana/provisioning:ro",
            f"./{GRAFANA_DASHBOARDS}:{GRAFANA_DASHBOARDS_IN_CONTAINER}:ro",
            f"grafana-secrets:{GRAFANA_SECRETS}:ro",
        ],
        "ports": [published(3000)],
        "depends_on": {"prometheus": {"condition": "service_healthy"},
                       KEYS_INIT: {"condition": "service_completed_successfully"}},
        "healthcheck": _wget_health(3000, "/api/health"),
    }
    volumes["grafana-secrets"] = {}
    services[CLI] = _cli_service(topology)
    return {"name": "din", "services": services, "volumes": volumes}


def render_compose() -> dict[str, str]:
    """Every generated file for the default topology, keyed by its path relative to the repository root."""
    topology = load_topology(DEFAULT_TOPOLOGY)
    header = (
        f"# Generated by `din compose` from {DEFAULT_TOPOLOGY.relative_to(REPO_ROOT).as_posix()} and\n"
        "# din.stack.launcher.service_environments. Do not edit: change those and rerun `din compose`.\n"
        "# Published ports bind ${DIN_BIND_ADDRESS:-127.0.0.1}; keys-init makes the secrets (ops/compose/README.md).\n"
    )
    files = {
        COMPOSE_FILE: header + yaml.dump(compose_document(topology), Dumper=_NoAliases, sort_keys=False, width=120),
        KAFKA_START_SCRIPT: kafka_start_script(),
    }
    for site in topology.sites:
        files[f"{NATS_CONF_DIR}/{site.name}.conf"] = nats_config(topology, site.name)
    return files


def write_compose(root: Path = REPO_ROOT) -> list[Path]:
    """Write every generated file under ``root``, removing stale NATS configs; return the paths written."""
    root, files = Path(root), render_compose()
    return write_files(root, files, stale_files(root, NATS_CONF_DIR, "*.conf", files))


def drifted(root: Path = REPO_ROOT) -> list[str]:
    """Relative paths whose committed content differs from a fresh render (missing and stale files too)."""
    root, files = Path(root), render_compose()
    return drifted_files(root, files, stale_files(root, NATS_CONF_DIR, "*.conf", files))


# --------------------------------------------------------------------------- init steps (run in containers)


def _copy_secret(source: Path, target: Path) -> None:
    write_secret(target, Path(source).read_text())


def _chown_tree(root: Path, uid: int, gid: int) -> None:
    os.chown(root, uid, gid)
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            os.chown(os.path.join(folder, name), uid, gid)


def init_compose(topology_path: Path, *, run_dir: Path = Path(CONTAINER_RUN), init_dir: Path = Path(INIT_DIR),
                 chown: bool = True) -> list[str]:
    """Make or complete every secret of a compose deployment; return what was done, one line each.

    Idempotent: existing keys, CA, users, passwords and Kafka cluster id are kept (``docker compose down -v``
    starts over). ``run_dir`` (the ``din-keys`` volume) gets what ``din keys init`` writes — the key files and
    the bus, with every NATS server's certificate for its compose host name — plus the tenants'
    ``credentials.json``, a copy of the topology and the ``health-probe`` NATS user. Each other container gets
    only its own share, in its own volume under ``init_dir``, owned by the user it runs as (``chown``).
    """
    from din.shared.credentials import read_credentials, write_credentials
    from din.shared.security import MASTER_KEY_FILE, init_keys
    from din.stack.bus import BusCredentials, nats_server_name

    topology = load_topology(topology_path)
    run_dir, init_dir = Path(run_dir), Path(init_dir)
    keys = run_dir / "keys"
    done = []
    if not (keys / MASTER_KEY_FILE).exists():
        store = init_keys(keys, topology)
        done.append(f"keys of {len(store.publics)} principals in {keys}")
    credentials = run_dir / "credentials.json"
    existing = read_credentials(credentials) if credentials.exists() else None
    write_credentials(credentials, [t.name for t in topology.tenants], existing)
    shutil.copyfile(topology_path, run_dir / "topology.yaml")
    hosts = {site.name: (nats_host(site.name), *DEFAULT_HOSTS) for site in topology.sites}
    hosts[topology.hub.name] = (nats_host(topology.hub.name), WAN_PROXY_HOST, *DEFAULT_HOSTS)
    instances = [(i.service, i.site, i.name, i.instance)
                 for i in [*service_instances(topology), *pool_instances(topology)]]
    bus = BusCredentials.provision(keys / "bus", topology, instances, hosts=hosts)
    bus.nats.ensure(PROBE_USER, probe_permissions())
    done.append(f"bus credentials in {bus.root}")

    for site in topology.sites:
        target = init_dir / nats_bus_volume(site.name)
        cert = bus.ca.server_cert(nats_server_name(site.name), hosts[site.name])
        write_secret(target / "trust.conf", bus.nats.trust_file.read_text())
        _copy_secret(bus.ca.cert_path, target / CA_CERT)
        _copy_secret(cert.cert, target / "server.pem")
        _copy_secret(cert.key, target / "server-key.pem")
        if site.name != topology.hub.name:
            _copy_secret(bus.creds(f"leaf-{site.name}"), target / "leaf.creds")
            write_secret(target / "account.conf", f'{NATS_ACCOUNT_VARIABLE}: "{bus.nats.account_public_key()}"\n')
        done.append(f"NATS server files of {site.name} in {target}")

    kafka = init_dir / "kafka-bus"
    users = KafkaUsers(bus.root / "kafka")
    cert = bus.ca.server_cert("kafka", KAFKA_CERT_HOSTS)
    write_secret(kafka / "keystore.pem", cert.key.read_text() + cert.cert.read_text())
    _copy_secret(bus.ca.cert_path, kafka / CA_CERT)
    write_secret(kafka / "server.properties", kafka_properties(users))
    write_secret(kafka / "format.args", "".join(f"{arg}\n" for arg in users.scram_arguments()))
    login = KafkaLogin(BROKER_USER, users.password_file(BROKER_USER), Path(KAFKA_CONF / CA_CERT))
    write_secret(kafka / "health.properties", login.java_properties())
    if not (kafka / "cluster.id").exists():
        write_secret(kafka / "cluster.id", _cluster_id() + "\n")
    done.append(f"Kafka broker files in {kafka}")

    grafana = init_dir / "grafana-secrets" / GRAFANA_PASSWORD
    if not grafana.exists():
        write_secret(grafana, secrets.token_urlsafe(24) + "\n")
        done.append(f"Grafana admin password in {grafana}")

    if chown:
        _chown_tree(run_dir, DIN_UID, DIN_UID)
        for volume, uid in init_volumes(topology).items():
            path = init_dir / volume
            path.mkdir(parents=True, exist_ok=True)
            if volume.endswith("-bus") or volume == "grafana-secrets":
                _chown_tree(path, uid, 0 if uid == GRAFANA_UID else uid)
            else:
                os.chown(path, uid, uid)  # a data volume: only its root, its content is the server's own
        done.append("each volume handed to its container's user")
    return done


def prepare_compose_kafka(topology_path: Path, *, bus_dir: Path = Path(CONTAINER_BUS),
                          bootstrap: str | None = None, timeout_s: float = 120.0) -> None:
    """DIN's ACLs and every recorded topic, created as ``din up`` creates them (``prepare_kafka``), retried until
    the broker takes them or ``timeout_s`` passes."""
    from din.services.telemetry.settings import TelemetrySettings
    from din.services.telemetry.topics import topic_plan
    from din.stack.launcher import prepare_kafka
    from din.stack.processes import StackError

    topology = load_topology(topology_path)
    access = KafkaAccess(bootstrap or kafka_bootstrap(), Path(bus_dir))
    settings = TelemetrySettings(nats_url=nats_urls(topology)[topology.hub.name], kafka_bootstrap=access.bootstrap,
                                 site=topology.hub.name)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            prepare_kafka(access, topic_plan(settings), topic_scope=None, acls=True)
            return
        except StackError:
            if time.monotonic() > deadline:
                raise
            time.sleep(2.0)
