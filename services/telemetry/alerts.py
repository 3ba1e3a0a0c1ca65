"""SLA violation alerts: an SLA class whose latency quantile stays over its target across a sliding window.

``SlaWatch`` sees every completion (one ``bisect`` per observation) and, when
asked to ``evaluate``, returns an ``SlaViolationV1`` for each class whose state
changed: ``firing=True`` when the class's quantile over the window first
exceeds its target (with at least ``min_samples`` completions in the window),
``firing=False`` once it is back at or under target or the window is empty.
Nothing here knows NATS or Kafka.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from din.services.telemetry.window import SlidingQuantiles
from din.shared.contracts.inference import SlaClass
from din.shared.contracts.telemetry import SlaViolationV1

REPORTED_QUANTILES = (0.5, 0.95, 0.99)


@dataclass(frozen=True)
class ClassLatency:
    """One class's window: how many completions, and p50/p95/p99 in ms (None when empty)."""

    samples: int
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None


class SlaWatch:
    """Per-class sliding latency quantiles and the firing/resolved state of each class's SLA."""

    def __init__(
        self,
        targets_ms: Mapping[SlaClass, float],
        *,
        window_s: float,
        quantile: float = 0.99,
        min_samples: int = 20,
        slots: int = 10,
    ) -> None:
        if not 0 < quantile < 1:
            raise ValueError("quantile must be between 0 and 1")
        self.targets_ms = {SlaClass(c): float(t) for c, t in targets_ms.items()}
        self.window_s = window_s
        self.quantile = quantile
        self.min_samples = min_samples
        self._slots = slots
        self._classes = {c: SlidingQuantiles(window_s, slots) for c in SlaClass}
        self._sites: dict[tuple[SlaClass, str], SlidingQuantiles] = {}
        self.firing: dict[SlaClass, bool] = {c: False for c in SlaClass}
        self.fired = {c: 0 for c in SlaClass}

    def observe(self, sla: SlaClass, site: str, total_ms: float, now_s: float) -> None:
        """Count one completion of class ``sla`` served at ``site`` in ``total_ms``."""
        self._classes[sla].observe(total_ms, now_s)
        window = self._sites.get((sla, site))
        if window is None:
            window = self._sites[(sla, site)] = SlidingQuantiles(self.window_s, self._slots)
        window.observe(total_ms, now_s)

    def latency(self, sla: SlaClass, now_s: float) -> ClassLatency:
        """The class's window right now."""
        samples, values = self._classes[sla].quantiles(REPORTED_QUANTILES, now_s)
        return ClassLatency(samples, *values)

    def _worst_site(self, sla: SlaClass, now_s: float) -> str | None:
        worst: tuple[float, str] | None = None
        for (cls, site), window in self._sites.items():
            if cls != sla:
                continue
            samples, (value,) = window.quantiles((self.quantile,), now_s)
            if samples and (worst is None or value > worst[0]):
                worst = (value, site)
        return worst[1] if worst else None

    def evaluate(self, now_s: float, now_ms: float) -> list[SlaViolationV1]:
        """Alerts for every class whose state changed since the last evaluation."""
        changes = []
        for sla, target in self.targets_ms.items():
            samples, (observed,) = self._classes[sla].quantiles((self.quantile,), now_s)
            over = samples >= self.min_samples and observed is not None and observed > target
            under = samples == 0 or (observed is not None and observed <= target)
            if over and not self.firing[sla]:
                self.firing[sla] = True
                self.fired[sla] += 1
            elif under and self.firing[sla]:
                self.firing[sla] = False
            else:
                continue
            changes.append(
                SlaViolationV1(
                    sla_class=sla,
                    firing=self.firing[sla],
                    quantile=self.quantile,
                    observed_ms=round(observed or 0.0, 3),
                    target_ms=target,
                    window_s=self.window_s,
                    samples=samples,
                    worst_site=self._worst_site(sla, now_s),
                    at_ms=now_ms,
                )
            )
        return changes


def describe(alert: SlaViolationV1) -> str:
    """One line for the log: the class, firing or resolved, the quantile against the target, the worst site."""
    state = "firing" if alert.firing else "resolved"
    return (f"{alert.sla_class.value} {state}: p{alert.quantile * 100:g} {alert.observed_ms:.1f} ms vs target "
            f"{alert.target_ms:.1f} ms over {alert.samples} requests (worst site {alert.worst_site})")
