"""Telemetry's aggregates: Prometheus families, sliding quantiles and SLA alerts, without brokers."""

from __future__ import annotations

import random

import pytest
from prometheus_client.parser import text_string_to_metric_families

from din.services.telemetry.alerts import SlaWatch, describe
from din.services.telemetry.decisions import DecisionFeed
from din.services.telemetry.metrics import METRIC_NAMES, OTHER, TelemetryMetrics
from din.services.telemetry.settings import TelemetrySettings
from din.services.telemetry.window import SlidingQuantiles
from din.shared.contracts.events import (
    AdmissionDecisionV1,
    CompletionV1,
    HeartbeatV1,
    SchedulingDecisionV1,
)
from din.shared.contracts.inference import SlaClass
from din.shared.contracts.scaling import AWAITING_EXECUTOR, ScalingDecisionV1
from din.shared.contracts.telemetry import SlaViolationV1
from din.shared.naming import Topics
from tests.support import ManualClock, make_heartbeat

TARGETS = {SlaClass.REALTIME: 50.0, SlaClass.INTERACTIVE: 500.0, SlaClass.BATCH: 5000.0}


def completion(total=10.0, sla="realtime", ok=True, site="cloud", tenant="acme", model="digits-small",
               degraded=False, error=None, **timings) -> CompletionV1:
    return CompletionV1(
        request_id="r", tenant=tenant, site=site, executor=f"{site}-1", model=model, model_version="1",
        sla_class=sla, ok=ok, error_code=error, batch_size=4, degraded=degraded,
        timings_ms={"total": total, **timings}, at_ms=0.0,
    )


def heartbeat(inflight=2, queued=6, capacity=16) -> HeartbeatV1:
    return make_heartbeat("cloud-1", "cloud", ["digits-small"], max_batch_size=32, compute_ms_per_item=0.5,
                          capacity=capacity, queue_depth={"realtime": queued}, inflight=inflight,
                          recent_latency_ms=3.0, sent_ms=0.0)


def scrape(metrics: TelemetryMetrics) -> dict[str, list]:
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def value(samples, name, **labels) -> float:
    matching = [s.value for s in samples.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items())]
    assert matching, f"no {name} with {labels}"
    return sum(matching)


def test_completions_feed_rate_latency_stages_and_batch_sizes():
    metrics = TelemetryMetrics(TARGETS, clock=ManualClock(1000.0))
    full = dict(admission=0.2, classify=0.1, schedule=0.3, queue=2.0, compute=1.0)
    for _ in range(3):
        metrics.observe_completion(completion(total=10.0, **full))
    metrics.observe_completion(completion(total=80.0, queue=1.0, compute=1.0))  # over the 50 ms target
    metrics.observe_completion(completion(total=5.0, degraded=True, model="digits-tiny", sla="interactive"))
    metrics.observe_completion(completion(ok=False, error="inference_failed", total=3.0))
    s = scrape(metrics)
    key = dict(tenant="acme", model="digits-small", site="cloud", sla_class="realtime")
    assert value(s, "din_requests_total", outcome="ok", **key) == 4
    assert value(s, "din_requests_total", outcome="error", **key) == 1
    assert value(s, "din_request_duration_seconds_count", **key) == 4
    assert value(s, "din_request_duration_seconds_sum", **key) == pytest.approx(0.110)
    assert value(s, "din_request_duration_seconds_bucket", le="0.01", **key) == 3
    # network is what the other stages leave of the total, only when every stage is known
    assert value(s, "din_request_stage_duration_seconds_count", stage="network", **key) == 3
    assert value(s, "din_request_stage_duration_seconds_sum", stage="network", **key) == pytest.approx(3 * 0.0064)
    assert value(s, "din_request_stage_duration_seconds_count", stage="queue", **key) == 4
    assert value(s, "din_sla_target_misses_total", **key) == 1
    assert value(s, "din_degraded_requests_total", model="digits-tiny") == 1
    assert value(s, "din_rejects_total", stage="executor", reason="inference_failed") == 1
    assert value(s, "din_batch_size_count", model="digits-small", site="cloud") == 4
    assert value(s, "din_telemetry_events_total", source="completion") == 6


def test_a_cascade_counts_once_at_the_step_that_answered():
    metrics = TelemetryMetrics(TARGETS, clock=ManualClock(1000.0))
    handed_on = completion(model="digits-small").model_copy(update={"cascade_step": 1, "escalated": True})
    answered = completion(model="digits-large").model_copy(update={"cascade_step": 2, "escalated": True})
    confident = completion(model="digits-small").model_copy(update={"cascade_step": 1, "escalated": False})
    for event in (handed_on, answered, confident):
        metrics.observe_completion(event)
    s = scrape(metrics)
    assert value(s, "din_requests_total", model="digits-small", outcome="ok") == 1
    assert value(s, "din_requests_total", model="digits-large", outcome="ok") == 1
    assert value(s, "din_telemetry_events_total", source="completion") == 3


def test_token_latencies_are_defined_and_fed_when_present():
    metrics = TelemetryMetrics(TARGETS, clock=ManualClock(1000.0))
    metrics.observe_completion(completion(total=900.0, ttft=120.0, tpot=15.0, sla="interactive"))
    s = scrape(metrics)
    assert value(s, "din_time_to_first_token_seconds_sum", sla_class="interactive") == pytest.approx(0.12)
    assert value(s, "din_time_per_output_token_seconds_sum", sla_class="interactive") == pytest.approx(0.015)


def test_rejects_by_refusing_service_and_reason_with_unknown_reasons_folded():
    metrics = TelemetryMetrics(TARGETS, clock=ManualClock(1000.0))
    for reason, admitted in (("ok", True), ("rate_limited", False), ("rate_limited", False), ("bogus!", False)):
        metrics.observe_admission(AdmissionDecisionV1(
            request_id="r", tenant="acme", model="digits-small", sla_class="batch" if admitted else None,
            admitted=admitted, reason=reason, input_bytes=10, at_ms=0.0))
    metrics.observe_scheduling(SchedulingDecisionV1(
        request_id="r", tenant="acme", mode="centralized", sla_class="realtime", chosen_executor=None,
        chosen_site=None, chosen_model=None, degraded=False, predicted_ms=None, reason="no_eligible_executor",
        alternatives=[], attempt=1, at_ms=0.0))
    metrics.observe_scheduling(SchedulingDecisionV1(
        request_id="r", tenant="acme", mode="centralized", sla_class="realtime", chosen_executor="cloud-1",
        chosen_site="cloud", chosen_model="digits-small", degraded=True, predicted_ms=2.0, reason="degraded",
        alternatives=[], attempt=1, at_ms=0.0))
    s = scrape(metrics)
    assert value(s, "din_admission_requests_total", outcome="admitted") == 1
    assert value(s, "din_admission_requests_total", outcome="refused", sla_class="unknown") == 3
    assert value(s, "din_rejects_total", stage="admission", reason="rate_limited") == 2
    assert value(s, "din_rejects_total", stage="admission", reason=OTHER) == 1
    assert value(s, "din_rejects_total", stage="scheduler", reason="no_eligible_executor") == 1
    assert value(s, "din_scheduling_decisions_total", outcome="degraded", site="cloud") == 1
    assert value(s, "din_scheduling_decisions_total", outcome="refused") == 1


def test_a_job_held_for_a_cold_start_is_awaiting_not_a_reject():
    metrics = TelemetryMetrics(TARGETS, clock=ManualClock(1000.0))

    def decision(site, reason, at_ms, model=None):
        return SchedulingDecisionV1(
            request_id="r", tenant="acme", mode="centralized", sla_class="interactive",
            chosen_executor=f"{site}-pool-1" if site else None, chosen_site=site, chosen_model=model, degraded=False,
            predicted_ms=3.0 if site else None, reason=reason, alternatives=[], attempt=1, at_ms=at_ms)

    metrics.observe_scheduling(decision(None, AWAITING_EXECUTOR, 0.0))
    s = scrape(metrics)
    assert value(s, "din_scheduling_decisions_total", outcome="awaiting", site="none") == 1
    assert not [x for x in s.get("din_scheduling_decisions_total", []) if x.labels["outcome"] == "refused"]
    assert not s.get("din_rejects_total"), "a held job is not refused"
    metrics.observe_scheduling(decision("cloud", "fastest", 900.0, "digits-small"))
    metrics.observe_scheduling(decision(None, AWAITING_EXECUTOR, 1000.0))
    metrics.observe_scheduling(decision(None, "no_eligible_executor", 5000.0))
    s = scrape(metrics)
    assert value(s, "din_scheduling_decisions_total", outcome="awaiting") == 2
    assert value(s, "din_scheduling_decisions_total", outcome="placed", site="cloud") == 1
    assert value(s, "din_rejects_total", stage="scheduler", reason="no_eligible_executor") == 1
    assert value(s, "din_rejects_total") == 1, "only the refusal at the deadline is a reject"


def test_executor_gauges_from_heartbeats_and_liveness():
    clock = ManualClock(1000.0)
    metrics = TelemetryMetrics(TARGETS, clock=clock)
    metrics.observe_heartbeat(heartbeat(inflight=2, queued=6, capacity=16))
    s = scrape(metrics)
    ids = dict(executor="cloud-1", site="cloud")
    assert value(s, "din_executor_utilization_ratio", **ids) == pytest.approx(0.5)
    assert value(s, "din_executor_queue_depth", sla_class="realtime", **ids) == 6
    assert value(s, "din_executor_up", **ids) == 1
    assert value(s, "din_model_compute_seconds_per_item", model="digits-small", **ids) == pytest.approx(0.0005)
    clock.advance(2.0)  # four missed 0.5 s heartbeats
    assert value(scrape(metrics), "din_executor_up", **ids) == 0


def test_label_sets_past_the_cap_fold_into_other():
    metrics = TelemetryMetrics(TARGETS, clock=ManualClock(1000.0), max_series=3)
    for i in range(10):
        metrics.observe_completion(completion(tenant=f"t{i}"))
    samples = scrape(metrics)["din_requests_total"]
    assert len(samples) == 4
    assert value({"x": samples}, "x", tenant=OTHER) == 7


def test_a_record_of_shed_requests_counts_every_request_it_stands_for():
    metrics = TelemetryMetrics(TARGETS, clock=ManualClock(1000.0))
    metrics.observe_admission(AdmissionDecisionV1(request_id="r", tenant="acme", model="digits-small",
                                                  admitted=False, reason="overloaded", input_bytes=90, at_ms=0.0,
                                                  count=9))
    s = scrape(metrics)
    assert value(s, "din_admission_requests_total", outcome="refused", sla_class="unknown") == 9
    assert value(s, "din_rejects_total", stage="admission", reason="overloaded") == 9


def test_every_declared_metric_is_exported_once_fed():
    metrics = TelemetryMetrics(TARGETS, clock=ManualClock(1000.0))
    metrics.observe_completion(completion(total=5.0, ttft=1.0, tpot=1.0, degraded=True, admission=0.1,
                                          classify=0.1, schedule=0.1, queue=0.1, compute=0.1))
    metrics.observe_completion(completion(total=500.0))
    metrics.observe_completion(completion(ok=False, error="internal"))
    metrics.observe_heartbeat(heartbeat())
    metrics.observe_admission(AdmissionDecisionV1(request_id="r", tenant="a", model="m", admitted=False,
                                                  reason="rate_limited", input_bytes=1, at_ms=0))
    metrics.observe_scheduling(SchedulingDecisionV1(
        request_id="r", tenant="acme", mode="centralized", sla_class="realtime", chosen_executor="cloud-1",
        chosen_site="cloud", chosen_model="digits-small", degraded=False, predicted_ms=2.0, reason="ok",
        alternatives=[], attempt=1, at_ms=0.0))
    metrics.invalid("completion")
    families = {f.name for f in text_string_to_metric_families(metrics.exposition().decode())}
    exported = {f"{name}_total" if f"{name}_total" in METRIC_NAMES else name for name in families}
    assert exported == set(METRIC_NAMES)


def test_sliding_quantiles_are_within_a_bucket_and_forget_old_samples():
    window = SlidingQuantiles(window_s=10.0, slots=10)
    values = list(range(1, 1001))
    random.Random(1).shuffle(values)
    for v in values:
        window.observe(float(v), now_s=100.0)
    count, (p50, p99) = window.quantiles((0.5, 0.99), now_s=100.0)
    assert count == 1000
    assert p50 == pytest.approx(500, rel=0.05) and p99 == pytest.approx(990, rel=0.05)
    assert p99 >= 990, "the upper bucket bound is reported: never under the true quantile"
    window.observe(7.0, now_s=105.0)
    assert window.count(now_s=109.9) == 1001
    assert window.count(now_s=111.0) == 1, "samples older than the window are gone"
    assert window.quantiles((0.5,), now_s=200.0) == (0, [None])


def test_sla_watch_fires_once_then_resolves():
    watch = SlaWatch(TARGETS, window_s=10.0, min_samples=20)
    for i in range(19):
        watch.observe(SlaClass.REALTIME, "factory" if i % 2 else "cloud", 80.0 if i % 2 else 10.0, now_s=1.0)
    assert watch.evaluate(1.0, 1000.0) == [], "too few samples to judge"
    for _ in range(20):
        watch.observe(SlaClass.REALTIME, "factory", 90.0, now_s=2.0)
    (alert,) = watch.evaluate(2.0, 2000.0)
    assert alert.firing and alert.sla_class == SlaClass.REALTIME and alert.target_ms == 50.0
    assert alert.observed_ms > 50.0 and alert.samples == 39 and alert.worst_site == "factory"
    assert watch.evaluate(3.0, 3000.0) == [], "a firing alert is not repeated"
    (resolved,) = watch.evaluate(30.0, 30000.0)
    assert not resolved.firing and resolved.samples == 0
    assert watch.fired[SlaClass.REALTIME] == 1


def test_decision_feed_counts_decisions_of_its_scoped_topics_and_skips_garbage():
    metrics = TelemetryMetrics(TARGETS, clock=ManualClock(1000.0))
    settings = TelemetrySettings(nats_url="nats://x:4222", kafka_bootstrap="k:9092", site="cloud", topic_scope="run1")
    feed = DecisionFeed(metrics, settings, client_id="t")
    admissions, placements = Topics.scoped(Topics.ADMISSION_DECISIONS, "run1"), Topics.scoped(
        Topics.SCHEDULING_DECISIONS, "run1")
    scaling = Topics.scoped(Topics.SCALING_DECISIONS, "run1")
    assert set(feed.by_topic) == {admissions, placements, scaling} and feed.group == "din-telemetry-run1"
    refusal = AdmissionDecisionV1(request_id="r", tenant="acme", model="m", admitted=False, reason="rate_limited",
                                  input_bytes=1, at_ms=0.0)
    feed.observe(admissions, refusal.model_dump_json().encode())
    feed.observe(admissions, b"garbage")
    feed.observe(placements, None)
    assert (feed.decisions, feed.invalid) == (1, 2)
    s = scrape(metrics)
    assert value(s, "din_rejects_total", stage="admission", reason="rate_limited") == 1
    assert value(s, "din_telemetry_invalid_events_total", source="admission") == 1
    assert value(s, "din_telemetry_invalid_events_total", source="scheduling") == 1


def test_scaling_decisions_give_each_pool_its_desired_size_the_cost_and_the_cold_starts():
    metrics = TelemetryMetrics(TARGETS, clock=ManualClock(1000.0))

    def decision(action, after, at_ms, **kw):
        return ScalingDecisionV1(site="cloud", pool="small", models=["digits-small"], action=action,
                                 executors_before=after - 1, executors_after=after, reason="r",
                                 cost_per_hour=after * 1.5, provider="local", at_ms=at_ms, **kw)

    metrics.observe_scaling(decision("scale_out", 2, 10.0))
    metrics.observe_scaling(decision("started", 2, 20.0, cold_start_ms=2500.0))
    metrics.observe_scaling(decision("scale_out", 1, 5.0))
    s = scrape(metrics)
    assert value(s, "din_pool_desired_executors", site="cloud", pool="small") == 2, "an older decision is not newer"
    assert value(s, "din_pool_cost_per_hour") == 3.0
    assert value(s, "din_pool_decisions_total", site="cloud", pool="small", action="scale_out") == 2
    assert value(s, "din_pool_cold_start_seconds_count", site="cloud", pool="small") == 1


def test_an_alert_is_described_in_one_line():
    alert = SlaViolationV1(sla_class="realtime", firing=True, quantile=0.99, observed_ms=61.34, target_ms=50.0,
                           window_s=60.0, samples=40, worst_site="factory", at_ms=0.0)
    assert describe(alert) == ("realtime firing: p99 61.3 ms vs target 50.0 ms over 40 requests "
                               "(worst site factory)")
