"""The model zoo: digit classifiers trained deterministically and exported to ONNX.

``build_zoo`` trains every model in ``RECIPES`` on scikit-learn's bundled
digits data (nothing is downloaded) and writes a model repository::

    <out_dir>/<model>/config.json
    <out_dir>/<model>/<version>/model.onnx
    <out_dir>/_data/digits_test.npz      held-out split: X float32 [n, 64], y int64 [n]
    <out_dir>/_stamp.json                what was built, to skip an identical rebuild

Inputs are the 8x8 digit images flattened to 64 float32 values scaled to
[0, 1]. Every model answers ``probabilities`` [batch, 10] float32 and
``label`` [batch] int64. scikit-learn and skl2onnx are imported only when a
build actually runs, so reading a built zoo needs neither.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

ZOO_FORMAT = 1
TASK = "image-classification"
FAMILY = "digits"
INPUT_NAME = "input"
FEATURES = 64
CLASSES = 10
MAX_BATCH_SIZE = 64
TEST_FRACTION = 0.3
SPLIT_SEED = 0
OPSETS = {"": 17, "ai.onnx.ml": 3}

DATA_DIR = "_data"
TEST_SPLIT_FILE = "digits_test.npz"
STAMP_FILE = "_stamp.json"
CONFIG_FILE = "config.json"
MODEL_FILE = "model.onnx"

INPUTS = [{"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, FEATURES]}]
OUTPUTS = [
    {"name": "probabilities", "datatype": "FP32", "shape": [-1, CLASSES]},
    {"name": "label", "datatype": "INT64", "shape": [-1]},
]


@dataclass(frozen=True)
class ModelRecipe:
    """How to train one version of one zoo model: an estimator kind and its parameters."""

    name: str
    version: str
    estimator: str
    params: Mapping[str, Any]


RECIPES: tuple[ModelRecipe, ...] = (
    ModelRecipe("digits-small", "1", "logistic_regression", {"C": 0.1, "max_iter": 2000}),
    ModelRecipe("digits-small", "2", "logistic_regression", {"C": 0.3, "max_iter": 2000}),
    ModelRecipe(
        "digits-large",
        "1",
        "mlp",
        {"hidden_layer_sizes": [256, 128], "max_iter": 300, "random_state": 0},
    ),
)

DESCRIPTIONS = {
    "digits-small": "Multinomial logistic regression on 8x8 digits: tiny and fast, less accurate.",
    "digits-large": "Two-hidden-layer perceptron (256, 128, ReLU) on 8x8 digits: slower, more accurate.",
}


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


def recipe_digest() -> str:
    """A digest of everything that decides the zoo's contents; the stamp records it."""
    recipe = {
        "format": ZOO_FORMAT,
        "split": [TEST_FRACTION, SPLIT_SEED],
        "opsets": OPSETS,
        "max_batch_size": MAX_BATCH_SIZE,
        "models": [[r.name, r.version, r.estimator, dict(r.params)] for r in RECIPES],
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def model_names() -> list[str]:
    """Names of the zoo's models, in recipe order."""
    return list(dict.fromkeys(recipe.name for recipe in RECIPES))


def build_zoo(out_dir: Path, *, force: bool = False) -> list[dict[str, Any]]:
    """Build the zoo into ``out_dir`` and return each model's config.

    When every file exists and the stamp matches the current recipes, nothing
    is trained and the configs already on disk are returned; ``force`` rebuilds
    regardless.
    """
    out_dir = Path(out_dir)
    digest = recipe_digest()
    if not force and _is_built(out_dir, digest):
        return [json.loads((out_dir / name / CONFIG_FILE).read_text()) for name in model_names()]

    from threadpoolctl import threadpool_limits

    (out_dir / STAMP_FILE).unlink(missing_ok=True)
    split = load_digits_split()
    accuracy: dict[str, dict[str, float]] = {}
    parameter_count: dict[str, int] = {}
    split_points: dict[str, list[str]] = {}
    with threadpool_limits(limits=1):
        for recipe in RECIPES:
            estimator = make_estimator(recipe)
            estimator.fit(split.x_train, split.y_train)
            model = _to_onnx(estimator, recipe)
            split_points[recipe.name] = _name_hidden_layers(model)
            payload = model.SerializeToString()
            _write_atomic(out_dir / recipe.name / recipe.version / MODEL_FILE, payload)
            accuracy.setdefault(recipe.name, {})[recipe.version] = _onnx_accuracy(
                payload, split.x_test, split.y_test
            )
            parameter_count[recipe.name] = _parameter_count(estimator)

    configs = []
    for name in model_names():
        versions = [recipe.version for recipe in RECIPES if recipe.name == name]
        config = {
            "name": name,
            "task": TASK,
            "family": FAMILY,
            "description": DESCRIPTIONS[name],
            "versions": versions,
            "inputs": copy.deepcopy(INPUTS),
            "outputs": copy.deepcopy(OUTPUTS),
            "max_batch_size": MAX_BATCH_SIZE,
            "accuracy": accuracy[name],
            "input_bytes_per_item": FEATURES * np.dtype(np.float32).itemsize,
            "parameter_count": parameter_count[name],
            "split_points": split_points[name],
        }
        _write_atomic(out_dir / name / CONFIG_FILE, (json.dumps(config, indent=2) + "\n").encode())
        configs.append(config)

    test_path = out_dir / DATA_DIR / TEST_SPLIT_FILE
    test_path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(test_path, X=split.x_test, y=split.y_test)

    stamp = {"recipe": digest, "libraries": _library_versions()}
    _write_atomic(out_dir / STAMP_FILE, (json.dumps(stamp, indent=2) + "\n").encode())
    return configs


def load_test_split(out_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """The held-out ``(X, y)`` saved by ``build_zoo``."""
    with np.load(Path(out_dir) / DATA_DIR / TEST_SPLIT_FILE) as data:
        return data["X"], data["y"]


def _is_built(out_dir: Path, digest: str) -> bool:
    stamp_path = out_dir / STAMP_FILE
    try:
        stamp = json.loads(stamp_path.read_text())
    except (OSError, ValueError):
        return False
    if stamp.get("recipe") != digest:
        return False
    expected = [out_dir / DATA_DIR / TEST_SPLIT_FILE]
    expected += [out_dir / name / CONFIG_FILE for name in model_names()]
    expected += [out_dir / r.name / r.version / MODEL_FILE for r in RECIPES]
    return all(path.is_file() for path in expected)


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


def _to_onnx(estimator, recipe: ModelRecipe):
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
    model.doc_string = DESCRIPTIONS[recipe.name]
    model.model_version = int(recipe.version)
    return model


def _name_hidden_layers(model) -> list[str]:
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


def _onnx_accuracy(payload: bytes, x_test: np.ndarray, y_test: np.ndarray) -> float:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(payload, options, providers=["CPUExecutionProvider"])
    (labels,) = session.run(["label"], {INPUT_NAME: x_test})
    return round(float(np.mean(labels == y_test)), 6)


def _parameter_count(estimator) -> int:
    if hasattr(estimator, "coefs_"):
        return int(sum(w.size for w in estimator.coefs_) + sum(b.size for b in estimator.intercepts_))
    return int(estimator.coef_.size + estimator.intercept_.size)


def _library_versions() -> dict[str, str]:
    versions = {}
    for package in ("scikit-learn", "skl2onnx", "onnx", "onnxruntime", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "absent"
    return versions


def _write_atomic(path: Path, payload: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(payload)
    os.replace(partial, path)
