"""Cascade policies: confidence measures, fixed and calibrated thresholds, and scoring against each model alone."""

import math

import numpy as np
import onnxruntime
import pytest

from din.bench.cascade_policy import (
    CascadePolicy,
    Confidence,
    calibrate,
    confidence,
    cross_fit,
    evaluate_cascade,
)
from din.shared.errors import DinError, ErrorCode
from din.zoo.build import load_test_split

PROBABILITIES = np.array(
    [
        [0.7, 0.2, 0.1],
        [0.4, 0.35, 0.25],
        [1.0, 0.0, 0.0],
        [1 / 3, 1 / 3, 1 / 3],
    ]
)


@pytest.mark.parametrize(
    ("measure", "expected"),
    [
        ("max", [0.7, 0.4, 1.0, 1 / 3]),
        ("margin", [0.5, 0.05, 1.0, 0.0]),
        ("entropy", [None, None, 1.0, 0.0]),
    ],
)
def test_confidence_measures(measure, expected):
    scores = confidence(PROBABILITIES, measure)
    for score, want in zip(scores, expected, strict=True):
        if want is not None:
            assert score == pytest.approx(want, abs=1e-6)
    assert scores[0] > scores[1]


def test_unknown_measure_is_a_bad_request():
    with pytest.raises(DinError) as refused:
        confidence(PROBABILITIES, "vibes")
    assert refused.value.code is ErrorCode.BAD_REQUEST


def test_policy_escalates_strictly_below_its_threshold():
    policy = CascadePolicy(threshold=0.7)
    assert policy.escalate(PROBABILITIES).tolist() == [False, True, False, True]
    assert policy.should_escalate(PROBABILITIES[1]) and not policy.should_escalate(PROBABILITIES[0])


def _random_probabilities(count: int, seed: int = 0) -> np.ndarray:
    logits = np.random.default_rng(seed).normal(scale=3.0, size=(count, 10))
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("measure", list(Confidence))
@pytest.mark.parametrize("target", [0.0, 0.1, 0.3, 0.55, 1.0])
def test_calibration_escalates_the_target_fraction_of_its_calibration_set(measure, target):
    calibration = _random_probabilities(200)
    policy = calibrate(calibration, target, measure)
    assert policy.target_rate == target and policy.measure is measure
    assert int(policy.escalate(calibration).sum()) == math.floor(target * 200)


def test_ties_at_the_threshold_escalate_fewer_never_more():
    tied = np.tile([[0.9, 0.1]], (10, 1))
    assert int(calibrate(tied, 0.5).escalate(tied).sum()) == 0


@pytest.mark.parametrize("target", [-0.1, 1.5])
def test_calibration_target_outside_zero_one_is_refused(target):
    with pytest.raises(DinError) as refused:
        calibrate(_random_probabilities(10), target)
    assert refused.value.code is ErrorCode.BAD_REQUEST


def test_evaluation_counts_answers_from_whichever_model_answered():
    small = np.array([[0.9, 0.1], [0.6, 0.4], [0.55, 0.45], [0.2, 0.8]])
    large = np.array([[0.1, 0.9], [0.1, 0.9], [0.9, 0.1], [0.9, 0.1]])
    labels = np.array([0, 1, 1, 1])
    result = evaluate_cascade(CascadePolicy(0.65), small, large, labels)
    # Items 1 and 2 escalate: the large model is right on 1 and wrong on 2; the small model answers 0 and 3 right.
    assert (result.items, result.escalated, result.correct) == (4, 2, 3)
    assert (result.small_correct, result.large_correct) == (2, 1)
    assert result.escalation_rate == 0.5 and result.accuracy == 0.75
    assert result.gap_pp == pytest.approx(-50.0)
    assert result.meets(max_gap_pp=0.5, max_escalation_rate=0.5) and not result.meets(max_escalation_rate=0.3)


def test_mismatched_shapes_are_refused():
    with pytest.raises(DinError):
        evaluate_cascade(CascadePolicy(0.5), np.ones((3, 2)), np.ones((2, 2)), np.zeros(3))


def test_cross_fit_scores_every_item_once_and_never_reads_labels_to_calibrate():
    small, large = _random_probabilities(101, seed=1), _random_probabilities(101, seed=2)
    labels = small.argmax(axis=1)
    result = cross_fit(small, large, labels, 0.2, folds=3, seed=5)
    shuffled = cross_fit(small, large, np.random.default_rng(0).permutation(labels), 0.2, folds=3, seed=5)
    assert result.items == 101 and len(result.thresholds) == 3
    assert result.escalated == shuffled.escalated and result.thresholds == shuffled.thresholds
    assert 0.1 <= result.escalation_rate <= 0.3


@pytest.fixture(scope="module")
def zoo_probabilities(zoo_dir):
    x_test, y_test = load_test_split(zoo_dir)

    def run(name, version):
        session = onnxruntime.InferenceSession(
            str(zoo_dir / name / version / "model.onnx"), providers=["CPUExecutionProvider"]
        )
        return session.run(["probabilities"], {"input": x_test})[0]

    return run("digits-small", "2"), run("digits-large", "1"), y_test


@pytest.mark.parametrize("measure", ["max", "margin"])
def test_calibrated_cascade_on_the_zoo_keeps_the_large_models_accuracy_at_under_a_third_escalated(
    zoo_probabilities, measure
):
    small, large, labels = zoo_probabilities
    result = cross_fit(small, large, labels, 0.2, measure, folds=2, seed=0)
    assert result.small_accuracy < result.large_accuracy
    assert result.gap_pp <= 0.5
    assert result.escalation_rate <= 0.3
