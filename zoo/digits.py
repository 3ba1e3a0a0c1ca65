"""The digit classifiers: scikit-learn's bundled 8x8 digits, the estimators and their ONNX export.

Inputs are the 8x8 digit images flattened to 64 float32 values scaled to
[0, 1]. Every digit classifier answers ``probabilities`` [batch, 10] float32
and ``label`` [batch] int64. scikit-learn and skl2onnx are imported only when
a model is actually trained, so reading a built zoo needs neither.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from din.shared.contracts.model_config import TensorConfigV1

TASK = "image-classification"
FAMILY = "digits"
INPUT_NAME = "input"
FEATURES = 64
CLASSES = 10
TEST_FRACTION = 0.3
SPLIT_SEED = 0
OPSETS = {"": 17, "ai.onnx.ml": 3}
INPUT_BYTES_PER_ITEM = FEATURES * np.dtype(np.float32).itemsize

INPUTS = (TensorConfigV1(name=INPUT_NAME, datatype="FP32", shape=[-1, FEATURES]),)
OUTPUTS = (
    TensorConfigV1(name="probabilities", datatype="FP32", shape=[-1, CLASSES]),
    TensorConfigV1(name="label", datatype="INT64", shape=[-1]),
)


@dataclass(frozen=True)
class ModelRecipe:
    """How to train one version of one digits model: an estimator kind and its parameters."""

    name: str
    version: str
    estimator: str
    params: Mapping[str, Any]

    def split_points(self) -> list[str]:
        """Names of the hidden tensors where this model can be cut: ``hidden_1`` .. ``hidden_<layers>``."""
        if self.estimator != "mlp":
            return []
        return [f"hidden_{index + 1}" for index in range(len(self.params["hidden_layer_sizes"]))]


@dataclass(frozen=True)
class DigitsSplit:
    """The digits data, split once with a fixed seed and stratified by class."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_digits_split() -> DigitsSplit:
    """The bundled digits data as float32 in [0, 1], split 70/30 with ``SPLIT_SEED``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    features = (digits.data / 16.0).astype(np.float32)
    labels = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        features, labels, test_size=TEST_FRACTION, stratify=labels, random_state=SPLIT_SEED
    )
    return DigitsSplit(x_train, y_train, x_test, y_test)


def make_estimator(recipe: ModelRecipe):
    """An untrained scikit-learn estimator for ``recipe``."""
    if recipe.estimator == "logistic_regression":
        from sklearn.linear_model import LogisticRegression

        return LogisticRegression(**recipe.params)
    if recipe.estimator == "mlp":
        from sklearn.neural_network import MLPClassifier

        params = dict(recipe.params)
        params["hidden_layer_sizes"] = tuple(params["hidden_layer_sizes"])
        return MLPClassifier(**params)
    raise ValueError(f"unknown estimator kind {recipe.estimator!r}")


def to_onnx(estimator, recipe: ModelRecipe, description: str):
    """The ONNX graph of the fitted ``estimator``, named after ``recipe`` so that builds are byte-identical."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    model = convert_sklearn(
        estimator,
        initial_types=[(INPUT_NAME, FloatTensorType([None, FEATURES]))],
        options={id(estimator): {"zipmap": False}},
        target_opset=OPSETS,
    )
    # skl2onnx names the graph with a random uuid; a fixed name keeps builds byte-identical.
    model.graph.name = f"{recipe.name}-v{recipe.version}"
    model.doc_string = description
    model.model_version = int(recipe.version)
    return model


def name_hidden_layers(model) -> list[str]:
    """Rename each ReLU output to ``hidden_<n>`` and return the names in graph order.

    They are the layer boundaries where the graph can be cut for split
    inference; a model without hidden layers has none.
    """
    renames: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type == "Relu":
            renames[node.output[0]] = f"hidden_{len(renames) + 1}"
    for node in model.graph.node:
        for index, name in enumerate(node.input):
            if name in renames:
                node.input[index] = renames[name]
        for index, name in enumerate(node.output):
            if name in renames:
                node.output[index] = renames[name]
    return list(renames.values())


def parameter_count(estimator) -> int:
    """Trained weights and biases of a fitted estimator."""
    if hasattr(estimator, "coefs_"):
        return int(sum(w.size for w in estimator.coefs_) + sum(b.size for b in estimator.intercepts_))
    return int(estimator.coef_.size + estimator.intercept_.size)
