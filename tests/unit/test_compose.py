"""docker-compose.yml runs what `din up` runs: the same processes, environments, ports and NATS mesh."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import yaml
from pydantic import AliasChoices

from din.compose import drifted
from din.stack.brokers import REPO_ROOT
from din.stack.launcher import DEFAULT_TOPOLOGY, SERVICE_KINDS, service_environments, service_instances
from services.admission.settings import AdmissionSettings
from services.classifier.settings import ClassifierSettings
from services.executor.settings import ExecutorSettings
from services.keymanager.settings import KeyManagerSettings
from services.scheduler.settings import SchedulerSettings
from services.telemetry.settings import TelemetrySettings
from shared.credentials import read_credentials
from shared.topology import load_topology

SETTINGS = {
    "admission": AdmissionSettings,
    "classifier": ClassifierSettings,
    "executor": ExecutorSettings,
    "keymanager": KeyManagerSettings,
    "scheduler": SchedulerSettings,
    "telemetry": TelemetrySettings,
}
APP_DIR = "/app"


@pytest.fixture(scope="module")
def topology():
    return load_topology(DEFAULT_TOPOLOGY)


@pytest.fixture(scope="module")
def services() -> dict[str, dict]:
    return yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())["services"]


def _nats_conf(service: dict) -> tuple[str, str]:
    """(site, config text) of a NATS compose service, from its mounted config file."""
    for volume in service["volumes"]:
        source = volume.split(":")[0]
        if source.endswith(".conf"):
            return Path(source).stem, (REPO_ROOT / source).read_text()
    raise AssertionError(f"no NATS config mounted in {service}")


@pytest.fixture(scope="module")
def nats_servers(services) -> dict[str, dict]:
    """Per site: compose host, config text, client port, leafnode listen port or remote."""
    servers = {}
    for host, service in services.items():
        if not service.get("image", "").startswith("nats:"):
            continue
        site, conf = _nats_conf(service)
        servers[site] = {
            "host": host,
            "conf": conf,
            "client_port": int(re.search(r"^listen: [\d.]+:(\d+)$", conf, re.M).group(1)),
            "leaf_listen": re.search(r"^\s+listen: [\d.]+:(\d+)$", conf, re.M),
            "remote": re.search(r'url: "nats-leaf://([\w-]+):(\d+)"', conf),
        }
    return servers


@pytest.fixture(scope="module")
def expected_envs(topology, services, nats_servers) -> dict[str, dict[str, str]]:
    kafka_env = services["kafka"]["environment"]
    bootstrap = kafka_env["KAFKA_ADVERTISED_LISTENERS"].removeprefix("PLAINTEXT://")
    credentials = services["admission"]["volumes"][0].split(":")[1]
    return service_environments(
        topology,
        nats_urls={site: f"nats://{s['host']}:{s['client_port']}" for site, s in nats_servers.items()},
        kafka_bootstrap=bootstrap,
        topology_path=f"{APP_DIR}/{DEFAULT_TOPOLOGY.relative_to(REPO_ROOT).as_posix()}",
        credentials_path=credentials,
        model_repo=f"{APP_DIR}/.din/models",
        telemetry_metrics_port=9464,
        telemetry_metrics_host="0.0.0.0",
    )


def test_compose_matches_a_fresh_render():
    assert drifted() == [], "docker-compose.yml or its configs drifted: run `din compose` and commit the result"


def test_every_service_instance_runs(topology, services):
    for inst in service_instances(topology):
        assert inst.name in services, f"{inst.name} missing from docker-compose.yml"
        service = services[inst.name]
        assert service["command"] == ["python", "-m", f"services.{inst.service}"]
        assert (REPO_ROOT / "services" / inst.service / "__main__.py").is_file()
        assert "build" in service and (REPO_ROOT / service["build"]["dockerfile"]).is_file()


def test_environments_are_those_of_din_up(topology, services, expected_envs):
    assert set(expected_envs) == {i.name for i in service_instances(topology)}
    for name, env in expected_envs.items():
        assert services[name]["environment"] == env, name


def _known_variables(settings_cls) -> set[str]:
    prefix = settings_cls.model_config.get("env_prefix", "")
    names = set()
    for field_name, field in settings_cls.model_fields.items():
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            names.update(str(choice).upper() for choice in alias.choices)
        elif isinstance(alias, str):
            names.add(alias.upper())
        else:
            names.add(f"{prefix}{field_name}".upper())
    return names


def _settings_from(settings_cls, env: dict[str, str], monkeypatch):
    """``settings_cls`` loaded from exactly ``env``, as the container's process would load it."""
    for key in [k for k in os.environ if k.startswith("DIN_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return settings_cls()


def test_every_variable_is_read_by_a_settings_class(topology, services, monkeypatch):
    assert set(SETTINGS) == set(SERVICE_KINDS)
    # service_environments hands the topology and model repository to every process; some kinds ignore them.
    every_process = {"DIN_TOPOLOGY", "DIN_MODEL_REPO"}
    assert every_process <= set().union(*(_known_variables(cls) for cls in SETTINGS.values()))
    for inst in service_instances(topology):
        env = services[inst.name]["environment"]
        settings_cls = SETTINGS[inst.service]
        unknown = set(env) - _known_variables(settings_cls) - every_process
        assert not unknown, f"{inst.name}: {sorted(unknown)} not read by {settings_cls.__name__}"
        assert _settings_from(settings_cls, env, monkeypatch).site == inst.site


def test_published_ports(topology, services, nats_servers):
    hub = nats_servers[topology.hub.name]
    assert f"{hub['client_port']}:{hub['client_port']}" in services[hub["host"]]["ports"]
    port = services["telemetry"]["environment"]["DIN_TELEMETRY_METRICS_PORT"]
    assert f"{port}:{port}" in services["telemetry"]["ports"]


def test_leaves_dial_the_hub_leafnode_port(topology, nats_servers):
    assert set(nats_servers) == {s.name for s in topology.sites}
    hub = nats_servers[topology.hub.name]
    assert hub["leaf_listen"] and not hub["remote"]
    for site in topology.sites:
        server = nats_servers[site.name]
        assert f'domain: "{site.name}"' in server["conf"]
        if site.role == "edge":
            assert server["remote"], f"leaf {site.name} has no remote"
            assert server["remote"].group(1) == hub["host"]
            assert server["remote"].group(2) == hub["leaf_listen"].group(1)


def test_services_wait_for_their_site_nats(topology, services, nats_servers):
    for inst in service_instances(topology):
        depends = services[inst.name]["depends_on"]
        assert depends[nats_servers[inst.site]["host"]]["condition"] == "service_healthy"
        assert "healthcheck" in services[nats_servers[inst.site]["host"]]


def test_mounted_credentials_cover_every_tenant(topology, services):
    source, target = services["admission"]["volumes"][0].split(":")[:2]
    assert target == services["admission"]["environment"]["DIN_ADMISSION_CREDENTIALS_FILE"]
    assert set(read_credentials(REPO_ROOT / source)) == {t.name for t in topology.tenants}


def test_image_holds_the_paths_the_environment_names(services):
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    assert "FROM python:3.11-slim" in dockerfile
    env = services["admission"]["environment"]
    topology_rel = env["DIN_TOPOLOGY"].removeprefix(f"{APP_DIR}/")
    assert (REPO_ROOT / topology_rel).is_file()
    assert f"COPY {Path(topology_rel).parent.as_posix()} " in dockerfile
    assert "build_zoo" in dockerfile and env["DIN_MODEL_REPO"] in dockerfile


def test_telemetry_metrics_reachable_from_other_containers(services, monkeypatch):
    settings = _settings_from(TelemetrySettings, services["telemetry"]["environment"], monkeypatch)
    host = getattr(settings, "metrics_host", None)
    assert host not in ("127.0.0.1", "localhost", "::1"), (
        f"telemetry binds /metrics to {host} in docker-compose.yml, out of Prometheus' and the host's reach: "
        "service_environments must set DIN_TELEMETRY_METRICS_HOST (0.0.0.0 for compose), then run `din compose`"
    )


def test_key_files_are_made_once_and_mounted_read_only_into_every_din_service(topology, services):
    init = services["keys-init"]
    assert "din keys init" in init["command"][-1] and "/run/din/keys" in init["command"][-1]
    for inst in service_instances(topology):
        service = services[inst.name]
        assert "din-keys:/run/din/keys:ro" in service["volumes"], inst.name
        assert service["depends_on"]["keys-init"] == {"condition": "service_completed_successfully"}
        for name, value in service["environment"].items():
            if name.endswith("KEY_FILE") or name.endswith("KEYSTORE"):
                assert value.startswith("/run/din/keys/"), (inst.name, name)
