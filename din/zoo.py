"""The model zoo: digit classifiers trained deterministically and exported to ONNX.

``build_zoo`` trains every model in ``RECIPES`` on scikit-learn's bundled
digits data (nothing is downloaded) and writes a model repository::

    <out_dir>/<model>/config.json
    <out_dir>/<model>/<version>/model.onnx
    <out_dir>/_data/digits_test.npz      held-out split: X float32 [n, 64], y int64 [n]
    <out_dir>/_stamp.json                what was built, to skip an identical rebuild

Inputs are the 8x8 digit images flattened to 64 float32 values scaled to
[0, 1]. Every digit classifier answers ``probabilities`` [batch, 10] float32
and ``label`` [batch] int64. scikit-learn and skl2onnx are imported only when
a build actually runs, so reading a built zoo needs neither.

Two more kinds of model are derived or trained alongside, for multi-stage inference:

* split models: each classifier with hidden layers is cut at every split
  point into ``<model>-head-<point>`` (input -> the hidden tensor) and
  ``<model>-tail-<point>`` (hidden tensor -> probabilities, label), see
  ``din.split``; their configs carry ``role``, ``split_of`` and ``split_point``.
* ``charlm``: a character-level GRU with its recurrent state as an explicit
  input and output, trained in numpy on Python's own documentation text, see
  ``din.zoo_text``. Its one-step graph serves decoding; ``charlm-prefill``,
  exported from the same weights, reads a whole prompt per call. The step
  model's config names it in ``prefill_model``; its own config carries
  ``role`` "prefill" and ``prefill_for``.
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

from din.zoo_text import (
    LOGITS_OUTPUT,
    PROMPT_INPUT,
    STATE_INPUT,
    STATE_OUTPUT,
    TOKEN_INPUT,
    CharLMRecipe,
    load_corpus,
    numpy_stepper,
    prefill,
    to_onnx,
    to_onnx_prefill,
    train_charlm,
)

ZOO_FORMAT = 3
TASK = "image-classification"
FAMILY = "digits"
TEXT_TASK = "text-generation"
PREFILL_TASK = "text-generation-prefill"
PREFILL_FIDELITY_CHARS = 256
PREFILL_TOLERANCE = 1e-4
TEXT_FAMILY = "charlm"
SPLIT_ROLES = ("head", "tail")
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

TEXT_RECIPES: tuple[CharLMRecipe, ...] = (CharLMRecipe(),)

DESCRIPTIONS = {
    "digits-small": "Multinomial logistic regression on 8x8 digits: tiny and fast, less accurate.",
    "digits-large": "Two-hidden-layer perceptron (256, 128, ReLU) on 8x8 digits: slower, more accurate.",
    "charlm": "Character-level GRU over Python's documentation text, one step per call with explicit state.",
    "charlm-prefill": "Prefill for charlm: reads a whole prompt in one call (a Scan over the same GRU step) "
    "and returns the last logits and the state to decode from.",
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
    """A digest of everything that decides the zoo's contents; the stamp records it.

    It covers the split models (derived from the recipes' split points) and
    the text models with the digest of the corpus they learn from.
    """
    recipe = {
        "format": ZOO_FORMAT,
        "split": [TEST_FRACTION, SPLIT_SEED],
        "opsets": OPSETS,
        "max_batch_size": MAX_BATCH_SIZE,
        "models": [[r.name, r.version, r.estimator, dict(r.params)] for r in RECIPES],
        "split_models": [[r.name, r.version, recipe_split_points(r)] for r in RECIPES],
        "text_models": [dict(r.key()) for r in TEXT_RECIPES],
        "prefill_models": [[prefill_model_name(r.name), r.version] for r in TEXT_RECIPES],
    }
    if TEXT_RECIPES:
        recipe["corpus"] = load_corpus().digest
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def recipe_split_points(recipe: ModelRecipe) -> list[str]:
    """Names of the hidden tensors where ``recipe``'s model can be cut: ``hidden_1`` .. ``hidden_<layers>``."""
    if recipe.estimator != "mlp":
        return []
    return [f"hidden_{index + 1}" for index in range(len(recipe.params["hidden_layer_sizes"]))]


def split_model_name(model: str, role: str, split_point: str) -> str:
    """Name of the ``role`` ("head" or "tail") part of ``model`` cut at ``split_point``."""
    return f"{model}-{role}-{split_point}"


def split_task(model: str, role: str, split_point: str) -> str:
    """The task of a split part: unique to its model, role and point, since no other model can stand in for it.

    The catalog offers models of the same task and inputs as fallbacks; a head
    cut elsewhere, or from another model, computes a different tensor.
    """
    return f"split-{role}:{model}@{split_point}"


def prefill_model_name(model: str) -> str:
    """Name of the prefill model exported beside the one-step text model ``model``."""
    return f"{model}-prefill"


def _split_sources() -> list[tuple[str, str, list[str]]]:
    """``(model, split point, versions)`` for every cut the zoo makes, in recipe order."""
    sources = []
    for name in dict.fromkeys(r.name for r in RECIPES):
        recipes = [r for r in RECIPES if r.name == name]
        for point in dict.fromkeys(p for r in recipes for p in recipe_split_points(r)):
            sources.append((name, point, [r.version for r in recipes if point in recipe_split_points(r)]))
    return sources


def model_names() -> list[str]:
    """Names of the zoo's models: the recipes' in order, then the split parts, then each text model and its prefill."""
    names = list(dict.fromkeys(recipe.name for recipe in RECIPES))
    names += [split_model_name(name, role, point) for name, point, _ in _split_sources() for role in SPLIT_ROLES]
    for name in dict.fromkeys(recipe.name for recipe in TEXT_RECIPES):
        names += [name, prefill_model_name(name)]
    return names


def _model_files() -> list[tuple[str, str]]:
    """``(model, version)`` of every ONNX file the zoo holds."""
    files = [(r.name, r.version) for r in RECIPES]
    for name, point, versions in _split_sources():
        files += [(split_model_name(name, role, point), v) for role in SPLIT_ROLES for v in versions]
    files += [(name, r.version) for r in TEXT_RECIPES for name in (r.name, prefill_model_name(r.name))]
    return files


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
            if split_points[recipe.name] != recipe_split_points(recipe):
                raise RuntimeError(
                    f"{recipe.name} has split points {split_points[recipe.name]}, "
                    f"its recipe promises {recipe_split_points(recipe)}"
                )
            payload = model.SerializeToString()
            _write_atomic(out_dir / recipe.name / recipe.version / MODEL_FILE, payload)
            accuracy.setdefault(recipe.name, {})[recipe.version] = _onnx_accuracy(
                payload, split.x_test, split.y_test
            )
            parameter_count[recipe.name] = _parameter_count(estimator)

    configs = []
    for name in dict.fromkeys(recipe.name for recipe in RECIPES):
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
        _write_config(out_dir, config)
        configs.append(config)

    configs += _build_split_models(out_dir, split)
    with threadpool_limits(limits=1):
        for recipe in TEXT_RECIPES:
            configs += _build_text_model(out_dir, recipe)

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
    expected += [out_dir / name / version / MODEL_FILE for name, version in _model_files()]
    return all(path.is_file() for path in expected)


def _build_split_models(out_dir: Path, split: DigitsSplit) -> list[dict[str, Any]]:
    """Cut every model with split points into a head and a tail at each point; their configs, head first."""
    from din.split import split_model

    configs = []
    for source, point, versions in _split_sources():
        paths = {role: out_dir / split_model_name(source, role, point) for role in SPLIT_ROLES}
        accuracy: dict[str, float] = {}
        width = 0
        for version in versions:
            head, tail = (paths[role] / version / MODEL_FILE for role in SPLIT_ROLES)
            split_model(out_dir / source / version / MODEL_FILE, point, head, tail)
            accuracy[version], width = _composed_accuracy(head, tail, point, split.x_test, split.y_test)
        leakage = _head_leakage(paths["head"] / versions[-1] / MODEL_FILE, point, split)
        hidden = [{"name": point, "datatype": "FP32", "shape": [-1, width]}]
        hidden_bytes = width * np.dtype(np.float32).itemsize
        input_bytes = FEATURES * np.dtype(np.float32).itemsize
        for role in SPLIT_ROLES:
            is_head = role == "head"
            config = {
                "name": split_model_name(source, role, point),
                "task": split_task(source, role, point),
                "family": FAMILY,
                "description": f"The {role} of {source} cut at {point}: "
                + (f"input -> {point}." if is_head else f"{point} -> probabilities, label."),
                "versions": versions,
                "inputs": copy.deepcopy(INPUTS if is_head else hidden),
                "outputs": copy.deepcopy(hidden if is_head else OUTPUTS),
                "max_batch_size": MAX_BATCH_SIZE,
                "accuracy": dict(accuracy),
                "input_bytes_per_item": input_bytes if is_head else hidden_bytes,
                "intermediate_bytes_per_item": hidden_bytes,
                "parameter_count": _onnx_parameter_count(paths[role] / versions[-1] / MODEL_FILE),
                "role": role,
                "split_of": source,
                "split_point": point,
            }
            if is_head:
                config["leakage"] = {
                    "recovered_variance": leakage,
                    "attack": "ridge inversion decoder fitted on the train split, scored on the held-out split; "
                    "intermediate unprotected",
                }
            _write_config(out_dir, config)
            configs.append(config)
    return configs


def _head_leakage(head: Path, point: str, split: DigitsSplit) -> float:
    """What an inversion attack recovers of the input from the head's unprotected output (``din.inversion``)."""
    from din.inversion import recovered_variance

    session = _ort_session(head.read_bytes())
    (train_mid,) = session.run([point], {INPUT_NAME: split.x_train})
    (test_mid,) = session.run([point], {INPUT_NAME: split.x_test})
    return round(recovered_variance(train_mid, split.x_train, test_mid, split.x_test), 4)


def _composed_accuracy(
    head: Path, tail: Path, point: str, x_test: np.ndarray, y_test: np.ndarray
) -> tuple[float, int]:
    """Held-out accuracy of tail(head(x)), and the width of the split tensor."""
    head_session = _ort_session(head.read_bytes())
    tail_session = _ort_session(tail.read_bytes())
    (hidden,) = head_session.run([point], {INPUT_NAME: x_test})
    (labels,) = tail_session.run(["label"], {point: hidden})
    return round(float(np.mean(labels == y_test)), 6), int(hidden.shape[1])


def _build_text_model(out_dir: Path, recipe: CharLMRecipe) -> list[dict[str, Any]]:
    """Train the character model of ``recipe``, export its one-step and prefill graphs; their configs, step first."""
    corpus = load_corpus()
    trained = train_charlm(recipe)
    model = to_onnx(
        trained.params, graph_name=f"{recipe.name}-v{recipe.version}", doc=DESCRIPTIONS[recipe.name]
    )
    model.model_version = int(recipe.version)
    _write_atomic(out_dir / recipe.name / recipe.version / MODEL_FILE, model.SerializeToString())
    hidden, vocab = trained.hidden, len(trained.vocab)
    state_bytes = hidden * np.dtype(np.float32).itemsize
    config = {
        "name": recipe.name,
        "task": TEXT_TASK,
        "family": TEXT_FAMILY,
        "description": DESCRIPTIONS[recipe.name],
        "versions": [recipe.version],
        "inputs": [
            {"name": TOKEN_INPUT, "datatype": "INT64", "shape": [-1]},
            {"name": STATE_INPUT, "datatype": "FP32", "shape": [-1, hidden]},
        ],
        "outputs": [
            {"name": LOGITS_OUTPUT, "datatype": "FP32", "shape": [-1, vocab]},
            {"name": STATE_OUTPUT, "datatype": "FP32", "shape": [-1, hidden]},
        ],
        "max_batch_size": MAX_BATCH_SIZE,
        "accuracy": {recipe.version: trained.heldout_accuracy},
        "accuracy_metric": "held-out next-character top-1 accuracy",
        "input_bytes_per_item": np.dtype(np.int64).itemsize + state_bytes,
        "state_bytes_per_item": state_bytes,
        "parameter_count": int(sum(p.size for p in trained.params.values())),
        "role": "autoregressive",
        "prefill_model": prefill_model_name(recipe.name),
        "vocab": trained.vocab,
        "hidden": hidden,
        "loss": {
            "train": trained.train_loss,
            "heldout": trained.heldout_loss,
            "uniform": round(trained.uniform_loss, 4),
            "unit": "nats per character",
        },
        "corpus": {
            "source": "pydoc_data.topics",
            "sha256": corpus.digest,
            "train_chars": int(len(corpus.train)),
            "heldout_chars": int(len(corpus.heldout)),
        },
        "training": {key: value for key, value in recipe.key() if key not in ("name", "version")},
    }
    _write_config(out_dir, config)
    return [config, _build_prefill_model(out_dir, recipe, trained.params, config)]


def _build_prefill_model(
    out_dir: Path, recipe: CharLMRecipe, params: Mapping[str, np.ndarray], step_config: Mapping[str, Any]
) -> dict[str, Any]:
    """Export the prefill graph of the trained ``params``, check it reads a prompt as the step does; its config."""
    name = prefill_model_name(recipe.name)
    model = to_onnx_prefill(params, graph_name=f"{name}-v{recipe.version}", doc=DESCRIPTIONS[name])
    model.model_version = int(recipe.version)
    payload = model.SerializeToString()
    _check_prefill(payload, params, load_corpus().heldout[:PREFILL_FIDELITY_CHARS])
    _write_atomic(out_dir / name / recipe.version / MODEL_FILE, payload)
    hidden, vocab = step_config["hidden"], len(step_config["vocab"])
    config = copy.deepcopy(dict(step_config))
    del config["input_bytes_per_item"], config["prefill_model"]
    config.update(
        name=name,
        task=PREFILL_TASK,
        description=DESCRIPTIONS[name],
        inputs=[
            {"name": PROMPT_INPUT, "datatype": "INT64", "shape": [-1, -1]},
            {"name": STATE_INPUT, "datatype": "FP32", "shape": [-1, hidden]},
        ],
        outputs=[
            {"name": LOGITS_OUTPUT, "datatype": "FP32", "shape": [-1, vocab]},
            {"name": STATE_OUTPUT, "datatype": "FP32", "shape": [-1, hidden]},
        ],
        # Prompts of different lengths cannot share a [batch, time] tensor.
        max_batch_size=1,
        input_bytes_per_token=np.dtype(np.int64).itemsize,
        role="prefill",
        prefill_for=recipe.name,
    )
    _write_config(out_dir, config)
    return config


def _check_prefill(payload: bytes, params: Mapping[str, np.ndarray], tokens: np.ndarray) -> None:
    """Raise unless the prefill graph reads ``tokens`` as the numpy step does, token by token."""
    hidden = params["recurrent"].shape[0]
    expected_logits, expected_state = prefill(numpy_stepper(params), tokens, hidden)
    logits, state = _ort_session(payload).run(
        [LOGITS_OUTPUT, STATE_OUTPUT],
        {PROMPT_INPUT: tokens[None, :].astype(np.int64), STATE_INPUT: np.zeros((1, hidden), np.float32)},
    )
    error = max(float(np.abs(logits - expected_logits).max()), float(np.abs(state - expected_state).max()))
    if error > PREFILL_TOLERANCE:
        raise RuntimeError(f"the prefill graph differs from the step by {error:g} over {len(tokens)} tokens")


def _write_config(out_dir: Path, config: Mapping[str, Any]) -> None:
    _write_atomic(out_dir / config["name"] / CONFIG_FILE, (json.dumps(config, indent=2) + "\n").encode())


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


def _ort_session(payload: bytes):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(payload, options, providers=["CPUExecutionProvider"])


def _onnx_accuracy(payload: bytes, x_test: np.ndarray, y_test: np.ndarray) -> float:
    (labels,) = _ort_session(payload).run(["label"], {INPUT_NAME: x_test})
    return round(float(np.mean(labels == y_test)), 6)


def _onnx_parameter_count(path: Path) -> int:
    """Floating-point weights in an ONNX file (class labels and shape constants are not parameters)."""
    import onnx

    model = onnx.load(str(path))
    return int(
        sum(np.prod(t.dims, dtype=np.int64) for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT)
    )


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
