"""The model zoo: layout, accuracy, fidelity of the ONNX export, split points and rebuild skipping."""

import json
import os
import shutil

import numpy as np
import onnx
import onnxruntime
import pytest

from din.shared.contracts.model_config import ModelConfigV1
from din.zoo import build as zoo
from din.zoo import digits
from din.zoo.text import CharLMRecipe


def _session(path) -> onnxruntime.InferenceSession:
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _backdate(path) -> int:
    """Set ``path``'s mtime to a fixed past instant, so a rewrite is visible whatever the clock resolution."""
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    return path.stat().st_mtime_ns


def _config(zoo_dir, name: str) -> dict:
    return json.loads((zoo_dir / name / "config.json").read_text())


def test_layout_has_every_version_config_and_test_split(zoo_dir):
    assert (zoo_dir / "digits-small" / "1" / "model.onnx").is_file()
    assert (zoo_dir / "digits-small" / "2" / "model.onnx").is_file()
    assert (zoo_dir / "digits-large" / "1" / "model.onnx").is_file()
    assert (zoo_dir / "_stamp.json").is_file()
    x_test, y_test = zoo.load_test_split(zoo_dir)
    assert x_test.dtype == np.float32 and x_test.shape[1] == 64
    assert y_test.dtype == np.int64 and len(y_test) == len(x_test)
    assert 0.0 <= x_test.min() and x_test.max() <= 1.0
    assert sorted(np.unique(y_test).tolist()) == list(range(10))


def test_configs_declare_the_serving_contract(zoo_dir):
    for name, versions in (("digits-small", ["1", "2"]), ("digits-large", ["1"])):
        config = _config(zoo_dir, name)
        assert config["name"] == name
        assert config["task"] == "image-classification"
        assert config["versions"] == versions
        assert config["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
        assert {o["name"]: (o["datatype"], o["shape"]) for o in config["outputs"]} == {
            "probabilities": ("FP32", [-1, 10]),
            "label": ("INT64", [-1]),
        }
        assert config["max_batch_size"] == 64
        assert config["input_bytes_per_item"] == 256
        assert sorted(config["accuracy"]) == versions


def test_large_model_is_clearly_more_accurate_than_every_small_version(zoo_dir):
    small = _config(zoo_dir, "digits-small")["accuracy"]
    large = _config(zoo_dir, "digits-large")["accuracy"]["1"]
    assert large >= 0.97
    assert all(0.9 <= accuracy < large - 0.01 for accuracy in small.values())


def test_accuracy_in_config_is_what_the_onnx_model_scores(zoo_dir):
    x_test, y_test = zoo.load_test_split(zoo_dir)
    for name in ("digits-small", "digits-large"):
        for version, accuracy in _config(zoo_dir, name)["accuracy"].items():
            labels = _session(zoo_dir / name / version / "model.onnx").run(["label"], {"input": x_test})[0]
            assert float(np.mean(labels == y_test)) == pytest.approx(accuracy, abs=1e-6)


def test_small_versions_are_different_models(zoo_dir):
    v1 = (zoo_dir / "digits-small" / "1" / "model.onnx").read_bytes()
    v2 = (zoo_dir / "digits-small" / "2" / "model.onnx").read_bytes()
    assert v1 != v2


@pytest.mark.parametrize("recipe", zoo.RECIPES, ids=lambda r: f"{r.name}-v{r.version}")
def test_onnx_matches_a_fresh_sklearn_fit(zoo_dir, recipe):
    """Retraining from the recipe reproduces the stored model: builds are deterministic and the export faithful."""
    from threadpoolctl import threadpool_limits

    split = digits.load_digits_split()
    with threadpool_limits(limits=1):
        estimator = digits.make_estimator(recipe).fit(split.x_train, split.y_train)
    session = _session(zoo_dir / recipe.name / recipe.version / "model.onnx")
    probabilities, labels = session.run(["probabilities", "label"], {"input": split.x_test})
    assert probabilities.dtype == np.float32 and probabilities.shape == (len(split.x_test), 10)
    assert labels.dtype == np.int64
    np.testing.assert_allclose(probabilities, estimator.predict_proba(split.x_test), atol=1e-5)
    np.testing.assert_array_equal(labels, estimator.predict(split.x_test))


def test_batch_dimension_is_dynamic(zoo_dir):
    x_test, _ = zoo.load_test_split(zoo_dir)
    session = _session(zoo_dir / "digits-large" / "1" / "model.onnx")
    for rows in (1, 7, 64):
        assert session.run(["label"], {"input": x_test[:rows]})[0].shape == (rows,)


def test_split_points_are_relu_layer_outputs_in_graph_order(zoo_dir):
    assert _config(zoo_dir, "digits-small")["split_points"] == []
    split_points = _config(zoo_dir, "digits-large")["split_points"]
    assert split_points == ["hidden_1", "hidden_2"]

    model = onnx.load(str(zoo_dir / "digits-large" / "1" / "model.onnx"))
    relu_outputs = [node.output[0] for node in model.graph.node if node.op_type == "Relu"]
    assert relu_outputs == split_points
    model.graph.output.extend(onnx.ValueInfoProto(name=name) for name in split_points)
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x_test, _ = zoo.load_test_split(zoo_dir)
    hidden_1, hidden_2 = session.run(split_points, {"input": x_test[:5]})
    assert hidden_1.shape == (5, 256) and hidden_2.shape == (5, 128)
    assert hidden_1.min() >= 0.0 and hidden_2.min() >= 0.0


def test_second_build_is_skipped_and_returns_the_same_configs(zoo_dir, tmp_path):
    built = shutil.copytree(zoo_dir, tmp_path / "zoo")
    model_path = built / "digits-large" / "1" / "model.onnx"
    before = _backdate(model_path)
    configs = zoo.build_zoo(built)
    assert model_path.stat().st_mtime_ns == before
    assert configs == [ModelConfigV1.read(built / name / "config.json") for name in zoo.model_names()]


@pytest.fixture
def tiny_recipes(monkeypatch):
    recipes = (digits.ModelRecipe("digits-small", "1", "logistic_regression", {"C": 0.1, "max_iter": 500}),)
    monkeypatch.setattr(zoo, "RECIPES", recipes)
    monkeypatch.setattr(zoo, "TEXT_RECIPES", ())
    return recipes


def test_missing_file_or_changed_recipe_triggers_a_rebuild(tmp_path, tiny_recipes):
    first = zoo.build_zoo(tmp_path)
    model_path = tmp_path / "digits-small" / "1" / "model.onnx"
    model_path.unlink()
    assert zoo.build_zoo(tmp_path) == first
    assert model_path.is_file()

    stamp = json.loads((tmp_path / "_stamp.json").read_text())
    stamp["recipe"] = "something else"
    (tmp_path / "_stamp.json").write_text(json.dumps(stamp))
    before = _backdate(model_path)
    zoo.build_zoo(tmp_path)
    assert model_path.stat().st_mtime_ns != before
    assert json.loads((tmp_path / "_stamp.json").read_text())["recipe"] == zoo.recipe_digest()


def test_a_missing_prefill_model_triggers_a_rebuild(tmp_path, tiny_recipes, monkeypatch):
    monkeypatch.setattr(zoo, "TEXT_RECIPES", (CharLMRecipe(hidden=8, seq_len=8, batch=4, steps=3),))
    first = zoo.build_zoo(tmp_path)
    assert [c.name for c in first] == zoo.model_names() == ["digits-small", "charlm", "charlm-prefill"]
    assert first[1].prefill_model == "charlm-prefill" and first[2].prefill_for == "charlm"
    prefill_path = tmp_path / "charlm-prefill" / "1" / "model.onnx"
    payload = prefill_path.read_bytes()
    prefill_path.unlink()
    assert zoo.build_zoo(tmp_path) == first
    assert prefill_path.read_bytes() == payload


def test_force_rebuilds_byte_identical_models(tmp_path, tiny_recipes):
    zoo.build_zoo(tmp_path)
    model_path = tmp_path / "digits-small" / "1" / "model.onnx"
    payload, before = model_path.read_bytes(), _backdate(model_path)
    zoo.build_zoo(tmp_path, force=True)
    assert model_path.stat().st_mtime_ns != before
    assert model_path.read_bytes() == payload


def test_a_zoo_built_once_is_copied_from_the_cache_not_trained_again(tmp_path, tiny_recipes, monkeypatch):
    cache = tmp_path / "cache"
    first = zoo.build_zoo(tmp_path / "one", cache_dir=cache)
    assert (cache / zoo.recipe_digest() / "_stamp.json").is_file()

    def no_training(*_):
        raise AssertionError("trained again despite the cache")

    monkeypatch.setattr(zoo, "_train_zoo", no_training)
    assert zoo.build_zoo(tmp_path / "two", cache_dir=cache) == first
    assert (tmp_path / "two" / "digits-small" / "1" / "model.onnx").read_bytes() == (
        tmp_path / "one" / "digits-small" / "1" / "model.onnx").read_bytes()
    (tmp_path / "two" / "digits-small" / "1" / "model.onnx").unlink()
    assert zoo.build_zoo(tmp_path / "two", cache_dir=cache) == first
