"""The WAN links' plan, without starting anything: ports, leaf and hub configs, toxics, the links CLI's parsing."""

from __future__ import annotations

import argparse

import pytest

from din.commands.links import parse_bandwidth, parse_duration_ms
from din.stack.launcher import DEFAULT_TOPOLOGY, PortPlan, check_ports, nats_specs, port_roles, stack_wan_links
from din.stack.wan import conditions_of, toxics_for
from shared.topology import LinkConditions, load_topology


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
    assert len(roles) == len({port for port, _ in roles}) == 13
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


@pytest.mark.parametrize(("text", "ms"), [("50ms", 50), ("50", 50), ("0.05s", 50), ("1s", 1000), (" 2 ms ", 2)])
def test_durations(text, ms):
    assert parse_duration_ms(text) == ms


@pytest.mark.parametrize("text", ["fast", "-5ms", "5 minutes", ""])
def test_bad_durations_say_how_to_write_one(text):
    with pytest.raises(argparse.ArgumentTypeError, match="write e.g. 50ms"):
        parse_duration_ms(text)


def test_bandwidth_is_kilobytes_per_second_or_none():
    assert parse_bandwidth("512") == 512
    assert parse_bandwidth("none") is None
    with pytest.raises(argparse.ArgumentTypeError, match="at least 1 KB/s"):
        parse_bandwidth("0")
