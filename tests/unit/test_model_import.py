"""Bringing your own model: a graph's interface, the config derived from it, adding it to a repository, and the
catalog that follows the repository (pure: real ONNX graphs, no broker)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from skl2onnx import to_onnx
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

from din.model_import import ModelImportError, add_model
from din.services.executor.repository import ModelRepository
from din.shared.catalog import REFRESH_S, ModelCatalog
from din.shared.contracts.inference import Datatype
from din.shared.contracts.model_config import ModelConfigV1
from din.shared.errors import DinError
from din.shared.model_graph import GraphError, mismatches, read_graph


@pytest.fixture(scope="module")
def iris_graphs(tmp_path_factory):
    """A logistic regression of scikit-learn's iris as ONNX: with tensor outputs, and with the default ZipMap."""
    x, y = load_iris(return_X_y=True)
    model = LogisticRegression(max_iter=500).fit(x.astype(np.float32), y)
    folder = tmp_path_factory.mktemp("graphs")
    tensors, zipmap = folder / "iris.onnx", folder / "iris-zipmap.onnx"
    tensors.write_bytes(to_onnx(model, x[:1].astype(np.float32), options={"zipmap": False}).SerializeToString())
    zipmap.write_bytes(to_onnx(model, x[:1].astype(np.float32)).SerializeToString())
    return tensors, zipmap


def test_the_zoos_own_config_is_what_its_graph_says(zoo_dir):
    config = ModelConfigV1.read(zoo_dir / "digits-small" / "config.json")
    graph = read_graph(zoo_dir / "digits-small" / "1" / "model.onnx")
    assert mismatches(config, graph) == []
    assert [(t.name, t.datatype, t.shape) for t in graph.inputs] == [("input", Datatype.FP32, [-1, 64])]


def test_a_non_tensor_output_is_left_out_and_said(iris_graphs, tmp_path):
    added = add_model(tmp_path, iris_graphs[1], "iris-zipmap")
    assert [t.name for t in added.config.outputs] == ["output_label"]
    assert len(added.left_out) == 1 and added.left_out[0].startswith("output_probability")


@pytest.mark.parametrize("content", [b"", b"not a graph", b"\x08\x07\x12\x04junk"])
def test_a_corrupt_graph_is_refused_naming_the_file(tmp_path, content):
    path = tmp_path / "broken.onnx"
    path.write_bytes(content)
    with pytest.raises(GraphError, match=str(path)):
        read_graph(path)
    with pytest.raises(ModelImportError, match="not an ONNX graph"):
        add_model(tmp_path / "repo", path, "broken")
    assert not (tmp_path / "repo" / "broken").exists()


def test_add_writes_the_layout_the_executor_serves(iris_graphs, tmp_path):
    added = add_model(tmp_path, iris_graphs[0], "iris", task="tabular-classification", accuracy=0.97)
    assert (added.version, added.config.versions, added.config.accuracy) == ("1", ["1"], {"1": 0.97})
    assert [(t.name, t.shape) for t in added.config.inputs] == [("X", [-1, 4])]
    assert {t.name for t in added.config.outputs} == {"label", "probabilities"}
    handle = ModelRepository(tmp_path).load("iris")
    x, y = load_iris(return_X_y=True)
    assert np.mean(handle.run({"X": x.astype(np.float32)})["label"] == y) > 0.9
    assert not list(tmp_path.rglob(".*.partial"))


def test_a_second_graph_is_the_next_version_and_must_keep_the_interface(iris_graphs, zoo_dir, tmp_path):
    add_model(tmp_path, iris_graphs[0], "iris", task="tabular-classification")
    second = add_model(tmp_path, iris_graphs[0], "iris", accuracy=0.9)
    assert second.version == "2" and second.config.versions == ["1", "2"]
    assert second.config.task == "tabular-classification"
    with pytest.raises(ModelImportError, match="already has version '2'"):
        add_model(tmp_path, iris_graphs[0], "iris", version="2")
    with pytest.raises(ModelImportError, match="a new version must keep it"):
        add_model(tmp_path, zoo_dir / "digits-small" / "1" / "model.onnx", "iris")
    assert ModelConfigV1.read(tmp_path / "iris" / "config.json").versions == ["1", "2"]


@pytest.mark.parametrize("name", ["a.b", "", "x" * 65, "has space", ">"])
def test_a_bad_name_is_refused(iris_graphs, tmp_path, name):
    with pytest.raises(ModelImportError, match="invalid model name"):
        add_model(tmp_path, iris_graphs[0], name)


def test_a_config_whose_shapes_or_types_disagree_with_the_graph_is_not_served(zoo_dir, tmp_path):
    shutil.copytree(zoo_dir / "digits-small", tmp_path / "digits-small")
    path = tmp_path / "digits-small" / "config.json"
    config = json.loads(path.read_text())
    for change, expected in [({"shape": [-1, 32]}, "[-1, 32] in the config, [-1, 64] in the graph"),
                             ({"datatype": "FP64"}, "FP64 in the config, FP32 in the graph")]:
        path.write_text(json.dumps({**config, "inputs": [{**config["inputs"][0], **change}]}))
        with pytest.raises(DinError, match=expected.replace("[", r"\[").replace("]", r"\]")):
            ModelRepository(tmp_path).load("digits-small")


def test_the_catalog_follows_its_repository(iris_graphs, zoo_dir, tmp_path):
    shutil.copytree(zoo_dir / "digits-small", tmp_path / "digits-small")
    now = [0.0]
    catalog = ModelCatalog.from_repository(tmp_path, clock=lambda: now[0])
    assert catalog.names() == ["digits-small"]
    add_model(tmp_path, iris_graphs[0], "iris")
    assert catalog.get("iris") is None, "looked again only after REFRESH_S"
    now[0] += REFRESH_S
    assert catalog.get("iris") is not None and catalog.config("iris").inputs[0].name == "X"
    add_model(tmp_path, iris_graphs[0], "iris")
    now[0] += REFRESH_S
    assert catalog.get("iris").versions == ("1", "2")
    shutil.rmtree(tmp_path / "iris")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{}")
    now[0] += REFRESH_S
    assert catalog.names() == ["digits-small"] and len(catalog.skipped) == 1
