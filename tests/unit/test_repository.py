"""The model repository: listing, loading, running and swapping versions while a handle is in use."""

import json
import shutil
import threading

import numpy as np
import pytest

from din.services.executor.repository import ModelRepository
from din.shared.catalog import ModelCatalog
from din.shared.contracts.model_config import DEFAULT_MAX_BATCH_SIZE, ModelConfigV1
from din.shared.errors import DinError, ErrorCode
from din.zoo import build as zoo
from din.zoo.build import load_test_split


@pytest.fixture
def repo(zoo_dir) -> ModelRepository:
    return ModelRepository(zoo_dir)


@pytest.fixture(scope="module")
def test_split(zoo_dir):
    return load_test_split(zoo_dir)


def test_lists_models_and_versions(repo):
    assert repo.list_models() == sorted(zoo.model_names())
    assert repo.versions("digits-small") == ["1", "2"]
    assert repo.latest_version("digits-small") == "2"
    assert repo.config("digits-large").split_points == ["hidden_1", "hidden_2"]


def test_empty_or_missing_root_lists_nothing(tmp_path):
    assert ModelRepository(tmp_path / "absent").list_models() == []


def test_load_defaults_to_latest_and_runs_at_the_configured_accuracy(repo, test_split):
    x_test, y_test = test_split
    handle = repo.load("digits-small")
    assert (handle.name, handle.version) == ("digits-small", "2")
    assert repo.current("digits-small") is handle
    outputs = handle.run({"input": x_test})
    assert set(outputs) == {"probabilities", "label"}
    assert outputs["probabilities"].shape == (len(x_test), 10)
    np.testing.assert_allclose(outputs["probabilities"].sum(axis=1), 1.0, rtol=1e-5)
    assert float(np.mean(outputs["label"] == y_test)) == pytest.approx(handle.accuracy, abs=1e-6)
    assert handle.max_batch_size == 64
    assert [spec.name for spec in handle.inputs] == ["input"]


def test_run_returns_only_the_outputs_asked_for(repo, test_split):
    outputs = repo.load("digits-large").run({"input": test_split[0][:3]}, outputs=["label"])
    assert list(outputs) == ["label"] and outputs["label"].shape == (3,)


@pytest.mark.parametrize(
    ("name", "version"),
    [("digits-medium", None), ("digits-small", "9"), ("../digits-small", None), ("digits small", None)],
    ids=["unknown", "no-such-version", "traversal", "space"],
)
def test_unknown_models_and_versions_are_refused(repo, name, version):
    with pytest.raises(DinError) as excinfo:
        repo.load(name, version)
    assert excinfo.value.code is ErrorCode.UNKNOWN_MODEL


def test_current_and_pinned_version_lookups(repo):
    with pytest.raises(DinError) as excinfo:
        repo.current("digits-small")
    assert excinfo.value.code is ErrorCode.UNKNOWN_MODEL
    repo.load("digits-small", "1")
    assert repo.handle("digits-small").version == "1"
    assert repo.handle("digits-small", "1").version == "1"
    with pytest.raises(DinError) as excinfo:
        repo.handle("digits-small", "2")
    assert excinfo.value.code is ErrorCode.UNKNOWN_MODEL


def test_version_swap_while_the_old_handle_is_running(repo, test_split):
    x_test = test_split[0][:32]
    expected_v1 = repo.open("digits-small", "1").run({"input": x_test})["probabilities"]
    expected_v2 = repo.open("digits-small", "2").run({"input": x_test})["probabilities"]
    assert not np.allclose(expected_v1, expected_v2)

    old = repo.load("digits-small", "1")
    started, stop = threading.Event(), threading.Event()
    results: list[np.ndarray] = []
    errors: list[BaseException] = []

    def keep_running_old_handle() -> None:
        try:
            while not stop.is_set() or not results:
                results.append(old.run({"input": x_test})["probabilities"])
                started.set()
        except BaseException as exc:
            errors.append(exc)
            started.set()

    worker = threading.Thread(target=keep_running_old_handle)
    worker.start()
    assert started.wait(10)
    new = repo.load("digits-small", "2")
    after_swap = repo.current("digits-small").run({"input": x_test})["probabilities"]
    results_at_swap = len(results)
    stop.set()
    worker.join(10)

    assert errors == []
    assert new is not old and repo.current("digits-small") is new
    np.testing.assert_array_equal(after_swap, expected_v2)
    assert len(results) >= results_at_swap >= 1
    for result in results:
        np.testing.assert_array_equal(result, expected_v1)
    np.testing.assert_array_equal(old.run({"input": x_test})["probabilities"], expected_v1)


def test_unload_stops_serving_but_leaves_the_handle_usable(repo, test_split):
    handle = repo.load("digits-large")
    assert repo.loaded() == [handle]
    assert repo.unload("digits-large") is handle
    assert repo.loaded() == []
    with pytest.raises(DinError):
        repo.current("digits-large")
    assert handle.run({"input": test_split[0][:2]})["label"].shape == (2,)


def test_bad_input_fails_as_inference_failed(repo):
    handle = repo.load("digits-small")
    with pytest.raises(DinError) as excinfo:
        handle.run({"input": np.zeros((2, 10), np.float32)})
    assert excinfo.value.code is ErrorCode.INFERENCE_FAILED




@pytest.fixture
def small_copy(zoo_dir, tmp_path):
    """A repository holding a copy of digits-small, and a function that rewrites its config."""
    shutil.copytree(zoo_dir / "digits-small", tmp_path / "digits-small")
    config_path = tmp_path / "digits-small" / "config.json"

    def rewrite(change) -> None:
        config = json.loads(config_path.read_text())
        change(config)
        config_path.write_text(json.dumps(config))

    return tmp_path, config_path, rewrite


def test_config_that_disagrees_with_the_graph_is_refused(small_copy):
    root, _, rewrite = small_copy
    rewrite(lambda config: config["inputs"][0].update(name="image"))
    with pytest.raises(DinError) as excinfo:
        ModelRepository(root).load("digits-small")
    assert excinfo.value.code is ErrorCode.INTERNAL


def test_config_is_typed_and_the_handle_takes_its_values(repo):
    config = repo.config("digits-small")
    assert isinstance(config, ModelConfigV1)
    assert (config.name, config.task, config.versions) == ("digits-small", "image-classification", ["1", "2"])
    handle = repo.open("digits-small", "1")
    assert handle.config == config
    assert handle.max_batch_size == config.max_batch_size
    assert handle.accuracy == config.accuracy["1"]
    assert [(s.name, s.datatype.value, s.shape) for s in handle.outputs] == [
        ("probabilities", "FP32", (-1, 10)), ("label", "INT64", (-1,))]


def test_a_config_without_a_batch_size_gets_the_one_default_everywhere(small_copy):
    root, _, rewrite = small_copy
    rewrite(lambda config: config.pop("max_batch_size"))
    assert ModelRepository(root).open("digits-small").max_batch_size == DEFAULT_MAX_BATCH_SIZE
    assert ModelConfigV1.read(root / "digits-small" / "config.json").max_batch_size == DEFAULT_MAX_BATCH_SIZE


def test_a_config_missing_a_required_key_is_refused_naming_the_file(small_copy):
    root, config_path, rewrite = small_copy
    rewrite(lambda config: config.pop("inputs"))
    with pytest.raises(DinError) as excinfo:
        ModelRepository(root).load("digits-small")
    assert excinfo.value.code is ErrorCode.INTERNAL
    assert str(config_path) in excinfo.value.message and "inputs" in excinfo.value.message
    left_out = ModelCatalog.from_repository(root)
    assert "digits-small" not in left_out.names() and "inputs" in left_out.skipped[0]


def test_a_config_that_is_not_json_is_refused_naming_the_file(small_copy):
    root, config_path, _ = small_copy
    config_path.write_text("{not json")
    repo = ModelRepository(root)
    assert repo.list_models() == ["digits-small"]
    for read in (repo.config, repo.versions, repo.load):
        with pytest.raises(DinError) as excinfo:
            read("digits-small")
        assert excinfo.value.code is ErrorCode.INTERNAL and str(config_path) in excinfo.value.message
    left_out = ModelCatalog.from_repository(root)
    assert "digits-small" not in left_out.names() and str(config_path) in left_out.skipped[0]


def test_a_missing_config_is_an_unknown_model(small_copy):
    root, config_path, _ = small_copy
    config_path.unlink()
    with pytest.raises(DinError) as excinfo:
        ModelRepository(root).config("digits-small")
    assert excinfo.value.code is ErrorCode.UNKNOWN_MODEL


def test_a_bad_model_config_is_left_out_naming_its_file_and_the_rest_is_served(tmp_path):
    import json

    from din.shared.catalog import ModelCatalog

    good = {"name": "good", "versions": ["1"], "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 2]}],
            "outputs": [{"name": "label", "datatype": "INT64", "shape": [-1]}]}
    for folder, text in (("good", json.dumps(good)), ("nameless", json.dumps({k: v for k, v in good.items()
                                                                               if k != "name"})),
                         ("garbled", "{not json"), ("renamed", json.dumps({**good, "name": "other"}))):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "config.json").write_text(text)
    catalog = ModelCatalog.from_repository(tmp_path)
    assert catalog.names() == ["good"]
    assert len(catalog.skipped) == 3
    assert all(str(tmp_path) in reason for reason in catalog.skipped)
    assert any("not its folder 'renamed'" in reason for reason in catalog.skipped)
