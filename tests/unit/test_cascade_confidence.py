"""The confidence a cascade escalates on, as the executor measures it, and the threshold a request sets."""

import math

import numpy as np
import pytest

from shared.cascade import answer_confidence, parse_threshold
from shared.errors import DinError, ErrorCode


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
