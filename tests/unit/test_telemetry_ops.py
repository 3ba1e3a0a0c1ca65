"""The Grafana dashboard, the Prometheus config and the docs use exactly the metric names the code exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from din.services.telemetry.metrics import METRIC_NAMES, METRICS, exported_series_names
from din.services.telemetry.settings import TelemetrySettings
from din.services.telemetry.topics import topic_plan

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "ops" / "grafana" / "dashboards" / "din.json"
PROMETHEUS = ROOT / "ops" / "prometheus" / "prometheus.yml"
DATASOURCES = ROOT / "ops" / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DOCS = ROOT / "docs" / "telemetry.md"

PROMQL_WORDS = {"sum", "by", "rate", "increase", "histogram_quantile", "label_values", "without", "avg", "max",
                "min", "count", "le"}


def metric_names_in(expr: str) -> set[str]:
    """Every ``din_*`` identifier in a PromQL expression."""
    return set(re.findall(r"\b(din_[a-z0-9_]+)", expr))


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dashboard["templating"]["list"]]
    return exprs


def settings() -> TelemetrySettings:
    return TelemetrySettings(nats_url="nats://x:4222", kafka_bootstrap="k:9092", site="cloud")


def test_the_name_extractor_sees_names_and_nothing_else():
    assert metric_names_in('sum by (le) (rate(din_a_b_bucket{x="din_not"}[5m])) / din_c') == {"din_a_b_bucket", "din_c",
                                                                                              "din_not"}
    assert "din_requests_bucket" not in exported_series_names(), "a histogram suffix on a counter is caught"


def test_dashboard_uses_only_exported_metric_names_and_covers_them_all():
    used = set().union(*(metric_names_in(e) for e in dashboard_exprs()))
    assert used, "the dashboard has queries"
    unknown = used - exported_series_names()
    assert not unknown, f"dashboard queries metrics the code does not export: {sorted(unknown)}"
    covered = {name for name in METRIC_NAMES
               if any(u == name or u.startswith(name + "_") for u in used)}
    assert covered == set(METRIC_NAMES), f"not on the dashboard: {sorted(set(METRIC_NAMES) - covered)}"


def test_dashboard_panels_use_the_provisioned_datasource():
    dashboard = json.loads(DASHBOARD.read_text())
    (source,) = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == source["uid"], panel["title"]
        assert panel["targets"], panel["title"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])


def test_histogram_queries_use_buckets_and_counters_use_rate():
    kinds = {m.name: m.kind for m in METRICS}
    for expr in dashboard_exprs():
        if "histogram_quantile" in expr:
            assert all(n.endswith("_bucket") for n in metric_names_in(expr)), expr
        for name in metric_names_in(expr):
            if kinds.get(name) == "counter" and "label_values" not in expr:
                assert re.search(rf"(rate|increase)\({name}\b", expr), f"counter {name} read raw in {expr}"


def test_prometheus_scrapes_telemetry_on_its_configured_port_and_path():
    config = yaml.safe_load(PROMETHEUS.read_text())
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    (target,) = [t for c in job["static_configs"] for t in c["targets"]]
    assert int(target.rsplit(":", 1)[1]) == settings().metrics_port


@pytest.mark.parametrize("name", METRIC_NAMES)
def test_docs_name_every_metric(name):
    assert f"`{name}`" in DOCS.read_text(), f"docs/telemetry.md does not document {name}"


def test_docs_name_every_topic_with_its_retention():
    text = DOCS.read_text()
    for spec in topic_plan(settings()):
        assert f"`{spec.base}`" in text, spec.base
        hours = spec.retention_ms / 3_600_000
        assert re.search(rf"`{re.escape(spec.base)}`[^\n]*\b{hours:g} h\b", text), f"retention of {spec.base}"
