"""Small self-contained SVG charts (line, step, stacked bars) for reports that must open offline.

No plotting library: each chart is a string of SVG with its axes, ticks,
legend and an explicit "no data" state, styled inline so the HTML file needs
nothing else.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from html import escape

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")
FONT = "font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif"
MARGIN = {"left": 64, "right": 16, "top": 34, "bottom": 44}
LEGEND_ROW = 18


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values covering ``[lo, hi]``."""
    if not math.isfinite(lo) or not math.isfinite(hi):
        return [0.0, 1.0]
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(count, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.floor(lo / step) * step
    ticks, value = [], first
    while value <= hi + step * 0.5:
        ticks.append(round(value, 10))
        value += step
    return ticks


TIME_STEPS_MS = (100, 200, 500, 1_000, 2_000, 5_000, 10_000, 15_000, 30_000, 60_000, 120_000, 300_000, 600_000,
                 900_000, 1_800_000, 3_600_000, 7_200_000, 21_600_000, 43_200_000, 86_400_000)


def time_ticks(lo_ms: float, hi_ms: float, count: int = 6) -> list[float]:
    """Clock-friendly ticks (whole seconds, minutes, hours) between two epoch-ms times."""
    wanted = (hi_ms - lo_ms) / max(count, 1)
    step = next((s for s in TIME_STEPS_MS if s >= wanted), TIME_STEPS_MS[-1])
    first = math.ceil(lo_ms / step) * step
    return [first + i * step for i in range(int((hi_ms - first) // step) + 1)]


def log_ticks(lo: float, hi: float) -> list[float]:
    """1-2-5 ticks between ``lo`` and ``hi`` (both > 0)."""
    ticks = []
    for exponent in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1):
        for m in (1, 2, 5):
            value = m * 10**exponent
            if lo <= value <= hi:
                ticks.append(value)
    if len(ticks) > 10:
        ticks = [t for t in ticks if str(t).lstrip("0.").startswith("1")] or ticks
    return ticks


def fmt_number(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1000:
        return f"{value / 1000:g}k"
    if abs(value) >= 1:
        return f"{value:g}"
    return f"{value:.3g}"


def fmt_clock(ms: float, step_ms: float = 1000.0) -> str:
    """UTC clock time, with tenths of a second when ticks are closer than a second."""
    moment = datetime.fromtimestamp(ms / 1000.0, tz=UTC)
    if step_ms < 1000.0:
        return moment.strftime("%H:%M:%S.%f")[:-5]
    return moment.strftime("%H:%M:%S")


class _Frame:
    def __init__(self, width: int, height: int, legend_rows: int) -> None:
        self.width, self.height = width, height
        self.x0 = MARGIN["left"]
        self.x1 = width - MARGIN["right"]
        self.y0 = MARGIN["top"]
        self.y1 = height - MARGIN["bottom"] - legend_rows * LEGEND_ROW

    def x(self, fraction: float) -> float:
        return self.x0 + fraction * (self.x1 - self.x0)

    def y(self, fraction: float) -> float:
        return self.y1 - fraction * (self.y1 - self.y0)


def _open(width: int, height: int, title: str) -> list[str]:
    return [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'role="img" aria-label="{escape(title)}" style="{FONT};font-size:11px;background:#fff">',
        f'<text x="{width / 2}" y="18" text-anchor="middle" style="font-size:13px;font-weight:600">'
        f"{escape(title)}</text>",
    ]


def _no_data(parts: list[str], frame: _Frame) -> str:
    parts.append(f'<rect x="{frame.x0}" y="{frame.y0}" width="{frame.x1 - frame.x0}" height="{frame.y1 - frame.y0}" '
                 'fill="#fafafa" stroke="#ddd"/>')
    parts.append(f'<text x="{(frame.x0 + frame.x1) / 2}" y="{(frame.y0 + frame.y1) / 2}" text-anchor="middle" '
                 'fill="#888">no data in this window</text>')
    parts.append("</svg>")
    return "".join(parts)


def _legend(parts: list[str], frame: _Frame, names: list[str]) -> None:
    x, row = frame.x0, 0
    base = frame.y1 + 48
    for i, name in enumerate(names):
        width = 22 + 7 * len(name)
        if x + width > frame.x1 and x > frame.x0:
            x, row = frame.x0, row + 1
        y = base + row * LEGEND_ROW
        color = PALETTE[i % len(PALETTE)]
        parts.append(f'<rect x="{x}" y="{y - 9}" width="12" height="10" fill="{color}"/>')
        parts.append(f'<text x="{x + 16}" y="{y}">{escape(name)}</text>')
        x += width


def _legend_rows(names: list[str], width: int) -> int:
    usable = width - MARGIN["left"] - MARGIN["right"]
    rows, x = 1, 0
    for name in names:
        w = 22 + 7 * len(name)
        if x + w > usable and x > 0:
            rows, x = rows + 1, 0
        x += w
    return rows if names else 0


def line_chart(
    series: dict[str, list[tuple[float, float]]],
    *,
    title: str,
    x_label: str,
    y_label: str,
    width: int = 660,
    height: int = 320,
    log_x: bool = False,
    x_clock: bool = False,
    step: bool = False,
    y_min: float | None = 0.0,
    y_max: float | None = None,
    y_percent: bool = False,
    markers: list[tuple[float, str, str]] = (),
) -> str:
    """Lines (or steps) per named series of ``(x, y)`` points; ``markers`` are vertical ``(x, label, color)`` lines.

    ``x_clock`` labels x as UTC clock time (x in epoch ms); ``log_x`` uses a log scale (x > 0).
    """
    names = [n for n, pts in series.items() if pts]
    frame = _Frame(width, height, _legend_rows(names, width))
    parts = _open(width, height, title)
    points = [p for n in names for p in series[n]]
    if log_x:
        points = [p for p in points if p[0] > 0]
    if not points:
        return _no_data(parts, frame)
    xs = [p[0] for p in points] + [m[0] for m in markers]
    ys = [p[1] for p in points]
    x_lo, x_hi = min(xs), max(xs)
    if x_hi <= x_lo:
        x_hi = x_lo + (1.0 if not log_x else x_lo)
    lo_y = min(ys) if y_min is None else y_min
    hi_y = max(ys) if y_max is None else y_max
    if hi_y <= lo_y:
        hi_y = lo_y + 1.0
    if log_x:
        lx_lo, lx_hi = math.log10(x_lo), math.log10(x_hi)
        if lx_hi - lx_lo < 1e-9:
            lx_hi = lx_lo + 1

        def fx(v: float) -> float:
            return frame.x((math.log10(max(v, x_lo)) - lx_lo) / (lx_hi - lx_lo))
        x_ticks = log_ticks(x_lo, x_hi) or [x_lo, x_hi]
    else:
        def fx(v: float) -> float:
            return frame.x((v - x_lo) / (x_hi - x_lo))
        ticks = time_ticks(x_lo, x_hi) if x_clock else nice_ticks(x_lo, x_hi, 6)
        x_ticks = [t for t in ticks if x_lo <= t <= x_hi] or [x_lo, x_hi]
    y_ticks = nice_ticks(lo_y, hi_y, 5)
    hi_y = max(hi_y, y_ticks[-1])

    def fy(v: float) -> float:
        return frame.y((v - lo_y) / (hi_y - lo_y))

    for t in y_ticks:
        if t < lo_y - 1e-12 or t > hi_y + 1e-12:
            continue
        y = fy(t)
        label = f"{100 * t:g}%" if y_percent else fmt_number(t)
        parts.append(f'<line x1="{frame.x0}" x2="{frame.x1}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>')
        parts.append(f'<text x="{frame.x0 - 6}" y="{y + 4:.1f}" text-anchor="end" fill="#555">{label}</text>')
    step_ms = (x_ticks[1] - x_ticks[0]) if len(x_ticks) > 1 else 1000.0
    for t in x_ticks:
        x = fx(t)
        label = fmt_clock(t, step_ms) if x_clock else fmt_number(t)
        anchor = "end" if x > frame.x1 - 24 else ("start" if x < frame.x0 + 8 else "middle")
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{frame.y0}" y2="{frame.y1}" stroke="#f3f3f3"/>')
        parts.append(f'<text x="{x:.1f}" y="{frame.y1 + 15}" text-anchor="{anchor}" fill="#555">{label}</text>')
    parts.append(f'<rect x="{frame.x0}" y="{frame.y0}" width="{frame.x1 - frame.x0}" height="{frame.y1 - frame.y0}" '
                 'fill="none" stroke="#999"/>')
    parts.append(f'<text x="{(frame.x0 + frame.x1) / 2}" y="{frame.y1 + 30}" text-anchor="middle">'
                 f'{escape(x_label)}</text>')
    parts.append(f'<text transform="translate(14,{(frame.y0 + frame.y1) / 2}) rotate(-90)" text-anchor="middle">'
                 f'{escape(y_label)}</text>')
    for x_value, label, color in markers:
        x = fx(x_value)
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{frame.y0}" y2="{frame.y1}" stroke="{color}" '
                     'stroke-dasharray="4,3" stroke-width="1.5"><title>' + escape(label) + "</title></line>")
    for i, name in enumerate(series):
        pts = series[name]
        if log_x:
            pts = [p for p in pts if p[0] > 0]
        if not pts:
            continue
        color = PALETTE[names.index(name) % len(PALETTE)] if name in names else PALETTE[i % len(PALETTE)]
        coords = []
        previous_y = None
        for x_value, y_value in pts:
            x, y = fx(x_value), fy(min(max(y_value, lo_y), hi_y))
            if step and previous_y is not None:
                coords.append(f"{x:.1f},{previous_y:.1f}")
            coords.append(f"{x:.1f},{y:.1f}")
            previous_y = y
        if len(coords) == 1:
            x, y = coords[0].split(",")
            parts.append(f'<circle cx="{x}" cy="{y}" r="3" fill="{color}"/>')
        else:
            parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.8" points="{" ".join(coords)}">'
                         f"<title>{escape(name)}</title></polyline>")
    _legend(parts, frame, names)
    parts.append("</svg>")
    return "".join(parts)


def bar_chart(
    categories: list[str],
    series: dict[str, list[float]],
    *,
    title: str,
    y_label: str,
    width: int = 660,
    height: int = 320,
) -> str:
    """Stacked bars: one bar per category, one colour per series."""
    names = [n for n, values in series.items() if any(values)]
    frame = _Frame(width, height, _legend_rows(names, width))
    parts = _open(width, height, title)
    totals = [sum(series[n][i] for n in names) for i in range(len(categories))]
    if not categories or not any(totals):
        return _no_data(parts, frame)
    y_ticks = nice_ticks(0.0, max(totals) * 1.1, 5)  # room for the value above the tallest bar
    hi = y_ticks[-1] or 1.0
    for t in y_ticks:
        y = frame.y(t / hi)
        parts.append(f'<line x1="{frame.x0}" x2="{frame.x1}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>')
        parts.append(f'<text x="{frame.x0 - 6}" y="{y + 4:.1f}" text-anchor="end" fill="#555">{fmt_number(t)}</text>')
    slot = (frame.x1 - frame.x0) / len(categories)
    bar = min(slot * 0.6, 80)
    for i, category in enumerate(categories):
        x = frame.x0 + slot * i + (slot - bar) / 2
        base = 0.0
        for k, name in enumerate(names):
            value = series[name][i]
            if value <= 0:
                continue
            y_top, y_bottom = frame.y((base + value) / hi), frame.y(base / hi)
            parts.append(f'<rect x="{x:.1f}" y="{y_top:.1f}" width="{bar:.1f}" height="{y_bottom - y_top:.1f}" '
                         f'fill="{PALETTE[k % len(PALETTE)]}"><title>{escape(category)} / {escape(name)}: '
                         f'{fmt_number(value)}</title></rect>')
            base += value
        parts.append(f'<text x="{x + bar / 2:.1f}" y="{frame.y(base / hi) - 4:.1f}" text-anchor="middle" '
                     f'fill="#333">{fmt_number(base)}</text>')
        parts.append(f'<text x="{x + bar / 2:.1f}" y="{frame.y1 + 15}" text-anchor="middle">{escape(category)}</text>')
    parts.append(f'<line x1="{frame.x0}" x2="{frame.x1}" y1="{frame.y1}" y2="{frame.y1}" stroke="#999"/>')
    parts.append(f'<text transform="translate(14,{(frame.y0 + frame.y1) / 2}) rotate(-90)" text-anchor="middle">'
                 f'{escape(y_label)}</text>')
    _legend(parts, frame, names)
    parts.append("</svg>")
    return "".join(parts)
