"""Building the model zoo: every model trained deterministically, exported to ONNX, with its config.

``build_zoo`` trains every model in ``RECIPES`` on scikit-learn's bundled
digits data (nothing is downloaded, see ``zoo.digits``) and writes a model
repository::

    <out_dir>/<model>/config.json            a ``ModelConfigV1``
    <out_dir>/<model>/<version>/model.onnx
    <out_dir>/_data/digits_test.npz      held-out split: X float32 [n, 64], y int64 [n]
    <out_dir>/_stamp.json                what was built, to skip an identical rebuild

Two more kinds of model are derived or trained alongside, for multi-stage inference:

* split models: each classifier with hidden layers is cut at every split
  point into ``<model>-head-<point>`` (input -> the hidden tensor) and
  ``<model>-tail-<point>`` (hidden tensor -> probabilities, label), see
  ``zoo.split``; their configs carry ``role``, ``split_of`` and ``split_point``,
  and a head's the leakage an inversion attack measures (``zoo.inversion``).
* ``charlm``: a character-level GRU with its recurrent state as an explicit
  input and output, trained in numpy on Python's own documentation text, see
  ``zoo.text``. Its one-step graph serves decoding; ``charlm-prefill``,
  exported from the same weights, reads a whole prompt per call. The step
  model's config names it in ``prefill_model``; its own config carries
  ``role`` "prefill" and ``prefill_for``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path

import numpy as np

from din.shared.contracts.model_config import (
    CONFIG_FILE,
    DEFAULT_MAX_BATCH_SIZE,
    MODEL_FILE,
    LeakageV1,
    ModelConfigV1,
    TensorConfigV1,
)
from din.zoo.digits import (
    FAMILY,
    INPUT_BYTES_PER_ITEM,
    INPUT_NAME,
    INPUTS,
    OPSETS,
    OUTPUTS,
    SPLIT_SEED,
    TASK,
    TEST_FRACTION,
    DigitsSplit,
    ModelRecipe,
    load_digits_split,
    make_estimator,
    name_hidden_layers,
    parameter_count,
    to_onnx,
)
from din.zoo.text import (
    LOGITS_OUTPUT,
    PROMPT_INPUT,
    STATE_INPUT,
    STATE_OUTPUT,
    TOKEN_INPUT,
    CharLMRecipe,
    load_corpus,
    numpy_stepper,
    prefill,
    to_onnx_prefill,
    train_charlm,
)
from din.zoo.text import to_onnx as text_to_onnx

ZOO_FORMAT = 3
TEXT_TASK = "text-generation"
PREFILL_TASK = "text-generation-prefill"
PREFILL_FIDELITY_CHARS = 256
PREFILL_TOLERANCE = 1e-4
TEXT_FAMILY = "charlm"
SPLIT_ROLES = ("head", "tail")
MAX_BATCH_SIZE = DEFAULT_MAX_BATCH_SIZE

DATA_DIR = "_data"
TEST_SPLIT_FILE = "digits_test.npz"
STAMP_FILE = "_stamp.json"
LEAKAGE_ATTACK = (
    "ridge inversion decoder fitted on the train split, scored on the held-out split; intermediate unprotected"
)


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
        "split_models": [[r.name, r.version, r.split_points()] for r in RECIPES],
        "text_models": [dict(r.key()) for r in TEXT_RECIPES],
        "prefill_models": [[prefill_model_name(r.name), r.version] for r in TEXT_RECIPES],
    }
    if TEXT_RECIPES:
        recipe["corpus"] = load_corpus().digest
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


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
        for point in dict.fromkeys(p for r in recipes for p in r.split_points()):
            sources.append((name, point, [r.version for r in recipes if point in r.split_points()]))
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


def build_zoo(out_dir: Path, *, force: bool = False, cache_dir: Path | None = None) -> list[ModelConfigV1]:
    """Build the zoo into ``out_dir`` and return each model's config, in ``model_names()`` order.

    When every file exists and the stamp matches the current recipes, nothing
    is trained and the configs already on disk are returned; ``force`` rebuilds
    regardless. With ``cache_dir``, a zoo built earlier from the same recipes and libraries (another checkout's)
    is copied from ``<cache_dir>/<recipe digest>`` instead of trained again, and a zoo trained here is kept there.
    """
    out_dir = Path(out_dir)
    digest = recipe_digest()
    if not force and _is_built(out_dir, digest):
        return [ModelConfigV1.read(out_dir / name / CONFIG_FILE) for name in model_names()]
    cached = Path(cache_dir) / digest if cache_dir is not None else None
    if not force and cached is not None and _is_built(cached, digest) and _same_libraries(cached):
        _copy_zoo(cached, out_dir)
        return [ModelConfigV1.read(out_dir / name / CONFIG_FILE) for name in model_names()]
    configs = _train_zoo(out_dir, digest)
    if cached is not None:
        _keep_in_cache(out_dir, cached)
    return configs


def default_cache_dir() -> Path:
    """Where built zoos are kept for other checkouts: ``$DIN_CACHE_DIR/zoo``, else ``$XDG_CACHE_HOME/din/zoo``,
    else ``~/.cache/din/zoo``."""
    if os.environ.get("DIN_CACHE_DIR"):
        return Path(os.environ["DIN_CACHE_DIR"]) / "zoo"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "din" / "zoo"


def _zoo_files(root: Path) -> list[Path]:
    """Every file a built zoo under ``root`` holds, its stamp last."""
    files = [root / DATA_DIR / TEST_SPLIT_FILE]
    files += [root / name / CONFIG_FILE for name in model_names()]
    files += [root / name / version / MODEL_FILE for name, version in _model_files()]
    return [*files, root / STAMP_FILE]


def _copy_zoo(source: Path, target: Path) -> None:
    """Copy a built zoo's files (and only those) from ``source`` to ``target``, the stamp last."""
    (target / STAMP_FILE).unlink(missing_ok=True)
    for path, copy in zip(_zoo_files(source), _zoo_files(target), strict=True):
        _write_atomic(copy, path.read_bytes())


def _same_libraries(root: Path) -> bool:
    try:
        return json.loads((root / STAMP_FILE).read_text()).get("libraries") == _library_versions()
    except (OSError, ValueError):
        return False


def _keep_in_cache(built: Path, cached: Path) -> None:
    """Keep a freshly trained zoo in the cache; a cache that cannot be written is only skipped."""
    try:
        _copy_zoo(built, cached)
    except OSError:
        pass


def _train_zoo(out_dir: Path, digest: str) -> list[ModelConfigV1]:

    from threadpoolctl import threadpool_limits

    (out_dir / STAMP_FILE).unlink(missing_ok=True)
    split = load_digits_split()
    accuracy: dict[str, dict[str, float]] = {}
    parameters: dict[str, int] = {}
    split_points: dict[str, list[str]] = {}
    with threadpool_limits(limits=1):
        for recipe in RECIPES:
            estimator = make_estimator(recipe)
            estimator.fit(split.x_train, split.y_train)
            model = to_onnx(estimator, recipe, DESCRIPTIONS[recipe.name])
            split_points[recipe.name] = name_hidden_layers(model)
            if split_points[recipe.name] != recipe.split_points():
                raise RuntimeError(
                    f"{recipe.name} has split points {split_points[recipe.name]}, "
                    f"its recipe promises {recipe.split_points()}"
                )
            payload = model.SerializeToString()
            _write_atomic(out_dir / recipe.name / recipe.version / MODEL_FILE, payload)
            accuracy.setdefault(recipe.name, {})[recipe.version] = _onnx_accuracy(
                payload, split.x_test, split.y_test
            )
            parameters[recipe.name] = parameter_count(estimator)

    configs = []
    for name in dict.fromkeys(recipe.name for recipe in RECIPES):
        versions = [recipe.version for recipe in RECIPES if recipe.name == name]
        config = ModelConfigV1(
            name=name,
            task=TASK,
            family=FAMILY,
            description=DESCRIPTIONS[name],
            versions=versions,
            inputs=INPUTS,
            outputs=OUTPUTS,
            max_batch_size=MAX_BATCH_SIZE,
            accuracy=accuracy[name],
            input_bytes_per_item=INPUT_BYTES_PER_ITEM,
            parameter_count=parameters[name],
            split_points=split_points[name],
        )
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
    return all(path.is_file() for path in _zoo_files(out_dir))


def _build_split_models(out_dir: Path, split: DigitsSplit) -> list[ModelConfigV1]:
    """Cut every model with split points into a head and a tail at each point; their configs, head first."""
    from din.zoo.split import split_model

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
        hidden = (TensorConfigV1(name=point, datatype="FP32", shape=[-1, width]),)
        hidden_bytes = width * np.dtype(np.float32).itemsize
        for role in SPLIT_ROLES:
            is_head = role == "head"
            config = ModelConfigV1(
                name=split_model_name(source, role, point),
                task=split_task(source, role, point),
                family=FAMILY,
                description=f"The {role} of {source} cut at {point}: "
                + (f"input -> {point}." if is_head else f"{point} -> probabilities, label."),
                versions=versions,
                inputs=INPUTS if is_head else hidden,
                outputs=hidden if is_head else OUTPUTS,
                max_batch_size=MAX_BATCH_SIZE,
                accuracy=accuracy,
                input_bytes_per_item=INPUT_BYTES_PER_ITEM if is_head else hidden_bytes,
                intermediate_bytes_per_item=hidden_bytes,
                parameter_count=_onnx_parameter_count(paths[role] / versions[-1] / MODEL_FILE),
                role=role,
                split_of=source,
                split_point=point,
                leakage=LeakageV1(recovered_variance=leakage, attack=LEAKAGE_ATTACK) if is_head else None,
            )
            _write_config(out_dir, config)
            configs.append(config)
    return configs


def _head_leakage(head: Path, point: str, split: DigitsSplit) -> float:
    """What an inversion attack recovers of the input from the head's unprotected output (``zoo.inversion``)."""
    from din.zoo.inversion import recovered_variance

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


def _build_text_model(out_dir: Path, recipe: CharLMRecipe) -> list[ModelConfigV1]:
    """Train the character model of ``recipe``, export its one-step and prefill graphs; their configs, step first."""
    corpus = load_corpus()
    trained = train_charlm(recipe)
    model = text_to_onnx(
        trained.params, graph_name=f"{recipe.name}-v{recipe.version}", doc=DESCRIPTIONS[recipe.name]
    )
    model.model_version = int(recipe.version)
    _write_atomic(out_dir / recipe.name / recipe.version / MODEL_FILE, model.SerializeToString())
    hidden, vocab = trained.hidden, len(trained.vocab)
    state_bytes = hidden * np.dtype(np.float32).itemsize
    config = ModelConfigV1(
        name=recipe.name,
        task=TEXT_TASK,
        family=TEXT_FAMILY,
        description=DESCRIPTIONS[recipe.name],
        versions=[recipe.version],
        inputs=[
            TensorConfigV1(name=TOKEN_INPUT, datatype="INT64", shape=[-1]),
            TensorConfigV1(name=STATE_INPUT, datatype="FP32", shape=[-1, hidden]),
        ],
        outputs=_text_outputs(hidden, vocab),
        max_batch_size=MAX_BATCH_SIZE,
        accuracy={recipe.version: trained.heldout_accuracy},
        accuracy_metric="held-out next-character top-1 accuracy",
        input_bytes_per_item=np.dtype(np.int64).itemsize + state_bytes,
        state_bytes_per_item=state_bytes,
        parameter_count=int(sum(p.size for p in trained.params.values())),
        role="autoregressive",
        prefill_model=prefill_model_name(recipe.name),
        vocab=trained.vocab,
        hidden=hidden,
        loss={
            "train": trained.train_loss,
            "heldout": trained.heldout_loss,
            "uniform": round(trained.uniform_loss, 4),
            "unit": "nats per character",
        },
        corpus={
            "source": "pydoc_data.topics",
            "sha256": corpus.digest,
            "train_chars": int(len(corpus.train)),
            "heldout_chars": int(len(corpus.heldout)),
        },
        training={key: value for key, value in recipe.key() if key not in ("name", "version")},
    )
    _write_config(out_dir, config)
    return [config, _build_prefill_model(out_dir, recipe, trained.params, config)]


def _build_prefill_model(
    out_dir: Path, recipe: CharLMRecipe, params: Mapping[str, np.ndarray], step_config: ModelConfigV1
) -> ModelConfigV1:
    """Export the prefill graph of the trained ``params``, check it reads a prompt as the step does; its config."""
    name = prefill_model_name(recipe.name)
    model = to_onnx_prefill(params, graph_name=f"{name}-v{recipe.version}", doc=DESCRIPTIONS[name])
    model.model_version = int(recipe.version)
    payload = model.SerializeToString()
    _check_prefill(payload, params, load_corpus().heldout[:PREFILL_FIDELITY_CHARS])
    _write_atomic(out_dir / name / recipe.version / MODEL_FILE, payload)
    hidden, vocab = step_config.hidden, len(step_config.vocab)
    inherited = step_config.model_dump(exclude_none=True, exclude={"input_bytes_per_item", "prefill_model"})
    config = ModelConfigV1.model_validate(inherited | dict(
        name=name,
        task=PREFILL_TASK,
        description=DESCRIPTIONS[name],
        inputs=[
            TensorConfigV1(name=PROMPT_INPUT, datatype="INT64", shape=[-1, -1]),
            TensorConfigV1(name=STATE_INPUT, datatype="FP32", shape=[-1, hidden]),
        ],
        outputs=_text_outputs(hidden, vocab),
        # Prompts of different lengths cannot share a [batch, time] tensor.
        max_batch_size=1,
        input_bytes_per_token=np.dtype(np.int64).itemsize,
        role="prefill",
        prefill_for=recipe.name,
    ))
    _write_config(out_dir, config)
    return config


def _text_outputs(hidden: int, vocab: int) -> list[TensorConfigV1]:
    """What both text graphs answer: next-character logits and the state after the last character read."""
    return [
        TensorConfigV1(name=LOGITS_OUTPUT, datatype="FP32", shape=[-1, vocab]),
        TensorConfigV1(name=STATE_OUTPUT, datatype="FP32", shape=[-1, hidden]),
    ]


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


WIDE_RECIPE = ModelRecipe("digits-wide", "1", "mlp",
                          {"hidden_layer_sizes": [3072, 3072], "max_iter": 6, "random_state": 0})
"""A heavy digits model for benchmarks whose executors must be the bottleneck (``din bench-elastic``): ~19 M
parameters, a few ms per image on one core; not in the zoo every run builds."""


def build_wide_model(out_dir: Path, max_batch_size: int) -> ModelConfigV1:
    """Train ``WIDE_RECIPE`` on the digits (deterministic, ~15 s here) into the repository at ``out_dir``, once:
    an existing build of the same recipe and batch size is kept."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from threadpoolctl import threadpool_limits

    recipe = WIDE_RECIPE
    config_path = out_dir / recipe.name / CONFIG_FILE
    stamp = hashlib.sha256(json.dumps([recipe.params, max_batch_size, ZOO_FORMAT]).encode()).hexdigest()[:16]
    if config_path.is_file() and (out_dir / recipe.name / "_recipe").is_file() \
            and (out_dir / recipe.name / "_recipe").read_text() == stamp:
        return ModelConfigV1.model_validate_json(config_path.read_text())
    split = load_digits_split()
    estimator = make_estimator(recipe)
    with threadpool_limits(limits=2), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        estimator.fit(split.x_train, split.y_train)
    payload = to_onnx(estimator, recipe, "Two 3072-wide hidden layers on 8x8 digits: heavy, for benchmarks.") \
        .SerializeToString()
    _write_atomic(out_dir / recipe.name / recipe.version / MODEL_FILE, payload)
    config = ModelConfigV1(
        name=recipe.name, task=TASK, family="digits-wide", description="Wide MLP (3072, 3072) on 8x8 digits.",
        versions=[recipe.version], inputs=INPUTS, outputs=OUTPUTS, max_batch_size=max_batch_size,
        accuracy={recipe.version: _onnx_accuracy(payload, split.x_test, split.y_test)},
        input_bytes_per_item=INPUT_BYTES_PER_ITEM, parameter_count=parameter_count(estimator))
    _write_config(out_dir, config)
    _write_atomic(out_dir / recipe.name / "_recipe", stamp.encode())
    return config


def _write_config(out_dir: Path, config: ModelConfigV1) -> None:
    _write_atomic(out_dir / config.name / CONFIG_FILE, config.to_json().encode())


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
