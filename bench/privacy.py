"""What a split point leaks: a model-inversion attack on the intermediate tensor, with and without protection.

The attacker observes the intermediate tensors that cross the link and has
its own data from the same distribution (the TRAIN split, labels unused), runs
the public head on it, applies the same protection (it knows the scheme) and
fits a decoder from intermediate back to input: a ridge regression with its
regularisation chosen by cross-validation. On the held-out split it then
reconstructs the inputs from what it observes. Leakage is reported as

* reconstruction MSE (pixels in [0, 1]) beside the MSE of guessing the mean
  image, and the share of the inputs' variance it recovers, 1 - MSE / baseline
  (0: no better than the mean image, 1: exact);
* attack accuracy: how often digits-small, a classifier the attacker did not
  train, labels the reconstruction with the true digit (compare it with
  digits-small on the real inputs).

The same protected tensors give the task accuracy the tail reaches, so cost
and protection are read off one table. A linear decoder is a weak attacker:
its figures bound the leak from below.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from din.shared.contracts.model_config import CONFIG_FILE, MODEL_FILE, ModelConfigV1
from din.shared.privacy import Protection, protect, wire_bytes
from din.zoo.inversion import fit_decoder, reconstruct

RAW_POINT = "input"
PROTECTIONS: tuple[tuple[str, float], ...] = (
    ("none", 0.0),
    ("quantize", 8),
    ("quantize", 4),
    ("quantize", 2),
    ("noise", 0.25),
    ("noise", 0.5),
    ("noise", 1.0),
    ("noise", 2.0),
)


@dataclass(frozen=True)
class LeakageRow:
    """One split point under one protection: the task's accuracy, the payload and what an attacker recovers."""

    point: str
    protection: str
    strength: float
    task_accuracy: float
    bytes_per_item: int
    inversion_mse: float
    baseline_mse: float
    recovered_variance: float
    attack_accuracy: float
    reference_accuracy: float

    def to_dict(self) -> dict:
        """Plain fields for JSON."""
        return asdict(self)


def onnx_session(path: Path):
    """A single-threaded, quiet ONNX Runtime session for offline measurements."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def model_config(repo: Path, model: str) -> ModelConfigV1:
    """The config of ``model`` in the repository at ``repo``."""
    return ModelConfigV1.read(Path(repo) / model / CONFIG_FILE)


def latest_model_path(repo: Path, model: str) -> Path:
    """The newest version's ``model.onnx`` of ``model`` in the repository at ``repo``."""
    return Path(repo) / model / model_config(repo, model).versions[-1] / MODEL_FILE


def measure_leakage(
    repo: Path,
    model: str = "digits-large",
    points: Sequence[str] | None = None,
    protections: Sequence[tuple[str, float]] = PROTECTIONS,
    judge: str = "digits-small",
    seed: int = 0,
) -> list[LeakageRow]:
    """Task accuracy and inversion leakage for every split point of ``model`` in ``repo`` under each protection.

    The first rows are the raw input (what "no split" ships) under each
    protection, for reference: an attacker who sees the input needs no decoder.
    """
    from din.zoo.build import split_model_name
    from din.zoo.digits import load_digits_split

    repo = Path(repo)
    points = list(model_config(repo, model).split_points if points is None else points)
    split = load_digits_split()
    judge_session = onnx_session(latest_model_path(repo, judge))
    full_session = onnx_session(latest_model_path(repo, model))
    rng = np.random.default_rng(seed)

    def judge_accuracy(images: np.ndarray) -> float:
        (labels,) = judge_session.run(["label"], {"input": np.clip(images, 0.0, 1.0).astype(np.float32)})
        return float(np.mean(labels == split.y_test))

    reference = judge_accuracy(split.x_test)
    baseline = float(np.mean((split.x_train.mean(axis=0) - split.x_test) ** 2))
    rows = []
    for point in [RAW_POINT, *points]:
        if point == RAW_POINT:
            train_mid, test_mid, tail, tail_input = split.x_train, split.x_test, full_session, "input"
        else:
            head = onnx_session(latest_model_path(repo, split_model_name(model, "head", point)))
            tail = onnx_session(latest_model_path(repo, split_model_name(model, "tail", point)))
            (train_mid,) = head.run([point], {"input": split.x_train})
            (test_mid,) = head.run([point], {"input": split.x_test})
            tail_input = point
        for method, strength in protections:
            seen_train = protect(train_mid, method, strength, rng)
            seen_test = protect(test_mid, method, strength, rng)
            (labels,) = tail.run(["label"], {tail_input: seen_test})
            if point == RAW_POINT and Protection(method) is Protection.NONE:
                reconstruction = split.x_test
            else:
                reconstruction = reconstruct(fit_decoder(seen_train, split.x_train), seen_test)
            mse = float(np.mean((reconstruction - split.x_test) ** 2))
            rows.append(
                LeakageRow(
                    point=point,
                    protection=str(Protection(method).value),
                    strength=float(strength),
                    task_accuracy=round(float(np.mean(labels == split.y_test)), 6),
                    bytes_per_item=wire_bytes(int(test_mid.shape[1]), method, strength),
                    inversion_mse=round(mse, 6),
                    baseline_mse=round(baseline, 6),
                    recovered_variance=round(1.0 - mse / baseline, 4),
                    attack_accuracy=round(judge_accuracy(reconstruction), 6),
                    reference_accuracy=round(reference, 6),
                )
            )
    return rows
