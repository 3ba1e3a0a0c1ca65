"""docker-compose.yml runs what `din up` runs: the same processes, environments, ports and closed NATS mesh and
Kafka; published ports on loopback, every secret made by the init step, every DIN service health-checked."""

from __future__ import annotations

import argparse
import os
import re
import stat
import subprocess
from pathlib import Path

import pytest
import yaml
from pydantic import AliasChoices

from din.cli import build_parser
from din.compose import (
    GRAFANA_PASSWORD,
    INIT_DIR,
    TOXIPROXY_DIR,
    WAN_PROXY_HOST,
    init_compose,
    init_volumes,
    nats_bus_volume,
    probe_permissions,
)
from din.compose import drifted as compose_drifted
from din.probe import PROBE_USER, connect_options
from din.services.admission.settings import AdmissionSettings
from din.services.autoscaler.settings import AutoscalerSettings
from din.services.classifier.settings import ClassifierSettings
from din.services.executor.settings import ExecutorSettings
from din.services.gateway.settings import GatewaySettings
from din.services.keymanager.settings import KeyManagerSettings
from din.services.scheduler.settings import SchedulerSettings
from din.services.telemetry.settings import TelemetrySettings
from din.shared.bus.kafka import BROKER_USER, USERS
from din.shared.bus.permissions import service_inbox
from din.shared.credentials import read_credentials
from din.shared.naming import Subjects
from din.shared.topology import load_topology
from din.stack.brokers import REPO_ROOT, nats_server_binary
from din.stack.launcher import DEFAULT_TOPOLOGY, SERVICE_KINDS, service_environments, service_instances
from din.stack.wan import TOXIPROXY_VERSION, toxics_for

SETTINGS = {
    "admission": AdmissionSettings,
    "classifier": ClassifierSettings,
    "executor": ExecutorSettings,
    "keymanager": KeyManagerSettings,
    "scheduler": SchedulerSettings,
    "telemetry": TelemetrySettings,
    "gateway": GatewaySettings,
    "autoscaler": AutoscalerSettings,
}
APP_DIR = "/app"
BIND = "${DIN_BIND_ADDRESS:-127.0.0.1}"
RUN = "/run/din"
ONE_SHOT = ("keys-init", "kafka-init", "links-init")


@pytest.fixture(scope="module")
def topology():
    return load_topology(DEFAULT_TOPOLOGY)


@pytest.fixture(scope="module")
def services() -> dict[str, dict]:
    return yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())["services"]


@pytest.fixture(scope="module")
def init_out(tmp_path_factory) -> tuple[Path, Path]:
    """(run dir, init dir): what the keys-init container writes, here without handing files to other users."""
    root = tmp_path_factory.mktemp("compose-init")
    init_compose(DEFAULT_TOPOLOGY, run_dir=root / "run", init_dir=root / "init", chown=False)
    return root / "run", root / "init"


def in_init(init_out, container_path: str) -> Path:
    """Where a path of DIN's containers (under /run/din) or of the init's volume mounts lies in ``init_out``."""
    run, init = init_out
    if container_path.startswith(f"{INIT_DIR}/"):
        return init / container_path.removeprefix(f"{INIT_DIR}/")
    assert container_path.startswith(f"{RUN}/"), container_path
    return run / container_path.removeprefix(f"{RUN}/")


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
            "service": service,
            "conf": conf,
            "client_port": int(re.search(r"^listen: [\d.]+:(\d+)$", conf, re.M).group(1)),
            "leaf_listen": re.search(r"^\s+listen: [\d.]+:(\d+)$", conf, re.M),
            "remote": re.search(r'url: "(\w[\w-]*)://([\w-]+):(\d+)"', conf),
        }
    return servers


@pytest.fixture(scope="module")
def expected_envs(topology, services, nats_servers) -> dict[str, dict[str, str]]:
    bootstrap = services["kafka-init"]["depends_on"] and "kafka:9092"
    return service_environments(
        topology,
        nats_urls={site: f"tls://{s['host']}:{s['client_port']}" for site, s in nats_servers.items()},
        kafka_bootstrap=bootstrap,
        topology_path=f"{APP_DIR}/{DEFAULT_TOPOLOGY.relative_to(REPO_ROOT).as_posix()}",
        credentials_path=f"{RUN}/credentials.json",
        model_repo=f"{APP_DIR}/.din/models",
        telemetry_metrics_port=9464,
        telemetry_metrics_host="0.0.0.0",
        gateway_http_host="0.0.0.0",
        keys_dir=f"{RUN}/keys",
        kafka_bus_dir=f"{RUN}/keys/bus",
        bus_dir=f"{RUN}/keys/bus",
    )


def test_compose_matches_a_fresh_render():
    assert compose_drifted() == [], "docker-compose.yml or its configs drifted: run `din compose` and commit them"


def test_every_service_instance_runs(topology, services):
    for inst in service_instances(topology):
        assert inst.name in services, f"{inst.name} missing from docker-compose.yml"
        service = services[inst.name]
        assert service["command"] == ["python", "-m", f"din.services.{inst.service}"]
        assert (REPO_ROOT / "services" / inst.service / "__main__.py").is_file()
        assert "build" in service and (REPO_ROOT / service["build"]["dockerfile"]).is_file()


def test_environments_are_those_of_din_up_on_a_closed_bus(topology, services, expected_envs):
    assert set(expected_envs) == {i.name for i in service_instances(topology)}
    for name, env in expected_envs.items():
        assert services[name]["environment"] == env, name
        assert env["DIN_NATS_URL"].startswith("tls://"), name
        assert env["DIN_NATS_CREDS"].endswith(f"/users/{name}.creds"), name
        assert env["DIN_KAFKA_USER"] and env["DIN_KAFKA_PASSWORD_FILE"] and env["DIN_BUS_CA_FILE"], name


def test_every_file_a_din_service_names_is_made_by_the_init(topology, services, init_out):
    for inst in service_instances(topology):
        env = services[inst.name]["environment"]
        named = [v for k, v in env.items() if k.endswith(("_FILE", "_CREDS", "_KEYSTORE"))]
        assert len(named) >= 3, (inst.name, named)
        for path in named:
            assert in_init(init_out, path).is_file(), (inst.name, path)
    assert set(read_credentials(in_init(init_out, f"{RUN}/credentials.json"))) == {t.name for t in topology.tenants}


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


def _interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ``${NAME:-default}`` substitution."""
    return re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: env.get(m.group(1)) or m.group(2), text)


def test_published_ports_bind_loopback_unless_the_operator_sets_an_address(topology, services, nats_servers):
    published = {}
    for name, service in services.items():
        for entry in service.get("ports", []):
            assert isinstance(entry, str) and entry.startswith(f"{BIND}:"), (name, entry)
            address, host_port, container_port = _interpolate(entry, {}).rsplit(":", 2)
            assert address == "127.0.0.1", (name, entry)
            assert _interpolate(entry, {"DIN_BIND_ADDRESS": "10.0.0.5"}).startswith("10.0.0.5:")
            published[name] = int(container_port)
    hub = nats_servers[topology.hub.name]
    port = int(services["telemetry"]["environment"]["DIN_TELEMETRY_METRICS_PORT"])
    gateways = {inst.name: int(services[inst.name]["environment"]["DIN_GATEWAY_GRPC_PORT"])
                for inst in service_instances(topology) if inst.service == "gateway"}
    assert published == {hub["host"]: hub["client_port"], "telemetry": port, "prometheus": 9090, "grafana": 3000,
                         **gateways}


def test_nats_configs_include_the_trust_file_relative_to_the_config(nats_servers, services):
    for site, server in nats_servers.items():
        mounts = dict(v.split(":")[:2] for v in server["service"]["volumes"])
        config_target = mounts[f"./ops/compose/nats/{site}.conf"]
        includes = re.findall(r'^include "([^"]+)"$', server["conf"], re.M)
        assert includes and includes[0] == "bus/trust.conf", site
        for include in includes:
            assert not include.startswith("/"), f"{site}: nats-server resolves includes relative to the config"
            resolved = (Path(config_target).parent / include).as_posix()
            assert Path(resolved).parent.as_posix() == mounts[nats_bus_volume(site)], (site, resolved)
        assert f"{nats_bus_volume(site)}:{mounts[nats_bus_volume(site)]}:ro" in server["service"]["volumes"]


def test_nats_uses_tls_for_clients_and_leafnodes_and_monitors_on_loopback(topology, nats_servers):
    for site, server in nats_servers.items():
        conf = server["conf"]
        top_level = re.search(r"^tls \{\n(.*?)\n\}", conf, re.M | re.S)
        assert top_level and "cert_file" in top_level.group(1) and "key_file" in top_level.group(1), site
        assert re.search(r"^http: 127\.0\.0\.1:\d+$", conf, re.M), f"{site}: monitoring must stay in its container"
        assert "nats-leaf://" not in conf and "authorization" not in conf and "no_auth_user" not in conf
        if site == topology.hub.name:
            leaf = conf[conf.index("leafnodes {"):]
            assert "no_advertise: true" in leaf and "cert_file" in leaf.split("tls {", 1)[1], site
        else:
            assert server["remote"].group(1) == "tls", site
            assert 'credentials: "/etc/nats/bus/leaf.creds"' in conf and 'ca_file: "/etc/nats/bus/ca.pem"' in conf
            assert "account: $DIN_ACCOUNT" in conf, f"{site}: the leaf binds the deployment's DIN account"


def test_nats_configs_load_with_the_files_the_init_writes(topology, nats_servers, init_out, tmp_path):
    _, init = init_out
    for site, server in nats_servers.items():
        folder = tmp_path / site
        (folder / "bus").mkdir(parents=True)
        for item in (init / nats_bus_volume(site)).iterdir():
            (folder / "bus" / item.name).write_bytes(item.read_bytes())
        conf = server["conf"].replace("/etc/nats/bus", str(folder / "bus")).replace(
            "/data/jetstream", str(folder / "js"))
        (folder / "nats.conf").write_text(conf)
        done = subprocess.run([nats_server_binary(), "-t", "-c", str(folder / "nats.conf")], capture_output=True,
                              text=True, timeout=30)
        assert done.returncode == 0, f"{site}: {done.stdout}{done.stderr}"


def test_leaves_dial_the_hub_through_their_wan_link_proxy(topology, nats_servers, services):
    assert set(nats_servers) == {s.name for s in topology.sites}
    hub = nats_servers[topology.hub.name]
    assert hub["leaf_listen"] and not hub["remote"]
    assert "no_advertise: true" in hub["conf"], "leaves would reconnect around their proxy"
    ports = set()
    for site in topology.sites:
        server = nats_servers[site.name]
        assert f'domain: "{site.name}"' in server["conf"]
        if site.role == "edge":
            assert server["remote"], f"leaf {site.name} has no remote"
            assert server["remote"].group(2) == WAN_PROXY_HOST, f"leaf {site.name} dials around the WAN proxy"
            ports.add(int(server["remote"].group(3)))
            assert server["service"]["depends_on"]["links-init"] == {"condition": "service_completed_successfully"}
    assert len(ports) == len(topology.sites) - 1, "each edge site has its own link"


def _links_apply(services) -> argparse.Namespace:
    """The links-init step's command line as `din` parses it."""
    command = services["links-init"]["command"]
    assert command[:3] == ["din", "links", "apply"]
    return build_parser().parse_args(command[1:])


def test_links_init_gives_every_leafs_proxy_the_topologys_conditions(topology, services, nats_servers):
    from din.commands.links import cmd_links_apply, topology_links

    args = _links_apply(services)
    assert args.handler is cmd_links_apply and args.toxiproxy == f"http://{WAN_PROXY_HOST}:8474"
    assert args.topology.as_posix() == f"{APP_DIR}/{DEFAULT_TOPOLOGY.relative_to(REPO_ROOT).as_posix()}"
    links = {link.site: link for link in topology_links(load_topology(DEFAULT_TOPOLOGY), listen_host=args.listen_host,
                                                         hub_host=args.hub_host)}
    hub = nats_servers[topology.hub.name]
    assert set(links) == {s.name for s in topology.sites if s.role == "edge"}
    for site, link in links.items():
        dialed = nats_servers[site]["remote"]
        assert link.proxy["listen"] == f"0.0.0.0:{dialed.group(3)}", f"{site}'s leaf dials a port nothing serves"
        assert link.proxy["upstream"] == f"{hub['host']}:{hub['leaf_listen'].group(1)}"
        assert link.conditions == topology.hub_link(site).conditions()
    assert any(t["type"] == "loss" for t in toxics_for(links["branch"].conditions).values())
    assert services["links-init"]["depends_on"] == {WAN_PROXY_HOST: {"condition": "service_healthy"}}


def test_the_wan_proxy_is_dins_toxiproxy_with_the_loss_toxic_unpublished(services):
    proxy = services[WAN_PROXY_HOST]
    assert proxy["build"] == {"context": f"./{TOXIPROXY_DIR}", "dockerfile": "Dockerfile"}
    assert not proxy["image"].startswith(("ghcr.io/shopify", "shopify/")), "the official image has no loss toxic"
    assert "ports" not in proxy, "the Toxiproxy API has no authentication: never published"
    assert proxy["command"] == ["-host", "0.0.0.0", "-port", "8474"] and proxy["user"] != "0"
    assert proxy["healthcheck"]["test"][-1] == "http://127.0.0.1:8474/version"
    folder = REPO_ROOT / TOXIPROXY_DIR
    dockerfile = (folder / "Dockerfile").read_text()
    assert "COPY go.mod go.sum ./" in dockerfile and "COPY *.go ./" in dockerfile
    assert f"Version={TOXIPROXY_VERSION}+din-loss" in dockerfile
    assert f"github.com/Shopify/toxiproxy/v2 {TOXIPROXY_VERSION}" in (folder / "go.mod").read_text()
    assert 'toxics.Register("loss"' in (folder / "loss.go").read_text()


def test_server_certificates_cover_their_compose_host_names(topology, init_out):
    from cryptography import x509

    _, init = init_out
    for site in topology.sites:
        cert = x509.load_pem_x509_certificate((init / nats_bus_volume(site.name) / "server.pem").read_bytes())
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = set(names.get_values_for_type(x509.DNSName))
        assert f"nats-{site.name}" in dns, site.name
        others = {f"nats-{s.name}" for s in topology.sites if s.name != site.name}
        assert not others & dns, f"{site.name}'s certificate speaks for another server"
        assert (WAN_PROXY_HOST in dns) == (site.name == topology.hub.name), "leaves verify the hub as the proxy"
    keystore = (init / "kafka-bus" / "keystore.pem").read_bytes()
    cert = x509.load_pem_x509_certificate(keystore[keystore.index(b"-----BEGIN CERTIFICATE"):])
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "kafka" in names.get_values_for_type(x509.DNSName)


def test_kafka_has_no_plaintext_listener_and_runs_the_authorizer(services, init_out):
    _, init = init_out
    kafka = services["kafka"]
    assert "PLAINTEXT" not in yaml.safe_dump(kafka)
    props = dict(line.split("=", 1) for line in (init / "kafka-bus" / "server.properties").read_text().splitlines())
    protocols = dict(item.split(":") for item in props["listener.security.protocol.map"].split(","))
    assert set(protocols.values()) == {"SASL_SSL"}
    for listener in props["listeners"].split(","):
        name, address = listener.split("://")
        assert protocols[name] == "SASL_SSL"
        if name == "CONTROLLER":
            assert address.startswith("127.0.0.1:"), "the controller listener stays in the container"
    assert props["advertised.listeners"] == "SASL_SSL://kafka:9092"
    assert props["authorizer.class.name"].endswith("StandardAuthorizer")
    assert props["allow.everyone.if.no.acl.found"] == "false"
    assert props["auto.create.topics.enable"] == "false"
    assert props["ssl.keystore.location"].startswith("/etc/kafka/din/")
    assert f"kafka-bus:{props['ssl.keystore.location'].rsplit('/', 1)[0]}:ro" in kafka["volumes"]
    args = (init / "kafka-bus" / "format.args").read_text().splitlines()
    assert args.count("--add-scram") == len(USERS) + 1
    assert any(f"name={BROKER_USER}," in a for a in args)
    script = (REPO_ROOT / "ops" / "compose" / "kafka" / "start.sh").read_text()
    assert "format.args" in script and "kafka-storage.sh format" in script and "exec " in script
    assert "--command-config" in kafka["healthcheck"]["test"][-1]


def test_kafka_init_prepares_acls_and_topics_before_any_din_service(topology, services):
    init = services["kafka-init"]
    assert init["command"][:3] == ["din", "compose", "prepare-kafka"]
    assert init["depends_on"]["kafka"] == {"condition": "service_healthy"}
    for inst in service_instances(topology):
        assert services[inst.name]["depends_on"]["kafka-init"] == {"condition": "service_completed_successfully"}


def test_services_wait_for_their_site_nats(topology, services, nats_servers):
    for inst in service_instances(topology):
        depends = services[inst.name]["depends_on"]
        assert depends[nats_servers[inst.site]["host"]]["condition"] == "service_healthy"
        assert "healthcheck" in services[nats_servers[inst.site]["host"]]


def test_every_din_service_has_a_healthcheck_on_its_health_subject(topology, services, init_out):
    for inst in service_instances(topology):
        test = services[inst.name]["healthcheck"]["test"]
        assert test[:4] == ["CMD", "python", "-m", "din.probe"], inst.name
        assert test[-1] == inst.health_subject, inst.name
        creds = test[test.index("--creds") + 1]
        assert creds.endswith(f"/{PROBE_USER}.creds") and in_init(init_out, creds).is_file()
    for name, service in services.items():
        if name not in ONE_SHOT and "tools" not in service.get("profiles", []):
            assert "healthcheck" in service, f"{name}: `docker compose up --wait` could not wait for it"


def test_the_probe_may_only_ask_health_subjects(topology):
    perms = probe_permissions()
    assert set(perms.publish) == {"din.v1.health.*", "din.v1.health.*.*"}
    assert perms.responses == 0
    for site in topology.sites:
        inbox = connect_options("tls://x:1", site.name, "creds", None)["inbox_prefix"]
        assert inbox == service_inbox(site.name, PROBE_USER)
        assert all(s.startswith("_DIN_INBOX.*.health-probe.") for s in perms.subscribe)
    assert Subjects.health("admission", "factory").startswith("din.v1.health.")


def test_grafana_requires_the_generated_password(services, init_out):
    grafana = services["grafana"]
    env = grafana["environment"]
    assert "GF_SECURITY_ADMIN_PASSWORD" not in env
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "false" and env["GF_USERS_ALLOW_SIGN_UP"] == "false"
    secret = env["GF_SECURITY_ADMIN_PASSWORD__FILE"]
    mount = next(v for v in grafana["volumes"] if v.startswith("grafana-secrets:"))
    assert mount.endswith(":ro") and secret.startswith(mount.split(":")[1] + "/")
    _, init = init_out
    password = init / "grafana-secrets" / GRAFANA_PASSWORD
    assert len(password.read_text().strip()) >= 24 and stat.S_IMODE(password.stat().st_mode) == 0o600


def test_init_hands_each_container_only_its_own_volume(topology, services):
    init = services["keys-init"]
    assert init["user"] == "0" and init["command"][:3] == ["din", "compose", "init"]
    mounted = {v.split(":")[0]: v.split(":")[1] for v in init["volumes"]}
    assert mounted["din-keys"] == RUN
    for volume in init_volumes(topology):
        assert mounted[volume] == f"{INIT_DIR}/{volume}"
    for name, service in services.items():
        if name in ONE_SHOT or name == "keys-init":
            continue
        volumes = [v.split(":")[0] for v in service.get("volumes", [])]
        if service.get("image", "").startswith(("nats:", "apache/kafka", "grafana/", "prom/")):
            assert "din-keys" not in volumes, f"{name} must not see DIN's keys"


def test_init_is_idempotent_and_writes_secrets_0600(tmp_path):
    run, init = tmp_path / "run", tmp_path / "init"
    init_compose(DEFAULT_TOPOLOGY, run_dir=run, init_dir=init, chown=False)
    before = {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}
    init_compose(DEFAULT_TOPOLOGY, run_dir=run, init_dir=init, chown=False)
    after = {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}
    assert before.keys() == after.keys()
    changed = [p for p in before if before[p] != after[p] and p.name != "credentials.json"]
    assert not changed, f"a second init changed {changed}"
    for path in init.rglob("*"):
        if path.is_file():
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


SECRET_PATTERNS = {
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----\s*\n[A-Za-z0-9+/=]{16}"),
    "NATS seed": re.compile(r"\bS[UAO][A-Z2-7]{56}\b"),
    "NATS creds": re.compile(r"-----BEGIN (?:USER NKEY SEED|NATS USER JWT)-----\s*\n\S{20}"),
    "hex secret": re.compile(r'"[0-9a-f]{64}"'),
    "JWT": re.compile(r"\beyJ[A-Za-z0-9_-]{20,}\.eyJ[A-Za-z0-9_-]{20,}\."),
    "password": re.compile(r"(?i)(?:password|passwd|secret)\s*[=:]\s*[\"']?[A-Za-z0-9+/_-]{12,}"),
}


def _committed(paths: list[str]) -> list[Path]:
    done = subprocess.run(["git", "ls-files", "--", *paths], cwd=REPO_ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip("not a git checkout")
    return [REPO_ROOT / p for p in done.stdout.split()]


def test_no_secret_in_any_committed_compose_or_ops_file():
    files = _committed(["docker-compose.yml", "Dockerfile", "ops", "README.md", "docs"])
    assert files
    assert not (REPO_ROOT / "ops" / "compose" / "credentials.example.json").exists(), "demo secrets are back"
    for path in files:
        if not path.is_file():
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        for what, rx in SECRET_PATTERNS.items():
            match = rx.search(text)
            assert not match, f"{path.relative_to(REPO_ROOT)} holds a {what}: {match.group(0)[:40]}..."


def test_the_secret_scan_finds_what_the_init_writes(init_out):
    run, init = init_out
    found = {what for path in [*run.rglob("*"), *init.rglob("*")] if path.is_file()
             for what, rx in SECRET_PATTERNS.items() if rx.search(path.read_text())}
    assert {"private key", "NATS seed", "NATS creds", "hex secret", "password"} <= found


def test_image_holds_the_paths_the_environment_names(services):
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    assert "FROM python:3.11-slim" in dockerfile
    env = services["admission"]["environment"]
    topology_rel = env["DIN_TOPOLOGY"].removeprefix(f"{APP_DIR}/")
    assert (REPO_ROOT / topology_rel).is_file()
    assert f"COPY {Path(topology_rel).parent.as_posix()} " in dockerfile
    assert "build_zoo" in dockerfile and env["DIN_MODEL_REPO"] in dockerfile
    assert "--uid 10001" in dockerfile, "keys-init hands DIN's volume to uid 10001"


def test_telemetry_metrics_reachable_from_other_containers(services, monkeypatch):
    settings = _settings_from(TelemetrySettings, services["telemetry"]["environment"], monkeypatch)
    host = getattr(settings, "metrics_host", None)
    assert host not in ("127.0.0.1", "localhost", "::1"), (
        f"telemetry binds /metrics to {host} in docker-compose.yml, out of Prometheus' and the host's reach: "
        "service_environments must set DIN_TELEMETRY_METRICS_HOST (0.0.0.0 for compose), then run `din compose`"
    )


def test_key_files_are_made_once_and_mounted_read_only_into_every_din_service(topology, services):
    for inst in service_instances(topology):
        service = services[inst.name]
        assert f"din-keys:{RUN}:ro" in service["volumes"], inst.name
        assert service["depends_on"]["keys-init"] == {"condition": "service_completed_successfully"}
        for name, value in service["environment"].items():
            if name.endswith("KEY_FILE") or name.endswith("KEYSTORE"):
                assert value.startswith(f"{RUN}/keys/"), (inst.name, name)


# --------------------------------------------------------------------------- operator commands


def test_operator_commands_take_the_stack_url_and_key_folder(init_out, capsys):
    run, _ = init_out
    keys = str(run / "keys")
    parser = build_parser()
    for argv in (["token", "--tenant", "acme"], ["infer", "--tenant", "acme"], ["keys", "status"],
                 ["keys", "rotate"], ["keys", "export-audit", "--out", "x"]):
        args = parser.parse_args([*argv, "--keys-dir", keys] + ([] if argv[0] == "token" else
                                                              ["--nats-url", "tls://127.0.0.1:4222"]))
        assert args.keys_dir == Path(keys), argv
    for argv in (["report"], ["replay"]):
        args = parser.parse_args([*argv, "--kafka", "kafka:9092", "--keys-dir", keys])
        assert args.keys_dir == Path(keys)

    args = parser.parse_args(["token", "--tenant", "acme", "--keys-dir", keys])
    assert args.handler(args) == 0
    assert capsys.readouterr().out.startswith("din1.acme.")
    args = parser.parse_args(["token", "--tenant", "acme", "--keys-dir", keys, "--model", "digits-small",
                              "--request-id", "r-1"])
    assert args.handler(args) == 0
    proof = capsys.readouterr().out.strip().split(".")
    assert proof[:2] == ["din2", "acme"] and proof[4] == "a", "a proof for one request, any reply subject"


def test_infer_connects_as_the_tenant_over_tls_with_the_given_folder(init_out):
    from din.commands.token import running_tenant

    run, _ = init_out
    args = build_parser().parse_args(["infer", "--tenant", "acme", "--nats-url", "tls://127.0.0.1:4222",
                                      "--keys-dir", str(run / "keys"), "--din-dir", "/nonexistent"])
    url, token, keys, options = running_tenant(args, args.tenant, args.site)
    assert url == "tls://127.0.0.1:4222" and token.startswith("din1.acme.") and keys is not None
    assert options["user_credentials"].endswith("tenant-acme.creds") and "tls" in options
    assert options["inbox_prefix"].startswith("_INBOX.acme.cloud")


def test_report_reads_kafka_with_the_given_folder(init_out):
    from din.replay.endpoints import resolve_endpoints

    run, _ = init_out
    args = build_parser().parse_args(["report", "--kafka", "kafka:9092", "--keys-dir", str(run / "keys"),
                                      "--din-dir", "/nonexistent"])
    endpoints = resolve_endpoints(args)
    assert endpoints.kafka == "kafka:9092" and endpoints.kafka_bus_dir == run / "keys" / "bus"
    assert endpoints.kafka_kwargs("report")["sasl_plain_username"] == "report"
    assert endpoints.credentials == run / "credentials.json"


def test_nats_url_without_a_key_folder_is_refused():
    from din.commands.target import stack_state
    from din.stack.processes import StackError

    with pytest.raises(StackError, match="--keys-dir"):
        stack_state(argparse.Namespace(nats_url="tls://127.0.0.1:4222", keys_dir=None, din_dir=Path("/x")))


def test_the_cli_service_names_the_stack_for_operator_commands(topology, services):
    from din.commands.target import KAFKA_ENV, KEYS_DIR_ENV, NATS_URL_ENV

    cli = services["cli"]
    assert cli["profiles"] == ["tools"] and cli["entrypoint"] == ["din"]
    env = cli["environment"]
    assert env[NATS_URL_ENV] == services["admission"]["environment"]["DIN_NATS_URL"]
    assert env[KAFKA_ENV] == services["admission"]["environment"]["DIN_KAFKA_BOOTSTRAP"]
    assert env[KEYS_DIR_ENV] == f"{RUN}/keys" and f"din-keys:{RUN}:ro" in cli["volumes"]
