"""charlm: BPTT gradients, ONNX step == numpy step, prefill graph == steps, deterministic training, greedy decoding."""

import json
import math

import numpy as np
import onnx
import onnxruntime
import pytest

from din.services.executor.repository import ModelRepository
from din.shared.tensors import validate_inputs
from din.zoo import text as zoo_text
from din.zoo.text import (
    CharLMRecipe,
    Corpus,
    decode,
    evaluate,
    generate,
    init_params,
    load_corpus,
    loss_and_grads,
    numpy_stepper,
    onnx_stepper,
    params_from_onnx,
    prefill,
    step,
    to_onnx,
    to_onnx_prefill,
    train_charlm,
)


def _session(model_or_path) -> onnxruntime.InferenceSession:
    source = model_or_path.SerializeToString() if isinstance(model_or_path, onnx.ModelProto) else str(model_or_path)
    return onnxruntime.InferenceSession(source, providers=["CPUExecutionProvider"])


def _run_prefill(session, tokens: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    logits, new_state = session.run(["logits", "state_out"], {"tokens": tokens, "state": state})
    return logits, new_state


def _step_through(stepper, tokens: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Read ``tokens`` [batch, time] one column at a time with the step model."""
    logits = None
    for column in tokens.T:
        logits, state = stepper(column, state)
    return logits, state


@pytest.fixture(scope="module")
def charlm(zoo_dir):
    config = json.loads((zoo_dir / "charlm" / "config.json").read_text())
    path = zoo_dir / "charlm" / "1" / "model.onnx"
    return config, path, params_from_onnx(onnx.load(str(path)))


@pytest.fixture(scope="module")
def charlm_prefill(zoo_dir):
    config = json.loads((zoo_dir / "charlm-prefill" / "config.json").read_text())
    return config, _session(zoo_dir / "charlm-prefill" / "1" / "model.onnx")


def test_bptt_gradients_match_finite_differences():
    rng = np.random.default_rng(1)
    params = {k: (v + rng.normal(0, 0.3, v.shape)).astype(np.float64) for k, v in init_params(5, 4, rng).items()}
    x, y = rng.integers(0, 5, (6, 3)), rng.integers(0, 5, (6, 3))
    _, grads = loss_and_grads(params, x, y)
    for name, value in params.items():
        numeric = np.zeros_like(value)
        for index in np.ndindex(value.shape):
            original = value[index]
            value[index] = original + 1e-6
            plus, _ = loss_and_grads(params, x, y)
            value[index] = original - 1e-6
            minus, _ = loss_and_grads(params, x, y)
            value[index] = original
            numeric[index] = (plus - minus) / 2e-6
        np.testing.assert_allclose(grads[name], numeric, atol=1e-7, err_msg=name)


def test_config_declares_the_one_step_contract(charlm):
    config, _, params = charlm
    hidden, vocab = config["hidden"], len(config["vocab"])
    assert config["role"] == "autoregressive" and config["task"] == "text-generation"
    assert config["inputs"] == [
        {"name": "token", "datatype": "INT64", "shape": [-1]},
        {"name": "state", "datatype": "FP32", "shape": [-1, hidden]},
    ]
    assert config["outputs"] == [
        {"name": "logits", "datatype": "FP32", "shape": [-1, vocab]},
        {"name": "state_out", "datatype": "FP32", "shape": [-1, hidden]},
    ]
    assert config["vocab"] == load_corpus().vocab and "\n" in config["vocab"] and "a" in config["vocab"]
    assert params["output"].shape == (hidden, vocab)
    assert config["state_bytes_per_item"] == 4 * hidden


def test_repository_serves_charlm(zoo_dir, charlm):
    config, _, _ = charlm
    handle = ModelRepository(zoo_dir).open("charlm")
    outputs = handle.run({"token": np.array([3, 4], np.int64), "state": np.zeros((2, config["hidden"]), np.float32)})
    assert outputs["logits"].shape == (2, len(config["vocab"]))
    assert outputs["state_out"].shape == (2, config["hidden"])


def test_onnx_step_equals_numpy_step(charlm):
    config, path, params = charlm
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, len(config["vocab"]), 9)
    state = np.tanh(rng.normal(size=(9, config["hidden"]))).astype(np.float32)
    logits, new_state = onnx_stepper(_session(path))(tokens, state)
    expected_logits, expected_state = step(params, tokens, state)
    np.testing.assert_allclose(logits, expected_logits, atol=1e-5)
    np.testing.assert_allclose(new_state, expected_state, atol=1e-5)


def test_held_out_loss_is_far_below_uniform_and_matches_the_config(charlm):
    config, path, _ = charlm
    uniform = math.log(len(config["vocab"]))
    assert config["loss"]["uniform"] == pytest.approx(uniform, abs=1e-4)
    assert config["loss"]["heldout"] < 0.5 * uniform
    assert config["accuracy"]["1"] > 0.5
    loss, accuracy = evaluate(onnx_stepper(_session(path)), load_corpus().heldout[:6401], config["hidden"])
    assert loss < 0.5 * uniform and accuracy > 0.5


def test_greedy_generation_is_deterministic_and_survives_a_state_handoff(charlm):
    config, path, params = charlm
    vocab, hidden = config["vocab"], config["hidden"]
    first = generate(onnx_stepper(_session(path)), vocab, "The ", 40, hidden)
    assert first == generate(onnx_stepper(_session(path)), vocab, "The ", 40, hidden)
    assert first == generate(numpy_stepper(params), vocab, "The ", 40, hidden)
    assert len(first) == 40 and set(first) <= set(vocab)

    prompt = load_corpus().encode("The ")
    prefill_executor, decode_executor = onnx_stepper(_session(path)), onnx_stepper(_session(path))
    logits, state = prefill(prefill_executor, prompt, hidden)
    moved = np.frombuffer(state.tobytes(), dtype=np.float32).reshape(1, hidden)
    tokens, _, _ = decode(decode_executor, logits, moved, 40)
    assert "".join(vocab[t] for t in tokens) == first


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("length", [1, 5, 300])
def test_prefill_model_reads_a_prompt_as_the_step_model_does(charlm, charlm_prefill, batch, length):
    config, path, params = charlm
    _, prefill_session = charlm_prefill
    hidden = config["hidden"]
    heldout = load_corpus().heldout
    tokens = np.stack([heldout[1000 * row : 1000 * row + length] for row in range(batch)])
    start = np.tanh(np.random.default_rng(length).normal(size=(batch, hidden))).astype(np.float32)
    logits, state = _run_prefill(prefill_session, tokens, start)
    assert logits.shape == (batch, len(config["vocab"])) and state.shape == (batch, hidden)
    for stepper in (onnx_stepper(_session(path)), numpy_stepper(params)):
        expected_logits, expected_state = _step_through(stepper, tokens, start)
        np.testing.assert_allclose(logits, expected_logits, atol=1e-4)
        np.testing.assert_allclose(state, expected_state, atol=1e-4)
    expected_logits, expected_state = prefill(numpy_stepper(params), tokens[0], hidden)
    logits, state = _run_prefill(prefill_session, tokens[:1], np.zeros((1, hidden), np.float32))
    np.testing.assert_allclose(logits, expected_logits, atol=1e-4)
    np.testing.assert_allclose(state, expected_state, atol=1e-4)


def test_prefill_config_pairs_with_the_step_model(charlm, charlm_prefill):
    step_config, _, _ = charlm
    config, _ = charlm_prefill
    hidden, vocab = step_config["hidden"], len(step_config["vocab"])
    assert step_config["prefill_model"] == "charlm-prefill"
    assert config["name"] == "charlm-prefill" and config["versions"] == ["1"]
    assert (config["task"], config["role"], config["prefill_for"]) == ("text-generation-prefill", "prefill", "charlm")
    assert config["family"] == "charlm" and config["description"]
    assert config["inputs"] == [
        {"name": "tokens", "datatype": "INT64", "shape": [-1, -1]},
        {"name": "state", "datatype": "FP32", "shape": [-1, hidden]},
    ]
    assert config["outputs"] == [
        {"name": "logits", "datatype": "FP32", "shape": [-1, vocab]},
        {"name": "state_out", "datatype": "FP32", "shape": [-1, hidden]},
    ]
    assert config["max_batch_size"] == 1
    for field in ("vocab", "hidden", "accuracy", "accuracy_metric", "corpus", "loss", "state_bytes_per_item"):
        assert config[field] == step_config[field], field
    assert "prefill_model" not in config


def test_repository_serves_charlm_prefill(zoo_dir, charlm_prefill):
    config, _ = charlm_prefill
    handle = ModelRepository(zoo_dir).open("charlm-prefill")
    prompt = load_corpus().encode("def main():")[None, :]
    inputs = {"tokens": prompt, "state": np.zeros((1, config["hidden"]), np.float32)}
    assert validate_inputs(inputs, handle.inputs, handle.max_batch_size) == 1
    outputs = handle.run(inputs)
    assert outputs["logits"].shape == (1, len(config["vocab"])) and outputs["state_out"].shape == (1, config["hidden"])


@pytest.mark.parametrize("prompt", ["The ", "def main():\n    ", "x"])
def test_greedy_continuation_after_the_prefill_model_matches_generate(charlm, charlm_prefill, prompt):
    config, path, _ = charlm
    _, prefill_session = charlm_prefill
    vocab, hidden = config["vocab"], config["hidden"]
    expected = generate(onnx_stepper(_session(path)), vocab, prompt, 40, hidden)
    tokens = load_corpus().encode(prompt)[None, :]
    logits, state = _run_prefill(prefill_session, tokens, np.zeros((1, hidden), np.float32))
    produced, _, _ = decode(onnx_stepper(_session(path)), logits, state, 40)
    assert "".join(vocab[t] for t in produced) == expected


def test_prefill_needs_a_prompt(charlm):
    config, _, params = charlm
    with pytest.raises(ValueError):
        prefill(numpy_stepper(params), [], config["hidden"])


def _tiny_corpus() -> Corpus:
    text = "abcabd abcabd ab cab dab " * 40
    vocab = "".join(sorted(set(text)))
    tokens = np.array([vocab.index(c) for c in text], dtype=np.int64)
    return Corpus(vocab, tokens[:800], tokens[800:], "tiny")


def test_training_is_deterministic_and_exports_faithfully():
    recipe = CharLMRecipe(hidden=8, seq_len=8, batch=4, steps=30, learning_rate=0.05)
    first, second = train_charlm(recipe, _tiny_corpus()), train_charlm(recipe, _tiny_corpus())
    for name in first.params:
        np.testing.assert_array_equal(first.params[name], second.params[name])
    assert first.heldout_loss < first.uniform_loss
    model = to_onnx(first.params)
    for name, value in params_from_onnx(model).items():
        np.testing.assert_array_equal(value, first.params[name])
    tokens, state = np.array([0, 1, 2]), np.zeros((3, 8), np.float32)
    logits, _ = onnx_stepper(_session(model))(tokens, state)
    np.testing.assert_allclose(logits, step(first.params, tokens, state)[0], atol=1e-5)

    prefill_model = to_onnx_prefill(first.params)
    assert [node.op_type for node in prefill_model.graph.node].count("Scan") == 1
    for name, value in params_from_onnx(prefill_model).items():
        np.testing.assert_array_equal(value, first.params[name])
    prompt = np.array([[0, 1, 2, 3], [3, 2, 1, 0]])
    logits, state = _run_prefill(_session(prefill_model), prompt, np.zeros((2, 8), np.float32))
    expected_logits, expected_state = _step_through(numpy_stepper(first.params), prompt, np.zeros((2, 8), np.float32))
    np.testing.assert_allclose(logits, expected_logits, atol=1e-5)
    np.testing.assert_allclose(state, expected_state, atol=1e-5)


def test_corpus_is_real_python_documentation():
    corpus = load_corpus()
    text = corpus.decode(corpus.train[:20000])
    assert "the" in text and "object" in text
    assert len(corpus.train) > 300_000 and len(corpus.heldout) > 30_000
    total = len(corpus.train) + len(corpus.heldout)
    assert len(corpus.heldout) / total == pytest.approx(zoo_text.HELDOUT_FRACTION, abs=1e-3)
