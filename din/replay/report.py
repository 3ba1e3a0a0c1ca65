"""``din report``: a recorded window as one self-contained HTML file with its plots, viewable offline.

Sections: a summary (completions, latency quantiles per SLA class against
their targets, rejects, alerts), then

* latency CDF per SLA class,
* throughput over time per site,
* rejects by stage and reason, and SLA target misses and alerts, over time,
* model mix per SLA class, and the degradation (cascade to a smaller variant) rate over time.

Everything is inline (SVG, CSS); the file loads nothing.
"""

from __future__ import annotations

import html
from collections import Counter, defaultdict
from datetime import UTC, datetime

import numpy as np

from din.replay.recorded import RecordedWindow
from din.replay.svg import bar_chart, line_chart
from services.telemetry.settings import DEFAULT_SLA_TARGETS_MS
from shared.contracts.inference import SlaClass

CDF_POINTS = 400
TARGET_BUCKETS = 60
NICE_BUCKETS_S = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 86400)
MAX_REJECT_SERIES = 7


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


def latency_cdf(window: RecordedWindow) -> dict[str, list[tuple[float, float]]]:
    by_class: dict[str, list[float]] = defaultdict(list)
    for c in window.completions:
        total = c.timings_ms.get("total")
        if c.ok and total is not None:
            by_class[c.sla_class.value].append(total)
    curves = {}
    for sla in [c.value for c in SlaClass]:
        values = sorted(by_class.get(sla, []))
        if not values:
            continue
        n = len(values)
        step = max(1, n // CDF_POINTS)
        picks = list(range(0, n, step)) + ([n - 1] if (n - 1) % step else [])
        curves[f"{sla} (n={n})"] = [(max(values[i], 1e-3), (i + 1) / n) for i in picks]
    return curves


def throughput(window: RecordedWindow, buckets: _Buckets) -> dict[str, list[tuple[float, float]]]:
    counts: dict[str, list[int]] = defaultdict(lambda: [0] * buckets.count)
    for c in window.completions:
        counts[c.site][buckets.index(c.at_ms)] += 1
    return {site: [(buckets.center(i), n / buckets.width_s) for i, n in enumerate(values)]
            for site, values in sorted(counts.items())}


def rejects(window: RecordedWindow) -> Counter:
    """Rejects by ``stage: reason``."""
    found: Counter = Counter()
    for d in window.admissions:
        if not d.admitted:
            found[("admission", d.reason, d.at_ms)] += d.count
    for d in window.schedulings:
        if d.chosen_site is None:
            found[("scheduler", d.reason, d.at_ms)] += 1
    for c in window.completions:
        if not c.ok:
            found[("executor", c.error_code or "error", c.at_ms)] += 1
    return found


def rejects_over_time(window: RecordedWindow, buckets: _Buckets, targets: dict[str, float]):
    events = rejects(window)
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
    for c in window.completions:
        total = c.timings_ms.get("total")
        if c.ok and total is not None and total > targets.get(c.sla_class.value, float("inf")):
            misses[buckets.index(c.at_ms)] += 1
    lines = {name: [(buckets.center(i), n / buckets.width_s) for i, n in enumerate(values)]
             for name, values in series.items()}
    if any(misses):
        lines["SLA target misses"] = [(buckets.center(i), n / buckets.width_s) for i, n in enumerate(misses)]
    markers = [(a.at_ms, f"{a.sla_class.value} SLA {'violated' if a.firing else 'resolved'}: "
                f"p{a.quantile * 100:g} {a.observed_ms:.1f} ms vs {a.target_ms:.0f} ms",
                "#d62728" if a.firing else "#2ca02c") for a in window.alerts]
    return lines, markers, totals


def model_mix(window: RecordedWindow) -> tuple[list[str], dict[str, list[float]]]:
    classes = [c.value for c in SlaClass]
    mix: dict[str, list[float]] = defaultdict(lambda: [0.0] * len(classes))
    for c in window.completions:
        if c.ok:
            mix[c.model][classes.index(c.sla_class.value)] += 1
    return classes, dict(sorted(mix.items()))


def degradation_over_time(window: RecordedWindow, buckets: _Buckets) -> dict[str, list[tuple[float, float]]]:
    done: dict[str, list[int]] = defaultdict(lambda: [0] * buckets.count)
    degraded: dict[str, list[int]] = defaultdict(lambda: [0] * buckets.count)
    for c in window.completions:
        if c.ok:
            i = buckets.index(c.at_ms)
            done[c.sla_class.value][i] += 1
            degraded[c.sla_class.value][i] += c.degraded
    return {sla: [(buckets.center(i), degraded[sla][i] / n) for i, n in enumerate(counts) if n]
            for sla, counts in sorted(done.items())}


def _summary_rows(window: RecordedWindow, targets: dict[str, float]) -> list[list[str]]:
    rows = []
    for sla in [c.value for c in SlaClass]:
        items = [c for c in window.completions if c.sla_class.value == sla]
        ok = [c.timings_ms["total"] for c in items if c.ok and "total" in c.timings_ms]
        if not items:
            continue
        p50, p95, p99 = (np.percentile(ok, q) for q in (50, 95, 99)) if ok else (float("nan"),) * 3
        target = targets.get(sla)
        verdict = "-" if target is None or not ok else ("over target" if p99 > target else "within target")
        degraded = sum(c.degraded for c in items if c.ok)
        rows.append([sla, str(len(items)), str(len(items) - len(ok)), f"{p50:.2f}", f"{p95:.2f}", f"{p99:.2f}",
                     f"{target:.0f}" if target else "-", verdict,
                     f"{100.0 * degraded / len(ok):.1f}%" if ok else "-"])
    return rows


def _table(headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body or '<tr><td colspan=99>none</td></tr>'}</tbody></table>"


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
                  scope: str | None = None) -> str:
    """The whole report as one HTML string."""
    start = window.since_ms
    end = window.until_ms
    times = [c.at_ms for c in window.completions] + [d.at_ms for d in window.admissions] + \
            [d.at_ms for d in window.schedulings]
    if times:
        start, end = min(times), max(times)
    buckets = _Buckets(start, end)
    targets = _targets(window)

    completions = len(window.completions)
    ok = sum(c.ok for c in window.completions)
    refused = sum(d.count for d in window.admissions if not d.admitted)
    alerts = [a for a in window.alerts if a.firing]
    degraded = sum(c.degraded for c in window.completions if c.ok)
    span_s = max((end - start) / 1000.0, 1e-9)

    cards = [
        (f"{completions:,}", "completions"),
        (f"{100.0 * ok / completions:.1f}%" if completions else "-", "answered ok"),
        (f"{completions / span_s:,.1f}/s", "mean throughput"),
        (f"{refused:,}", "refused at admission"),
        (f"{sum(1 for d in window.schedulings if d.chosen_site is None):,}", "refused by the scheduler"),
        (f"{len(alerts)}", "SLA violation alerts"),
        (f"{100.0 * degraded / ok:.1f}%" if ok else "-", "degraded (smaller variant)"),
    ]
    card_html = "".join(f'<div class="card"><b>{html.escape(v)}</b><span>{html.escape(k)}</span></div>'
                        for v, k in cards)

    cdf = line_chart(latency_cdf(window), title="Latency CDF per SLA class (server-side total)",
                     x_label="latency, ms (log scale)", y_label="fraction of requests", log_x=True, step=True,
                     y_max=1.0, y_percent=True, width=660)
    tput = line_chart(throughput(window, buckets), title=f"Throughput per site ({buckets.width_s}s buckets)",
                      x_label="time (UTC)", y_label="completions / s", x_clock=True, width=660)
    reject_lines, markers, reject_totals = rejects_over_time(window, buckets, targets)
    rej = line_chart(reject_lines, title="Rejects and SLA target misses over time (dashed: SLA alerts)",
                     x_label="time (UTC)", y_label="per second", x_clock=True, markers=markers, width=660)
    classes, mix = model_mix(window)
    mix_chart = bar_chart(classes, mix, title="Model mix per SLA class (served model)", y_label="completions",
                          width=660)
    deg = line_chart(degradation_over_time(window, buckets),
                     title="Degradation (cascade to a smaller variant) rate per SLA class", x_label="time (UTC)",
                     y_label="share of answers", x_clock=True, y_max=1.0, y_percent=True, width=660)

    summary = _table(["SLA class", "completions", "errors", "p50 ms", "p95 ms", "p99 ms", "p99 target ms",
                      "verdict", "degraded"], _summary_rows(window, targets))
    reject_table = _table(["stage: reason", "count"],
                          [[k, str(v)] for k, v in reject_totals.most_common()])
    alert_table = _table(["time", "class", "state", "observed", "target", "samples", "worst site"], [
        [_utc(a.at_ms), a.sla_class.value, "firing" if a.firing else "resolved",
         f"p{a.quantile * 100:g} {a.observed_ms:.1f} ms", f"{a.target_ms:.0f} ms", str(a.samples),
         a.worst_site or "-"] for a in sorted(window.alerts, key=lambda a: a.at_ms)])
    site_counts = Counter(c.site for c in window.completions)
    model_counts = Counter(c.model for c in window.completions if c.ok)
    mix_table = _table(["served by", "completions"],
                       [[f"site {k}", str(v)] for k, v in sorted(site_counts.items())]
                       + [[f"model {k}", str(v)] for k, v in sorted(model_counts.items())])
    notes = "".join(f'<p class="note">{html.escape(line)}</p>' for line in window.skipped_summary())
    meta = (f"Window {_utc(start)} to {_utc(end)} ({span_s:,.0f} s)"
            + (f" &middot; scope {html.escape(scope)}" if scope else "")
            + (f" &middot; from Kafka at {html.escape(source)}" if source else "")
            + f" &middot; generated {_utc(datetime.now(UTC).timestamp() * 1000.0)}")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{STYLE}</style></head><body>
<h1>{html.escape(title)}</h1><p class="meta">{meta}</p>
<div class="grid">{card_html}</div>
<h2>Latency per SLA class</h2>{summary}
<div class="grid"><figure>{cdf}</figure><figure>{tput}</figure></div>
<h2>Rejects and SLA violations</h2>
<div class="grid"><figure>{rej}</figure><div>{reject_table}{alert_table}</div></div>
<h2>Model mix and degradation</h2>
<div class="grid"><figure>{mix_chart}</figure><figure>{deg}</figure></div>
{mix_table}
{notes}
</body></html>
"""
