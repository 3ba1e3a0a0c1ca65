"""A model-inversion attack on a split point's intermediate tensor: how much of the input it gives away.

The attacker has data from the same distribution (the train split, labels
unused), runs the public head on it and fits a decoder from intermediate back
to input: a ridge regression, its regularisation chosen by cross-validation.
On held-out data it reconstructs the inputs from the intermediates it
observes. ``recovered_variance`` is 1 - MSE / (MSE of guessing the mean input):
0 is no better than the mean, 1 exact. A linear decoder is a weak attacker, so
the figure bounds the leak from below. The zoo records it per split point; the
scheduler refuses to send an intermediate that leaks more than a tenant allows.
"""

from __future__ import annotations

import numpy as np

ATTACK_ALPHAS = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)


def fit_decoder(observed: np.ndarray, inputs: np.ndarray):
    """The attacker's decoder from observed intermediates to inputs (ridge, alpha by cross-validation)."""
    from sklearn.linear_model import RidgeCV

    return RidgeCV(alphas=ATTACK_ALPHAS).fit(observed.astype(np.float64), inputs.astype(np.float64))


def reconstruct(decoder, observed: np.ndarray, low: float = 0.0, high: float = 1.0) -> np.ndarray:
    """The decoder's reconstruction of the inputs behind ``observed``, clipped to the inputs' range."""
    return np.clip(decoder.predict(np.asarray(observed, dtype=np.float64)), low, high)


def recovered_variance(train_mid: np.ndarray, x_train: np.ndarray, test_mid: np.ndarray,
                       x_test: np.ndarray) -> float:
    """Share of the held-out inputs' variance a decoder fitted on the train pairs recovers from ``test_mid``."""
    reconstruction = reconstruct(fit_decoder(train_mid, x_train), test_mid)
    baseline = float(np.mean((x_train.mean(axis=0) - x_test) ** 2))
    return 1.0 - float(np.mean((reconstruction - x_test) ** 2)) / baseline
