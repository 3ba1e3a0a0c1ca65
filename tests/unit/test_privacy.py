"""Protection of an intermediate tensor: quantisation and relative Gaussian noise, per item."""

import numpy as np
import pytest

from din.shared.errors import DinError, ErrorCode
from din.shared.privacy import Protection, dequantize, protect, quantize, wire_bytes


@pytest.fixture
def activations() -> np.ndarray:
    rng = np.random.default_rng(0)
    # Items on very different scales, like ReLU activations of different inputs.
    scales = np.geomspace(0.01, 100, 16)[:, None]
    return (np.maximum(rng.normal(size=(16, 256)), 0.0) * scales).astype(np.float32)


def test_none_passes_a_copy_through(activations):
    seen = protect(activations, "none", 0)
    np.testing.assert_array_equal(seen, activations)
    assert seen is not activations and seen.dtype == np.float32


@pytest.mark.parametrize("bits", [8, 4, 2, 1])
def test_quantize_error_is_within_half_a_step_of_each_items_own_scale(activations, bits):
    codes, scale, offset = quantize(activations, bits)
    assert codes.dtype == np.uint8 and codes.shape == activations.shape and codes.max() <= 2**bits - 1
    spans = activations.max(axis=1) - activations.min(axis=1)
    np.testing.assert_allclose(scale, spans / (2**bits - 1), rtol=1e-6)
    error = np.abs(dequantize(codes, scale, offset) - activations).max(axis=1)
    assert np.all(error <= scale / 2 * (1 + 1e-4) + 1e-7)
    np.testing.assert_array_equal(protect(activations, "quantize", bits), dequantize(codes, scale, offset))


def test_fewer_bits_cost_more_error(activations):
    errors = [np.mean((protect(activations, Protection.QUANTIZE, bits) - activations) ** 2) for bits in (8, 4, 2)]
    assert errors[0] < errors[1] < errors[2]


def test_each_item_is_quantized_on_its_own(activations):
    alone = protect(activations[:1], "quantize", 4)
    together = protect(activations, "quantize", 4)[:1]
    np.testing.assert_array_equal(alone, together)


def test_constant_item_survives_quantization_exactly():
    flat = np.full((2, 5), 3.5, np.float32)
    np.testing.assert_array_equal(protect(flat, "quantize", 8), flat)


def test_noise_is_relative_to_each_items_spread_and_reproducible(activations):
    first = protect(activations, "noise", 0.5, np.random.default_rng(7))
    second = protect(activations, "noise", 0.5, np.random.default_rng(7))
    np.testing.assert_array_equal(first, second)
    relative = (first - activations).std(axis=1) / activations.std(axis=1)
    np.testing.assert_allclose(relative, 0.5, rtol=0.15)
    assert first.dtype == np.float32 and first.shape == activations.shape


def test_zero_noise_changes_nothing(activations):
    np.testing.assert_array_equal(protect(activations, "noise", 0.0, np.random.default_rng(0)), activations)


@pytest.mark.parametrize(
    ("method", "strength", "rng"),
    [
        ("blur", 1, None),
        ("quantize", 0, None),
        ("quantize", 9, None),
        ("quantize", 3.5, None),
        ("noise", -1.0, np.random.default_rng(0)),
        ("noise", float("nan"), np.random.default_rng(0)),
        ("noise", 1.0, None),
    ],
    ids=["unknown-method", "zero-bits", "nine-bits", "fractional-bits", "negative-noise", "nan-noise", "no-rng"],
)
def test_bad_protections_are_bad_requests(activations, method, strength, rng):
    with pytest.raises(DinError) as refused:
        protect(activations, method, strength, rng)
    assert refused.value.code is ErrorCode.BAD_REQUEST


@pytest.mark.parametrize(
    ("method", "strength", "expected"),
    [("none", 0, 1024), ("noise", 2.0, 1024), ("quantize", 8, 264), ("quantize", 4, 136), ("quantize", 1, 40)],
)
def test_wire_bytes_per_item(method, strength, expected):
    assert wire_bytes(256, method, strength) == expected
