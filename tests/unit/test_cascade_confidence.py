"""The confidence a cascade escalates on, as the executor measures it, and the threshold a request sets."""

import math

import numpy as np
import pytest

from din.shared.cascade import EscalationCalibrator, answer_confidence, parse_cascade, parse_threshold
from din.shared.errors import DinError, ErrorCode


@pytest.mark.parametrize("raw, expected", [("0.8", 0.8), (" 0 ", 0.0), (1.01, 1.01), (2, 2.0)])
def test_thresholds_are_finite_non_negative_numbers(raw, expected):
    assert parse_threshold(raw) == expected


@pytest.mark.parametrize("raw", ["x", "", "-1", "nan", "inf", True, None, math.inf])
def test_other_thresholds_are_bad_requests(raw):
    with pytest.raises(DinError) as caught:
        parse_threshold(raw)
    assert caught.value.code == ErrorCode.BAD_REQUEST


def test_a_request_is_as_confident_as_its_least_confident_item():
    sure, unsure = [0.05, 0.9, 0.05], [0.4, 0.35, 0.25]
    assert answer_confidence({"probabilities": np.array([sure], np.float32)}) == pytest.approx(0.9)
    assert answer_confidence({"probabilities": np.array([sure, unsure]), "label": np.array([1, 0])}) == pytest.approx(
        0.4)
    assert answer_confidence({"probabilities": np.array([sure])}, "margin") == pytest.approx(0.85)


def test_a_model_without_probabilities_cannot_cascade():
    with pytest.raises(DinError) as caught:
        answer_confidence({"label": np.array([3])})
    assert caught.value.code == ErrorCode.BAD_REQUEST


def test_a_cascade_is_a_threshold_or_a_target_rate():
    assert (parse_cascade("0.8").threshold, parse_cascade("0.8").target_rate) == (0.8, None)
    assert (parse_cascade(" rate:0.25").threshold, parse_cascade("rate:0.25").target_rate) == (None, 0.25)
    for bad in ("rate:1.5", "rate:", "rate:nan", "sure"):
        with pytest.raises(DinError):
            parse_cascade(bad)


def test_a_target_rate_escalates_about_that_fraction_of_recent_answers():
    calibrator = EscalationCalibrator(window=400)
    assert calibrator.threshold(0.2) == math.inf, "no history yet: escalate"
    rng = np.random.default_rng(0)
    for value in rng.uniform(0.3, 1.0, 1000):
        calibrator.observe(float(value))
    assert len(calibrator) == 400, "only the recent window counts"
    fresh = rng.uniform(0.3, 1.0, 5000)
    for rate in (0.0, 0.1, 0.3):
        assert np.mean(fresh < calibrator.threshold(rate)) == pytest.approx(rate, abs=0.06)
    assert calibrator.threshold(1.0) == math.inf
