"""A clustered hub's plan, without starting anything: the topology field, ports, each server's config (routes,
cluster block, server name, JetStream), the leaves' remotes, the WAN proxies and the services' environment."""

from __future__ import annotations

import json

import pytest

from din.shared.bus.connect import nats_servers
from din.shared.settings import ServiceSettings
from din.shared.topology import Topology
from din.shared.workqueue import work_stream_config
from din.stack.brokers import NatsSecurity
from din.stack.launcher import (
    PortPlan,
    check_ports,
    nats_specs,
    port_roles,
    service_environments,
    stack_wan_links,
)
from tests.support import three_site_topology


def clustered(servers: int = 3) -> Topology:
    spec = three_site_topology("cluster", {"cloud": [{"id": "cloud-1", "models": ["digits-small"]}]},
                               [{"name": "acme"}])
    spec["sites"][0]["servers"] = servers
    return Topology.model_validate(spec)


SECURITY = NatsSecurity(trust_include="/bus/nats/trust.conf", cert="/bus/tls/nats-cloud-2.pem",
                        key="/bus/tls/nats-cloud-2-key.pem", ca_file="/bus/ca.pem", account="ADIN")


@pytest.mark.parametrize("servers", [0, 2, 8])
def test_hub_servers_are_one_or_a_quorum(servers):
    with pytest.raises(ValueError, match="servers"):
        clustered(servers)


def test_only_the_hub_runs_as_a_cluster():
    spec = three_site_topology("cluster", {}, [{"name": "acme"}])
    spec["sites"][1]["servers"] = 3
    with pytest.raises(ValueError, match="only the hub"):
        Topology.model_validate(spec)


def test_replicas_follow_the_hub_cluster():
    assert clustered(1).stream_replicas() == {}
    assert clustered(3).stream_replicas() == {"cloud": 3}
    assert clustered(5).stream_replicas() == {"cloud": 3}
    assert clustered(5).hub.jetstream_replicas == 3


def test_free_plan_gives_every_hub_server_its_own_ports():
    topology = clustered()
    roles = port_roles(topology, PortPlan.free(edge_sites=2, hub_servers=3), kafka=False, telemetry=False,
                       wan=True, gateway=False)
    # 3 hub servers x (client, monitor, leafnode, route) + 2 leaves x (client, monitor) + toxiproxy + 2 x 3 proxies
    assert len(roles) == len({port for port, _ in roles}) == 12 + 4 + 1 + 6
    check_ports(roles)


def test_default_cluster_ports_step_by_a_hundred():
    roles = {role: port for port, role in port_roles(clustered(), PortPlan(), wan=True)}
    assert roles["NATS client port of hub site cloud server din-cloud"] == 4222
    assert roles["NATS client port of hub site cloud server din-cloud-3"] == 4422
    assert roles["NATS route port of hub site cloud server din-cloud-2"] == 6223
    assert roles["NATS leafnode port of hub site cloud server din-cloud-2"] == 7522
    assert roles["WAN link proxy from site branch to hub server 3"] == 7624
    assert len(roles) == len(set(roles.values()))


def test_each_hub_server_routes_to_the_others_with_verified_tls(tmp_path):
    ports = PortPlan()
    hubs = [s for s in nats_specs(clustered(), ports) if s.is_hub]
    assert [s.name for s in hubs] == ["din-cloud", "din-cloud-2", "din-cloud-3"]
    assert [s.process_name for s in hubs] == ["nats-hub-cloud", "nats-hub-cloud-2", "nats-hub-cloud-3"]
    second = hubs[1]
    second.security = SECURITY
    conf = second.config(tmp_path / "js", tmp_path)
    assert 'server_name: "din-cloud-2"' in conf
    assert 'domain: "cloud"' in conf
    assert f"listen: 127.0.0.1:{ports.hub_route(2)}" in conf
    assert f'routes: ["nats-route://127.0.0.1:{ports.hub_route(1)}", "nats-route://127.0.0.1:{ports.hub_route(3)}"]' \
        in conf
    cluster = conf[conf.index("cluster {"):]
    assert 'name: "din-cloud"' in cluster
    assert "no_advertise: true" in cluster
    assert 'ca_file: "/bus/ca.pem"' in cluster and "verify: true" in cluster
    assert 'cert_file: "/bus/tls/nats-cloud-2.pem"' in cluster
    leafnodes = conf[conf.index("leafnodes {"):conf.index("cluster {")]
    assert f"listen: 127.0.0.1:{ports.hub_server_ports(2)[2]}" in leafnodes and "no_advertise: true" in leafnodes


def test_a_single_hub_has_no_cluster_block(tmp_path):
    hub = nats_specs(clustered(1), PortPlan())[0]
    conf = hub.config(tmp_path)
    assert "cluster {" not in conf and 'server_name: "din-cloud"' in conf


def test_leaves_list_every_hub_server_each_through_its_own_proxy(tmp_path):
    topology, ports = clustered(), PortPlan()
    leaves = [s for s in nats_specs(topology, ports, wan=True) if not s.is_hub]
    links = stack_wan_links(topology, ports)
    assert [link.name for link in links] == ["factory", "branch", "factory.2", "branch.2", "factory.3", "branch.3"]
    for leaf in leaves:
        mine = [link for link in links if link.site == leaf.site]
        assert [link.upstream_port for link in mine] == [ports.hub_server_ports(k)[2] for k in (1, 2, 3)]
        assert leaf.leaf_remote_ports == tuple(link.listen_port for link in mine)
        urls = ", ".join(f'"nats-leaf://127.0.0.1:{link.listen_port}"' for link in mine)
        assert f"urls: [{urls}]" in leaf.config(tmp_path)
    plain = [s for s in nats_specs(topology, ports) if not s.is_hub]
    assert plain[0].leaf_remote_ports == tuple(ports.hub_server_ports(k)[2] for k in (1, 2, 3))


def test_hub_processes_get_every_hub_server_and_the_replicas(monkeypatch):
    topology, ports = clustered(), PortPlan()
    hub_urls = ",".join(f"nats://127.0.0.1:{ports.hub_server_ports(k)[0]}" for k in (1, 2, 3))
    envs = service_environments(
        topology, nats_urls={"cloud": hub_urls, "factory": "nats://127.0.0.1:4223", "branch": "nats://127.0.0.1:4224"},
        kafka_bootstrap="127.0.0.1:9092", topology_path="t.yaml", credentials_path="c.json")
    assert nats_servers(envs["scheduler"]["DIN_NATS_URL"]) == hub_urls.split(",")
    assert json.loads(envs["keymanager"]["DIN_JETSTREAM_REPLICAS"]) == {"cloud": 3}
    for name, value in envs["admission-factory"].items():
        monkeypatch.setenv(name, value)
    settings = ServiceSettings()
    assert (settings.replicas_in("cloud"), settings.replicas_in("factory")) == (3, 1)
    assert work_stream_config("cloud", settings.replicas_in("cloud")).num_replicas == 3


def test_single_hub_environment_is_unchanged():
    envs = service_environments(
        clustered(1), nats_urls={"cloud": "nats://h", "factory": "nats://f", "branch": "nats://b"},
        kafka_bootstrap="k", topology_path="t.yaml", credentials_path="c.json")
    assert all("DIN_JETSTREAM_REPLICAS" not in env for env in envs.values())
    assert nats_servers("nats://h") == ["nats://h"]
