"""DIN's Prometheus metrics, aggregated per tenant, model, site and SLA class from the events services publish.

Telemetry sees every completion, so observing one must stay cheap: the
families here are plain dicts of per-label-set counters and bucket arrays
(one ``bisect`` and a few increments per observation, no locks, no
per-call label validation), turned into Prometheus families only when
``/metrics`` is scraped. ``prometheus_client`` does the exposition format.

``METRICS`` lists every exported name with its type and labels; the Grafana
dashboard, the Prometheus config and docs/telemetry.md use exactly these (a
test checks). Nothing here knows NATS or Kafka.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.utils import floatToGoString

from din.services.telemetry.alerts import REPORTED_QUANTILES, SlaWatch
from din.services.telemetry.relay import RelayLedger
from din.shared.contracts.events import AdmissionDecisionV1, CompletionV1, HeartbeatV1, SchedulingDecisionV1
from din.shared.contracts.federation import SiteSummaryV1
from din.shared.contracts.inference import SlaClass
from din.shared.contracts.scaling import AWAITING_EXECUTOR, ScalingDecisionV1
from din.shared.errors import ErrorCode

LATENCY_BUCKETS_S = (
    0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)
TOKEN_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

REQUEST_LABELS = ("tenant", "model", "site", "sla_class")
PHASE_LABEL = "stage"
"""The label of ``din_request_stage_duration_seconds`` that names a latency phase (exported as ``stage``, the name
the dashboard queries)."""
REFUSED_BY_LABEL = "stage"
"""The label of ``din_rejects_total`` that names the service that refused or failed the request (exported as
``stage``, the name the dashboard queries)."""
LATENCY_PHASES = ("admission", "classify", "schedule", "network", "queue", "compute")
"""Phases of a request's latency, the values of ``PHASE_LABEL``. ``network`` is what is left of ``total`` once
the others are taken out: transit between sites there and back. It is reported only for completions that carry
every other phase."""
MEASURED_PHASES = tuple(p for p in LATENCY_PHASES if p != "network")
"""The phases a completion's ``timings_ms`` carries (``network`` is derived from them)."""
REFUSED_BY_ADMISSION, REFUSED_BY_SCHEDULER, FAILED_AT_EXECUTOR = "admission", "scheduler", "executor"
"""Values of ``REFUSED_BY_LABEL``."""

OTHER = "_other"
UNKNOWN = "unknown"
EXECUTOR_STALE_INTERVALS = 3
EXECUTOR_FORGET_S = 300.0
SITES_KEPT = 256
POOLS_KEPT = 1024
"""Most pools the pool gauges keep (a topology names them; the bound only guards against forged names)."""
"""Most sites whose summaries are kept for the per-site gauges (a flood of made-up site names stops there)."""
LABEL_BUDGETS = {"tenant": 64, "model": 128, "site": 32, "executor": 512, "route": 64}
"""Most distinct values of each name label telemetry keeps series for, and (``route``) of the tenant, model and site
combinations a completion's series are kept under; later new ones count under ``_other`` (or, for a gauge of one
executor or site, are not shown) and in ``din_telemetry_folded_labels_total``, so a flood of made-up names cannot
grow ``/metrics`` or telemetry's memory without bound."""


@dataclass(frozen=True)
class MetricSpec:
    """One exported metric: its full name as scraped (counters end in ``_total``), type (``counter``, ``gauge``,
    ``histogram`` or ``summary``), labels (without the ``le`` of a histogram's buckets or the ``quantile`` of a
    summary's quantiles) and help."""

    name: str
    kind: str
    labels: tuple[str, ...]
    help: str


METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("din_requests_total", "counter", (*REQUEST_LABELS, "outcome"),
               "Completed requests (outcome ok or error), by where and what served them."),
    MetricSpec("din_request_duration_seconds", "histogram", REQUEST_LABELS,
               "End-to-end latency of completed requests, from admission to answer."),
    MetricSpec("din_request_stage_duration_seconds", "histogram", (PHASE_LABEL, *REQUEST_LABELS),
               "Latency of each stage: admission, classify, schedule, network, queue, compute."),
    MetricSpec("din_time_to_first_token_seconds", "histogram", REQUEST_LABELS,
               "Streaming models: time from admission to the first output token (TTFT)."),
    MetricSpec("din_time_per_output_token_seconds", "histogram", REQUEST_LABELS,
               "Streaming models: mean time between output tokens after the first (TPOT)."),
    MetricSpec("din_batch_size", "histogram", ("model", "site"),
               "Size of the batch each completed request was computed in."),
    MetricSpec("din_degraded_requests_total", "counter", REQUEST_LABELS,
               "Requests answered by a smaller variant than the one asked for (model is the variant)."),
    MetricSpec("din_stage_handoffs_total", "counter", ("stage_kind", "site", "to_site"),
               "Multi-stage jobs: a stage's output (intermediate tensor or decode state) sealed and sent on."),
    MetricSpec("din_stage_handoff_bytes_total", "counter", ("stage_kind", "site", "to_site"),
               "Multi-stage jobs: bytes of intermediate tensors and decode states handed on (before sealing)."),
    MetricSpec("din_sla_target_misses_total", "counter", REQUEST_LABELS,
               "Completed requests slower than their SLA class's latency target."),
    MetricSpec("din_admission_requests_total", "counter", ("tenant", "model", "sla_class", "outcome"),
               "Admission decisions: admitted or refused."),
    MetricSpec("din_rejects_total", "counter", (REFUSED_BY_LABEL, "reason", "tenant", "model", "sla_class"),
               "Requests refused or failed, by the stage that gave up (admission, scheduler, executor) and why."),
    MetricSpec("din_scheduling_decisions_total", "counter", ("sla_class", "site", "model", "outcome"),
               "Scheduler placements (outcome placed or degraded), refusals (site and model 'none') and jobs held "
               "while a pool scales from zero (outcome awaiting; their placement or refusal is counted after)."),
    MetricSpec("din_executor_up", "gauge", ("executor", "site"),
               "1 while the executor's heartbeats arrive, 0 once it missed three."),
    MetricSpec("din_executor_utilization_ratio", "gauge", ("executor", "site"),
               "Jobs held (in flight plus queued) over capacity, from the latest heartbeat."),
    MetricSpec("din_executor_inflight", "gauge", ("executor", "site"), "Jobs being computed."),
    MetricSpec("din_executor_queue_depth", "gauge", ("executor", "site", "sla_class"), "Jobs queued per SLA class."),
    MetricSpec("din_executor_capacity", "gauge", ("executor", "site"), "Jobs the executor holds before it sheds."),
    MetricSpec("din_model_compute_seconds_per_item", "gauge", ("executor", "site", "model"),
               "Recent compute time per batch item the executor reports for each model."),
    MetricSpec("din_site_executors", "gauge", ("site", "model"),
               "Live executors at the site serving the model, from its scheduler's latest summary."),
    MetricSpec("din_site_free_slots", "gauge", ("site", "model", "sla_class"),
               "Jobs of the class the site's executors of the model could still take, from its latest summary."),
    MetricSpec("din_site_queue_depth", "gauge", ("site", "model"),
               "Jobs queued or in flight at the site's executors of the model, from its latest summary."),
    MetricSpec("din_pool_desired_executors", "gauge", ("site", "pool"),
               "Executors the autoscaler wants in the pool, from its latest decision (KEDA scales Kubernetes "
               "pools on it)."),
    MetricSpec("din_pool_cost_per_hour", "gauge", (),
               "What the network's executors cost per hour, from the autoscaler's latest decision."),
    MetricSpec("din_pool_decisions_total", "counter", ("site", "pool", "action"),
               "Changes the autoscaler made to a pool (scale_out, started, start_failed, scale_in, stopped, "
               "replaced)."),
    MetricSpec("din_pool_cold_start_seconds", "histogram", ("site", "pool"),
               "From asking the provider for an executor to its first ready health answer."),
    MetricSpec("din_sla_latency_seconds", "summary", ("sla_class",),
               "End-to-end latency per SLA class: quantiles 0.5, 0.95 and 0.99 over the sliding SLA window, count "
               "and sum of every completion since telemetry started."),
    MetricSpec("din_sla_window_requests", "gauge", ("sla_class",), "Completions per SLA class in the sliding window."),
    MetricSpec("din_sla_target_seconds", "gauge", ("sla_class",), "Latency target of the SLA class's quantile."),
    MetricSpec("din_sla_violation_active", "gauge", ("sla_class",), "1 while the class's SLA violation alert fires."),
    MetricSpec("din_sla_violations_total", "counter", ("sla_class",), "SLA violation alerts raised."),
    MetricSpec("din_telemetry_events_total", "counter", ("source",),
               "Events telemetry consumed, by source (completion, heartbeat, summary, admission, scheduling)."),
    MetricSpec("din_telemetry_invalid_events_total", "counter", ("source",),
               "Events telemetry could not decode, by source; they were dead-lettered or skipped."),
    MetricSpec("din_telemetry_folded_labels_total", "counter", ("label",),
               "Events naming a tenant, model, site or executor past telemetry's budget of distinct values for that "
               "label (LABEL_BUDGETS): counted under _other, or not shown in the per-executor and per-site gauges."),
    MetricSpec("din_completions_relayed_total", "counter", ("site",),
               "Completions relayed from the site's completion stream to Kafka (acknowledged by Kafka first)."),
    MetricSpec("din_completion_relay_pending", "gauge", ("site",),
               "Completions in the site's completion stream not yet relayed to Kafka, at the last look."),
    MetricSpec("din_completion_relay_oldest_seconds", "gauge", ("site",),
               "Age of the site's oldest completion not yet relayed to Kafka (0 when none waits)."),
    MetricSpec("din_completion_relay_lagging", "gauge", ("site",),
               "1 while the site's oldest unrelayed completion is older than DIN_TELEMETRY_RELAY_LAG_ALERT_S, or "
               "its completion stream does not answer."),
    MetricSpec("din_telemetry_recorded_events_total", "counter", (), "Events telemetry wrote to Kafka."),
    MetricSpec("din_telemetry_dropped_events_total", "counter", (),
               "Events telemetry could not buffer for Kafka (Kafka unreachable for long)."),
)
METRIC_NAMES = tuple(m.name for m in METRICS)
SERIES_SUFFIXES = {"histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count")}
"""The series a histogram or summary adds to its own name."""


def exported_series_names() -> set[str]:
    """Every series name a scrape can contain, including ``_bucket``/``_sum``/``_count`` of histograms and
    ``_sum``/``_count`` of summaries."""
    names = set()
    for spec in METRICS:
        names.add(spec.name)
        names.update(f"{spec.name}{suffix}" for suffix in SERIES_SUFFIXES.get(spec.kind, ()))
    return names


class _Family:
    """Per-label-set values of one metric; folds label values into ``_other`` past ``max_series``."""

    __slots__ = ("spec", "series", "max_series")

    def __init__(self, spec: MetricSpec, max_series: int) -> None:
        self.spec = spec
        self.series: dict[tuple[str, ...], object] = {}
        self.max_series = max_series

    def _key(self, key: tuple[str, ...]) -> tuple[str, ...]:
        if key in self.series or len(self.series) < self.max_series:
            return key
        return tuple(OTHER for _ in key)


class _LabelBudget:
    """The distinct values of each name label telemetry keeps series for (``LABEL_BUDGETS``); the rest fold."""

    __slots__ = ("budgets", "kept", "folded")

    def __init__(self, budgets: Mapping[str, int], folded: _Counter) -> None:
        self.budgets = dict(budgets)
        self.kept: dict[str, set[str]] = {label: set() for label in budgets}
        self.folded = folded

    def admits(self, label: str, value: str) -> bool:
        """True when ``value`` has (or now gets) its own series; else it is counted as folded."""
        kept = self.kept[label]
        if value in kept:
            return True
        if len(kept) < self.budgets[label]:
            kept.add(value)
            return True
        self.folded.inc((label,))
        return False

    def __call__(self, label: str, value: str) -> str:
        """``value``, or ``_other`` past the label's budget."""
        return value if self.admits(label, value) else OTHER


class _Counter(_Family):
    __slots__ = ()

    def inc(self, key: tuple[str, ...], amount: float = 1.0) -> None:
        series = self.series
        if key not in series:
            key = self._key(key)
        series[key] = series.get(key, 0.0) + amount

    def collect(self) -> Metric:
        family = CounterMetricFamily(self.spec.name, self.spec.help, labels=self.spec.labels)
        for key, value in self.series.items():
            family.add_metric(list(key), value)
        return family


class _Histogram(_Family):
    __slots__ = ("bounds", "_les")

    def __init__(self, spec: MetricSpec, max_series: int, bounds: tuple[float, ...]) -> None:
        super().__init__(spec, max_series)
        self.bounds = bounds
        self._les = [floatToGoString(b) for b in bounds] + ["+Inf"]

    def observe(self, key: tuple[str, ...], value: float) -> None:
        entry = self.series.get(key)
        if entry is None:
            key = self._key(key)
            entry = self.series.get(key)
            if entry is None:
                entry = self.series[key] = [[0] * (len(self.bounds) + 1), 0.0]
        entry[0][bisect_left(self.bounds, value)] += 1
        entry[1] += value

    def collect(self) -> Metric:
        family = HistogramMetricFamily(self.spec.name, self.spec.help, labels=self.spec.labels)
        for key, (counts, total) in self.series.items():
            running = 0
            buckets = []
            for le, count in zip(self._les, counts, strict=True):
                running += count
                buckets.append((le, running))
            family.add_metric(list(key), buckets, total)
        return family


@dataclass
class _Executor:
    heartbeat: HeartbeatV1
    seen_s: float


class _Collector:
    """Adapter so a ``CollectorRegistry`` scrapes ``TelemetryMetrics`` on demand."""

    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self.collect = collect


class TelemetryMetrics:
    """All of telemetry's aggregates. Feed it decoded events; scrape ``exposition()``."""

    def __init__(
        self,
        sla_targets_ms: Mapping[SlaClass, float],
        *,
        sla_window_s: float = 60.0,
        sla_quantile: float = 0.99,
        sla_min_samples: int = 20,
        max_series: int = 5000,
        label_budgets: Mapping[str, int] = LABEL_BUDGETS,
        clock: Callable[[], float] = time.monotonic,
        recorded: Callable[[], tuple[int, int]] = lambda: (0, 0),
        relay: RelayLedger | None = None,
    ) -> None:
        self.clock = clock
        self.relay = relay if relay is not None else RelayLedger([], 0.0)
        self.sla = SlaWatch(sla_targets_ms, window_s=sla_window_s, quantile=sla_quantile, min_samples=sla_min_samples)
        self._sla_seen = {sla: [0, 0.0] for sla in SlaClass}
        self._recorded = recorded
        specs = {m.name: m for m in METRICS}

        def counter(name: str) -> _Counter:
            return _Counter(specs[name], max_series)

        def histogram(name: str, bounds: tuple[float, ...]) -> _Histogram:
            return _Histogram(specs[name], max_series, bounds)

        self.requests = counter("din_requests_total")
        self.duration = histogram("din_request_duration_seconds", LATENCY_BUCKETS_S)
        self.phase_duration = histogram("din_request_stage_duration_seconds", LATENCY_BUCKETS_S)
        self.ttft = histogram("din_time_to_first_token_seconds", LATENCY_BUCKETS_S)
        self.tpot = histogram("din_time_per_output_token_seconds", TOKEN_BUCKETS_S)
        self.batch = histogram("din_batch_size", BATCH_BUCKETS)
        self.degraded = counter("din_degraded_requests_total")
        self.target_misses = counter("din_sla_target_misses_total")
        self.handoffs = counter("din_stage_handoffs_total")
        self.handoff_bytes = counter("din_stage_handoff_bytes_total")
        self.admission = counter("din_admission_requests_total")
        self.rejects = counter("din_rejects_total")
        self.scheduling = counter("din_scheduling_decisions_total")
        self.pool_decisions = counter("din_pool_decisions_total")
        self.cold_starts = histogram("din_pool_cold_start_seconds", LATENCY_BUCKETS_S)
        self.events = counter("din_telemetry_events_total")
        self.invalid_events = counter("din_telemetry_invalid_events_total")
        self.folded = counter("din_telemetry_folded_labels_total")
        self.labels = _LabelBudget(label_budgets, self.folded)
        self._families = (
            self.requests, self.duration, self.phase_duration, self.ttft, self.tpot, self.batch, self.degraded,
            self.target_misses, self.handoffs, self.handoff_bytes, self.admission, self.rejects, self.scheduling,
            self.pool_decisions, self.cold_starts, self.events, self.invalid_events, self.folded,
        )
        self._pools: dict[tuple[str, str], ScalingDecisionV1] = {}
        self._executors: dict[str, _Executor] = {}
        self._sites: dict[str, tuple[SiteSummaryV1, float]] = {}
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self.collect))

    # -- observations (the hot path)

    def observe_completion(self, event: CompletionV1) -> None:
        """Count one completed (or failed) job."""
        sla = event.sla_class
        labels = self.labels
        tenant, model, site = labels("tenant", event.tenant), labels("model", event.model), labels("site", event.site)
        if not labels.admits("route", f"{tenant}/{model}/{site}"):
            tenant = model = site = OTHER
        key = (tenant, model, site, sla.value)
        self.events.inc(("completion",))
        if event.cascade_step == 1 and event.escalated:
            return  # a cascade's first step handed the request on; its final completion counts it
        if event.handed_on_to is not None:
            handoff = (event.stage_kind or OTHER, site, labels("site", event.handed_on_to))
            self.handoffs.inc(handoff)
            self.handoff_bytes.inc(handoff, event.output_bytes or 0)
            return
        if not event.ok:
            self.requests.inc((*key, "error"))
            self._reject(FAILED_AT_EXECUTOR, event.error_code, tenant, model, sla.value)
            return
        self.requests.inc((*key, "ok"))
        timings = event.timings_ms
        total = timings.get("total")
        if total is not None:
            self.duration.observe(key, total / 1000.0)
            self.sla.observe(sla, site, total, self.clock())
            seen = self._sla_seen[sla]
            seen[0] += 1
            seen[1] += total / 1000.0
            if total > self.sla.targets_ms.get(sla, float("inf")):
                self.target_misses.inc(key)
        known = 0.0
        complete = total is not None
        for phase in MEASURED_PHASES:
            value = timings.get(phase)
            if value is None:
                complete = False
                continue
            known += value
            self.phase_duration.observe((phase, *key), value / 1000.0)
        if complete:
            self.phase_duration.observe(("network", *key), max(0.0, total - known) / 1000.0)
        ttft = timings.get("ttft")
        if ttft is not None:
            self.ttft.observe(key, ttft / 1000.0)
        tpot = timings.get("tpot")
        if tpot is not None:
            self.tpot.observe(key, tpot / 1000.0)
        self.batch.observe((model, site), event.batch_size)
        if event.degraded:
            self.degraded.inc(key)

    def observe_heartbeat(self, heartbeat: HeartbeatV1) -> None:
        """Keep an executor's latest heartbeat for the utilisation gauges."""
        self.events.inc(("heartbeat",))
        if self.labels.admits("executor", heartbeat.executor) and self.labels.admits("site", heartbeat.site):
            self._executors[heartbeat.executor] = _Executor(heartbeat, self.clock())
            for model in heartbeat.models:
                self.labels.admits("model", model.name)

    def observe_summary(self, summary: SiteSummaryV1) -> None:
        """Keep a site's latest summary for the per-site gauges."""
        self.events.inc(("summary",))
        if (summary.site in self._sites or len(self._sites) < SITES_KEPT) and self.labels.admits("site", summary.site):
            self._sites[summary.site] = (summary, self.clock())
            for model in summary.models:
                self.labels.admits("model", model.model)

    def observe_admission(self, decision: AdmissionDecisionV1) -> None:
        """Count an admission decision (every request a record of shed requests stands for), and the refusal's
        reason."""
        self.events.inc(("admission",))
        sla = decision.sla_class.value if decision.sla_class else UNKNOWN
        outcome = "admitted" if decision.admitted else "refused"
        tenant, model = self.labels("tenant", decision.tenant), self.labels("model", decision.model)
        self.admission.inc((tenant, model, sla, outcome), decision.count)
        if not decision.admitted:
            self._reject(REFUSED_BY_ADMISSION, decision.reason, tenant, model, sla, decision.count)

    def observe_scheduling(self, decision: SchedulingDecisionV1) -> None:
        """Count a placement or a refusal by the scheduler; a job held while a pool scales from zero
        (``awaiting_executor``) is neither: it counts as ``awaiting``, and its placement or refusal follows."""
        self.events.inc(("scheduling",))
        sla = decision.sla_class.value
        if decision.chosen_site is None and decision.reason == AWAITING_EXECUTOR:
            self.scheduling.inc((sla, "none", "none", "awaiting"))
            return
        if decision.forwarded_to is not None:
            self.scheduling.inc((sla, self.labels("site", decision.forwarded_to), "none", "forwarded"))
            return
        if decision.chosen_site is None:
            self.scheduling.inc((sla, "none", "none", "refused"))
            self._reject(REFUSED_BY_SCHEDULER, decision.reason, self.labels("tenant", decision.tenant),
                         self.labels("model", decision.chosen_model or UNKNOWN), sla)
            return
        outcome = "degraded" if decision.degraded else "placed"
        self.scheduling.inc((sla, self.labels("site", decision.chosen_site),
                             self.labels("model", decision.chosen_model or UNKNOWN), outcome))

    def observe_scaling(self, decision: ScalingDecisionV1) -> None:
        """Keep a pool's latest size and count the change (pools are named by the topology: no label budget)."""
        self.events.inc(("autoscaler",))
        key = (decision.site, decision.pool)
        if key not in self._pools and len(self._pools) >= POOLS_KEPT:
            return
        held = self._pools.get(key)
        if held is None or held.at_ms <= decision.at_ms:
            self._pools[key] = decision
        self.pool_decisions.inc((*key, decision.action.value))
        if decision.cold_start_ms is not None:
            self.cold_starts.observe(key, decision.cold_start_ms / 1000.0)

    def _reject(self, refused_by: str, code: str | None, tenant: str, model: str, sla: str,
                count: int = 1) -> None:
        self.rejects.inc((refused_by, _reason(code), tenant, model, sla), count)

    def invalid(self, source: str) -> None:
        """Count an event that could not be decoded."""
        self.invalid_events.inc((source,))

    # -- scrape

    def collect(self) -> Iterable[Metric]:
        for family in self._families:
            yield family.collect()
        yield from self._executor_gauges()
        yield from self._site_gauges()
        yield from self._sla_families()
        yield from self._relay_gauges()
        yield from self._pool_gauges()
        sent, dropped = self._recorded()
        specs = {m.name: m for m in METRICS}
        recorded = CounterMetricFamily("din_telemetry_recorded_events_total",
                                       specs["din_telemetry_recorded_events_total"].help)
        recorded.add_metric([], sent)
        yield recorded
        lost = CounterMetricFamily("din_telemetry_dropped_events_total",
                                   specs["din_telemetry_dropped_events_total"].help)
        lost.add_metric([], dropped)
        yield lost

    def _executor_gauges(self) -> Iterable[Metric]:
        specs = {m.name: m for m in METRICS}

        def gauge(name: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, specs[name].help, labels=specs[name].labels)

        up, util, inflight, depth, capacity, per_item = (
            gauge("din_executor_up"), gauge("din_executor_utilization_ratio"), gauge("din_executor_inflight"),
            gauge("din_executor_queue_depth"), gauge("din_executor_capacity"),
            gauge("din_model_compute_seconds_per_item"),
        )
        now = self.clock()
        for name, state in list(self._executors.items()):
            hb = state.heartbeat
            age = now - state.seen_s
            if age > EXECUTOR_FORGET_S:
                del self._executors[name]
                continue
            ids = [hb.executor, hb.site]
            alive = age <= EXECUTOR_STALE_INTERVALS * hb.interval_s
            up.add_metric(ids, 1.0 if alive else 0.0)
            held = hb.inflight + sum(hb.queue_depth.values())
            util.add_metric(ids, held / hb.capacity if hb.capacity > 0 else 0.0)
            inflight.add_metric(ids, hb.inflight)
            capacity.add_metric(ids, hb.capacity)
            for sla in SlaClass:
                depth.add_metric([*ids, sla.value], hb.queue_depth.get(sla.value, 0))
            for model in hb.models:
                if model.name in self.labels.kept["model"]:
                    per_item.add_metric([*ids, model.name], model.compute_ms_per_item / 1000.0)
        return up, util, inflight, depth, capacity, per_item

    def _site_gauges(self) -> Iterable[Metric]:
        specs = {m.name: m for m in METRICS}
        executors, free, depth = (GaugeMetricFamily(name, specs[name].help, labels=specs[name].labels)
                                  for name in ("din_site_executors", "din_site_free_slots", "din_site_queue_depth"))
        now = self.clock()
        for site, (summary, seen_s) in list(self._sites.items()):
            if now - seen_s > EXECUTOR_STALE_INTERVALS * summary.interval_s:
                del self._sites[site]
                continue
            for model in summary.models:
                if model.model not in self.labels.kept["model"]:
                    continue
                executors.add_metric([site, model.model], model.executors)
                depth.add_metric([site, model.model], model.queue_depth)
                for sla, slots in model.free_slots.items():
                    free.add_metric([site, model.model, sla], slots)
        return executors, free, depth

    def _sla_families(self) -> Iterable[Metric]:
        specs = {m.name: m for m in METRICS}
        latency = SummaryMetricFamily("din_sla_latency_seconds", specs["din_sla_latency_seconds"].help,
                                      labels=("sla_class",))
        samples = GaugeMetricFamily("din_sla_window_requests", specs["din_sla_window_requests"].help,
                                    labels=("sla_class",))
        target = GaugeMetricFamily("din_sla_target_seconds", specs["din_sla_target_seconds"].help,
                                   labels=("sla_class",))
        active = GaugeMetricFamily("din_sla_violation_active", specs["din_sla_violation_active"].help,
                                   labels=("sla_class",))
        fired = CounterMetricFamily("din_sla_violations_total", specs["din_sla_violations_total"].help,
                                    labels=("sla_class",))
        now = self.clock()
        for sla in SlaClass:
            window = self.sla.latency(sla, now)
            samples.add_metric([sla.value], window.samples)
            for q, value in zip(REPORTED_QUANTILES, (window.p50_ms, window.p95_ms, window.p99_ms), strict=True):
                if value is not None:
                    latency.add_sample(latency.name, {"sla_class": sla.value, "quantile": floatToGoString(q)},
                                       value / 1000.0)
            count, total = self._sla_seen[sla]
            latency.add_metric([sla.value], count, total)
            if sla in self.sla.targets_ms:
                target.add_metric([sla.value], self.sla.targets_ms[sla] / 1000.0)
            active.add_metric([sla.value], 1.0 if self.sla.firing[sla] else 0.0)
            fired.add_metric([sla.value], self.sla.fired[sla])
        return latency, samples, target, active, fired

    def _relay_gauges(self) -> Iterable[Metric]:
        specs = {m.name: m for m in METRICS}
        relayed = CounterMetricFamily("din_completions_relayed_total", specs["din_completions_relayed_total"].help,
                                      labels=("site",))
        pending, oldest, lagging = (GaugeMetricFamily(name, specs[name].help, labels=("site",)) for name in (
            "din_completion_relay_pending", "din_completion_relay_oldest_seconds", "din_completion_relay_lagging"))
        behind = set(self.relay.lagging())
        for site, relay in self.relay.sites.items():
            relayed.add_metric([site], relay.relayed)
            pending.add_metric([site], relay.pending)
            oldest.add_metric([site], relay.oldest_s or 0.0)
            lagging.add_metric([site], 1.0 if site in behind else 0.0)
        return relayed, pending, oldest, lagging

    def _pool_gauges(self) -> Iterable[Metric]:
        specs = {m.name: m for m in METRICS}
        desired = GaugeMetricFamily("din_pool_desired_executors", specs["din_pool_desired_executors"].help,
                                    labels=("site", "pool"))
        cost = GaugeMetricFamily("din_pool_cost_per_hour", specs["din_pool_cost_per_hour"].help)
        for (site, pool), decision in sorted(self._pools.items()):
            desired.add_metric([site, pool], decision.executors_after)
        if self._pools:
            cost.add_metric([], max(self._pools.values(), key=lambda d: d.at_ms).cost_per_hour)
        return desired, cost

    def exposition(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)


_REASONS = {code.value for code in ErrorCode}


def _reason(code: str | None) -> str:
    """A reject reason label: a known error code, ``ok`` never; anything else folds into ``_other``."""
    if code is None:
        return UNKNOWN
    return code if code in _REASONS else OTHER
