"""Session fixtures for the whole suite: real brokers started once per session, a private token per test.

* ``nats_network``: a real nats-server hub (site ``cloud``) with one leaf per
  edge site (``factory``, ``branch``), JetStream on each with the site name as
  its domain. With ``DIN_NATS_URL`` set, that one server stands for every site.
* ``kafka_access``: a real, secure Kafka (KRaft, SASL/SCRAM over TLS, DIN's ACLs)
  on free ports, started only when a test asks for it; ``kafka_bootstrap`` is its
  address, ``kafka_operator`` the operator user's client arguments. With
  ``DIN_KAFKA_BOOTSTRAP`` set, that (insecure) broker is used.
* With ``DIN_TESTCONTAINERS=1`` and a reachable Docker engine, both come from
  testcontainers instead (a single NATS server with JetStream).
* ``unique``: ``t`` + 8 hex characters, for a test's own subjects and topics.
* ``zoo_dir``: the model zoo set-up built (``.din/models``), reused rather than retrained.
* A failed test that ran a stack gets the last lines of each of its services' logs in its report.

Tests under ``tests/integration/`` are marked ``integration`` automatically.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from din.shared.bus.connect import nats_options
from din.shared.bus.kafka import KafkaAccess
from din.shared.bus.permissions import OPERATOR_USER, tenant_user
from din.shared.topology import Topology
from din.stack.bus import BusCredentials
from tests.support import three_site_topology

INTEGRATION_DIR = Path(__file__).parent / "integration"

TEST_TOPOLOGY = three_site_topology(
    "tests",
    {site: [{"id": f"{site}-1", "models": ["digits-small"]}] for site in ("cloud", "factory", "branch")},
    [{"name": "acme", "sensitive_sites": ["factory"]}, {"name": "globex"}],
)


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        if INTEGRATION_DIR in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.integration)


LOG_TAIL_LINES = 12


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Append the tail of every service log of the stacks a failed test used (``run_dir/logs``)."""
    outcome = yield
    report = outcome.get_result()
    if not report.failed:
        return
    for name, value in getattr(item, "funcargs", {}).items():
        run_dir = getattr(getattr(value, "stack", None), "run_dir", None)
        if run_dir is None or not (Path(run_dir) / "logs").is_dir():
            continue
        tails = []
        for log in sorted((Path(run_dir) / "logs").glob("*.log")):
            lines = log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
            tails.append(f"--- {log.name}\n" + "\n".join(line[:240] for line in lines))
        report.sections.append((f"service logs of {name}", "\n".join(tails)))


@dataclass
class NatsNetwork:
    """Where each site's NATS server listens.

    ``single`` is True when one external server stands for every site; then
    ``domain(site)`` is None, since that server has no per-site JetStream domain.
    """

    hub_site: str
    urls: dict[str, str]
    single: bool = False
    domains: dict[str, str | None] = field(default_factory=dict)
    bus: BusCredentials | None = None
    logs: Path | None = None

    def server_log(self, site: str) -> str:
        """What ``site``'s nats-server has logged so far (empty for an external server)."""
        return (self.logs / f"nats-{site}.log").read_text() if self.logs is not None else ""

    def options(self, site: str | None = None, user: str = OPERATOR_USER) -> dict:
        """nats-py connect options of NATS user ``user`` at ``site`` (default: the hub; user: the operator)."""
        site = site or self.hub_site
        if self.bus is None:
            return {}
        return nats_options(self.urls[site], site, self.bus.creds(user), self.bus.ca.cert_path)

    async def connect(self, site: str | None = None, user: str = OPERATOR_USER, **kwargs):
        """A nats-py connection to ``site``'s server as ``user``."""
        import nats

        return await nats.connect(self.url(site or self.hub_site), **self.options(site, user), **kwargs)

    def service_login(self, service: str, site: str, user: str | None = None, instance: str | None = None,
                      topology: Topology | None = None) -> dict:
        """Settings fields (``nats_creds_file``, ``bus_ca_file``) of an in-process service instance, its
        credentials issued now with the permissions ``din up`` would give it under ``topology`` (default: the
        session's)."""
        if self.bus is None:
            return {}
        from din.stack.bus import service_permissions

        user = user or (f"executor-{instance}" if service == "executor" else f"{service}-{site}")
        permissions = service_permissions(topology or self.bus.topology, service, site, user, instance)
        return {"nats_creds_file": str(self.bus.nats.ensure(user, permissions)),
                "bus_ca_file": str(self.bus.ca.cert_path),
                "bus_sites": ",".join(s.name for s in self.bus.topology.sites)}

    def tenant_options(self, tenant: str, site: str | None = None) -> dict:
        """Connect options of ``tenant``'s clients at ``site`` (credentials issued now for a new tenant)."""
        if self.bus is None:
            return {}
        from din.shared.bus import permissions

        self.bus.nats.ensure(tenant_user(tenant), permissions.tenant(self.bus.topology, tenant))
        return self.options(site, tenant_user(tenant))

    @property
    def hub_url(self) -> str:
        return self.urls[self.hub_site]

    @property
    def edge_sites(self) -> list[str]:
        return [site for site in self.urls if site != self.hub_site]

    def url(self, site: str) -> str:
        return self.urls[site]

    def domain(self, site: str) -> str | None:
        """JetStream domain of the server at ``site``."""
        return self.domains.get(site)


def _use_testcontainers() -> bool:
    if os.environ.get("DIN_TESTCONTAINERS") != "1":
        return False
    try:
        import docker

        docker.from_env(timeout=3).ping()
    except Exception:  # noqa: BLE001 - no engine: fall back to local brokers
        return False
    return True


@pytest.fixture(scope="session")
def test_topology() -> Topology:
    """Three sites (hub ``cloud``, edges ``factory`` and ``branch``), one executor each, two tenants."""
    return Topology.model_validate(TEST_TOPOLOGY)


@pytest.fixture(scope="session")
def nats_network(test_topology, tmp_path_factory):
    """A NATS hub with a leaf per edge site, started once per session (see module docstring)."""
    sites = [s.name for s in test_topology.sites]
    hub = test_topology.hub.name
    external = os.environ.get("DIN_NATS_URL")
    if external:
        yield NatsNetwork(hub, {site: external for site in sites}, single=True)
        return
    if _use_testcontainers():
        from testcontainers.community.nats import NatsContainer

        with NatsContainer(jetstream=True) as container:
            url = container.nats_uri()
            yield NatsNetwork(hub, {site: url for site in sites}, single=True)
        return
    from din.stack.launcher import Stack

    stack = Stack.brokers_only(test_topology, kafka=False, din_dir=tmp_path_factory.mktemp("nats"))
    stack.start()
    try:
        yield NatsNetwork(hub, stack.nats_urls, domains={site: site for site in sites}, bus=stack.bus,
                          logs=stack.run_dir / "logs")
    finally:
        stack.stop()


@dataclass(frozen=True)
class SessionKafka:
    """The session's Kafka: how to reach it, and its log (None when it is not started here)."""

    access: KafkaAccess
    log: Path | None = None


@pytest.fixture(scope="session")
def session_kafka(tmp_path_factory):
    """A real Kafka, started on first use and kept for the session: secure (SCRAM over TLS, DIN's ACLs applied),
    its CA and users in a session bus folder."""
    external = os.environ.get("DIN_KAFKA_BOOTSTRAP")
    if external:
        yield SessionKafka(KafkaAccess(external))
        return
    if _use_testcontainers():
        from testcontainers.community.kafka import KafkaContainer

        with KafkaContainer().with_kraft() as container:
            yield SessionKafka(KafkaAccess(container.get_bootstrap_server()))
        return
    from din.shared.bus.kafka import apply_acls
    from din.stack.brokers import KafkaSpec
    from din.stack.launcher import PortPlan, check_ports, wait_kafka_ready

    plan = PortPlan.free(edge_sites=0)
    spec = KafkaSpec(plan.kafka, plan.kafka_controller, bus_dir=tmp_path_factory.mktemp("bus"))
    check_ports([(spec.port, "Kafka broker port"), (spec.controller_port, "Kafka controller port")])
    proc = spec.process(tmp_path_factory.mktemp("kafka")).start()
    try:
        wait_kafka_ready(spec, proc, timeout_s=90)
        asyncio.run(apply_acls(spec.bootstrap, spec.bus_dir))
        yield SessionKafka(spec.access(), proc.log_path)
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def kafka_access(session_kafka) -> KafkaAccess:
    """The session's Kafka; ``.client_kwargs(user)`` and ``.settings(user)`` log in as one of DIN's users."""
    return session_kafka.access


@pytest.fixture(scope="session")
def kafka_bootstrap(kafka_access) -> str:
    """Bootstrap address of the session's Kafka (``kafka_access``)."""
    return kafka_access.bootstrap


@pytest.fixture(scope="session")
def kafka_operator(kafka_access) -> dict:
    """aiokafka keyword arguments of the ``operator`` Kafka user: what tests create, read and check topics with."""
    return kafka_access.client_kwargs("operator")


@pytest.fixture(scope="session")
def recorded_topics(kafka_access):
    """``await recorded_topics(scope)`` creates every recorded topic under ``scope`` as the operator, as ``din up``
    does for its run (services may not create topics)."""
    from din.services.telemetry.settings import TelemetrySettings
    from din.services.telemetry.topics import ensure_topics, topic_plan

    plan = topic_plan(TelemetrySettings(nats_url="nats://unused:4222", kafka_bootstrap=kafka_access.bootstrap,
                                        site="cloud"))

    async def create(scope: str | None) -> None:
        await ensure_topics(kafka_access.bootstrap, plan, scope=scope, client_id="din-tests-operator",
                            client_kwargs=kafka_access.client_kwargs("operator"))

    return create


@pytest.fixture
def unique() -> str:
    """A token private to this test, for its subjects, streams and topics: ``t`` + 8 hex characters."""
    return f"t{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def zoo_dir() -> Path:
    """The model zoo (real models trained on scikit-learn's digits) that set-up built in the default model
    repository; built there first only when it is missing or older than the recipes."""
    from din.stack.launcher import DEFAULT_MODEL_REPO
    from din.zoo.build import build_zoo

    build_zoo(DEFAULT_MODEL_REPO)
    return DEFAULT_MODEL_REPO


@pytest.fixture(scope="session")
def digits(zoo_dir):
    """The zoo's held-out digits: inputs (float32, n×64) and true labels."""
    from din.workload import load_digits_test

    return load_digits_test(zoo_dir)


@pytest.fixture(scope="session")
def local_labels(zoo_dir):
    """digits-small's labels (the version networks serve, v2) computed here with onnxruntime, to compare with the
    network's answers."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(zoo_dir / "digits-small" / "2" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    return lambda x: session.run(["label"], {"input": x.astype("float32")})[0]
