"""Sliding-window latency quantiles in constant time per observation.

A ``SlidingQuantiles`` keeps, for each of ``slots`` sub-windows, counts in
log-spaced buckets (each 4% wider than the last, from 10 us to 20 min), so an
observation is one ``bisect`` and one increment, memory is bounded whatever
the rate, and a quantile is accurate to within one bucket (4%). Old
sub-windows are cleared as time moves on: the window covers the last
``window_s`` seconds to within one sub-window.
"""

from __future__ import annotations

import math
from bisect import bisect_left

_GROWTH = 1.04
_LOWEST_MS = 0.01
_HIGHEST_MS = 1_200_000.0
BOUNDS_MS: tuple[float, ...] = tuple(
    _LOWEST_MS * _GROWTH**i for i in range(int(math.log(_HIGHEST_MS / _LOWEST_MS, _GROWTH)) + 2)
)


class SlidingQuantiles:
    """Latency quantiles over the last ``window_s`` seconds."""

    __slots__ = ("window_s", "slot_s", "_slots", "_counts", "_stamp")

    def __init__(self, window_s: float, slots: int = 10) -> None:
        if window_s <= 0 or slots < 1:
            raise ValueError("window_s must be > 0 and slots >= 1")
        self.window_s = window_s
        self.slot_s = window_s / slots
        self._slots = slots
        self._counts = [[0] * (len(BOUNDS_MS) + 1) for _ in range(slots)]
        self._stamp = [-1] * slots

    def _slot(self, now_s: float) -> list[int]:
        tick = int(now_s // self.slot_s)
        index = tick % self._slots
        if self._stamp[index] != tick:
            self._stamp[index] = tick
            self._counts[index] = [0] * (len(BOUNDS_MS) + 1)
        return self._counts[index]

    def observe(self, value_ms: float, now_s: float) -> None:
        """Count one latency of ``value_ms`` at time ``now_s`` (seconds, any monotonic origin)."""
        self._slot(now_s)[bisect_left(BOUNDS_MS, value_ms)] += 1

    def _merged(self, now_s: float) -> list[int]:
        tick = int(now_s // self.slot_s)
        merged = [0] * (len(BOUNDS_MS) + 1)
        for stamp, counts in zip(self._stamp, self._counts, strict=True):
            if stamp >= 0 and tick - stamp < self._slots:
                for i, c in enumerate(counts):
                    if c:
                        merged[i] += c
        return merged

    def count(self, now_s: float) -> int:
        """Observations in the window."""
        return sum(self._merged(now_s))

    def quantiles(self, qs: tuple[float, ...], now_s: float) -> tuple[int, list[float | None]]:
        """``(count, [value of each quantile in ms])``; values are None when the window is empty."""
        merged = self._merged(now_s)
        total = sum(merged)
        if total == 0:
            return 0, [None] * len(qs)
        results = []
        for q in qs:
            rank = max(1, math.ceil(q * total))
            seen = 0
            for i, c in enumerate(merged):
                seen += c
                if seen >= rank:
                    results.append(BOUNDS_MS[min(i, len(BOUNDS_MS) - 1)])
                    break
        return total, results
