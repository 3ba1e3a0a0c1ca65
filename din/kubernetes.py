"""Kubernetes manifests of a topology, generated like ``docker-compose.yml`` so they cannot drift from ``din up``.

``render_kubernetes`` builds, from one topology, one multi-document manifest (``ops/kubernetes/<name>.yaml``,
no secret in it) for the namespace ``din``:

* per site a NATS server: a StatefulSet, its Service ``nats-<site>`` (the compose host name, so the certificates
  ``din compose init`` issues are valid here) and a ConfigMap holding the config compose runs
  (``din.compose.nats_config``), except that a leaf dials the hub's Service directly: there is no WAN proxy;
* Kafka: one KRaft broker (StatefulSet, the ``apache/kafka`` image, compose's start script in a ConfigMap) and
  the one-shot Job ``kafka-init`` (``din compose prepare-kafka``: ACLs, recorded topics);
* every service instance of ``service_instances`` as a Deployment of one pod with exactly the environment
  ``service_environments`` gives it in compose (``din.compose.compose_environments``: the same host names and
  container paths), each fixed executor too;
* each executor pool (``SiteSpec.pools``) as a StatefulSet ``executor-<site>-<pool>`` whose pods are named like the
  pool's executor processes (``executor-<site>-<pool>-<n>``, ordinals from 1), and a KEDA ``ScaledObject`` that
  sizes it from the autoscaler's decision, ``din_pool_desired_executors`` in Prometheus (the autoscaler runs with
  ``DIN_AUTOSCALER_PROVIDER=kubernetes``: it decides and records, KEDA and the HPA start and stop pods);
* Prometheus scraping telemetry, with DIN's rules.

Secrets are Kubernetes Secrets the operator creates (``din manifests secrets``: the files ``din compose init``
makes, each pod mounting only the ones its environment names). ``ops/kubernetes/README.md`` says how to deploy.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path, PurePosixPath

import yaml

from din.compose import (
    APP_DIR,
    CONTAINER_RUN,
    DIN_IMAGE,
    DIN_UID,
    KAFKA_CONF,
    KAFKA_DATA_DIR,
    KAFKA_HOST,
    KAFKA_IMAGE,
    KAFKA_START_IN_CONTAINER,
    KAFKA_UID,
    NATS_BUS,
    NATS_CONF_IN_CONTAINER,
    NATS_DATA_DIR,
    NATS_IMAGE,
    NATS_UID,
    PORTS,
    PROBE_CREDS,
    PROMETHEUS_CONFIG,
    PROMETHEUS_IMAGE,
    PROMETHEUS_RULES,
    WAN_PROXY_HOST,
    compose_environments,
    compose_wan_links,
    din_healthcheck,
    kafka_start_script,
    nats_bus_volume,
    nats_config,
    nats_host,
)
from din.generated import drifted_files, stale_files, write_files
from din.shared.bus.kafka import BROKER_USER, OPERATOR, KafkaAccess
from din.shared.topology import PoolSpec, SiteSpec, Topology, load_topology
from din.stack.brokers import REPO_ROOT
from din.stack.launcher import DEFAULT_TOPOLOGY, EXECUTOR, ServiceInstance, service_instances

NAMESPACE = "din"
MANIFEST_DIR = "ops/kubernetes"
ELASTIC_TOPOLOGY = REPO_ROOT / "ops" / "topology" / "elastic.yaml"
MANIFESTS = {"din.yaml": DEFAULT_TOPOLOGY, "elastic.yaml": ELASTIC_TOPOLOGY}
"""Each committed manifest (under ``MANIFEST_DIR``) and the topology it is rendered from."""
KEDA_SCALEDOBJECT_CRD = f"{MANIFEST_DIR}/crds/keda.sh_scaledobjects.yaml"
"""KEDA's ScaledObject CRD, vendored: the tests validate every ScaledObject against its schema."""

KEYS_SECRET = "din-keys"
"""The Secret of DIN's key folder (``din compose init``'s ``din-keys`` volume): one entry per file, named by its
path under ``CONTAINER_RUN`` (``secret_key``); each pod projects only the files its environment names."""
KAFKA_BUS_SECRET = "kafka-bus"
KAFKA_INIT = "kafka-init"
PROMETHEUS = "prometheus"
PROMETHEUS_PORT = 9090
PROMETHEUS_URL = f"http://{PROMETHEUS}.{NAMESPACE}.svc:{PROMETHEUS_PORT}"
"""Where KEDA's operator (in its own namespace) queries Prometheus."""
POOL_GAUGE = "din_pool_desired_executors"
"""Telemetry's gauge of the autoscaler's decision, one series per (site, pool)."""
POD_INDEX_LABEL = "apps.kubernetes.io/pod-index"
"""The label a StatefulSet sets on each pod: its ordinal (from ``spec.ordinals.start``)."""
POD_INDEX_ENV = "POD_INDEX"
DRAIN_GRACE_S = 60
"""Seconds an executor has between SIGTERM and SIGKILL: it announces draining, finishes its queue, exits."""
NATS_STORAGE = "3Gi"
"""A NATS server's volume: its JetStream file store (``max_file_store: 2GB``) and room."""
KAFKA_STORAGE = "10Gi"
PART_OF = {"app.kubernetes.io/part-of": "din"}
_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")


class _BlockText(yaml.SafeDumper):
    """YAML whose multi-line strings (configs, scripts, rules) read as they are: literal blocks."""


def _text(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_BlockText.add_representer(str, _text)


def container_path(path: Path) -> PurePosixPath:
    """Where DIN's image holds a file of the checkout (``/app/<relative path>``)."""
    return APP_DIR / Path(path).resolve().relative_to(REPO_ROOT).as_posix()


def secret_key(relative: str) -> str:
    """The ``din-keys`` entry of the file at ``relative`` under ``CONTAINER_RUN``: its path with ``/`` as ``__``
    (a Secret's keys may not hold a slash)."""
    return relative.replace("/", "__")


def _name(value: str) -> str:
    if not _DNS_LABEL.match(value):
        raise ValueError(f"{value!r} is not a Kubernetes name (lowercase letters, digits and '-', at most 63, "
                         "starting with a letter): rename the site, pool or executor in the topology")
    return value


def _meta(name: str, component: str, **labels: str) -> dict:
    return {"name": _name(name), "namespace": NAMESPACE,
            "labels": {**PART_OF, "app.kubernetes.io/name": name, "app.kubernetes.io/component": component,
                       **labels}}


def _selector(name: str) -> dict:
    return {"matchLabels": {"app.kubernetes.io/name": name}}


def _env_list(env: dict[str, str]) -> list[dict]:
    return [{"name": key, "value": value} for key, value in env.items()]


def _restricted(uid: int) -> tuple[dict, dict]:
    """The pod's and its container's security context: a fixed non-root user, no privilege, default seccomp."""
    pod = {"runAsNonRoot": True, "runAsUser": uid, "runAsGroup": uid, "fsGroup": uid,
           "seccompProfile": {"type": "RuntimeDefault"}}
    container = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    return pod, container


def _exec_probe(command: list[str], *, period: int = 10, timeout: int = 5, failures: int = 3) -> dict:
    return {"exec": {"command": command}, "periodSeconds": period, "timeoutSeconds": timeout,
            "failureThreshold": failures}


def _service(name: str, component: str, ports: dict[str, int], *, selector: str | None = None) -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": _meta(name, component),
            "spec": {"selector": {"app.kubernetes.io/name": selector or name},
                     "ports": [{"name": port_name, "port": port, "targetPort": port}
                               for port_name, port in ports.items()]}}


def _claim(size: str) -> dict:
    return {"metadata": {"name": "data"},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": size}}}}


# --------------------------------------------------------------------------- NATS and Kafka


def kubernetes_nats_config(topology: Topology, site: str) -> str:
    """Compose's nats-server config of ``site`` (``din.compose.nats_config``), with a leaf dialing the hub's
    Service ``nats-<hub>`` at its leafnode port: the cluster has no WAN proxy."""
    text = nats_config(topology, site)
    if site == topology.hub.name:
        return text
    link = next(link for link in compose_wan_links(topology) if link.site == site)
    proxied = f"tls://{WAN_PROXY_HOST}:{link.listen_port}"
    if proxied not in text:
        raise ValueError(f"NATS config of {site} does not dial {proxied}: din.compose.nats_config changed")
    return text.replace(proxied, f"tls://{nats_host(topology.hub.name)}:{PORTS.leafnode}")


def nats_objects(topology: Topology, site: SiteSpec) -> list[dict]:
    """A site's NATS server: its config, StatefulSet and Service (client port; the hub's leafnode port too)."""
    name = nats_host(site.name)
    config = f"{name}-config"
    ports = {"client": PORTS.hub_client}
    if site.name == topology.hub.name:
        ports["leafnodes"] = PORTS.leafnode
    pod_security, container_security = _restricted(NATS_UID)
    container = {
        "name": "nats",
        "image": NATS_IMAGE,
        "args": ["-c", str(NATS_CONF_IN_CONTAINER)],
        "ports": [{"name": port_name, "containerPort": port} for port_name, port in ports.items()],
        "volumeMounts": [
            {"name": "config", "mountPath": str(NATS_CONF_IN_CONTAINER), "subPath": NATS_CONF_IN_CONTAINER.name,
             "readOnly": True},
            {"name": "bus", "mountPath": str(NATS_BUS), "readOnly": True},
            {"name": "data", "mountPath": str(NATS_DATA_DIR.parent)},
        ],
        # Monitoring listens on the pod's loopback only, as in compose: the probe runs inside the container.
        "readinessProbe": _exec_probe(["wget", "-q", "-O", "/dev/null",
                                       f"http://127.0.0.1:{PORTS.hub_monitor}/healthz"]),
        "securityContext": container_security,
    }
    return [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(config, "nats", **{"din.site": site.name}),
         "data": {NATS_CONF_IN_CONTAINER.name: kubernetes_nats_config(topology, site.name)}},
        _service(name, "nats", ports),
        {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": _meta(name, "nats", **{"din.site": site.name}),
         "spec": {
             "serviceName": name,
             "replicas": 1,
             "selector": _selector(name),
             "template": {
                 "metadata": {"labels": _meta(name, "nats", **{"din.site": site.name})["labels"]},
                 "spec": {
                     "securityContext": pod_security,
                     "containers": [container],
                     "volumes": [
                         {"name": "config", "configMap": {"name": config}},
                         {"name": "bus", "secret": {"secretName": nats_bus_volume(site.name), "defaultMode": 0o440}},
                     ],
                 },
             },
             "volumeClaimTemplates": [_claim(NATS_STORAGE)],
         }},
    ]


def kafka_objects() -> list[dict]:
    """The KRaft broker: compose's start script (``din.compose.kafka_start_script``) in a ConfigMap, its
    StatefulSet reading the broker's files from the Secret ``kafka-bus``, and its Service ``kafka``."""
    script = f"{KAFKA_HOST}-start"
    pod_security, container_security = _restricted(KAFKA_UID)
    container = {
        "name": "kafka",
        "image": KAFKA_IMAGE,
        "command": ["sh", str(KAFKA_START_IN_CONTAINER)],
        "env": _env_list({"LOG_DIR": "/tmp/kafka-logs", "KAFKA_HEAP_OPTS": "-Xmx512m -Xms256m"}),
        "ports": [{"name": "kafka", "containerPort": PORTS.kafka}],
        "volumeMounts": [
            {"name": "start", "mountPath": str(KAFKA_START_IN_CONTAINER), "subPath": KAFKA_START_IN_CONTAINER.name,
             "readOnly": True},
            {"name": "bus", "mountPath": str(KAFKA_CONF), "readOnly": True},
            # The claim's root holds lost+found, which Kafka would take for a log directory: data goes below it.
            {"name": "data", "mountPath": str(KAFKA_DATA_DIR.parent)},
        ],
        "readinessProbe": {"tcpSocket": {"port": PORTS.kafka}, "periodSeconds": 10, "failureThreshold": 12},
        "securityContext": container_security,
    }
    return [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(script, "kafka"),
         "data": {KAFKA_START_IN_CONTAINER.name: kafka_start_script()}},
        _service(KAFKA_HOST, "kafka", {"kafka": PORTS.kafka}),
        {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": _meta(KAFKA_HOST, "kafka"),
         "spec": {
             "serviceName": KAFKA_HOST,
             "replicas": 1,
             "selector": _selector(KAFKA_HOST),
             "template": {
                 "metadata": {"labels": _meta(KAFKA_HOST, "kafka")["labels"]},
                 "spec": {
                     "securityContext": pod_security,
                     "containers": [container],
                     "volumes": [
                         {"name": "start", "configMap": {"name": script}},
                         {"name": "bus", "secret": {"secretName": KAFKA_BUS_SECRET, "defaultMode": 0o440}},
                     ],
                 },
             },
             "volumeClaimTemplates": [_claim(KAFKA_STORAGE)],
         }},
    ]


# --------------------------------------------------------------------------- DIN's pods


def _keys_volume(paths: list[str]) -> dict:
    """The pod's share of ``din-keys``: the files under ``CONTAINER_RUN`` that ``paths`` name."""
    relative = sorted({PurePosixPath(p).relative_to(CONTAINER_RUN).as_posix() for p in paths})
    return {"name": "keys", "secret": {"secretName": KEYS_SECRET, "defaultMode": 0o440,
                                       "items": [{"key": secret_key(rel), "path": rel} for rel in relative]}}


def _run_paths(env: dict[str, str]) -> list[str]:
    return [value for value in env.values() if value.startswith(f"{CONTAINER_RUN}/")]


def _din_pod(inst: ServiceInstance, env: list[dict], files: list[str], probe: list[str], *,
             grace_s: int | None = None) -> dict:
    """The pod of one DIN process: DIN's image, ``python -m din.services.<kind>``, its key files, its health."""
    pod_security, container_security = _restricted(DIN_UID)
    container = {
        "name": inst.service,
        "image": DIN_IMAGE,
        "imagePullPolicy": "IfNotPresent",
        "command": ["python", "-m", f"din.services.{inst.service}"],
        "env": env,
        "volumeMounts": [{"name": "keys", "mountPath": str(CONTAINER_RUN), "readOnly": True}],
        "readinessProbe": _exec_probe(probe, period=30, timeout=10),
        "securityContext": container_security,
    }
    spec = {"securityContext": pod_security, "containers": [container],
            "volumes": [_keys_volume([*files, str(PROBE_CREDS)])]}
    if grace_s is not None:
        spec["terminationGracePeriodSeconds"] = grace_s
    return spec


def _probe(inst: ServiceInstance) -> list[str]:
    """Compose's healthcheck of ``inst`` (``din.probe`` on its health subject), as an exec probe."""
    test = din_healthcheck(inst)["test"]
    return test[1:] if test[0] == "CMD" else test


def kubernetes_environments(topology: Topology, topology_path: Path, *, pools: bool = False) -> dict[str, dict[str,
                                                                                                          str]]:
    """Compose's environment of every service instance (``compose_environments``: the Service host names are the
    compose ones, the paths the image's and the ``din-keys`` mount's), reading ``topology_path`` from the image
    (``pools``: of every pool executor instead). Given no run folder, the autoscaler runs with the Kubernetes
    provider: it decides and records, KEDA starts and stops the pods."""
    return compose_environments(topology, topology_path=container_path(topology_path), pools=pools)


def _in_pool(topology: Topology, inst: ServiceInstance) -> bool:
    return inst.service == EXECUTOR and topology.pool_of(inst.instance) is not None


def service_workloads(topology: Topology, topology_path: Path) -> list[dict]:
    """A Deployment of one pod per service instance (fixed executors included; pool executors are their pool's),
    with the Services of telemetry's metrics and each gateway."""
    envs = kubernetes_environments(topology, topology_path)
    objects = []
    for inst in service_instances(topology):
        if _in_pool(topology, inst):
            continue
        env = envs[inst.name]
        labels = {"din.site": inst.site}
        grace = DRAIN_GRACE_S if inst.service == EXECUTOR else None
        objects.append({
            "apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(inst.name, inst.service, **labels),
            "spec": {
                "replicas": 1,
                # One process per name (its NATS user, its instance id): the old pod is gone before the new starts.
                "strategy": {"type": "Recreate"},
                "selector": _selector(inst.name),
                "template": {
                    "metadata": {"labels": _meta(inst.name, inst.service, **labels)["labels"]},
                    "spec": _din_pod(inst, _env_list(env), _run_paths(env), _probe(inst), grace_s=grace),
                },
            },
        })
        if inst.service == "telemetry":
            objects.append(_service(inst.name, inst.service, {"metrics": int(env["DIN_TELEMETRY_METRICS_PORT"])}))
        if inst.service == "gateway":
            objects.append(_service(inst.name, inst.service, {"http": int(env["DIN_GATEWAY_HTTP_PORT"]),
                                                               "grpc": int(env["DIN_GATEWAY_GRPC_PORT"])}))
    return objects


def kafka_init_job(topology_path: Path) -> dict:
    """Compose's ``kafka-init`` step as a Job: DIN's ACLs (as the broker's super user) and the recorded topics (as
    the operator), retried until the broker answers."""
    access = KafkaAccess(f"{KAFKA_HOST}:{PORTS.kafka}", Path(CONTAINER_RUN / "keys" / "bus"))
    files = [str(PurePosixPath(p)) for user in (BROKER_USER, OPERATOR)
             for p in (access.login(user).password_file, access.login(user).ca_file)]
    pod_security, container_security = _restricted(DIN_UID)
    return {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": _meta(KAFKA_INIT, "kafka"),
        "spec": {
            "backoffLimit": 10,
            "template": {
                "metadata": {"labels": _meta(KAFKA_INIT, "kafka")["labels"]},
                "spec": {
                    "restartPolicy": "OnFailure",
                    "securityContext": pod_security,
                    "containers": [{
                        "name": KAFKA_INIT,
                        "image": DIN_IMAGE,
                        "imagePullPolicy": "IfNotPresent",
                        "command": ["din", "compose", "prepare-kafka", "--topology",
                                    str(container_path(topology_path))],
                        "volumeMounts": [{"name": "keys", "mountPath": str(CONTAINER_RUN), "readOnly": True}],
                        "securityContext": container_security,
                    }],
                    "volumes": [_keys_volume(files)],
                },
            },
        },
    }


# --------------------------------------------------------------------------- pools


def pool_name(site: str, pool: PoolSpec) -> str:
    """The pool's StatefulSet and ScaledObject: ``executor-<site>-<pool>``; its pod ``n`` is
    ``executor-<site>-<pool>-<n>``, the process name ``din up`` gives executor ``<site>-<pool>-<n>``."""
    return f"{EXECUTOR}-{site}-{pool.name}"


def pool_template(topology: Topology, topology_path: Path, site: str, pool: PoolSpec) -> tuple[list[dict], list[str],
                                                                                                 list[str]]:
    """The environment every pod of the pool runs with, its key files and probe: each slot's own environment with
    its executor id spelled ``<site>-<pool>-$(POD_INDEX)``, so a pod takes its id (and so its NATS credentials)
    from its ordinal. Every slot must give the same template, else this raises."""
    envs = kubernetes_environments(topology, topology_path, pools=True)
    placeholder = f"{site}-{pool.name}-$({POD_INDEX_ENV})"
    templates, files = [], set()
    for n in range(1, pool.max + 1):
        executor_id = pool.executor_id(site, n)
        inst = ServiceInstance(f"{EXECUTOR}-{executor_id}", EXECUTOR, site, executor_id)
        env = envs[inst.name]
        files.update(_run_paths(env))
        templates.append(({k: v.replace(executor_id, placeholder) for k, v in env.items()},
                          [part.replace(executor_id, placeholder) for part in _probe(inst)]))
    if any(t != templates[0] for t in templates):
        raise ValueError(f"pool {site}/{pool.name}: its executors' environments differ beyond their id")
    env, probe = templates[0]
    index = {"name": POD_INDEX_ENV, "valueFrom": {"fieldRef": {"fieldPath": f"metadata.labels['{POD_INDEX_LABEL}']"}}}
    return [index, *_env_list(env)], sorted(files), probe


def pool_objects(topology: Topology, topology_path: Path, site: SiteSpec, pool: PoolSpec) -> list[dict]:
    """A pool's StatefulSet (ordinals from 1, pods started and stopped in parallel, each draining on SIGTERM)
    and the KEDA ScaledObject that sizes it to the autoscaler's decision."""
    name = pool_name(site.name, pool)
    labels = {"din.site": site.name, "din.pool": pool.name}
    env, files, probe = pool_template(topology, topology_path, site.name, pool)
    inst = ServiceInstance(name, EXECUTOR, site.name)
    statefulset = {
        "apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": _meta(name, EXECUTOR, **labels),
        "spec": {
            # No replicas: KEDA's HPA owns the count, and applying the manifest again must not reset it.
            "ordinals": {"start": 1},
            "podManagementPolicy": "Parallel",
            "selector": _selector(name),
            "template": {
                "metadata": {"labels": _meta(name, EXECUTOR, **labels)["labels"]},
                "spec": _din_pod(inst, env, files, probe, grace_s=DRAIN_GRACE_S),
            },
        },
    }
    return [statefulset, scaled_object(topology, site.name, pool)]


def pool_query(site: str, pool: PoolSpec) -> str:
    """The pool's desired size in Prometheus: the autoscaler's decision, exported by telemetry."""
    return f'max({POOL_GAUGE}{{site="{site}",pool="{pool.name}"}})'


def scaled_object(topology: Topology, site: str, pool: PoolSpec) -> dict:
    """KEDA's Prometheus scaler on the pool's StatefulSet, making replicas equal the autoscaler's decision.

    ``AverageValue`` with threshold 1: the HPA runs ``ceil(desired / 1)`` pods. ``activationThreshold`` 0: a pool
    with min 0 wakes when the decision is 1 or more, and sleeps when it is 0. The autoscaler already applies the
    topology's hysteresis and cool-downs, so the HPA adds no stabilization window of its own and may move any
    number of pods in one step. When Prometheus fails or has no decision (``ignoreNullValues`` false), the pool
    keeps its current size (fallback ``currentReplicas``) rather than fall to its minimum.
    """
    name = pool_name(site, pool)
    step = [{"type": "Pods", "value": pool.max, "periodSeconds": 15}]
    return {
        "apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject",
        "metadata": _meta(name, EXECUTOR, **{"din.site": site, "din.pool": pool.name}),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": name},
            "minReplicaCount": pool.min,
            "maxReplicaCount": pool.max,
            "pollingInterval": max(1, round(topology.scaling.interval_s)),
            "cooldownPeriod": max(1, round(topology.scaling.interval_s)),
            "fallback": {"failureThreshold": 3, "replicas": pool.min, "behavior": "currentReplicas"},
            "advanced": {"horizontalPodAutoscalerConfig": {"behavior": {
                "scaleUp": {"stabilizationWindowSeconds": 0, "policies": step},
                "scaleDown": {"stabilizationWindowSeconds": 0, "policies": step},
            }}},
            "triggers": [{
                "type": "prometheus",
                "metricType": "AverageValue",
                "metadata": {
                    "serverAddress": PROMETHEUS_URL,
                    "query": pool_query(site, pool),
                    "threshold": "1",
                    "activationThreshold": "0",
                    "ignoreNullValues": "false",
                },
            }],
        },
    }


# --------------------------------------------------------------------------- Prometheus


def prometheus_objects() -> list[dict]:
    """Prometheus with compose's scrape config (``ops/prometheus/prometheus.yml``: the target ``telemetry:9464``
    is the telemetry Service here too) labelled ``din_stack: kubernetes``, and DIN's rules."""
    config = yaml.safe_load((REPO_ROOT / PROMETHEUS_CONFIG).read_text())
    for job in config["scrape_configs"]:
        for target in job.get("static_configs", []):
            target.setdefault("labels", {})["din_stack"] = "kubernetes"
    rules = {p.name: p.read_text() for p in sorted((REPO_ROOT / PROMETHEUS_RULES).glob("*.yml"))}
    etc = PurePosixPath("/etc/prometheus")
    pod_security, container_security = _restricted(65534)  # nobody, as the image runs
    container = {
        "name": PROMETHEUS,
        "image": PROMETHEUS_IMAGE,
        "args": [f"--config.file={etc / 'prometheus.yml'}", "--storage.tsdb.path=/prometheus"],
        "ports": [{"name": "http", "containerPort": PROMETHEUS_PORT}],
        "volumeMounts": [{"name": "config", "mountPath": str(etc), "readOnly": True},
                         {"name": "data", "mountPath": "/prometheus"}],
        "readinessProbe": {"httpGet": {"path": "/-/ready", "port": PROMETHEUS_PORT}, "periodSeconds": 10},
        "securityContext": container_security,
    }
    items = [{"key": "prometheus.yml", "path": "prometheus.yml"}]
    items += [{"key": f"rules-{name}", "path": f"rules/{name}"} for name in rules]
    return [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(PROMETHEUS, PROMETHEUS),
         "data": {"prometheus.yml": yaml.safe_dump(config, sort_keys=False),
                  **{f"rules-{name}": text for name, text in rules.items()}}},
        _service(PROMETHEUS, PROMETHEUS, {"http": PROMETHEUS_PORT}),
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(PROMETHEUS, PROMETHEUS),
         "spec": {"replicas": 1, "selector": _selector(PROMETHEUS),
                  "template": {"metadata": {"labels": _meta(PROMETHEUS, PROMETHEUS)["labels"]},
                               "spec": {"securityContext": pod_security, "containers": [container],
                                        "volumes": [{"name": "config",
                                                     "configMap": {"name": PROMETHEUS, "items": items}},
                                                    {"name": "data", "emptyDir": {}}]}}}},
    ]


# --------------------------------------------------------------------------- the manifests


def kubernetes_objects(topology: Topology, topology_path: Path) -> list[dict]:
    """Every object of ``topology``'s deployment, in apply order (namespace, brokers, DIN, pools, Prometheus)."""
    if topology.hub.servers > 1:
        raise ValueError("a clustered hub (servers > 1) is not rendered for Kubernetes yet: use one server")
    hub = topology.hub.name
    objects: list[dict] = [{"apiVersion": "v1", "kind": "Namespace",
                            "metadata": {"name": NAMESPACE, "labels": dict(PART_OF)}}]
    for site in sorted(topology.sites, key=lambda s: s.name != hub):
        objects += nats_objects(topology, site)
    objects += kafka_objects()
    objects.append(kafka_init_job(topology_path))
    objects += service_workloads(topology, topology_path)
    for site in topology.sites:
        for pool in site.pools:
            objects += pool_objects(topology, topology_path, site, pool)
    objects += prometheus_objects()
    # Through JSON: plain data (no YAML anchors for shared values), exactly what the API server would take.
    return json.loads(json.dumps(objects))


def render_kubernetes(topology: Topology, topology_path: Path, manifest: str) -> dict[str, str]:
    """``{ops/kubernetes/<manifest>: text}``: ``topology``'s objects as one multi-document YAML file."""
    source = Path(topology_path).resolve().relative_to(REPO_ROOT).as_posix()
    header = (
        f"# Generated by `din manifests` from {source} and din.stack.launcher.service_environments.\n"
        "# Do not edit: change those and rerun `din manifests`. No secret is in here: create them first\n"
        "# (`din manifests secrets`, see ops/kubernetes/README.md), then `kubectl apply -f` this file.\n"
    )
    documents = yaml.dump_all(kubernetes_objects(topology, topology_path), Dumper=_BlockText, sort_keys=False,
                              width=120)
    return {f"{MANIFEST_DIR}/{manifest}": header + documents}


def render_manifests() -> dict[str, str]:
    """Every committed manifest (``MANIFESTS``), keyed by its path relative to the repository root."""
    files: dict[str, str] = {}
    for manifest, path in MANIFESTS.items():
        files.update(render_kubernetes(load_topology(path), path, manifest))
    return files


def write_manifests(root: Path = REPO_ROOT) -> list[Path]:
    """Write every manifest under ``root``, removing stale ones; return the paths written."""
    root, files = Path(root), render_manifests()
    return write_files(root, files, stale_files(root, MANIFEST_DIR, "*.yaml", files))


def drifted(root: Path = REPO_ROOT) -> list[str]:
    """Relative paths whose committed content differs from a fresh render (missing and stale manifests too)."""
    root, files = Path(root), render_manifests()
    return drifted_files(root, files, stale_files(root, MANIFEST_DIR, "*.yaml", files))


# --------------------------------------------------------------------------- secrets (the operator's, never committed)


def mounted_key_files(objects: list[dict]) -> list[str]:
    """Every file of ``din-keys`` some pod of ``objects`` mounts, relative to ``CONTAINER_RUN``."""
    out = set()
    for obj in objects:
        pod = obj.get("spec", {}).get("template", {}).get("spec", {})
        for volume in pod.get("volumes", []):
            if volume.get("secret", {}).get("secretName") == KEYS_SECRET:
                out.update(item["path"] for item in volume["secret"]["items"])
    return sorted(out)


def _secret(name: str, files: dict[str, bytes]) -> dict:
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": name, "namespace": NAMESPACE, "labels": dict(PART_OF)},
            "data": {key: base64.b64encode(value).decode() for key, value in sorted(files.items())}}


def secret_objects(topology: Topology, topology_path: Path, run_dir: Path, init_dir: Path) -> list[dict]:
    """The Secrets the manifests reference, from what ``din compose init`` wrote (``run_dir``: the key folder;
    ``init_dir``: each server's share): ``din-keys`` with only the files some pod mounts (no CA key, no operator
    seed), ``nats-<site>-bus`` per site and ``kafka-bus``. Raises naming a file the pods need that is missing."""
    needed = mounted_key_files(kubernetes_objects(topology, topology_path))
    missing = [rel for rel in needed if not (run_dir / rel).is_file()]
    if missing:
        raise ValueError(f"din compose init wrote no {', '.join(missing)} (in {run_dir})")
    objects = [_secret(KEYS_SECRET, {secret_key(rel): (run_dir / rel).read_bytes() for rel in needed})]
    for volume in [*(nats_bus_volume(site.name) for site in topology.sites), KAFKA_BUS_SECRET]:
        folder = init_dir / volume
        objects.append(_secret(volume, {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}))
    return objects


def write_secrets(topology_path: Path, out_dir: Path) -> Path:
    """Make (or complete: existing keys are kept) a deployment's secrets in ``out_dir`` with ``din compose
    init``'s code and write them as ``out_dir/secrets.yaml`` (mode 0600) for ``kubectl apply``; return its path."""
    from din.compose import init_compose
    from din.shared.bus.files import write_secret

    topology_path = Path(topology_path).resolve()
    run_dir, init_dir = Path(out_dir) / "run", Path(out_dir) / "init"
    init_compose(topology_path, run_dir=run_dir, init_dir=init_dir, chown=False)
    objects = secret_objects(load_topology(topology_path), topology_path, run_dir, init_dir)
    target = Path(out_dir) / "secrets.yaml"
    write_secret(target, yaml.safe_dump_all(objects, sort_keys=False))
    return target
