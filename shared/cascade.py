"""Confidence of a model's answer from its class probabilities: what a large-small cascade escalates on.

The executor measures it on the small model's answer to decide whether a
cascade job goes on to the large model; the scheduler's offline cascade
analysis (``bench.cascade_policy``) calibrates thresholds with it.
Pure numpy.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from din.shared.errors import DinError, ErrorCode


class Confidence(StrEnum):
    """How confident the small model is in an answer, from its probabilities."""

    MAX = "max"
    MARGIN = "margin"
    ENTROPY = "entropy"


def confidence(probabilities: np.ndarray, measure: str | Confidence = Confidence.MAX) -> np.ndarray:
    """Confidence of each answer ([batch, classes] -> [batch]); higher means surer."""
    try:
        measure = Confidence(measure)
    except ValueError:
        known = ", ".join(m.value for m in Confidence)
        raise DinError(ErrorCode.BAD_REQUEST, f"unknown confidence measure {measure!r}; known: {known}") from None
    probabilities = np.atleast_2d(np.asarray(probabilities, dtype=np.float64))
    if probabilities.shape[1] < 2:
        raise DinError(ErrorCode.BAD_REQUEST, "confidence needs probabilities over at least two classes")
    if measure is Confidence.MAX:
        return probabilities.max(axis=1)
    if measure is Confidence.MARGIN:
        top_two = np.sort(probabilities, axis=1)[:, -2:]
        return top_two[:, 1] - top_two[:, 0]
    clipped = np.clip(probabilities, 1e-12, 1.0)
    entropy = -(clipped * np.log(clipped)).sum(axis=1)
    return 1.0 - entropy / math.log(probabilities.shape[1])


PROBABILITIES_OUTPUT = "probabilities"
"""Output tensor a cascade's first-stage model must have: class probabilities, [batch, classes]."""


TARGET_PREFIX = "rate:"
CALIBRATION_WINDOW = 512


@dataclass(frozen=True)
class CascadeSpec:
    """What a request asks of a cascade: a fixed confidence ``threshold``, or a ``target_rate`` of escalations."""

    threshold: float | None = None
    target_rate: float | None = None


def parse_cascade(raw: object) -> CascadeSpec:
    """``<threshold>`` (e.g. ``0.8``) or ``rate:<target escalation rate>`` (e.g. ``rate:0.2``); ``DinError`` else."""
    text = str(raw).strip() if not isinstance(raw, bool) else ""
    if not text.startswith(TARGET_PREFIX):
        return CascadeSpec(threshold=parse_threshold(raw))
    try:
        rate = float(text[len(TARGET_PREFIX):])
    except ValueError:
        rate = math.nan
    if not 0.0 <= rate <= 1.0:
        raise DinError(ErrorCode.BAD_REQUEST,
                       f"cascade target rate must be a fraction from 0 to 1 (e.g. rate:0.2), not {raw!r}")
    return CascadeSpec(target_rate=rate)


class EscalationCalibrator:
    """Turns a target escalation rate into a threshold from the confidences of recent first-stage answers.

    The threshold for rate ``r`` is the ``floor(r * n)``-th lowest of the last ``n`` confidences (as
    ``bench.cascade_policy.calibrate`` does offline), so about ``r`` of answers like the recent ones
    escalate. With no history yet every answer escalates: accuracy first until there is data.
    """

    def __init__(self, window: int = CALIBRATION_WINDOW) -> None:
        self._recent: deque[float] = deque(maxlen=window)

    def __len__(self) -> int:
        return len(self._recent)

    def observe(self, value: float) -> None:
        """Record one first-stage answer's confidence."""
        self._recent.append(value)

    def threshold(self, target_rate: float) -> float:
        """The confidence below which about ``target_rate`` of recent answers lie."""
        if not self._recent:
            return math.inf
        ordered = sorted(self._recent)
        count = math.floor(target_rate * len(ordered) + 1e-9)
        return math.inf if count >= len(ordered) else ordered[count]


def parse_threshold(raw: object) -> float:
    """A cascade threshold from a header or parameter: a finite number >= 0; raise ``DinError`` otherwise.

    Confidences lie in [0, 1], so 0 never escalates and anything above 1 always does.
    """
    try:
        threshold = float(str(raw).strip()) if not isinstance(raw, bool) else math.nan
    except ValueError:
        threshold = math.nan
    if not math.isfinite(threshold) or threshold < 0.0:
        raise DinError(
            ErrorCode.BAD_REQUEST,
            f"cascade threshold must be a finite number >= 0 (a confidence such as 0.8), not {raw!r}",
        )
    return threshold


def answer_confidence(outputs: dict[str, np.ndarray], measure: str | Confidence = Confidence.MAX) -> float:
    """Confidence of one request's answer: its least confident item's, so one hard item escalates the request."""
    probabilities = outputs.get(PROBABILITIES_OUTPUT)
    if probabilities is None:
        raise DinError(ErrorCode.BAD_REQUEST, f"a cascade needs a model with a {PROBABILITIES_OUTPUT!r} output")
    return float(confidence(np.reshape(probabilities, (-1, np.shape(probabilities)[-1])), measure).min())
