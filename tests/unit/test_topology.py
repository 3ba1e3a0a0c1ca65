"""Topology files: every mistake becomes one ``TopologyError`` line naming the file and the place."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from din.shared.topology import PathType, Topology, TopologyError, load_topology

REPO = Path(__file__).resolve().parents[2]

GOOD = {
    "name": "t",
    "sites": [
        {"name": "cloud", "role": "hub", "executors": [{"id": "c1", "models": ["m"]}]},
        {"name": "factory", "role": "edge", "executors": [{"id": "f1", "models": ["m"], "capacity": 8}]},
    ],
    "links": [{"between": ["cloud", "factory"], "path": "vpn"}],
    "tenants": [{"name": "acme", "sensitive_sites": ["factory"]}],
}


def _write(tmp_path: Path, data) -> Path:
    path = tmp_path / "topology.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def _broken(mutate) -> dict:
    data = copy.deepcopy(GOOD)
    mutate(data)
    return data


def test_default_topology_loads():
    topology = load_topology(REPO / "ops" / "topology" / "default.yaml")
    assert topology.hub.name == "cloud"
    assert {s.name for s in topology.sites} == {"cloud", "factory", "branch"}
    assert topology.path_between("cloud", "branch") is PathType.INTERNET


def test_good_topology_loads(tmp_path):
    topology = load_topology(_write(tmp_path, GOOD))
    assert topology.site("factory").executors[0].capacity == 8
    assert topology.path_between("factory", "cloud") is PathType.VPN
    assert topology.path_between("cloud", "cloud") is None


@pytest.mark.parametrize(
    ("case", "data", "expected"),
    [
        ("bad yaml", "name: t\nsites: [\n  - {name: cloud", "not valid YAML at line"),
        ("not a mapping", "- just\n- a list\n", "must hold a mapping"),
        (
            "unknown site in link",
            _broken(lambda d: d["links"].append({"between": ["cloud", "moon"], "path": "vpn"})),
            "unknown site 'moon'",
        ),
        ("two hubs", _broken(lambda d: d["sites"][1].update(role="hub")), "exactly one site needs role 'hub'"),
        ("no hub", _broken(lambda d: d["sites"][0].update(role="edge")), "exactly one site needs role 'hub'"),
        ("bad token in site name", _broken(lambda d: d["sites"][1].update(name="fac.tory")), "invalid site name"),
        ("wildcard in executor id", _broken(lambda d: d["sites"][1]["executors"][0].update(id="f*")),
         "invalid executor id"),
        ("space in tenant name", _broken(lambda d: d["tenants"][0].update(name="ac me")), "invalid tenant name"),
        ("repeated executor id", _broken(lambda d: d["sites"][1]["executors"][0].update(id="c1")),
         "executor ids repeat"),
        ("unknown field", _broken(lambda d: d["sites"][0].update(colour="red")), "sites.0.colour"),
        ("bad path type", _broken(lambda d: d["links"][0].update(path="carrier-pigeon")), "links.0.path"),
        ("tenant names unknown site", _broken(lambda d: d["tenants"][0].update(sensitive_sites=["moon"])), "'moon'"),
        ("self link", _broken(lambda d: d["links"].append({"between": ["cloud", "cloud"], "path": "vpn"})),
         "to itself"),
        ("plaintext for unknown tenant", _broken(lambda d: d.update(security={"plaintext_ingress": ["moon"]})),
         "unknown tenant 'moon'"),
    ],
)
def test_mistakes_give_one_line(tmp_path, case, data, expected):
    path = _write(tmp_path, data)
    with pytest.raises(TopologyError) as err:
        load_topology(path)
    message = str(err.value)
    assert "\n" not in message, f"{case}: message spans lines: {message!r}"
    assert str(path) in message
    assert expected in message, f"{case}: {message!r}"
    assert err.value.__cause__ is None
    assert err.value.__context__ is None or err.value.__suppress_context__, "a chained traceback would follow"


def test_missing_file_says_what_to_do(tmp_path):
    with pytest.raises(TopologyError, match="not found: pass an existing file with --topology"):
        load_topology(tmp_path / "nope.yaml")


def test_links_take_their_path_types_default_conditions():
    topology = load_topology(REPO / "ops" / "topology" / "default.yaml")
    dedicated = topology.hub_link("factory").conditions()
    internet = topology.hub_link("branch").conditions()
    assert (dedicated.latency_ms, dedicated.jitter_ms, dedicated.bandwidth_kb_s) == (2.0, 0.0, None)
    assert (internet.latency_ms, internet.jitter_ms) == (40.0, 10.0)
    assert topology.link_between("factory", "branch").conditions().latency_ms == 10.0


def test_a_link_overrides_only_what_it_names():
    data = _broken(lambda d: d["links"][0].update(latency_ms=25, bandwidth_kb_s=512))
    conditions = Topology.model_validate(data).links[0].conditions()
    assert (conditions.latency_ms, conditions.jitter_ms, conditions.bandwidth_kb_s) == (25.0, 0.0, 512)


def test_an_edge_without_a_link_to_the_hub_is_reached_over_the_internet():
    data = _broken(lambda d: d.update(links=[]))
    assert Topology.model_validate(data).hub_link("factory").path is PathType.INTERNET


@pytest.mark.parametrize(
    ("link", "message"),
    [
        ({"latency_ms": 5, "jitter_ms": 6}, "jitter_ms 6 exceeds latency_ms 5"),
        ({"latency_ms": -1}, "greater than or equal to 0"),
        ({"bandwidth_kb_s": 0}, "greater than or equal to 1"),
    ],
)
def test_impossible_link_conditions_are_one_line(tmp_path, link, message):
    path = _write(tmp_path, _broken(lambda d: d["links"][0].update(link)))
    with pytest.raises(TopologyError, match=message) as err:
        load_topology(path)
    assert "\n" not in str(err.value) and "links.0" in str(err.value)
