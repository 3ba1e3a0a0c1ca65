"""The launcher's plan, without starting anything: ports, processes, environments, CLI wiring."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from din.cli import build_parser, describe_error
from din.commands.stack import parse_services
from din.shared.settings import ServiceSettings
from din.shared.topology import Topology, load_topology
from din.stack.launcher import (
    DEFAULT_TOPOLOGY,
    PortPlan,
    StackError,
    check_ports,
    port_roles,
    service_environments,
    service_instances,
)


@pytest.fixture(scope="module")
def topology():
    return load_topology(DEFAULT_TOPOLOGY)


def test_default_ports_and_offset(topology):
    roles = dict((role, port) for port, role in port_roles(topology, PortPlan()))
    assert roles["NATS client port of hub site cloud"] == 4222
    assert roles["NATS client port of leaf site factory"] == 4223
    assert roles["NATS client port of leaf site branch"] == 4224
    assert roles["NATS leafnode port of hub site cloud"] == 7422
    assert roles["NATS monitor port of hub site cloud"] == 8222
    assert roles["NATS monitor port of leaf site branch"] == 8224
    assert (roles["Kafka broker port"], roles["Kafka controller port"]) == (9092, 9093)
    assert roles["telemetry metrics port"] == 9464

    moved = dict((role, port) for port, role in port_roles(topology, PortPlan().offset(100)))
    assert {role: port - 100 for role, port in moved.items()} == roles


def test_offset_out_of_range_is_refused():
    with pytest.raises(StackError, match="outside 1-65535"):
        PortPlan().offset(60000)


def test_free_plan_has_distinct_ports(topology):
    plan = PortPlan.free(edge_sites=2)
    ports = [port for port, _ in port_roles(topology, plan)]
    assert len(ports) == len(set(ports)) == 16
    check_ports(port_roles(topology, plan))


def test_free_plan_too_small_for_topology(topology):
    with pytest.raises(StackError, match="needs more edge sites"):
        port_roles(topology, PortPlan.free(edge_sites=1))


def test_repeated_port_in_plan_is_refused(topology):
    plan = PortPlan(kafka=4222)
    with pytest.raises(StackError, match="port 4222 is planned twice"):
        check_ports(port_roles(topology, plan))


def test_service_processes_in_start_order(topology):
    names = [(i.name, i.site) for i in service_instances(topology)]
    assert names == [
        ("keymanager", "cloud"),
        ("telemetry", "cloud"),
        ("executor-cloud-1", "cloud"),
        ("executor-cloud-2", "cloud"),
        ("executor-factory-1", "factory"),
        ("executor-branch-1", "branch"),
        ("scheduler", "cloud"),
        ("scheduler-factory", "factory"),
        ("scheduler-branch", "branch"),
        ("classifier", "cloud"),
        ("classifier-factory", "factory"),
        ("classifier-branch", "branch"),
        ("admission", "cloud"),
        ("admission-factory", "factory"),
        ("admission-branch", "branch"),
        ("gateway", "cloud"),
        ("gateway-factory", "factory"),
        ("gateway-branch", "branch"),
    ]
    assert [i.name for i in service_instances(topology, ["admission"])] == [
        "admission", "admission-factory", "admission-branch"]
    assert service_instances(topology, ["admission"])[1].health_subject == "din.v1.health.admission.factory"
    hub_only = topology.model_copy(update={"control_plane": "hub"})
    assert [i.name for i in service_instances(hub_only, ["admission", "scheduler"])] == ["scheduler", "admission"]
    assert service_instances(topology, []) == []
    executor = service_instances(topology, ["executor"])[2]
    assert executor.health_subject == "din.v1.health.executor.factory-1"
    with pytest.raises(StackError, match="unknown service 'gatekeeper'"):
        service_instances(topology, ["gatekeeper"])


def test_service_environments(topology):
    urls = {"cloud": "nats://hub:4222", "factory": "nats://factory:4222", "branch": "nats://branch:4222"}
    envs = service_environments(
        topology,
        nats_urls=urls,
        kafka_bootstrap="kafka:9092",
        topology_path="/run/topology.yaml",
        credentials_path="/run/credentials.json",
        model_repo="/models",
        mode="distributed",
        telemetry_metrics_port=9999,
    )
    common = {"DIN_KAFKA_BOOTSTRAP": "kafka:9092", "DIN_TOPOLOGY": "/run/topology.yaml", "DIN_MODEL_REPO": "/models"}
    hub = {**common, "DIN_NATS_URL": "nats://hub:4222", "DIN_SITE": "cloud"}
    hub_control = {**hub, "DIN_INSTANCE": "cloud"}
    secured = {"DIN_SECURITY": "on"}
    hub_keys = "/run/keys/site-cloud.json"
    assert envs["admission"] == {**hub_control, **secured, "DIN_ADMISSION_CREDENTIALS_FILE": "/run/credentials.json",
                                 "DIN_ADMISSION_KEY_FILE": hub_keys}
    assert envs["scheduler"] == {**hub_control, **secured, "DIN_SCHEDULER_MODE": "distributed",
                                 "DIN_SCHEDULER_KEY_FILE": hub_keys, "DIN_SCHEDULER_OWN_SITE_ONLY": "false",
                                 "DIN_SCHEDULER_ROSTERS": "true"}
    assert envs["scheduler-factory"] == {**common, **secured, "DIN_NATS_URL": "nats://factory:4222",
                                         "DIN_SITE": "factory", "DIN_INSTANCE": "factory",
                                         "DIN_SCHEDULER_MODE": "distributed",
                                         "DIN_SCHEDULER_KEY_FILE": "/run/keys/site-factory.json",
                                         "DIN_SCHEDULER_OWN_SITE_ONLY": "true", "DIN_SCHEDULER_ROSTERS": "false"}
    assert envs["admission-branch"]["DIN_ADMISSION_KEY_FILE"] == "/run/keys/site-branch.json"
    assert envs["telemetry"] == {
        **hub, **secured, "DIN_TELEMETRY_METRICS_PORT": "9999", "DIN_TELEMETRY_METRICS_HOST": "127.0.0.1",
        "DIN_TELEMETRY_KEY_FILE": "/run/keys/site-cloud.json", "DIN_TELEMETRY_HEARTBEAT_SITE": "cloud",
    }
    assert envs["classifier"] == {**hub_control, **secured, "DIN_CLASSIFIER_KEY_FILE": hub_keys}
    assert envs["keymanager"] == {
        **hub, **secured, "DIN_KEYMANAGER_KEYSTORE": "/run/keys/keystore.json",
        "DIN_KEYMANAGER_MASTER_KEY_FILE": "/run/keys/master.key",
        "DIN_KEYMANAGER_POLICY": envs["keymanager"]["DIN_KEYMANAGER_POLICY"],
    }
    assert envs["executor-factory-1"] == {
        **common,
        "DIN_NATS_URL": "nats://factory:4222",
        "DIN_SITE": "factory",
        "DIN_EXECUTOR_ID": "factory-1",
        "DIN_EXECUTOR_MODELS": ",".join(
            ["digits-small", "digits-large-head-hidden_1", "digits-large-head-hidden_2", "charlm-prefill", "charlm"]),
        "DIN_EXECUTOR_MODEL_REPO": "/models",
        "DIN_EXECUTOR_CAPACITY": "256",
        "DIN_EXECUTOR_PULL": "true",
        "DIN_EXECUTOR_KEY_FILE": "/run/keys/site-factory.json",
        **secured,
    }
    assert envs["executor-branch-1"]["DIN_EXECUTOR_MODELS"] == "digits-small,digits-large,charlm-prefill"
    assert envs["executor-cloud-2"]["DIN_NATS_URL"] == "nats://hub:4222"
    for env in envs.values():
        settings = ServiceSettings.model_validate(env)
        assert settings.site == env["DIN_SITE"]


def test_service_environments_refuses_bad_input(topology):
    args = dict(kafka_bootstrap="k:1", topology_path="t", credentials_path="c")
    with pytest.raises(StackError, match="unknown scheduler mode 'random'"):
        service_environments(topology, nats_urls=dict.fromkeys(["cloud", "factory", "branch"], "n"), mode="random",
                             **args)
    with pytest.raises(StackError, match="no NATS URL for site 'branch'"):
        service_environments(topology, nats_urls={"cloud": "n", "factory": "n"}, **args)


def test_parse_services():
    assert parse_services("all") is None
    assert parse_services("none") == []
    assert parse_services("executor, admission") == ["executor", "admission"]
    with pytest.raises(StackError, match="unknown service 'gatekeeper' in --services"):
        parse_services("executor,gatekeeper")


def test_cli_has_stack_commands():
    parser = build_parser()
    args = parser.parse_args(["up", "--mode", "distributed", "--port-offset", "10", "--detach"])
    assert (args.mode, args.port_offset, args.detach, args.topology) == ("distributed", 10, True, DEFAULT_TOPOLOGY)
    for command in ("status", "down", "setup", "links"):
        assert callable(parser.parse_args([command]).handler)
    assert parser.parse_args(["up"]).no_wan is False and parser.parse_args(["up", "--no-wan"]).no_wan is True
    change = parser.parse_args(["links", "--din-dir", "/x", "set", "factory", "--latency", "50ms", "--jitter", "5ms"])
    assert (str(change.din_dir), change.site, change.latency, change.jitter) == ("/x", "factory", 50, 5)
    assert [parser.parse_args(["links", action, "factory"]).site for action in ("cut", "restore")] == ["factory"] * 2
    with pytest.raises(SystemExit):
        parser.parse_args(["up", "--mode", "random"])


def test_settings_errors_become_one_line():
    with pytest.raises(ValidationError) as err:
        ServiceSettings.model_validate({"DIN_SITE": "cloud"})
    line = describe_error(err.value)
    assert "\n" not in line
    assert line.startswith("invalid settings for ServiceSettings: DIN_NATS_URL: Field required")


@pytest.mark.parametrize("kind", ["admission", "classifier", "scheduler", "telemetry", "keymanager", "executor"])
@pytest.mark.parametrize("mode", ["centralized", "distributed"])
def test_each_service_settings_accept_the_launcher_environment(topology, monkeypatch, kind, mode):
    """The environment `din up` gives a service is enough for that service's own settings class."""
    import importlib
    import inspect
    import os

    try:
        module = importlib.import_module(f"din.services.{kind}.settings")
    except ModuleNotFoundError as exc:
        pytest.skip(f"services.{kind}.settings not written yet ({exc.name})")
    classes = [c for _, c in inspect.getmembers(module, inspect.isclass)
               if issubclass(c, ServiceSettings) and c.__module__ == module.__name__]
    assert len(classes) == 1, classes
    urls = {"cloud": "nats://hub:4222", "factory": "nats://factory:4222", "branch": "nats://branch:4222"}
    envs = service_environments(
        topology, nats_urls=urls, kafka_bootstrap="kafka:9092", topology_path=str(DEFAULT_TOPOLOGY),
        credentials_path="/run/credentials.json", model_repo="/models", mode=mode,
    )
    for name in [n for n in envs if n == kind or n.startswith(f"{kind}-")]:
        for key in [k for k in os.environ if k.startswith("DIN_")]:
            monkeypatch.delenv(key)
        for key, value in envs[name].items():
            monkeypatch.setenv(key, value)
        settings = classes[0]()
        assert settings.site == envs[name]["DIN_SITE"]
        if kind == "scheduler":
            assert str(settings.mode) == mode
        if kind == "executor":
            assert settings.pull is (mode == "distributed")


def test_replicas_run_several_instances_of_each_control_service(topology):
    spec = topology.model_dump(mode="json")
    spec["sites"][1]["replicas"] = 2
    replicated = Topology.model_validate(spec)
    schedulers = [(i.name, i.instance) for i in service_instances(replicated, ["scheduler"])]
    assert schedulers == [("scheduler", "cloud"), ("scheduler-factory", "factory"),
                          ("scheduler-factory-2", "factory-2"), ("scheduler-branch", "branch")]
