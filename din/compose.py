"""``docker-compose.yml`` and its NATS configs, generated so they cannot drift from ``din up``.

``render_compose`` builds, from the default topology:

* ``docker-compose.yml``: a NATS hub and one leaf per edge site, Kafka in
  KRaft mode, every DIN service and executor (``service_instances``) with
  exactly the environment ``service_environments`` gives it for the
  containers' addresses and paths, then Prometheus and Grafana;
* ``ops/compose/nats/<site>.conf``: each site's nats-server config, the one
  ``din up`` writes (``NatsServerSpec.config``) with container addresses;
* ``ops/compose/credentials.example.json``: placeholder tenant secrets that
  admission reads; see ``ops/compose/README.md``.

Kafka's settings are ``KafkaSpec.properties`` turned into the image's
``KAFKA_*`` variables. ``din compose`` writes the files; a unit test fails when
the committed ones differ from a fresh render.
"""

from __future__ import annotations

import base64
import json
import uuid
from pathlib import Path, PurePosixPath

import yaml

from din.generated import drifted_files, stale_files, write_files
from din.stack.brokers import REPO_ROOT, KafkaSpec, NatsServerSpec
from din.stack.launcher import (
    DEFAULT_MODEL_REPO,
    DEFAULT_TOPOLOGY,
    PortPlan,
    ServiceInstance,
    service_environments,
    service_instances,
)
from shared.topology import Topology, load_topology

COMPOSE_FILE = "docker-compose.yml"
NATS_CONF_DIR = "ops/compose/nats"
CREDENTIALS_EXAMPLE = "ops/compose/credentials.example.json"
PROMETHEUS_CONFIG = "ops/prometheus/prometheus.yml"
GRAFANA_PROVISIONING = "ops/grafana/provisioning"
GRAFANA_DASHBOARDS = "ops/grafana/dashboards"

DIN_IMAGE = "din:local"
NATS_IMAGE = "nats:2.11-alpine"
KAFKA_IMAGE = "apache/kafka:3.9.1"
PROMETHEUS_IMAGE = "prom/prometheus:v3.5.0"
GRAFANA_IMAGE = "grafana/grafana:11.6.0"

APP_DIR = PurePosixPath("/app")
CONTAINER_TOPOLOGY = APP_DIR / DEFAULT_TOPOLOGY.relative_to(REPO_ROOT).as_posix()
CONTAINER_MODEL_REPO = APP_DIR / DEFAULT_MODEL_REPO.relative_to(REPO_ROOT).as_posix()
CONTAINER_CREDENTIALS = PurePosixPath("/run/din/credentials.json")
CONTAINER_KEYS = CONTAINER_CREDENTIALS.parent / "keys"
KEYS_INIT = "keys-init"
KEYS_VOLUME = "din-keys"
NATS_CONF_IN_CONTAINER = "/etc/nats/nats.conf"
NATS_DATA_DIR = PurePosixPath("/data/jetstream")
KAFKA_HOST = "kafka"
KAFKA_DATA_DIR = PurePosixPath("/var/lib/kafka/data")
GRAFANA_DASHBOARDS_IN_CONTAINER = "/var/lib/grafana/dashboards"
PORTS = PortPlan()
LOOPBACK = "127.0.0.1"


class _NoAliases(yaml.SafeDumper):
    """Plain YAML: repeated values are written out, never as anchors."""

    def ignore_aliases(self, data) -> bool:
        return True


def nats_host(site: str) -> str:
    """Compose service (and host) name of a site's NATS server."""
    return f"nats-{site}"


def nats_urls(topology: Topology) -> dict[str, str]:
    """NATS URL of each site inside the compose network; every server listens on the hub's client port."""
    return {s.name: f"nats://{nats_host(s.name)}:{PORTS.hub_client}" for s in topology.sites}


def kafka_bootstrap() -> str:
    """Kafka bootstrap address inside the compose network."""
    return f"{KAFKA_HOST}:{PORTS.kafka}"


def compose_environments(topology: Topology) -> dict[str, dict[str, str]]:
    """``service_environments`` for the containers' addresses and paths, keyed by compose service name."""
    return service_environments(
        topology,
        nats_urls=nats_urls(topology),
        kafka_bootstrap=kafka_bootstrap(),
        topology_path=CONTAINER_TOPOLOGY,
        credentials_path=CONTAINER_CREDENTIALS,
        model_repo=CONTAINER_MODEL_REPO,
        telemetry_metrics_port=PORTS.telemetry_metrics,
        telemetry_metrics_host="0.0.0.0",
    )


def _no_loopback(text: str, what: str) -> str:
    if LOOPBACK in text:
        raise ValueError(f"{what} still names {LOOPBACK} after translation to container addresses")
    return text


def nats_config(topology: Topology, site: str) -> str:
    """``din up``'s nats-server config of ``site``, listening on all interfaces, leaves dialing the hub's host."""
    hub = topology.hub.name
    if site == hub:
        spec = NatsServerSpec(site, PORTS.hub_client, PORTS.hub_monitor, leaf_listen_port=PORTS.leafnode)
    else:
        spec = NatsServerSpec(site, PORTS.hub_client, PORTS.hub_monitor, hub_leaf_port=PORTS.leafnode)
    text = (
        spec.config(Path(NATS_DATA_DIR))
        .replace(f"listen: {LOOPBACK}:", "listen: 0.0.0.0:")
        .replace(f"http: {LOOPBACK}:", "http: 0.0.0.0:")
        .replace(f"nats-leaf://{LOOPBACK}:", f"nats-leaf://{nats_host(hub)}:")
    )
    return _no_loopback(text, f"NATS config of {site}")


def kafka_environment() -> dict[str, str]:
    """``din up``'s Kafka properties as the apache/kafka image's ``KAFKA_*`` variables, with container listeners."""
    spec = KafkaSpec(PORTS.kafka, PORTS.kafka_controller, insecure=True)
    props = dict(line.split("=", 1) for line in spec.properties(Path(KAFKA_DATA_DIR)).splitlines() if line)
    props.update(
        {
            "controller.quorum.voters": f"1@{KAFKA_HOST}:{PORTS.kafka_controller}",
            "listeners": f"PLAINTEXT://0.0.0.0:{PORTS.kafka},CONTROLLER://0.0.0.0:{PORTS.kafka_controller}",
            "advertised.listeners": f"PLAINTEXT://{kafka_bootstrap()}",
        }
    )
    cluster = base64.urlsafe_b64encode(uuid.uuid5(uuid.NAMESPACE_URL, "din-compose").bytes).rstrip(b"=").decode()
    env = {"CLUSTER_ID": cluster}
    for key, value in props.items():
        name = key.replace("_", "__").replace("-", "___").replace(".", "_").upper()
        env[f"KAFKA_{name}"] = value
    return {k: _no_loopback(v, f"Kafka setting {k}") for k, v in env.items()}


def _wget_health(port: int, path: str) -> dict:
    return {
        "test": ["CMD", "wget", "-q", "-O", "/dev/null", f"http://127.0.0.1:{port}{path}"],
        "interval": "5s",
        "timeout": "3s",
        "retries": 12,
    }


def _din_service(inst: ServiceInstance, env: dict[str, str]) -> dict:
    service: dict = {
        "image": DIN_IMAGE,
        "build": {"context": ".", "dockerfile": "Dockerfile"},
        "command": ["python", "-m", f"services.{inst.service}"],
        "environment": env,
        "depends_on": {
            nats_host(inst.site): {"condition": "service_healthy"},
            KAFKA_HOST: {"condition": "service_healthy"},
            KEYS_INIT: {"condition": "service_completed_successfully"},
        },
        "restart": "on-failure",
        "volumes": [f"{KEYS_VOLUME}:{CONTAINER_KEYS}:ro"],
    }
    if inst.service == "admission":
        service["volumes"].insert(0, f"./{CREDENTIALS_EXAMPLE}:{CONTAINER_CREDENTIALS}:ro")
    if inst.service == "telemetry":
        port = env["DIN_TELEMETRY_METRICS_PORT"]
        service["ports"] = [f"{port}:{port}"]
    return service


def _keys_init_service() -> dict:
    """One-shot: write the master key, key store and key files into the shared volume, once."""
    init = f"din keys init --topology {CONTAINER_TOPOLOGY} --out {CONTAINER_KEYS}"
    return {
        "image": DIN_IMAGE,
        "build": {"context": ".", "dockerfile": "Dockerfile"},
        "command": ["sh", "-c", f"test -f {CONTAINER_KEYS}/master.key || {init}"],
        "volumes": [f"{KEYS_VOLUME}:{CONTAINER_KEYS}"],
    }


def compose_document(topology: Topology) -> dict:
    """The docker-compose document of ``topology``."""
    hub = topology.hub.name
    services: dict[str, dict] = {KEYS_INIT: _keys_init_service()}
    volumes: dict[str, dict] = {KEYS_VOLUME: {}}
    for site in sorted(topology.sites, key=lambda s: s.name != hub):
        host = nats_host(site.name)
        services[host] = {
            "image": NATS_IMAGE,
            "command": ["-c", NATS_CONF_IN_CONTAINER],
            "volumes": [f"./{NATS_CONF_DIR}/{site.name}.conf:{NATS_CONF_IN_CONTAINER}:ro", f"{host}:/data"],
            "healthcheck": _wget_health(PORTS.hub_monitor, "/healthz"),
        }
        if site.name == hub:
            services[host]["ports"] = [f"{PORTS.hub_client}:{PORTS.hub_client}"]
        else:
            services[host]["depends_on"] = {nats_host(hub): {"condition": "service_healthy"}}
        volumes[host] = {}
    services[KAFKA_HOST] = {
        "image": KAFKA_IMAGE,
        "environment": kafka_environment(),
        "volumes": [f"kafka:{KAFKA_DATA_DIR}"],
        "healthcheck": {
            "test": ["CMD-SHELL", f"/opt/kafka/bin/kafka-broker-api-versions.sh --bootstrap-server "
                     f"localhost:{PORTS.kafka} > /dev/null 2>&1"],
            "interval": "10s",
            "timeout": "10s",
            "retries": 12,
            "start_period": "20s",
        },
    }
    volumes[KAFKA_HOST] = {}
    envs = compose_environments(topology)
    for inst in service_instances(topology):
        services[inst.name] = _din_service(inst, envs[inst.name])
    services["prometheus"] = {
        "image": PROMETHEUS_IMAGE,
        "volumes": [f"./{PROMETHEUS_CONFIG}:/etc/prometheus/prometheus.yml:ro"],
        "ports": ["9090:9090"],
        "depends_on": ["telemetry"],
    }
    services["grafana"] = {
        "image": GRAFANA_IMAGE,
        "environment": {"GF_AUTH_ANONYMOUS_ENABLED": "true", "GF_AUTH_ANONYMOUS_ORG_ROLE": "Viewer"},
        "volumes": [
            f"./{GRAFANA_PROVISIONING}:/etc/grafana/provisioning:ro",
            f"./{GRAFANA_DASHBOARDS}:{GRAFANA_DASHBOARDS_IN_CONTAINER}:ro",
        ],
        "ports": ["3000:3000"],
        "depends_on": ["prometheus"],
    }
    return {"name": "din", "services": services, "volumes": volumes}


def credentials_example(topology: Topology) -> str:
    """A credentials file with a recognisable placeholder secret per tenant (never use it outside a demo)."""
    secrets = {t.name: f"{i + 1:02x}" * 32 for i, t in enumerate(topology.tenants)}
    return json.dumps({"tenants": secrets}, indent=2) + "\n"


def render_compose() -> dict[str, str]:
    """Every generated file for the default topology, keyed by its path relative to the repository root."""
    topology = load_topology(DEFAULT_TOPOLOGY)
    header = (
        f"# Generated by `din compose` from {DEFAULT_TOPOLOGY.relative_to(REPO_ROOT).as_posix()} and\n"
        "# din.stack.launcher.service_environments. Do not edit: change those and rerun `din compose`.\n"
    )
    files = {
        COMPOSE_FILE: header + yaml.dump(compose_document(topology), Dumper=_NoAliases, sort_keys=False, width=120),
        CREDENTIALS_EXAMPLE: credentials_example(topology),
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
