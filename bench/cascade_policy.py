"""Large-small cascades: the small model answers, and hard examples escalate to the large one.

An answer of the small model escalates when its confidence is below a
threshold (Sedna's hard-example mining, FrugalGPT's cascade). Confidence is
measured on the small model's probabilities as

* ``max``: the top probability;
* ``margin``: top probability minus the runner-up;
* ``entropy``: one minus the entropy over its maximum, ln(classes).

A policy either fixes the threshold or is calibrated on labelled-free
calibration data so that about a target fraction escalates: the threshold
is the confidence below which that fraction of the calibration answers lie.
``evaluate_cascade`` scores a policy on held-out data against each model
alone; ``cross_fit`` calibrates on some folds and scores on the others, so no
answer is scored by a threshold fitted on it. Pure numpy.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from din.shared.cascade import Confidence, confidence
from din.shared.errors import DinError, ErrorCode

__all__ = [
    "CascadeEvaluation", "CascadePolicy", "Confidence", "calibrate", "confidence", "cross_fit", "evaluate_cascade",
]


@dataclass(frozen=True)
class CascadePolicy:
    """Escalate an answer whose confidence (by ``measure``) is below ``threshold``.

    ``target_rate`` records the escalation rate it was calibrated for, if any.
    """

    threshold: float
    measure: Confidence = Confidence.MAX
    target_rate: float | None = None

    def escalate(self, probabilities: np.ndarray) -> np.ndarray:
        """Which answers of a batch ([batch, classes]) escalate to the large model."""
        return confidence(probabilities, self.measure) < self.threshold

    def should_escalate(self, probabilities: np.ndarray) -> bool:
        """Whether one answer ([classes] or [1, classes]) escalates."""
        return bool(self.escalate(np.reshape(probabilities, (1, -1)))[0])

    @property
    def name(self) -> str:
        """A short label: the measure and threshold, and the target when calibrated."""
        label = f"{self.measure.value} < {self.threshold:.4g}"
        if self.target_rate is not None:
            label = f"target {self.target_rate:.0%} ({label})"
        return label


def calibrate(
    probabilities: np.ndarray, target_rate: float, measure: str | Confidence = Confidence.MAX
) -> CascadePolicy:
    """A policy that escalates at most ``target_rate`` of answers like these calibration ones.

    The threshold is the ``floor(target_rate * n)``-th lowest confidence: exactly
    the least confident ``floor(target_rate * n)`` escalate when confidences are
    distinct, fewer when ties straddle the threshold.
    """
    if not 0.0 <= target_rate <= 1.0:
        raise DinError(ErrorCode.BAD_REQUEST, f"target escalation rate must be in [0, 1], not {target_rate!r}")
    measure = Confidence(measure)
    scores = np.sort(confidence(probabilities, measure))
    if len(scores) == 0:
        raise DinError(ErrorCode.BAD_REQUEST, "calibration needs at least one answer")
    count = math.floor(target_rate * len(scores) + 1e-9)
    threshold = math.inf if count >= len(scores) else float(scores[count])
    return CascadePolicy(threshold=threshold, measure=measure, target_rate=target_rate)


@dataclass(frozen=True)
class CascadeEvaluation:
    """A cascade's score on labelled data, beside each model alone on the same items."""

    policy: str
    items: int
    escalated: int
    correct: int
    small_correct: int
    large_correct: int
    thresholds: tuple[float, ...] = ()

    @property
    def accuracy(self) -> float:
        """Accuracy of the cascade's answers."""
        return self.correct / self.items

    @property
    def escalation_rate(self) -> float:
        """Fraction of items the large model answered."""
        return self.escalated / self.items

    @property
    def small_accuracy(self) -> float:
        """Accuracy of the small model alone."""
        return self.small_correct / self.items

    @property
    def large_accuracy(self) -> float:
        """Accuracy of the large model alone."""
        return self.large_correct / self.items

    @property
    def gap_pp(self) -> float:
        """Large model's accuracy minus the cascade's, in percentage points (negative: the cascade is better)."""
        return 100.0 * (self.large_correct - self.correct) / self.items

    def meets(self, max_gap_pp: float = 0.5, max_escalation_rate: float = 0.3) -> bool:
        """Within ``max_gap_pp`` of the large model while escalating at most ``max_escalation_rate``."""
        return self.gap_pp <= max_gap_pp + 1e-9 and self.escalation_rate <= max_escalation_rate + 1e-9

    def to_dict(self) -> dict:
        """Counts and the derived rates, for reports."""
        return {
            **asdict(self),
            "thresholds": [t if math.isfinite(t) else None for t in self.thresholds],
            "accuracy": round(self.accuracy, 6),
            "escalation_rate": round(self.escalation_rate, 6),
            "small_accuracy": round(self.small_accuracy, 6),
            "large_accuracy": round(self.large_accuracy, 6),
            "gap_pp": round(self.gap_pp, 4),
        }


def _check(small: np.ndarray, large: np.ndarray, labels: np.ndarray) -> None:
    if small.shape != large.shape or small.ndim != 2 or len(labels) != len(small) or len(labels) == 0:
        raise DinError(
            ErrorCode.BAD_REQUEST,
            f"need matching [items, classes] probabilities and labels, got {small.shape}, {large.shape}, "
            f"{np.shape(labels)}",
        )


def evaluate_cascade(
    policy: CascadePolicy, small: np.ndarray, large: np.ndarray, labels: np.ndarray
) -> CascadeEvaluation:
    """Score ``policy`` on items with the small and large models' probabilities and the true labels."""
    small, large, labels = np.asarray(small), np.asarray(large), np.asarray(labels)
    _check(small, large, labels)
    escalate = policy.escalate(small)
    small_answer, large_answer = small.argmax(axis=1), large.argmax(axis=1)
    answer = np.where(escalate, large_answer, small_answer)
    return CascadeEvaluation(
        policy=policy.name,
        items=len(labels),
        escalated=int(escalate.sum()),
        correct=int((answer == labels).sum()),
        small_correct=int((small_answer == labels).sum()),
        large_correct=int((large_answer == labels).sum()),
        thresholds=(policy.threshold,),
    )


def cross_fit(
    small: np.ndarray,
    large: np.ndarray,
    labels: np.ndarray,
    target_rate: float,
    measure: str | Confidence = Confidence.MAX,
    *,
    folds: int = 2,
    seed: int = 0,
) -> CascadeEvaluation:
    """Calibrate to ``target_rate`` on all folds but one, score on that one, and pool the scores.

    Folds are a seeded random partition of the items; calibration uses only
    the small model's probabilities (no labels).
    """
    small, large, labels = np.asarray(small), np.asarray(large), np.asarray(labels)
    _check(small, large, labels)
    if not 2 <= folds <= len(labels):
        raise DinError(ErrorCode.BAD_REQUEST, f"folds must be between 2 and the item count, not {folds}")
    order = np.random.default_rng(seed).permutation(len(labels))
    parts = np.array_split(order, folds)
    totals = dict(items=0, escalated=0, correct=0, small_correct=0, large_correct=0)
    thresholds = []
    for index, held in enumerate(parts):
        rest = np.concatenate([p for i, p in enumerate(parts) if i != index])
        policy = calibrate(small[rest], target_rate, measure)
        thresholds.append(policy.threshold)
        scored = evaluate_cascade(policy, small[held], large[held], labels[held])
        for key in totals:
            totals[key] += getattr(scored, key)
    name = f"target {target_rate:.0%} ({Confidence(measure).value}, {folds}-fold calibrated)"
    return CascadeEvaluation(policy=name, thresholds=tuple(thresholds), **totals)
