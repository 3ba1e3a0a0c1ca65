"""NATS permissions against what the services declare, and the boundaries that must hold (pure: no server)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from din.service_operations import service_class
from din.shared.bus import permissions as rules
from din.shared.bus.permissions import Permissions, is_tenant_reply
from din.shared.channels import CHANNELS
from din.shared.micro import MicroDiscovery
from din.shared.naming import Subjects
from din.shared.topology import Topology
from din.stack.bus import service_permissions
from din.stack.launcher import service_instances
from tests.integration.network import INFERENCE_TOPOLOGY
from tests.support import subject_covers

TOPOLOGY = Topology.model_validate(INFERENCE_TOPOLOGY)


def allowed(patterns: tuple[str, ...], subject: str) -> bool:
    return any(subject_covers(p, subject) for p in patterns)


def instances():
    for inst in service_instances(TOPOLOGY):
        user = inst.name
        yield pytest.param(inst, service_permissions(TOPOLOGY, inst.service, inst.site, user, inst.instance),
                           id=user)


def _settings(inst) -> SimpleNamespace:
    return SimpleNamespace(site=inst.site, id=inst.instance, instance=inst.instance, executor_id=inst.instance,
                           own_site_only=TOPOLOGY.scheduled_sites(inst.site) == [inst.site],
                           rosters=TOPOLOGY.hears_rosters(inst.site),
                           heartbeat_site=inst.site if TOPOLOGY.hears_rosters(inst.site) else None)


def _concrete(address: str, inst) -> str:
    values = {"site": inst.site, "executor": inst.instance or "x", "instance": inst.instance or inst.site,
              "service": inst.service, "tenant": "acme", "model": "digits-small", "entry": "pub.x"}
    for name, value in values.items():
        address = address.replace("{" + name + "}", value)
    return address


@pytest.mark.parametrize(("inst", "perms"), list(instances()))
def test_every_declared_subscription_is_allowed(inst, perms: Permissions):
    cls = service_class(inst.service)
    for spec in cls.endpoints().values():
        subject, _ = spec.resolve(_settings(inst))
        assert allowed(perms.subscribe, subject), f"{inst.name} may not subscribe {subject} ({spec.channel})"


@pytest.mark.parametrize(("inst", "perms"), list(instances()))
def test_every_declared_nats_send_is_allowed(inst, perms: Permissions):
    cls = service_class(inst.service)
    sent = set(cls.publishes)
    for spec in cls.endpoints().values():
        sent.update(spec.publishes)
    for name in sorted(sent):
        channel = CHANNELS.get(name)
        if channel is None or channel.address is None:
            continue
        subject = _concrete(channel.address, inst)
        if name == "inferReply":
            continue
        assert allowed(perms.publish, subject), f"{inst.name} may not publish {subject} ({name})"
    assert perms.responses >= 1, "replies and acknowledgements go through the response permission"


@pytest.mark.parametrize(("inst", "perms"), list(instances()))
def test_every_instance_may_answer_nats_micro_discovery(inst, perms: Permissions):
    micro = MicroDiscovery(inst.service, inst.instance or inst.name, inst.site, "")
    for subject in micro.subjects():
        assert allowed(perms.subscribe, subject), f"{inst.name} may not subscribe {subject}"
    assert not allowed(perms.subscribe, Subjects.micro("PING", "other-service"))


def test_discovery_is_the_operators_only_and_reaches_into_every_site():
    for party in (rules.tenant(TOPOLOGY, "acme"), rules.gateway(TOPOLOGY, "cloud", "gateway-cloud", "cloud")):
        assert not allowed(party.publish, Subjects.micro("PING"))
        assert not allowed(party.subscribe, Subjects.micro("INFO", "admission"))
    assert allowed(rules.operator().publish, Subjects.micro("STATS", "executor", "x"))
    leaf = rules.leaf(TOPOLOGY, "factory")
    assert allowed(leaf.subscribe, Subjects.micro("PING")), "the hub's operator must reach a site's services"
    assert not allowed(leaf.publish, Subjects.micro("PING")), "a site may not query the rest of the network"


def test_a_tenant_reaches_only_its_own_requests_and_inboxes():
    perms = rules.tenant(TOPOLOGY, "acme")
    assert allowed(perms.publish, "din.v1.infer.acme.digits-small")
    for subject in ("din.v1.infer.globex.digits-small", "din.v1.schedule.cloud", "din.v1.exec.cloud.cloud-1",
                    "din.v1.heartbeat.cloud.cloud-1", "din.v1.classify.cloud", "$KV.DIN_KEYS.pub.x",
                    "$JS.API.STREAM.DELETE.KV_DIN_KEYS", "$JS.API.STREAM.PURGE.KV_DIN_KEYS",
                    "$JS.cloud.API.STREAM.CREATE.X", "_INBOX.globex.cloud.x", "din.v1.control.executor.cloud-1"):
        assert not allowed(perms.publish, subject), subject
    assert allowed(perms.subscribe, "_INBOX.acme.factory.>")
    for subject in (">", "_INBOX.>", "_INBOX.globex.>", "_DIN_INBOX.>", "din.v1.>", "din.v1.infer.>"):
        assert not allowed(perms.subscribe, subject), subject
    assert perms.responses == 0


def test_an_executor_speaks_only_for_itself():
    perms = rules.executor(TOPOLOGY, "cloud", "cloud-1")
    assert allowed(perms.publish, "din.v1.heartbeat.cloud.cloud-1")
    for subject in ("din.v1.heartbeat.cloud.cloud-2", "din.v1.heartbeat.factory.factory-1",
                    "din.v1.events.completed.factory", "din.v1.control.executor.cloud-2", "din.v1.summary.cloud",
                    "din.v1.pressure.cloud", "$KV.DIN_KEYS.pub.executor", "din.v1.infer.acme.digits-small"):
        assert not allowed(perms.publish, subject), subject
    for subject in ("din.v1.exec.cloud.cloud-2", "din.v1.exec.factory.factory-1", "din.v1.schedule.cloud",
                    "din.v1.control.executor.cloud-2", "_INBOX.>", "din.v1.heartbeat.*.*"):
        assert not allowed(perms.subscribe, subject), subject


def test_only_the_key_manager_writes_the_key_bucket():
    for inst in service_instances(TOPOLOGY):
        perms = service_permissions(TOPOLOGY, inst.service, inst.site, inst.name, inst.instance)
        writes = allowed(perms.publish, "$KV.DIN_KEYS.pub.x") or allowed(perms.publish,
                                                                          "$JS.API.STREAM.DELETE.KV_DIN_KEYS")
        assert writes == (inst.service == "keymanager"), inst.name
        assert not allowed(perms.publish, "$JS.API.STREAM.PURGE.KV_DIN_KEYS") or inst.service == "keymanager"


def test_a_sites_leaf_cannot_speak_for_or_hear_another_site():
    perms = rules.leaf(TOPOLOGY, "factory")
    for subject in ("din.v1.heartbeat.factory.factory-1", "din.v1.summary.factory", "din.v1.events.completed.factory",
                    "_INBOX.acme.cloud.x", "din.v1.schedule.cloud"):
        assert allowed(perms.publish, subject), subject
    for subject in ("din.v1.heartbeat.branch.branch-1", "din.v1.summary.branch", "din.v1.events.completed.branch",
                    "din.v1.pressure.cloud", "$KV.DIN_KEYS.pub.x", "din.v1.control.keymanager.keymanager"):
        assert not allowed(perms.publish, subject), subject
    for subject in ("din.v1.exec.factory.factory-1", "din.v1.admit.factory.acme.m", "_INBOX.acme.factory.x",
                    "_DIN_INBOX.factory.admission-factory.x"):
        assert allowed(perms.subscribe, subject), subject
    for subject in ("din.v1.exec.branch.branch-1", "din.v1.work.branch.m", "din.v1.schedule.branch",
                    "din.v1.admit.branch.acme.m", "_INBOX.acme.branch.x", "_INBOX.acme.cloud.x",
                    "_DIN_INBOX.cloud.scheduler.x", "din.v1.heartbeat.branch.branch-1"):
        assert not allowed(perms.subscribe, subject), subject


def test_answers_go_only_into_the_senders_inboxes():
    assert is_tenant_reply("acme", "_INBOX.acme.cloud.abc.1")
    assert is_tenant_reply("acme", "_DIN_INBOX.cloud.operator.abc.1")
    for reply in ("_INBOX.globex.cloud.abc.1", "_INBOX.acmex.cloud.1", "_DIN_INBOX.cloud.scheduler.abc.1",
                  "din.v1.schedule.cloud", "_INBOX.abc"):
        assert not is_tenant_reply("acme", reply), reply


def test_the_access_table_in_the_docs_is_current():
    from din.access import ACCESS_DOC, drifted

    assert not drifted(), f"{ACCESS_DOC} drifted from the rules: run `din access`"
