"""DIN's Prometheus rules name only what telemetry exports, count the SLO's errors by the error codes' own classes,
and pass ``promtool``: ``check rules``, the rule unit tests (``test rules``), and ``check metrics`` on a scrape in
which every metric family holds data.

The ``promtool`` tests need Debian's ``prometheus`` package (``ops/setup.sh`` installs it where it can); they are
skipped without it. The others read the rule files only.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from din.services.telemetry.metrics import (
    METRIC_NAMES,
    METRICS,
    SERIES_SUFFIXES,
    TelemetryMetrics,
    exported_series_names,
)
from din.services.telemetry.relay import RelayLedger
from din.shared.contracts.events import AdmissionDecisionV1, SchedulingDecisionV1
from din.shared.contracts.federation import ModelSummaryV1, SiteSummaryV1
from din.shared.contracts.scaling import ScalingDecisionV1
from din.shared.errors import DinError, ErrorCode
from tests.support import ManualClock
from tests.unit.test_telemetry_metrics import TARGETS, completion, heartbeat

ROOT = Path(__file__).resolve().parents[2]
RULES_DIR = ROOT / "ops" / "prometheus" / "rules"
RULE_FILES = sorted(RULES_DIR.glob("*.yml"))
RULE_TESTS = sorted((RULES_DIR / "tests").glob("*.yml"))
SLO_GROUP = "din-slo-error-ratios"
TARGET_LABELS = {"job", "instance"}
"""Labels Prometheus adds to every scraped series."""

STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
IDENTIFIER = re.compile(r"(?<![\w:.])([a-zA-Z_:][a-zA-Z0-9_:]*)")
SELECTOR = re.compile(r"\b(din_[a-z0-9_]+)\s*\{([^}]*)\}")
MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*("(?:[^"\\]|\\.)*")')
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")


def rules() -> list[tuple[str, str, dict]]:
    """``(file name, group name, rule)`` of every shipped rule."""
    return [(path.name, group["name"], rule)
            for path in RULE_FILES for group in yaml.safe_load(path.read_text())["groups"] for rule in group["rules"]]


def recorded() -> set[str]:
    return {rule["record"] for _, _, rule in rules() if "record" in rule}


def names_in(expr: str) -> set[str]:
    """Every identifier of a PromQL expression outside its strings: metric, recorded, function and label names."""
    return set(IDENTIFIER.findall(STRING.sub('""', expr)))


def labels_of(name: str) -> set[str]:
    """The labels a series telemetry exports can carry (with a histogram's ``le``, a summary's ``quantile``)."""
    for spec in METRICS:
        suffixes = ("", *SERIES_SUFFIXES.get(spec.kind, ()))
        if name in {spec.name + suffix for suffix in suffixes}:
            extra = {"le"} if name.endswith("_bucket") else {"quantile"} if spec.kind == "summary" else set()
            return {*spec.labels, *extra, *TARGET_LABELS}
    raise KeyError(name)


def server_error_codes() -> set[str]:
    """The codes answered like HTTP 5xx: the SLO's errors."""
    return {code.value for code in ErrorCode if DinError(code, "").to_model().status >= 500}


def rule_id(item: tuple[str, str, dict]) -> str:
    return item[2].get("record") or item[2]["alert"]


def test_the_expression_readers_see_names_labels_and_nothing_else():
    expr = 'sum by (le, stage) (rate(din_a_bucket{reason=~"din_not|x", stage!="y"}[5m])) / on () x:din_b:rate5m'
    assert {n for n in names_in(expr) if n.startswith("din_") or ":" in n} == {"din_a_bucket", "x:din_b:rate5m"}
    assert [(m, [g[0] for g in MATCHER.findall(body)]) for m, body in SELECTOR.findall(expr)] == [
        ("din_a_bucket", ["reason", "stage"])]
    assert [g.strip() for g in GROUPING.findall(expr)] == ["le, stage", ""]
    with pytest.raises(KeyError):
        labels_of("din_requests_bucket")


@pytest.mark.parametrize("item", rules(), ids=rule_id)
def test_rules_name_only_exported_metrics_and_recorded_series(item):
    _, _, rule = item
    names = names_in(rule["expr"])
    unknown_metrics = {n for n in names if n.startswith("din_")} - exported_series_names()
    assert not unknown_metrics, f"not exported by telemetry: {sorted(unknown_metrics)}"
    unknown_records = {n for n in names if ":" in n} - recorded()
    assert not unknown_records, f"no rule records {sorted(unknown_records)}"


@pytest.mark.parametrize("item", rules(), ids=rule_id)
def test_rules_select_and_group_by_labels_the_metrics_carry(item):
    _, _, rule = item
    expr = rule["expr"]
    raw = {n for n in names_in(expr) if n.startswith("din_")}
    for name, matchers in SELECTOR.findall(expr):
        used = {label for label, _, _ in MATCHER.findall(matchers)}
        assert used <= labels_of(name), f"{name} has no {sorted(used - labels_of(name))}"
    if raw:
        carried = set().union(*(labels_of(n) for n in raw))
        grouped = {label.strip() for clause in GROUPING.findall(expr) for label in clause.split(",") if label.strip()}
        assert grouped <= carried, f"grouped by {sorted(grouped - carried)}, which {sorted(raw)} do not carry"


def test_recorded_series_follow_the_level_metric_operations_convention():
    for name in recorded():
        level, metric, operations = name.split(":")
        assert level and operations and (metric.startswith("din_") or level == "din"), name


def test_the_slo_counts_exactly_the_server_side_error_codes():
    slo_rules = [rule for _, group, rule in rules() if group == SLO_GROUP]
    assert len(slo_rules) == 4, "one error ratio per burn-rate window"
    for rule in slo_rules:
        reasons = [value for name, body in SELECTOR.findall(rule["expr"]) if name == "din_rejects_total"
                   for label, op, value in MATCHER.findall(body) if label == "reason" and op == "=~"]
        assert [set(r.strip('"').split("|")) for r in reasons] == [server_error_codes()], rule["record"]


def test_every_alert_has_a_severity_a_summary_and_a_description():
    for _, _, rule in rules():
        if "alert" in rule:
            assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
            assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]


def test_every_alert_is_tested_firing_and_silent():
    fired, silent = set(), set()
    for path in RULE_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (fired if check.get("exp_alerts") else silent).add(check["alertname"])
    alerts = {rule["alert"] for _, _, rule in rules() if "alert" in rule}
    assert alerts - fired == set(), "never shown to fire"
    assert alerts - silent == set(), "never shown to stay silent"


@pytest.fixture(scope="module")
def promtool() -> str:
    found = shutil.which("promtool")
    if not found:
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    return found


def run(promtool: str, *args: str, stdin: str | None = None) -> None:
    result = subprocess.run([promtool, *args], input=stdin, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", RULE_FILES, ids=lambda p: p.name)
def test_shipped_rules_pass_promtool_check_rules(promtool, path):
    run(promtool, "check", "rules", str(path))


@pytest.mark.parametrize("path", RULE_TESTS, ids=lambda p: p.name)
def test_rule_unit_tests_pass(promtool, path):
    run(promtool, "test", "rules", str(path))


def every_family_fed() -> TelemetryMetrics:
    """Telemetry's aggregates after one event of every kind: each metric family holds at least one series."""
    relay = RelayLedger(["factory"], lag_alert_s=30.0)
    relay.relayed("factory", 3)
    relay.seen("factory", pending=2, oldest_s=45.0)
    clock = ManualClock(1000.0)
    metrics = TelemetryMetrics(TARGETS, clock=clock, sla_min_samples=1, relay=relay,
                               label_budgets={"tenant": 1, "model": 8, "site": 8, "executor": 8, "route": 8})
    stages = dict(admission=0.1, classify=0.1, schedule=0.1, queue=0.1, compute=0.1)
    metrics.observe_completion(completion(total=80.0, ttft=1.0, tpot=1.0, degraded=True, **stages))
    metrics.observe_completion(completion(tenant="globex"))
    metrics.observe_completion(completion(ok=False, error="internal"))
    metrics.observe_completion(completion().model_copy(update={"stage_kind": "prefill", "handed_on_to": "cloud",
                                                                "output_bytes": 4096}))
    metrics.observe_heartbeat(heartbeat())
    metrics.observe_summary(SiteSummaryV1(
        site="cloud", instance="cloud", sent_ms=0.0, interval_s=30.0,
        models=[ModelSummaryV1(model="digits-small", versions=["1"], executors=1, free_slots={"realtime": 5},
                               queue_depth=3, compute_ms_per_item=0.4, best_ms={"realtime": 1.0}, cost_per_1k=0.1)]))
    metrics.observe_admission(AdmissionDecisionV1(request_id="r", tenant="acme", model="digits-small",
                                                  admitted=False, reason="overloaded", input_bytes=1, at_ms=0.0))
    metrics.observe_scheduling(SchedulingDecisionV1(
        request_id="r", tenant="acme", mode="centralized", sla_class="realtime", chosen_executor="cloud-1",
        chosen_site="cloud", chosen_model="digits-small", degraded=False, predicted_ms=2.0, reason="ok",
        alternatives=[], attempt=1, at_ms=0.0))
    metrics.observe_scaling(ScalingDecisionV1(
        site="cloud", pool="small", models=["digits-small"], action="started", executor="cloud-small-1",
        executors_before=1, executors_after=1, reason="ready", cost_per_hour=2.0, cold_start_ms=3200.0,
        provider="local", at_ms=0.0))
    metrics.invalid("completion")
    metrics.sla.evaluate(clock(), 0.0)
    return metrics


def test_a_scrape_with_data_in_every_family_passes_promtool_check_metrics(promtool):
    page = every_family_fed().exposition().decode()
    with_data = {s.name for f in text_string_to_metric_families(page) for s in f.samples}
    empty = {name for name in METRIC_NAMES
             if not any(s == name or s.startswith(name + "_") for s in with_data)}
    assert not empty, f"families without a series: {sorted(empty)}"
    assert 'din_sla_latency_seconds{quantile="0.99",sla_class="realtime"}' in page
    run(promtool, "check", "metrics", stdin=page)
