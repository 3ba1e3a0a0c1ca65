"""The Kafka ACL table against what the services declare, the users' files, the client and broker settings."""

from __future__ import annotations

import stat

import pytest

from din.commands.replay import REPLAY_TOPICS, WHAT_IF_TOPICS
from din.commands.report import REPORT_TOPICS
from din.service_operations import RECEIVE, SEND, operations
from din.services.telemetry.decisions import DecisionFeed
from din.services.telemetry.settings import TelemetrySettings
from din.shared.bus.kafka import (
    BROKER_USER,
    GROUPS,
    OPERATOR,
    READERS,
    READS,
    USERS,
    WRITES,
    KafkaAccess,
    Operation,
    Resource,
    acl_table,
    ensure_kafka_users,
    kafka_client_kwargs,
    may,
)
from din.shared.bus.tls import BusCA
from din.shared.naming import SERVICES, Topics
from din.shared.settings import ServiceSettings
from din.shared.topology import load_topology
from din.stack.brokers import KafkaSpec
from din.stack.launcher import DEFAULT_TOPOLOGY, service_environments, service_instances

BASES = (*Topics.ALL, Topics.SMOKE)
ADMIN = (Operation.CREATE, Operation.DELETE, Operation.ALTER, Operation.ALTER_CONFIGS)


def declared(action: str) -> set[tuple[str, str]]:
    """(service, base topic) for every Kafka operation the services declare."""
    return {(op.party, op.channel.address) for op in operations()
            if op.channel.kafka and op.action == action and op.party in SERVICES}


def topics_of(user: str, operation: Operation) -> set[str]:
    return {base for base in BASES if may(user, operation, base)}


def test_every_topic_a_service_emits_to_is_writable_by_it_and_nobody_else():
    sends = declared(SEND)
    assert sends, "the services declare Kafka topics they send to"
    for topic in BASES:
        senders = {service for service, sent in sends if sent == topic}
        writers = {user for user in USERS if may(user, Operation.WRITE, topic)}
        expected = senders | ({OPERATOR} if topic == Topics.SMOKE else set())
        assert writers == expected, f"{topic}: writable by {sorted(writers)}, sent to by {sorted(senders)}"
    for service in SERVICES:
        assert set(WRITES[service]) == {t for s, t in sends if s == service}, f"{service} holds an undeclared grant"


def test_the_audit_topics_have_one_writer_each():
    assert {u for u in USERS if may(u, Operation.WRITE, Topics.REQUESTS)} == {"admission"}
    assert {u for u in USERS if may(u, Operation.WRITE, Topics.SCHEDULING_DECISIONS)} == {"scheduler"}
    assert not may("executor", Operation.WRITE, Topics.scoped(Topics.REQUESTS, "run1"))
    assert not may("executor", Operation.WRITE, Topics.COMPLETIONS), "executors' completions are relayed by telemetry"


def test_grants_cover_every_scope_of_their_topic_and_no_other_topic():
    for base in BASES:
        others = [other for other in BASES if other != base]
        assert not any(other.startswith(base) for other in others), f"{base} prefixes another topic"
    assert may("admission", Operation.WRITE, Topics.scoped(Topics.REQUESTS, "t1234abcd"))
    assert not may("admission", Operation.WRITE, "din.v1.admission")
    assert not may("admission", Operation.WRITE, "other.topic")


def test_readers_read_what_their_commands_read_and_write_nothing():
    assert set(READS["replay"]) == {Topics.REQUESTS, *REPLAY_TOPICS, *WHAT_IF_TOPICS}
    assert set(READS["report"]) == {Topics.REQUESTS, *REPORT_TOPICS}, "offset ranges read the requests topic"
    for reader in READERS:
        assert topics_of(reader, Operation.READ) == set(READS[reader])
        assert not topics_of(reader, Operation.WRITE) and not any(topics_of(reader, op) for op in ADMIN)
    receives = declared(RECEIVE)
    for service in SERVICES:
        assert topics_of(service, Operation.READ) == {t for s, t in receives if s == service}, service


def test_only_the_operator_creates_alters_or_deletes_topics():
    for user in USERS:
        for op in ADMIN:
            assert all(may(user, op, base) for base in Topics.ALL) == (user == OPERATOR), (user, op.name)
            assert any(may(user, op, base) for base in Topics.ALL) == (user == OPERATOR), (user, op.name)
    assert not any(acl.resource == Resource.CLUSTER for acl in acl_table()), "nobody holds cluster-wide rights"
    assert all(acl.user != BROKER_USER for acl in acl_table()), "the broker is a super user, not an ACL holder"


def test_telemetry_may_join_its_consumer_group_under_any_scope():
    settings = TelemetrySettings(nats_url="nats://x:4222", kafka_bootstrap="k:9092", site="cloud")
    for scope in (None, "run1"):
        group = DecisionFeed(None, settings.model_copy(update={"topic_scope": scope}), client_id="t").group
        assert may("telemetry", Operation.READ, group, resource=Resource.GROUP)
        assert not may("admission", Operation.READ, group, resource=Resource.GROUP)
    assert set(GROUPS) == {"telemetry", "autoscaler", OPERATOR}
    assert may("autoscaler", Operation.READ, "din-autoscaler-run1", resource=Resource.GROUP)
    assert not may("autoscaler", Operation.READ, group, resource=Resource.GROUP)


def test_users_are_generated_once_secret_and_kept(tmp_path):
    users = ensure_kafka_users(tmp_path)
    first = {user: users.password(user) for user in (BROKER_USER, *USERS)}
    assert len(set(first.values())) == len(first), "every user has its own password"
    for user in first:
        assert stat.S_IMODE(users.password_file(user).stat().st_mode) == 0o600
        assert stat.S_IMODE(users.properties_file(user).stat().st_mode) == 0o600
    assert {u: ensure_kafka_users(tmp_path).password(u) for u in first} == first
    args = users.scram_arguments()
    assert args.count("--add-scram") == len(first)
    assert f"SCRAM-SHA-512=[name=operator,password={first['operator']}]" in args


def test_client_kwargs_need_a_user_and_log_in_over_tls(tmp_path):
    ca = BusCA.load_or_create(tmp_path)
    ensure_kafka_users(tmp_path)
    access = KafkaAccess("127.0.0.1:9092", tmp_path)
    assert kafka_client_kwargs(None) == {} and KafkaAccess("127.0.0.1:9092").client_kwargs("admission") == {}
    kwargs = access.client_kwargs("admission")
    assert kwargs["security_protocol"] == "SASL_SSL" and kwargs["sasl_mechanism"] == "SCRAM-SHA-512"
    assert kwargs["sasl_plain_username"] == "admission" and kwargs["ssl_context"].check_hostname
    settings = ServiceSettings(nats_url="nats://x:4222", site="cloud", **access.settings("classifier"))
    assert kafka_client_kwargs(settings)["sasl_plain_username"] == "classifier"
    assert access.environment("classifier")["DIN_BUS_CA_FILE"] == str(ca.cert_path)
    with pytest.raises(ValueError, match="without kafka_password_file"):
        kafka_client_kwargs(settings.model_copy(update={"kafka_password_file": None}))


def test_broker_properties_secure_by_default_plaintext_only_when_insecure(tmp_path):
    users = ensure_kafka_users(tmp_path)
    spec = KafkaSpec(9092, 9093, bus_dir=tmp_path)
    props = dict(line.split("=", 1) for line in spec.properties(
        tmp_path / "data", spec.security_properties(users, keystore=tmp_path / "k.pem", truststore=tmp_path / "ca.pem"),
    ).splitlines())
    assert props["listeners"] == "SASL_SSL://127.0.0.1:9092,CONTROLLER://127.0.0.1:9093"
    assert props["listener.security.protocol.map"] == "SASL_SSL:SASL_SSL,CONTROLLER:SASL_SSL"
    assert props["authorizer.class.name"].endswith("StandardAuthorizer")
    assert props["allow.everyone.if.no.acl.found"] == "false" and props["auto.create.topics.enable"] == "false"
    assert props["super.users"] == f"User:{BROKER_USER}" and props["sasl.mechanism.controller.protocol"] == "PLAIN"
    assert spec.access().secure
    insecure = dict(line.split("=", 1) for line in KafkaSpec(9092, 9093, insecure=True).properties(
        tmp_path).splitlines())
    assert insecure["listeners"].startswith("PLAINTEXT://") and "authorizer.class.name" not in insecure
    assert not KafkaSpec(9092, 9093, insecure=True).access().secure


def test_every_service_process_logs_in_as_its_own_kafka_user(tmp_path):
    topology = load_topology(DEFAULT_TOPOLOGY)
    common = dict(nats_urls={s.name: "nats://x:4222" for s in topology.sites}, kafka_bootstrap="k:9092",
                  topology_path="t", credentials_path=tmp_path / "c.json")
    envs = service_environments(topology, kafka_bus_dir=tmp_path, **common)
    for inst in service_instances(topology):
        env = envs[inst.name]
        assert env["DIN_KAFKA_USER"] == inst.service
        assert env["DIN_KAFKA_PASSWORD_FILE"] == str(tmp_path / "kafka" / f"{inst.service}.password")
        assert env["DIN_BUS_CA_FILE"] == str(tmp_path / "ca.pem")
    assert not any("DIN_KAFKA_USER" in env for env in service_environments(topology, **common).values())
