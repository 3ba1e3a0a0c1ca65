"""Split models: head then tail reproduces the full model, the zoo ships every part, bad cuts are refused."""

import json
import warnings

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper

from din.services.executor.repository import ModelRepository
from din.shared.errors import DinError, ErrorCode
from din.zoo import build as zoo
from din.zoo.digits import ModelRecipe
from din.zoo.split import check_split_point, split_model


def _session(path) -> onnxruntime.InferenceSession:
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _config(zoo_dir, name: str) -> dict:
    return json.loads((zoo_dir / name / "config.json").read_text())


def _split_points(zoo_dir) -> list[str]:
    return _config(zoo_dir, "digits-large")["split_points"]


def test_split_model_composes_to_the_full_model_at_every_split_point(zoo_dir, tmp_path):
    x_test, y_test = zoo.load_test_split(zoo_dir)
    full = zoo_dir / "digits-large" / "1" / "model.onnx"
    expected_probabilities, expected_labels = _session(full).run(["probabilities", "label"], {"input": x_test})
    for point in _split_points(zoo_dir):
        pair = split_model(full, point, tmp_path / f"head-{point}.onnx", tmp_path / f"tail-{point}.onnx")
        assert pair.inputs == ("input",) and set(pair.outputs) == {"probabilities", "label"}
        (hidden,) = _session(pair.head).run([point], {"input": x_test})
        probabilities, labels = _session(pair.tail).run(["probabilities", "label"], {point: hidden})
        np.testing.assert_allclose(probabilities, expected_probabilities, atol=1e-5)
        np.testing.assert_array_equal(labels, expected_labels)
        assert float(np.mean(labels == y_test)) >= 0.97


def test_zoo_ships_head_and_tail_for_each_split_point_with_their_configs(zoo_dir):
    x_test, _ = zoo.load_test_split(zoo_dir)
    repo = ModelRepository(zoo_dir)
    large = _config(zoo_dir, "digits-large")
    for point in _split_points(zoo_dir):
        head_name, tail_name = (zoo.split_model_name("digits-large", role, point) for role in ("head", "tail"))
        head_config, tail_config = _config(zoo_dir, head_name), _config(zoo_dir, tail_name)
        for config, role in ((head_config, "head"), (tail_config, "tail")):
            assert (config["role"], config["split_of"], config["split_point"]) == (role, "digits-large", point)
            assert config["family"] == "digits" and config["versions"] == ["1"]
            assert config["accuracy"] == large["accuracy"]
        width = head_config["outputs"][0]["shape"][1]
        assert head_config["inputs"] == large["inputs"]
        assert head_config["outputs"] == [{"name": point, "datatype": "FP32", "shape": [-1, width]}]
        assert tail_config["inputs"] == head_config["outputs"] and tail_config["outputs"] == large["outputs"]
        assert head_config["intermediate_bytes_per_item"] == tail_config["input_bytes_per_item"] == 4 * width
        head, tail = repo.open(head_name), repo.open(tail_name)
        outputs = tail.run({point: head.run({"input": x_test[:5]})[point]})
        expected = repo.open("digits-large").run({"input": x_test[:5]})
        np.testing.assert_allclose(outputs["probabilities"], expected["probabilities"], atol=1e-5)


def test_split_parts_are_never_offered_as_stand_ins_for_each_other(zoo_dir):
    tasks = [_config(zoo_dir, name)["task"] for name in zoo.model_names() if "-head-" in name or "-tail-" in name]
    assert len(tasks) == 2 * len(_split_points(zoo_dir)) and len(set(tasks)) == len(tasks)
    assert "image-classification" not in tasks


@pytest.mark.parametrize(
    ("point", "reason"),
    [
        ("no_such_tensor", "no tensor of that name"),
        ("argmax_output", "would also need ['probabilities']"),
        ("input", "model input"),
        ("coefficient", "weight"),
        ("probabilities", "model output"),
    ],
    ids=["unknown", "leaves-output-on-head-side", "graph-input", "initializer", "graph-output"],
)
def test_bad_split_points_are_refused_clearly_and_write_nothing(zoo_dir, tmp_path, point, reason):
    full = zoo_dir / "digits-large" / "1" / "model.onnx"
    with pytest.raises(DinError) as refused:
        split_model(full, point, tmp_path / "head.onnx", tmp_path / "tail.onnx")
    assert refused.value.code is ErrorCode.BAD_REQUEST
    assert point in refused.value.message and reason in refused.value.message
    assert list(tmp_path.iterdir()) == []


def _skip_connection_model() -> onnx.ModelProto:
    """y = relu(x W1) W2 + x W3: cutting at the ReLU leaves the tail needing x."""
    rng = np.random.default_rng(0)
    weights = [
        numpy_helper.from_array(rng.normal(size=shape).astype(np.float32), name)
        for name, shape in (("w1", (4, 3)), ("w2", (3, 2)), ("w3", (4, 2)))
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["a"]),
        helper.make_node("Relu", ["a"], ["hidden"]),
        helper.make_node("MatMul", ["hidden", "w2"], ["b"]),
        helper.make_node("MatMul", ["x", "w3"], ["skip"]),
        helper.make_node("Add", ["b", "skip"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "skip",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2])],
        initializer=weights,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_cut_bypassed_by_a_skip_connection_names_what_the_tail_still_needs():
    model = _skip_connection_model()
    with pytest.raises(DinError, match=r"would also need \['x'\]") as refused:
        check_split_point(model, "hidden")
    assert refused.value.code is ErrorCode.BAD_REQUEST


def test_a_clean_cut_of_the_skip_model_after_the_join_is_accepted(tmp_path):
    model = _skip_connection_model()
    model.graph.node.append(helper.make_node("Relu", ["y"], ["z"]))
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("z", TensorProto.FLOAT, [None, 2]))
    path = tmp_path / "skip.onnx"
    onnx.save(model, str(path))
    pair = split_model(path, "y", tmp_path / "head.onnx", tmp_path / "tail.onnx")
    x = np.random.default_rng(1).normal(size=(3, 4)).astype(np.float32)
    (y,) = _session(pair.head).run(["y"], {"x": x})
    (z,) = _session(pair.tail).run(["z"], {"y": y})
    np.testing.assert_allclose(z, _session(path).run(["z"], {"x": x})[0], atol=1e-6)


@pytest.fixture
def tiny_split_zoo(monkeypatch):
    params = {"hidden_layer_sizes": [8], "max_iter": 20, "random_state": 0}
    recipes = (ModelRecipe("digits-large", "1", "mlp", params),)
    monkeypatch.setattr(zoo, "RECIPES", recipes)
    monkeypatch.setattr(zoo, "TEXT_RECIPES", ())


def test_a_missing_split_part_triggers_a_rebuild(tmp_path, tiny_split_zoo):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = zoo.build_zoo(tmp_path)
        names = [c.name for c in first]
        assert names == ["digits-large", "digits-large-head-hidden_1", "digits-large-tail-hidden_1"]
        tail = tmp_path / "digits-large-tail-hidden_1" / "1" / "model.onnx"
        payload = tail.read_bytes()
        tail.unlink()
        assert zoo.build_zoo(tmp_path) == first
    assert tail.read_bytes() == payload
