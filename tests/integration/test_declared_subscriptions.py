"""Each service, started in-process on the session's NATS, subscribes exactly what its class declares.

The AsyncAPI document (``din schemas``) is generated from ``Service.endpoints()``; this checks that the
declaration is what the service really listens to: the nats-py client's subscriptions after start-up
(``nc._subs``: FastStream subscribers and hot-path subscriptions share the connection) against
``service.subscriptions()``. Reply inboxes (``_INBOX.``, ``_DIN_INBOX.``: request/response, JetStream pull and watch
deliveries) are the client's own, not declarations, and are left out. Security is off: keys change what a
service starts, not what it subscribes.
"""

from __future__ import annotations

import pytest
import yaml

from din.service_operations import service_class
from din.shared.bus.permissions import SERVICE_INBOX_ROOT, TENANT_INBOX_ROOT
from din.shared.channels import INSTANCE_HEALTH
from din.shared.credentials import write_credentials
from din.shared.naming import SERVICES, Subjects
from tests.support import free_port

pytestmark = pytest.mark.integration

INBOX_PREFIXES = (f"{TENANT_INBOX_ROOT}.", f"{SERVICE_INBOX_ROOT}.")
CASES = [*SERVICES, "executor-pull", "scheduler-distributed"]



@pytest.fixture
async def settings_of(nats_network, kafka_access, test_topology, zoo_dir, tmp_path, unique, recorded_topics):
    """Settings for one service (or a mode of one), every one on the hub site with security off."""
    topology = tmp_path / "topology.yaml"
    topology.write_text(yaml.safe_dump(test_topology.model_dump(mode="json")))
    credentials = tmp_path / "credentials.json"
    write_credentials(credentials, [t.name for t in test_topology.tenants])
    await recorded_topics(unique)
    def build(case: str):
        from din.services.admission.settings import AdmissionSettings
        from din.services.autoscaler.settings import AutoscalerSettings
        from din.services.classifier.settings import ClassifierSettings
        from din.services.executor.settings import ExecutorSettings
        from din.services.gateway.settings import GatewaySettings
        from din.services.keymanager.settings import KeyManagerSettings
        from din.services.scheduler.settings import SchedulerSettings
        from din.services.telemetry.settings import TelemetrySettings

        name, site, executor_id = case.split("-")[0], test_topology.hub.name, f"{unique}-1"
        # Each logs in to NATS as its own user (the session Kafka's CA is the bus_ca_file: NATS clients are plain).
        login = nats_network.service_login(name, site, instance=executor_id if name == "executor" else None)
        common = dict(nats_url=nats_network.hub_url, site=site, topic_scope=unique,
                      **(login | kafka_access.settings(name)))
        executor = dict(id=executor_id, models=["digits-small"], model_repo=zoo_dir, security=False)
        scheduler = dict(topology=topology, model_repo=zoo_dir, security=False)
        factories = {
            "admission": lambda: AdmissionSettings(topology=topology, model_repo=zoo_dir,
                                                   credentials_file=credentials, security=False, **common),
            "classifier": lambda: ClassifierSettings(topology=topology, model_repo=zoo_dir, security=False, **common),
            "scheduler": lambda: SchedulerSettings(**scheduler, **common),
            "scheduler-distributed": lambda: SchedulerSettings(**scheduler, mode="distributed", **common),
            "executor": lambda: ExecutorSettings(**executor, **common),
            "executor-pull": lambda: ExecutorSettings(**executor, pull=True, **common),
            "telemetry": lambda: TelemetrySettings(metrics_port=free_port(), metrics_host="127.0.0.1",
                                                   heartbeat_site=site if test_topology.hears_rosters(site) else None,
                                                   **common),
            "keymanager": lambda: KeyManagerSettings(topology=topology, security=False, **common),
            "gateway": lambda: GatewaySettings(model_repo=zoo_dir, http_port=free_port(), **common),
            "autoscaler": lambda: AutoscalerSettings(topology=topology, provider="kubernetes", security=False,
                                                     **common),
        }
        return factories[case]()

    return build


def live_subscriptions(service) -> list[tuple[str, str | None]]:
    """What the service's connection is subscribed to, reply inboxes left out."""
    return sorted(
        (sub.subject, sub.queue or None)
        for sub in service.nc._subs.values()
        if not sub.subject.startswith(INBOX_PREFIXES)
    )


@pytest.mark.parametrize("case", CASES)
async def test_live_subscriptions_equal_the_declaration(case, settings_of):
    name = case.split("-")[0]
    service = service_class(name)(settings_of(case))
    await service.app.start()
    try:
        live = live_subscriptions(service)
        declared = sorted((subject, queue or None) for subject, queue in service.subscriptions())
        assert live == declared, (
            f"{name}: subscribed but not declared {sorted(set(live) - set(declared))}, "
            f"declared but not subscribed {sorted(set(declared) - set(live))}"
        )
        instance_health = any(subject.startswith(Subjects.health(name) + ".") for subject, _ in live)
        assert instance_health == (name in INSTANCE_HEALTH), (
            f"{name} {'answers' if instance_health else 'does not answer'} an instance health subject: "
            "shared.channels.INSTANCE_HEALTH (which the AsyncAPI document follows) must say so")
    finally:
        await service.app.stop()


def test_every_service_is_covered():
    assert {case.split("-")[0] for case in CASES} == set(SERVICES)
