"""Comparing a replay with its recording: request counts and tenant mix, latency, errors, where and by what served.

Latency is compared on the same footing on both sides: the server-side total
(admission to answer) the executor reports, recorded in ``CompletionV1`` and
returned in each replayed answer's ``timings_ms``. The replay's client-observed
latency is shown beside it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from din.replay.outcomes import NO_OUTCOME, Outcome, final_outcomes
from din.replay.recorded import RecordedWindow

__all__ = ["NO_OUTCOME", "Comparison", "Outcome", "recorded_outcomes"]


def recorded_outcomes(window: RecordedWindow) -> dict[str, Outcome]:
    """The recorded outcome of each request of the window, keyed by request id: its final completion (a stage
    that handed the request on is not one), else its refusal, else ``no_outcome_recorded``
    (``outcomes.final_outcomes``)."""
    wanted = {r.meta.request_id: (r.meta.tenant, r.meta.sla_class.value) for r in window.requests}
    return final_outcomes(window.admissions, window.schedulings, window.completions, requests=wanted)


def _values(outcomes: dict[str, Outcome], attr: str, sla: str) -> list[float]:
    """``attr`` of the successful outcomes of class ``sla`` (every class for ``all``)."""
    return [getattr(o, attr) for o in outcomes.values()
            if o.ok and getattr(o, attr) is not None and (sla == "all" or o.sla_class == sla)]


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "p99": None, "max": None}
    arr = np.asarray(values, dtype=float)
    return {
        "p50": float(np.percentile(arr, 50)),
        "p95": float(np.percentile(arr, 95)),
        "p99": float(np.percentile(arr, 99)),
        "max": float(arr.max()),
    }


@dataclass
class Comparison:
    """A replay against its recording."""

    recorded: dict[str, Outcome]
    replayed: dict[str, Outcome]
    notes: list[str] = field(default_factory=list)

    def tenant_mix(self) -> tuple[Counter, Counter]:
        return Counter(o.tenant for o in self.recorded.values()), Counter(o.tenant for o in self.replayed.values())

    def errors(self) -> tuple[Counter, Counter]:
        return (Counter(o.code for o in self.recorded.values() if not o.ok),
                Counter(o.code for o in self.replayed.values() if not o.ok))

    def latency(self) -> dict[str, dict[str, dict[str, float | None]]]:
        """Per SLA class (and ``all``): recorded, replayed (server total) and replay client-observed percentiles."""
        classes = sorted({o.sla_class for o in self.recorded.values()}) + ["all"]
        result = {}
        for sla in classes:
            result[sla] = {
                "recorded": _percentiles(_values(self.recorded, "latency_ms", sla)),
                "replayed": _percentiles(_values(self.replayed, "latency_ms", sla)),
                "replay_client": _percentiles(_values(self.replayed, "client_ms", sla)),
            }
        return result

    def placement(self) -> dict[str, object]:
        """How often each request was served at the same site and by the same model as recorded."""
        both = [(self.recorded[rid], o) for rid, o in self.replayed.items()
                if rid in self.recorded and self.recorded[rid].ok and o.ok]
        same_site = sum(1 for r, o in both if r.site == o.site)
        same_model = sum(1 for r, o in both if r.model == o.model)
        moves = Counter((r.site, o.site) for r, o in both if r.site != o.site)
        return {
            "compared": len(both),
            "same_site": same_site,
            "same_model": same_model,
            "site_moves": {f"{a}->{b}": n for (a, b), n in moves.most_common()},
            "recorded_sites": dict(Counter(r.site for r, _ in both)),
            "replayed_sites": dict(Counter(o.site for _, o in both)),
            "recorded_models": dict(Counter(r.model for r, _ in both)),
            "replayed_models": dict(Counter(o.model for _, o in both)),
        }

    def as_dict(self) -> dict[str, object]:
        rec_mix, rep_mix = self.tenant_mix()
        rec_err, rep_err = self.errors()
        return {
            "requests": {"recorded": len(self.recorded), "replayed": len(self.replayed)},
            "tenant_mix": {"recorded": dict(rec_mix), "replayed": dict(rep_mix)},
            "errors": {"recorded": dict(rec_err), "replayed": dict(rep_err)},
            "latency_ms": self.latency(),
            "placement": self.placement(),
            "notes": list(self.notes),
        }

    def text(self) -> str:
        """A plain-text report for the terminal."""
        data = self.as_dict()
        lines = [f"requests: recorded {len(self.recorded)}, replayed {len(self.replayed)}"]
        rec_mix, rep_mix = data["tenant_mix"]["recorded"], data["tenant_mix"]["replayed"]
        lines.append("tenant mix (recorded -> replayed): " + ", ".join(
            f"{t} {rec_mix.get(t, 0)} -> {rep_mix.get(t, 0)}" for t in sorted(set(rec_mix) | set(rep_mix))))
        lines.append("")
        lines.append("latency ms (server total; client-observed for the replay)")
        lines.append(f"  {'class':<12} {'':<9} {'p50':>9} {'p95':>9} {'p99':>9} {'max':>9}")
        for sla, sides in data["latency_ms"].items():
            for side, label in (("recorded", "recorded"), ("replayed", "replayed"), ("replay_client", "client")):
                values = sides[side]
                cells = " ".join(f"{v:9.2f}" if v is not None else f"{'-':>9}" for v in values.values())
                lines.append(f"  {sla if side == 'recorded' else '':<12} {label:<9} {cells}")
        rec_err, rep_err = data["errors"]["recorded"], data["errors"]["replayed"]
        lines.append("")
        codes = sorted(set(rec_err) | set(rep_err))
        lines.append("errors (recorded -> replayed): " + (", ".join(
            f"{c} {rec_err.get(c, 0)} -> {rep_err.get(c, 0)}" for c in codes) or "none"))
        placement = data["placement"]
        compared = placement["compared"]
        if compared:
            lines.append(
                f"served at the same site: {placement['same_site']}/{compared} "
                f"({100.0 * placement['same_site'] / compared:.1f}%), by the same model: "
                f"{placement['same_model']}/{compared} ({100.0 * placement['same_model'] / compared:.1f}%)"
            )
            lines.append("sites (recorded -> replayed): " + ", ".join(
                f"{s} {placement['recorded_sites'].get(s, 0)} -> {placement['replayed_sites'].get(s, 0)}"
                for s in sorted(set(placement["recorded_sites"]) | set(placement["replayed_sites"]))))
            lines.append("models (recorded -> replayed): " + ", ".join(
                f"{m} {placement['recorded_models'].get(m, 0)} -> {placement['replayed_models'].get(m, 0)}"
                for m in sorted(set(placement["recorded_models"]) | set(placement["replayed_models"]))))
            if placement["site_moves"]:
                lines.append("moved: " + ", ".join(f"{k} {v}" for k, v in placement["site_moves"].items()))
        for note in self.notes:
            lines.append(f"note: {note}")
        return "\n".join(lines)
