"""``din report``: a recorded window as one self-contained HTML file with its plots, viewable offline.

Every figure counts **requests**, each once, by its final outcome
(``outcomes.final_outcomes``): a multi-stage job's stages that handed it on and a
cascade's first step that escalated are not completions of the request; they are
counted apart, as stage hand-offs. **Live and replayed traffic are separate**:
a request ``din replay`` sent (its id ``replay-<run>-...``) is left out of the live
figures and shown per replay run instead.

Sections: a summary (live requests, answered, latency quantiles per SLA class
against their targets, rejects, alerts), then

* latency CDF per SLA class,
* requests answered over time per site (replayed traffic as its own series),
* rejects by stage and reason, and SLA target misses and alerts, over time,
* model mix per SLA class, and the degradation (cascade to a smaller variant) rate over time,
* replayed traffic per run and SLA class, and the stage hand-offs,
* elastic capacity, when the autoscaler recorded decisions (``elastic.py``): each pool's desired executors over
  time, its decisions (action, executor, size before and after, reason, cold start), counts by action, the cold
  starts, the network's executor cost per hour, and how the requests held while a pool scaled from zero ended.

SLA alerts are telemetry's, which watches all traffic (replays included).
Everything is inline (SVG, CSS); the file loads nothing.
"""

from __future__ import annotations

import html
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np

from din.replay.elastic import ACTIONS, ElasticCapacity, elastic_capacity, spread
from din.replay.outcomes import Outcome, final_outcomes, stage_name
from din.replay.recorded import RecordedWindow
from din.replay.svg import bar_chart, line_chart
from din.services.telemetry.settings import DEFAULT_SLA_TARGETS_MS
from din.shared.contracts.inference import SlaClass
from din.shared.contracts.scaling import ScalingAction

CDF_POINTS = 400
TARGET_BUCKETS = 60
NICE_BUCKETS_S = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 86400)
MAX_REJECT_SERIES = 7
MAX_SCALING_ROWS = 300
"""Most scaling decisions listed in the HTML table (all of them are in ``--json``)."""
MAX_SCALING_MARKERS = 60
TROUBLES = {ScalingAction.START_FAILED: "#d62728", ScalingAction.REPLACED: "#ff7f0e"}
"""Pool events marked on the desired-executors plot, with their colour."""
REPLAYED = "replayed (all sites)"
CLASSES = [c.value for c in SlaClass]


def bucket_seconds(span_ms: float) -> int:
    """A round bucket width giving about ``TARGET_BUCKETS`` buckets over ``span_ms``."""
    wanted = span_ms / 1000.0 / TARGET_BUCKETS
    return next((b for b in NICE_BUCKETS_S if b >= wanted), NICE_BUCKETS_S[-1])


def _utc(ms: float) -> str:
    return datetime.fromtimestamp(ms / 1000.0, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


class _Buckets:
    def __init__(self, start_ms: float, end_ms: float) -> None:
        self.width_s = bucket_seconds(max(end_ms - start_ms, 1.0))
        self.width_ms = self.width_s * 1000.0
        self.start = start_ms - start_ms % self.width_ms
        self.count = int((end_ms - self.start) // self.width_ms) + 1

    def index(self, at_ms: float) -> int:
        return min(max(int((at_ms - self.start) // self.width_ms), 0), self.count - 1)

    def center(self, i: int) -> float:
        return self.start + (i + 0.5) * self.width_ms


def _targets(window: RecordedWindow) -> dict[str, float]:
    targets = {c.value: t for c, t in DEFAULT_SLA_TARGETS_MS.items()}
    for alert in window.alerts:
        targets[alert.sla_class.value] = alert.target_ms
    return targets


def _quantiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "p99": None}
    arr = np.asarray(values, dtype=float)
    return {f"p{q}": round(float(np.percentile(arr, q)), 3) for q in (50, 95, 99)}


@dataclass
class Traffic:
    """The requests of one kind of traffic (live, or one replay run), each once, by its final outcome."""

    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return sum(o.count for o in self.outcomes)

    @property
    def answered(self) -> list[Outcome]:
        """The requests answered with a result."""
        return [o for o in self.outcomes if o.ok]

    def refused(self, stage: str) -> Counter:
        """Requests refused (or failed) at ``stage``, by reason."""
        found: Counter = Counter()
        for o in self.outcomes:
            if not o.ok and o.stage == stage:
                found[o.code] += o.count
        return found

    def hand_offs(self) -> Counter:
        """Stage completions that handed a request on, by kind of stage."""
        return Counter(stage_name(c) for o in self.outcomes for c in o.hand_offs)

    def latencies(self, sla: str | None = None) -> list[float]:
        """Server-side total latency of the answered requests (of class ``sla``)."""
        return [o.latency_ms for o in self.answered
                if o.latency_ms is not None and (sla is None or o.sla_class == sla)]

    def summary(self) -> dict[str, object]:
        """The counts and quantiles, for ``din report --json``."""
        answered = self.answered
        by_class = {}
        for sla in CLASSES:
            items = [o for o in self.outcomes if o.sla_class == sla]
            if items:
                by_class[sla] = {"requests": sum(o.count for o in items), "answered": sum(o.ok for o in items),
                                 **_quantiles(self.latencies(sla))}
        return {
            "requests": self.requests,
            "answered": len(answered),
            "failed": dict(self.refused("executor")),
            "refused_at_admission": dict(self.refused("admission")),
            "refused_by_scheduler": dict(self.refused("scheduler")),
            "no_outcome": sum(o.count for o in self.outcomes if o.stage is None),
            "degraded": sum(o.degraded for o in answered),
            "sites": dict(Counter(o.site for o in answered)),
            "models": dict(Counter(o.model for o in answered)),
            "by_class": by_class,
            "stage_hand_offs": dict(self.hand_offs()),
            "awaited_executor": sum(o.count for o in self.outcomes if o.awaited_executor),
        }


@dataclass
class WindowTraffic:
    """A window's requests: live traffic, and each replay run's apart."""

    live: Traffic
    replayed: dict[str, Traffic]
    completion_records: int
    elastic: ElasticCapacity | None = None
    """The autoscaler's decisions, when it recorded any in the window."""

    @property
    def replayed_requests(self) -> int:
        return sum(t.requests for t in self.replayed.values())

    def hand_offs(self) -> int:
        return sum(self.live.hand_offs().values()) + sum(sum(t.hand_offs().values()) for t in self.replayed.values())

    def summary(self) -> dict[str, object]:
        found: dict[str, object] = {
            "live": self.live.summary(),
            "replayed": {run: t.summary() for run, t in sorted(self.replayed.items())},
            "replayed_requests": self.replayed_requests,
            "stage_hand_offs": self.hand_offs(),
            "completion_records": self.completion_records,
        }
        if self.elastic is not None:
            found["elastic_capacity"] = self.elastic.summary()
        return found


def window_traffic(window: RecordedWindow) -> WindowTraffic:
    """The window's requests by their final outcomes, live apart from each replay run."""
    outcomes = final_outcomes(window.admissions, window.schedulings, window.completions)
    live = Traffic()
    replayed: dict[str, Traffic] = defaultdict(Traffic)
    for o in sorted(outcomes.values(), key=lambda o: o.at_ms or 0.0):
        (live if o.run is None else replayed[o.run]).outcomes.append(o)
    elastic = elastic_capacity(window.scalings, outcomes.values(), window.schedulings)
    return WindowTraffic(live, dict(replayed), len(window.completions), elastic)


def latency_cdf(traffic: Traffic) -> dict[str, list[tuple[float, float]]]:
    curves = {}
    for sla in CLASSES:
        values = sorted(traffic.latencies(sla))
        if not values:
            continue
        n = len(values)
        step = max(1, n // CDF_POINTS)
        picks = list(range(0, n, step)) + ([n - 1] if (n - 1) % step else [])
        curves[f"{sla} (n={n})"] = [(max(values[i], 1e-3), (i + 1) / n) for i in picks]
    return curves


def throughput(traffic: WindowTraffic, buckets: _Buckets) -> dict[str, list[tuple[float, float]]]:
    """Requests answered per second at each site (live), and replayed requests answered per second."""
    counts: dict[str, list[int]] = defaultdict(lambda: [0] * buckets.count)
    for o in traffic.live.answered:
        counts[o.site or "?"][buckets.index(o.at_ms)] += 1
    series = {site: [(buckets.center(i), n / buckets.width_s) for i, n in enumerate(values)]
              for site, values in sorted(counts.items())}
    replayed = [0] * buckets.count
    for t in traffic.replayed.values():
        for o in t.answered:
            replayed[buckets.index(o.at_ms)] += 1
    if any(replayed):
        series[REPLAYED] = [(buckets.center(i), n / buckets.width_s) for i, n in enumerate(replayed)]
    return series


def rejects(traffic: Traffic) -> Counter:
    """Requests refused or failed, by ``(stage, reason, time)``."""
    found: Counter = Counter()
    for o in traffic.outcomes:
        if not o.ok and o.stage is not None:
            found[(o.stage, o.code, o.at_ms)] += o.count
    return found


def rejects_over_time(traffic: Traffic, alerts, buckets: _Buckets, targets: dict[str, float]):
    events = rejects(traffic)
    totals = Counter()
    for (stage, reason, _), n in events.items():
        totals[f"{stage}: {reason}"] += n
    top = [name for name, _ in totals.most_common(MAX_REJECT_SERIES)]
    series: dict[str, list[int]] = {name: [0] * buckets.count for name in top}
    other = [0] * buckets.count
    for (stage, reason, at_ms), n in events.items():
        name = f"{stage}: {reason}"
        (series[name] if name in series else other)[buckets.index(at_ms)] += n
    if any(other):
        series["other"] = other
    misses = [0] * buckets.count
    for o in traffic.answered:
        if o.latency_ms is not None and o.latency_ms > targets.get(o.sla_class, float("inf")):
            misses[buckets.index(o.at_ms)] += 1
    lines = {name: [(buckets.center(i), n / buckets.width_s) for i, n in enumerate(values)]
             for name, values in series.items()}
    if any(misses):
        lines["SLA target misses"] = [(buckets.center(i), n / buckets.width_s) for i, n in enumerate(misses)]
    markers = [(a.at_ms, f"{a.sla_class.value} SLA {'violated' if a.firing else 'resolved'}: "
                f"p{a.quantile * 100:g} {a.observed_ms:.1f} ms vs {a.target_ms:.0f} ms",
                "#d62728" if a.firing else "#2ca02c") for a in alerts]
    return lines, markers, totals


def model_mix(traffic: Traffic) -> tuple[list[str], dict[str, list[float]]]:
    mix: dict[str, list[float]] = defaultdict(lambda: [0.0] * len(CLASSES))
    for o in traffic.answered:
        if o.sla_class in CLASSES:
            mix[o.model or "?"][CLASSES.index(o.sla_class)] += 1
    return CLASSES, dict(sorted(mix.items()))


def degradation_over_time(traffic: Traffic, buckets: _Buckets) -> dict[str, list[tuple[float, float]]]:
    done: dict[str, list[int]] = defaultdict(lambda: [0] * buckets.count)
    degraded: dict[str, list[int]] = defaultdict(lambda: [0] * buckets.count)
    for o in traffic.answered:
        i = buckets.index(o.at_ms)
        done[o.sla_class][i] += 1
        degraded[o.sla_class][i] += o.degraded
    return {sla: [(buckets.center(i), degraded[sla][i] / n) for i, n in enumerate(counts) if n]
            for sla, counts in sorted(done.items())}


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _class_rows(traffic: Traffic, targets: dict[str, float], prefix: list[str] | None = None) -> list[list[str]]:
    rows = []
    for sla in CLASSES:
        items = [o for o in traffic.outcomes if o.sla_class == sla]
        if not items:
            continue
        ok = traffic.latencies(sla)
        q = _quantiles(ok)
        target = targets.get(sla)
        verdict = "-" if target is None or not ok else ("over target" if q["p99"] > target else "within target")
        answered = sum(o.ok for o in items)
        degraded = sum(o.degraded for o in items if o.ok)
        rows.append([*(prefix or []), sla, str(sum(o.count for o in items)), str(answered),
                     str(sum(o.count for o in items if not o.ok)), _fmt(q["p50"]), _fmt(q["p95"]), _fmt(q["p99"]),
                     f"{target:.0f}" if target else "-", verdict,
                     f"{100.0 * degraded / answered:.1f}%" if answered else "-"])
    return rows


def _table(headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body or '<tr><td colspan=99>none</td></tr>'}</tbody></table>"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _spread_cells(values: list[float]) -> list[str]:
    found = spread(values)
    return [str(found["count"]), _ms(found["median_ms"]), _ms(found["max_ms"])]


def elastic_section(capacity: ElasticCapacity | None, start_ms: float, end_ms: float) -> str:
    """The "Elastic capacity" section's HTML, or nothing when the autoscaler recorded no decision."""
    if capacity is None:
        return ""
    decisions = capacity.decisions
    desired = capacity.desired(start_ms, end_ms)
    most = max((y for points in desired.values() for _, y in points), default=0.0)
    troubles = [d for d in decisions if d.action in TROUBLES][:MAX_SCALING_MARKERS]
    markers = [(d.at_ms, f"{d.site}/{d.pool} {d.action.value}: {d.reason}", TROUBLES[d.action]) for d in troubles]
    plot = line_chart(desired, title="Desired executors per pool (dashed: failed starts, replacements)",
                      x_label="time (UTC)", y_label="executors wanted", x_clock=True, step=True,
                      y_max=max(most + 1.0, 3.0), markers=markers, width=660)
    counts = _table(["site/pool", "burst", *ACTIONS, "cold starts", "median ms", "max ms"], [
        [key, "yes" if p.burst else "no", *(str(p.actions().get(a, 0)) for a in ACTIONS),
         *_spread_cells(p.cold_starts())] for key, p in sorted(capacity.pools.items())]
        + [["all pools", "", *(str(capacity.actions().get(a, 0)) for a in ACTIONS),
            *_spread_cells(capacity.cold_starts())]])
    by_pool = sorted(decisions, key=lambda d: (d.site, d.pool, d.at_ms))
    table = _table(["time", "site/pool", "action", "executor", "before→after", "reason", "cold start ms"], [
        [_utc(d.at_ms), f"{d.site}/{d.pool}", d.action.value, d.executor or "-",
         f"{d.executors_before}→{d.executors_after}", d.reason, _ms(d.cold_start_ms)]
        for d in by_pool[:MAX_SCALING_ROWS]])
    cut = (f'<p class="note">the first {MAX_SCALING_ROWS} of {len(decisions):,} decisions are listed; '
           "din report --json has them all</p>" if len(decisions) > MAX_SCALING_ROWS else "")
    held = _table(["held while a pool scaled from zero (live), ended", "requests"],
                  [[k, str(v)] for k, v in sorted(capacity.held.items())])
    cold, waits = spread(capacity.cold_starts()), spread(capacity.held_wait_ms)
    last, peak = capacity.cost_per_hour()
    facts = (f"{len(decisions):,} decisions over {len(capacity.pools)} pool(s); {cold['count']} cold start(s), "
             f"median {_ms(cold['median_ms'])} ms, max {_ms(cold['max_ms'])} ms; executor cost {last:,.3f}/h "
             f"after the last decision (at most {peak:,.3f}/h). {sum(capacity.held.values()):,} live request(s) "
             "held while a pool scaled from zero, each counted once by its final outcome"
             + (f" ({capacity.held_replayed:,} replayed, apart)" if capacity.held_replayed else "")
             + (f"; {waits['count']} placed after a median wait of {_ms(waits['median_ms'])} ms, max "
                f"{_ms(waits['max_ms'])} ms" if waits["count"] else "") + ".")
    return (f'<h2>Elastic capacity</h2><p class="meta">{html.escape(facts)}</p>'
            f'<div class="grid"><figure>{plot}</figure><div>{counts}{held}</div></div>{table}{cut}')


STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222;max-width:1360px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:16px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
.meta{color:#555;font-size:13px} .grid{display:flex;flex-wrap:wrap;gap:16px}
.card{border:1px solid #ddd;border-radius:6px;padding:10px 14px;min-width:150px}
.card b{display:block;font-size:22px} .card span{color:#555;font-size:12px}
table{border-collapse:collapse;font-size:13px;margin:6px 0}
th,td{border:1px solid #ddd;padding:4px 8px;text-align:right}
th{background:#f5f5f5} td:first-child,th:first-child{text-align:left}
.note{color:#8a5300;font-size:13px} figure{margin:0}
"""


def render_report(window: RecordedWindow, *, title: str = "DIN recorded window", source: str = "",
                  scope: str | None = None, traffic: WindowTraffic | None = None) -> str:
    """The whole report as one HTML string (``traffic``: the window's, when already computed)."""
    traffic = traffic or window_traffic(window)
    live = traffic.live
    start = window.since_ms
    end = window.until_ms
    times = [c.at_ms for c in window.completions] + [d.at_ms for d in window.admissions] + \
            [d.at_ms for d in window.schedulings] + [d.at_ms for d in window.scalings]
    if times:
        start, end = min(times), max(times)
    buckets = _Buckets(start, end)
    targets = _targets(window)

    requests = live.requests
    answered = len(live.answered)
    alerts = [a for a in window.alerts if a.firing]
    degraded = sum(o.degraded for o in live.answered)
    span_s = max((end - start) / 1000.0, 1e-9)
    runs = len(traffic.replayed)
    cards = [
        (f"{requests:,}", "live requests"),
        (f"{100.0 * answered / requests:.1f}%" if requests else "-", "answered ok"),
        (f"{answered / span_s:,.1f}/s", "mean throughput (answers)"),
        (f"{sum(live.refused('admission').values()):,}", "refused at admission"),
        (f"{sum(live.refused('scheduler').values()):,}", "refused by the scheduler"),
        (f"{traffic.replayed_requests:,}", f"replayed requests ({runs} run{'s' if runs != 1 else ''}), apart"),
        (f"{traffic.hand_offs():,}", "stage hand-offs (not completions)"),
        (f"{len(alerts)}", "SLA violation alerts"),
        (f"{100.0 * degraded / answered:.1f}%" if answered else "-", "degraded (smaller variant)"),
    ]
    card_html = "".join(f'<div class="card"><b>{html.escape(v)}</b><span>{html.escape(k)}</span></div>'
                        for v, k in cards)

    cdf = line_chart(latency_cdf(live), title="Latency CDF per SLA class (live requests, server-side total)",
                     x_label="latency, ms (log scale)", y_label="fraction of requests", log_x=True, step=True,
                     y_max=1.0, y_percent=True, width=660)
    tput = line_chart(throughput(traffic, buckets), title=f"Throughput per site ({buckets.width_s}s buckets)",
                      x_label="time (UTC)", y_label="requests answered / s", x_clock=True, width=660)
    reject_lines, markers, reject_totals = rejects_over_time(live, window.alerts, buckets, targets)
    rej = line_chart(reject_lines, title="Rejects and SLA target misses over time (dashed: SLA alerts)",
                     x_label="time (UTC)", y_label="per second", x_clock=True, markers=markers, width=660)
    classes, mix = model_mix(live)
    mix_chart = bar_chart(classes, mix, title="Model mix per SLA class (served model)", y_label="requests",
                          width=660)
    deg = line_chart(degradation_over_time(live, buckets),
                     title="Degradation (cascade to a smaller variant) rate per SLA class", x_label="time (UTC)",
                     y_label="share of answers", x_clock=True, y_max=1.0, y_percent=True, width=660)

    class_headers = ["SLA class", "requests", "answered", "not answered", "p50 ms", "p95 ms", "p99 ms",
                     "p99 target ms", "verdict", "degraded"]
    summary = _table(class_headers, _class_rows(live, targets))
    replay_table = _table(["replay run", *class_headers], [
        row for run, t in sorted(traffic.replayed.items()) for row in _class_rows(t, targets, [run])])
    hand_off_rows = [["live", kind, str(n)] for kind, n in sorted(live.hand_offs().items())]
    for run, t in sorted(traffic.replayed.items()):
        hand_off_rows += [[f"replay {run}", kind, str(n)] for kind, n in sorted(t.hand_offs().items())]
    hand_off_table = _table(["traffic", "stage", "hand-offs"], hand_off_rows)
    reject_table = _table(["stage: reason", "requests"],
                          [[k, str(v)] for k, v in reject_totals.most_common()])
    alert_table = _table(["time", "class", "state", "observed", "target", "samples", "worst site"], [
        [_utc(a.at_ms), a.sla_class.value, "firing" if a.firing else "resolved",
         f"p{a.quantile * 100:g} {a.observed_ms:.1f} ms", f"{a.target_ms:.0f} ms", str(a.samples),
         a.worst_site or "-"] for a in sorted(window.alerts, key=lambda a: a.at_ms)])
    site_counts = Counter(o.site for o in live.answered)
    model_counts = Counter(o.model for o in live.answered)
    mix_table = _table(["served by", "live requests"],
                       [[f"site {k}", str(v)] for k, v in sorted(site_counts.items())]
                       + [[f"model {k}", str(v)] for k, v in sorted(model_counts.items())])
    notes = "".join(f'<p class="note">{html.escape(line)}</p>' for line in window.skipped_summary())
    meta = (f"Window {_utc(start)} to {_utc(end)} ({span_s:,.0f} s)"
            + (f" &middot; scope {html.escape(scope)}" if scope else "")
            + (f" &middot; from Kafka at {html.escape(source)}" if source else "")
            + f" &middot; generated {_utc(datetime.now(UTC).timestamp() * 1000.0)}")
    counting = (f"Each request counts once, by its final outcome: {traffic.completion_records:,} completion "
                f"records, of which {traffic.hand_offs():,} stage hand-offs (a stage that handed its request on, a "
                "cascade step that escalated) are shown apart. Requests sent by din replay "
                "(ids replay-&lt;run&gt;-...) are left out of the live figures and shown per run below; SLA "
                "alerts are telemetry's, over all traffic.")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{STYLE}</style></head><body>
<h1>{html.escape(title)}</h1><p class="meta">{meta}</p>
<div class="grid">{card_html}</div>
<p class="meta">{counting}</p>
<h2>Live traffic: latency per SLA class</h2>{summary}
<div class="grid"><figure>{cdf}</figure><figure>{tput}</figure></div>
<h2>Rejects and SLA violations (live traffic)</h2>
<div class="grid"><figure>{rej}</figure><div>{reject_table}{alert_table}</div></div>
<h2>Model mix and degradation (live traffic)</h2>
<div class="grid"><figure>{mix_chart}</figure><figure>{deg}</figure></div>
{mix_table}
<h2>Replayed traffic (din replay), per run</h2>{replay_table}
<h2>Stage hand-offs (multi-stage and cascade jobs; not completions of requests)</h2>{hand_off_table}
{elastic_section(traffic.elastic, start, end)}
{notes}
</body></html>
"""
