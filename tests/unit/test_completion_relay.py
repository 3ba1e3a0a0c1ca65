"""The completion relay's pure parts: when a site is lagging, what health and /metrics say, the stream's shape."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from din.services.telemetry.metrics import TelemetryMetrics
from din.services.telemetry.relay import RelayLedger, RelayState, relay_state
from din.services.telemetry.settings import TelemetrySettings
from din.shared.completionstream import completions_stream_config, relay_consumer_config, relay_durable
from din.shared.contracts.inference import SlaClass


def test_a_site_lags_only_while_a_completion_waits_longer_than_the_threshold():
    assert relay_state(0, None, 30.0) is RelayState.RELAYING
    assert relay_state(500, 29.9, 30.0) is RelayState.RELAYING
    assert relay_state(1, 30.1, 30.0) is RelayState.LAGGING
    assert relay_state(0, 99.0, 30.0) is RelayState.RELAYING, "nothing pending: no gap, whatever the age"


def test_the_ledger_reports_each_change_once_and_sums_the_backlog():
    ledger = RelayLedger(["cloud", "factory"], 30.0)
    assert ledger.seen("cloud", 0, None) is RelayState.RELAYING
    assert ledger.seen("cloud", 3, 1.0) is None, "still relaying: no change to log"
    assert ledger.seen("factory", 1700, 45.5) is RelayState.LAGGING
    ledger.relayed("cloud", 7)
    detail = ledger.detail()
    assert detail == {"relay": "cloud:relaying:3,factory:lagging:1700", "relay_pending": 1703,
                      "relay_oldest_s": 45.5, "relay_lagging": "factory", "relayed": 7}
    assert ledger.unreachable("cloud") is RelayState.UNREACHABLE
    assert ledger.lagging() == ["cloud", "factory"]
    assert ledger.seen("factory", 0, None) is RelayState.RELAYING
    assert ledger.sites["factory"].oldest_s is None


def test_metrics_show_each_sites_relay():
    ledger = RelayLedger(["cloud", "factory"], 30.0)
    ledger.seen("factory", 12, 31.0)
    ledger.relayed("cloud", 4)
    metrics = TelemetryMetrics({SlaClass.REALTIME: 50.0}, relay=ledger)
    found = {(s.name, s.labels.get("site")): s.value
             for family in text_string_to_metric_families(metrics.exposition().decode()) for s in family.samples}
    assert found[("din_completions_relayed_total", "cloud")] == 4
    assert found[("din_completion_relay_pending", "factory")] == 12
    assert found[("din_completion_relay_oldest_seconds", "factory")] == 31.0
    assert found[("din_completion_relay_lagging", "factory")] == 1
    assert found[("din_completion_relay_lagging", "cloud")] == 0


def test_the_stream_keeps_one_sites_completions_bounded_by_age_and_size():
    config = completions_stream_config("branch-2", max_age_s=3600.0, max_bytes=1 << 20, replicas=3)
    assert config.name == "DIN_COMPLETIONS_BRANCH_2"
    assert config.subjects == ["din.v1.events.completed.branch-2"]
    assert (config.max_age, config.max_bytes, config.num_replicas) == (3600.0, 1 << 20, 3)
    assert relay_durable() == "telemetry" and relay_durable("t1") == "telemetry_t1"
    assert relay_consumer_config("telemetry", from_start=True).deliver_policy.value == "all"
    assert relay_consumer_config("telemetry", from_start=False).deliver_policy.value == "new"


def test_the_relay_sites_come_from_the_bus_sites_else_the_own_site():
    settings = TelemetrySettings(nats_url="nats://x:4222", kafka_bootstrap="k:9092", site="cloud",
                                 bus_sites="cloud,factory")
    assert settings.relay_sites() == ["cloud", "factory"]
    assert TelemetrySettings(nats_url="nats://x:4222", kafka_bootstrap="k:9092", site="edge").relay_sites() == ["edge"]
