"""The WAN links' plan, without starting anything: ports, leaf and hub configs, toxics, the links CLI's parsing."""

from __future__ import annotations

import argparse

import pytest

from din.commands.links import describe, parse_bandwidth, parse_duration_ms, parse_loss, topology_links
from din.shared.topology import LinkConditions, LinkSpec, load_topology
from din.stack.launcher import DEFAULT_TOPOLOGY, PortPlan, check_ports, nats_specs, port_roles, stack_wan_links
from din.stack.wan import conditions_of, toxics_for


@pytest.fixture(scope="module")
def topology():
    return load_topology(DEFAULT_TOPOLOGY)


def test_default_wan_ports_follow_the_leafnode_port(topology):
    roles = {role: port for port, role in port_roles(topology, PortPlan(), wan=True)}
    assert roles["toxiproxy API port"] == 8474
    assert roles["WAN link proxy from site factory to the hub"] == 7423
    assert roles["WAN link proxy from site branch to the hub"] == 7424
    assert "toxiproxy API port" not in {role for _, role in port_roles(topology, PortPlan())}


def test_free_plan_has_distinct_wan_ports(topology):
    roles = port_roles(topology, PortPlan.free(edge_sites=2), wan=True)
    assert len(roles) == len({port for port, _ in roles}) == 19
    check_ports(roles)


def test_leaves_dial_their_link_proxy_and_the_hub_advertises_no_leafnode_urls(topology, tmp_path):
    ports = PortPlan()
    hub, *leaves = nats_specs(topology, ports, wan=True)
    assert "no_advertise: true" in hub.config(tmp_path)
    links = {link.site: link for link in stack_wan_links(topology, ports)}
    for leaf in leaves:
        assert f'url: "nats-leaf://127.0.0.1:{links[leaf.site].listen_port}"' in leaf.config(tmp_path)
        assert links[leaf.site].upstream_port == ports.leafnode
    plain = nats_specs(topology, ports)
    assert all(f"127.0.0.1:{ports.leafnode}" in leaf.config(tmp_path) for leaf in plain[1:])


def test_links_carry_the_topologys_conditions(topology):
    links = {link.site: link for link in stack_wan_links(topology, PortPlan())}
    assert (links["factory"].path, links["factory"].conditions.latency_ms) == ("dedicated", 2)
    assert (links["branch"].path, links["branch"].conditions.jitter_ms) == ("internet", 10)
    assert links["factory"].proxy == {
        "name": "factory", "listen": "127.0.0.1:7423", "upstream": "127.0.0.1:7422", "enabled": True
    }


def test_toxics_delay_and_cap_both_directions_and_read_back():
    conditions = LinkConditions(latency_ms=40, jitter_ms=10, bandwidth_kb_s=256)
    toxics = toxics_for(conditions)
    assert set(toxics) == {"latency_upstream", "latency_downstream", "bandwidth_upstream", "bandwidth_downstream"}
    assert toxics["latency_downstream"] == {
        "name": "latency_downstream", "type": "latency", "stream": "downstream", "toxicity": 1.0,
        "attributes": {"latency": 40, "jitter": 10},
    }
    assert conditions_of(list(toxics.values())) == conditions
    assert toxics_for(LinkConditions(latency_ms=0)) == {}
    assert conditions_of([]) == LinkConditions(latency_ms=0)


def test_loss_is_a_retransmission_stall_each_way_with_linux_timers():
    conditions = LinkConditions(latency_ms=40, jitter_ms=10, loss_percent=0.5)
    toxics = toxics_for(conditions)
    assert toxics["loss_upstream"] == {
        "name": "loss_upstream", "type": "loss", "stream": "upstream", "toxicity": 1.0,
        "attributes": {"percent": 0.5, "rtt": 80, "rto": 280},
    }
    assert toxics["loss_downstream"]["attributes"] == toxics["loss_upstream"]["attributes"]
    assert conditions_of(list(toxics.values())) == conditions
    # A jittery link's RTO grows past the 200 ms floor with its variation.
    assert LinkConditions(latency_ms=100, jitter_ms=40, loss_percent=1).retransmit_timeout_ms == 200 + 320
    assert "loss" not in {t["type"] for t in toxics_for(LinkConditions(latency_ms=40)).values()}


def test_only_the_internet_loses_packets_by_default(topology):
    assert topology.hub_link("branch").conditions().loss_percent == 0.1
    assert topology.hub_link("factory").conditions().loss_percent == 0
    assert LinkSpec(between=("a", "b"), path="internet", loss_percent=2).conditions().loss_percent == 2
    with pytest.raises(ValueError, match="less than or equal to 50"):
        LinkConditions(latency_ms=1, loss_percent=60)


def test_topology_links_for_a_proxy_elsewhere(topology):
    links = {link.site: link for link in topology_links(topology, listen_host="0.0.0.0", hub_host="nats-cloud")}
    assert links["branch"].proxy == {
        "name": "branch", "listen": "0.0.0.0:7424", "upstream": "nats-cloud:7422", "enabled": True
    }
    assert links["branch"].conditions == topology.hub_link("branch").conditions()
    assert "0.1 % loss (retransmitted after 80 ms or 280 ms)" in describe(links["branch"].conditions)


@pytest.mark.parametrize(("text", "ms"), [("50ms", 50), ("50", 50), ("0.05s", 50), ("1s", 1000), (" 2 ms ", 2)])
def test_durations(text, ms):
    assert parse_duration_ms(text) == ms


@pytest.mark.parametrize("text", ["fast", "-5ms", "5 minutes", ""])
def test_bad_durations_say_how_to_write_one(text):
    with pytest.raises(argparse.ArgumentTypeError, match="write e.g. 50ms"):
        parse_duration_ms(text)


@pytest.mark.parametrize(("text", "percent"), [("0.5", 0.5), ("0.5%", 0.5), ("0", 0.0), (" 2 % ", 2.0)])
def test_loss_is_a_percent(text, percent):
    assert parse_loss(text) == percent


@pytest.mark.parametrize(("text", "says"), [("lots", "write a percent"), ("75", "between 0 and 50"),
                                            ("-1", "between 0 and 50")])
def test_bad_loss_says_why(text, says):
    with pytest.raises(argparse.ArgumentTypeError, match=says):
        parse_loss(text)


def test_bandwidth_is_kilobytes_per_second_or_none():
    assert parse_bandwidth("512") == 512
    assert parse_bandwidth("none") is None
    with pytest.raises(argparse.ArgumentTypeError, match="at least 1 KB/s"):
        parse_bandwidth("0")
