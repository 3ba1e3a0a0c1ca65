"""The executor's settings: tenant weights come from the topology, the one place they are declared."""

from pathlib import Path

import yaml

from din.services.executor.settings import ExecutorSettings

REPO = Path(__file__).resolve().parents[2]
COMMON = dict(id="e1", models="m", model_repo="/models", site="cloud", nats_url="nats://localhost:4222",
              kafka_bootstrap="localhost:9092", security="off")


def test_tenant_weights_are_read_from_the_topology(tmp_path, monkeypatch):
    raw = yaml.safe_load((REPO / "ops" / "topology" / "default.yaml").read_text())
    raw["tenants"][1]["weight"] = 3.0
    path = tmp_path / "topology.yaml"
    path.write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("DIN_TOPOLOGY", str(path))
    weights = ExecutorSettings(**COMMON).tenant_weights()
    assert weights == {"acme": 1.0, "globex": 3.0, "initech": 1.0}


def test_without_a_topology_every_tenant_weighs_the_same(monkeypatch):
    monkeypatch.delenv("DIN_TOPOLOGY", raising=False)
    assert ExecutorSettings(**COMMON).tenant_weights() == {}
