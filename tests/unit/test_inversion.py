"""The model-inversion attack (zoo.inversion): what a decoder recovers of an input from an intermediate tensor."""

import numpy as np
import onnxruntime
import pytest

from din.shared.contracts.model_config import ModelConfigV1
from din.shared.privacy import protect
from din.zoo.build import split_model_name
from din.zoo.digits import INPUT_NAME, load_digits_split
from din.zoo.inversion import ATTACK_ALPHAS, fit_decoder, reconstruct, recovered_variance

FEATURES, TRAIN, TEST = 16, 800, 400


@pytest.fixture(scope="module")
def inputs() -> tuple[np.ndarray, np.ndarray]:
    """Train and held-out inputs in [0, 1], like the digits."""
    rng = np.random.default_rng(0)
    return rng.uniform(0, 1, (TRAIN, FEATURES)), rng.uniform(0, 1, (TEST, FEATURES))


@pytest.fixture(scope="module")
def invertible_map() -> np.ndarray:
    """A random linear map into a wider space; full column rank, so the input is recoverable from its image."""
    mixing = np.random.default_rng(1).normal(size=(FEATURES, 2 * FEATURES))
    assert np.linalg.matrix_rank(mixing) == FEATURES
    return mixing


def test_an_invertible_linear_intermediate_gives_away_nearly_all_of_the_input(inputs, invertible_map):
    x_train, x_test = inputs
    leak = recovered_variance(x_train @ invertible_map, x_train, x_test @ invertible_map, x_test)
    assert leak > 0.99


def test_an_intermediate_unrelated_to_the_input_gives_away_almost_nothing(inputs):
    x_train, x_test = inputs
    rng = np.random.default_rng(2)
    noise_train, noise_test = rng.normal(size=(TRAIN, 2 * FEATURES)), rng.normal(size=(TEST, 2 * FEATURES))
    assert abs(recovered_variance(noise_train, x_train, noise_test, x_test)) < 0.05


def test_protecting_the_intermediate_lowers_what_it_gives_away(inputs, invertible_map):
    x_train, x_test = inputs
    mid_train, mid_test = x_train @ invertible_map, x_test @ invertible_map
    clear = recovered_variance(mid_train, x_train, mid_test, x_test)
    rng = np.random.default_rng(3)

    def leak(method: str, strength: float) -> float:
        return recovered_variance(protect(mid_train, method, strength, rng), x_train,
                                  protect(mid_test, method, strength, rng), x_test)

    assert leak("quantize", 8) > leak("quantize", 2)
    assert clear > leak("noise", 0.5) > leak("noise", 2.0)
    assert leak("noise", 2.0) < 0.5 * clear


def test_reconstruction_is_clipped_to_the_inputs_range(inputs, invertible_map):
    x_train, x_test = inputs
    decoder = fit_decoder(x_train @ invertible_map, x_train)
    assert decoder.alpha_ in ATTACK_ALPHAS
    far_out = 10.0 * x_test @ invertible_map
    reconstruction = reconstruct(decoder, far_out)
    assert reconstruction.shape == x_test.shape
    assert reconstruction.min() >= 0.0 and reconstruction.max() <= 1.0
    assert reconstruct(decoder, far_out, low=-5.0, high=5.0).max() > 1.0


def test_the_leakage_the_zoo_records_is_what_the_attack_measures_on_its_head(zoo_dir):
    split = load_digits_split()
    large = ModelConfigV1.read(zoo_dir / "digits-large" / "config.json")
    leaks = []
    for point in large.split_points:
        head = split_model_name("digits-large", "head", point)
        config = ModelConfigV1.read(zoo_dir / head / "config.json")
        session = onnxruntime.InferenceSession(str(zoo_dir / head / config.versions[-1] / "model.onnx"),
                                               providers=["CPUExecutionProvider"])
        (train_mid,) = session.run([point], {INPUT_NAME: split.x_train})
        (test_mid,) = session.run([point], {INPUT_NAME: split.x_test})
        measured = recovered_variance(train_mid, split.x_train, test_mid, split.x_test)
        assert config.leakage.recovered_variance == pytest.approx(measured, abs=1e-3)
        leaks.append(measured)
    assert 0.0 < leaks[-1] < leaks[0] < 1.0
