"""A character-level language model with explicit recurrent state, trained in numpy and exported to ONNX.

The model is a single-layer GRU over characters. It is trained with
backpropagation through time and Adam on real English text that ships with
Python: the documentation topics of ``pydoc_data.topics`` (what ``help()``
shows), so nothing is downloaded. Training is deterministic: fixed seed,
a fixed number of steps, float32 throughout.

The ONNX export is a *one-step* model::

    inputs   token      INT64 [batch]          the current character's index in the vocabulary
             state      FP32  [batch, hidden]  the recurrent state (zeros before the first character)
    outputs  logits     FP32  [batch, vocab]   scores of the next character
             state_out  FP32  [batch, hidden]  the state after reading ``token``

Prefill runs the step over the prompt carrying the state; decode feeds back
the chosen character one step at a time. ``to_onnx_prefill`` exports the
prefill as one graph that reads a whole prompt per call (``tokens`` INT64
[batch, time] in, the last step's ``logits`` and ``state_out`` out), a
``Scan`` over the same step. The state is all that has to move
when prefill and decode run on different executors.
"""

from __future__ import annotations

import functools
import hashlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

TOKEN_INPUT = "token"
PROMPT_INPUT = "tokens"
STATE_INPUT = "state"
LOGITS_OUTPUT = "logits"
STATE_OUTPUT = "state_out"
OPSET = 17
HELDOUT_FRACTION = 0.1
GATES = ("reset", "update", "candidate")

StepFunction = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
"""One model step: ``(token [batch], state [batch, hidden]) -> (logits [batch, vocab], state [batch, hidden])``."""


@dataclass(frozen=True)
class CharLMRecipe:
    """How to train one version of the character model: sizes, optimiser and the fixed seed."""

    name: str = "charlm"
    version: str = "1"
    hidden: int = 128
    seq_len: int = 64
    batch: int = 32
    steps: int = 500
    learning_rate: float = 0.02
    clip_norm: float = 1.0
    seed: int = 0

    def key(self) -> tuple:
        """A hashable identity of the recipe (every field)."""
        return tuple(sorted(asdict(self).items()))


@dataclass(frozen=True)
class Corpus:
    """Training text as vocabulary indices, split into a train part and a held-out tail."""

    vocab: str
    train: np.ndarray
    heldout: np.ndarray
    digest: str

    def encode(self, text: str) -> np.ndarray:
        """Indices of ``text``'s characters; characters outside the vocabulary are dropped."""
        index = {char: i for i, char in enumerate(self.vocab)}
        return np.array([index[c] for c in text if c in index], dtype=np.int64)

    def decode(self, tokens: Sequence[int]) -> str:
        """The text of vocabulary indices."""
        return "".join(self.vocab[int(t)] for t in tokens)


@dataclass(frozen=True)
class TrainedCharLM:
    """Trained weights and the figures measured on them."""

    params: dict[str, np.ndarray]
    vocab: str
    train_loss: float
    heldout_loss: float
    heldout_accuracy: float
    loss_curve: tuple[float, ...]
    seconds: float

    @property
    def hidden(self) -> int:
        """Size of the recurrent state."""
        return int(self.params["recurrent"].shape[0])

    @property
    def uniform_loss(self) -> float:
        """Cross-entropy of guessing uniformly over the vocabulary: ln(vocab)."""
        return float(np.log(len(self.vocab)))


def _allowed_char(char: str) -> bool:
    return char == "\n" or " " <= char <= "~"


def corpus_text() -> str:
    """The raw corpus: every ``pydoc_data.topics`` entry in key order, separated by blank lines."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


@functools.lru_cache(maxsize=1)
def load_corpus() -> Corpus:
    """The corpus restricted to newline and printable ASCII, with its last ``HELDOUT_FRACTION`` held out."""
    text = "".join(c for c in corpus_text() if _allowed_char(c))
    vocab = "".join(sorted(set(text)))
    index = {char: i for i, char in enumerate(vocab)}
    tokens = np.fromiter((index[c] for c in text), dtype=np.int64, count=len(text))
    cut = int(len(tokens) * (1.0 - HELDOUT_FRACTION))
    digest = hashlib.sha256(text.encode()).hexdigest()
    return Corpus(vocab, tokens[:cut], tokens[cut:], digest)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def init_params(vocab_size: int, hidden: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Initial GRU weights: gates stacked as [reset | update | candidate] along the last axis."""
    scale = 1.0 / np.sqrt(hidden)
    return {
        "embedding": rng.normal(0.0, 0.1, (vocab_size, 3 * hidden)).astype(np.float32),
        "recurrent": rng.uniform(-scale, scale, (hidden, 3 * hidden)).astype(np.float32),
        "recurrent_bias": np.zeros(3 * hidden, np.float32),
        "output": rng.uniform(-scale, scale, (hidden, vocab_size)).astype(np.float32),
        "output_bias": np.zeros(vocab_size, np.float32),
    }


def step(params: Mapping[str, np.ndarray], token: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One GRU step in numpy: ``(logits [batch, vocab], new state [batch, hidden])``.

    The same arithmetic as the exported ONNX graph.
    """
    hidden = params["recurrent"].shape[0]
    x = params["embedding"][np.asarray(token, dtype=np.int64)]
    hu = state @ params["recurrent"] + params["recurrent_bias"]
    reset = _sigmoid(x[:, :hidden] + hu[:, :hidden])
    update = _sigmoid(x[:, hidden : 2 * hidden] + hu[:, hidden : 2 * hidden])
    candidate = np.tanh(x[:, 2 * hidden :] + reset * hu[:, 2 * hidden :])
    new_state = candidate + update * (state - candidate)
    return new_state @ params["output"] + params["output_bias"], new_state


def _forward(params: Mapping[str, np.ndarray], x: np.ndarray, h0: np.ndarray) -> dict[str, np.ndarray]:
    """Run a [time, batch] token block, keeping what backpropagation needs."""
    steps, batch = x.shape
    hidden = params["recurrent"].shape[0]
    dtype = params["recurrent"].dtype
    inputs = params["embedding"][x]
    states = np.empty((steps + 1, batch, hidden), dtype)
    states[0] = h0
    gates = np.empty((steps, batch, 3 * hidden), dtype)
    hn = np.empty((steps, batch, hidden), dtype)
    recurrent, bias = params["recurrent"], params["recurrent_bias"]
    for t in range(steps):
        hu = states[t] @ recurrent + bias
        xt = inputs[t]
        reset = _sigmoid(xt[:, :hidden] + hu[:, :hidden])
        update = _sigmoid(xt[:, hidden : 2 * hidden] + hu[:, hidden : 2 * hidden])
        candidate = np.tanh(xt[:, 2 * hidden :] + reset * hu[:, 2 * hidden :])
        states[t + 1] = candidate + update * (states[t] - candidate)
        gates[t, :, :hidden] = reset
        gates[t, :, hidden : 2 * hidden] = update
        gates[t, :, 2 * hidden :] = candidate
        hn[t] = hu[:, 2 * hidden :]
    logits = states[1:].reshape(steps * batch, hidden) @ params["output"] + params["output_bias"]
    return {"states": states, "gates": gates, "hn": hn, "logits": logits}


def _cross_entropy(logits: np.ndarray, targets: np.ndarray) -> tuple[float, np.ndarray]:
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    rows = np.arange(len(targets))
    loss = -float(log_probs[rows, targets].mean())
    grad = np.exp(log_probs)
    grad[rows, targets] -= 1.0
    return loss, (grad / len(targets)).astype(logits.dtype)


def loss_and_grads(
    params: Mapping[str, np.ndarray], x: np.ndarray, y: np.ndarray
) -> tuple[float, dict[str, np.ndarray]]:
    """Mean next-character cross-entropy of a [time, batch] block from a zero state, and its gradients."""
    steps, batch = x.shape
    hidden = params["recurrent"].shape[0]
    dtype = params["recurrent"].dtype
    cache = _forward(params, x, np.zeros((batch, hidden), dtype))
    loss, d_logits = _cross_entropy(cache["logits"], y.reshape(-1))
    states, gates, hn = cache["states"], cache["gates"], cache["hn"]
    grads = {
        "output": states[1:].reshape(steps * batch, hidden).T @ d_logits,
        "output_bias": d_logits.sum(axis=0),
    }
    d_states = (d_logits @ params["output"].T).reshape(steps, batch, hidden)
    d_inputs = np.empty((steps, batch, 3 * hidden), dtype)
    d_hu = np.empty((steps, batch, 3 * hidden), dtype)
    recurrent_t = params["recurrent"].T
    d_next = np.zeros((batch, hidden), dtype)
    for t in range(steps - 1, -1, -1):
        dh = d_states[t] + d_next
        reset = gates[t, :, :hidden]
        update = gates[t, :, hidden : 2 * hidden]
        candidate = gates[t, :, 2 * hidden :]
        d_candidate = dh * (1.0 - update) * (1.0 - candidate * candidate)
        d_reset = d_candidate * hn[t] * reset * (1.0 - reset)
        d_update = dh * (states[t] - candidate) * update * (1.0 - update)
        d_inputs[t, :, :hidden] = d_reset
        d_inputs[t, :, hidden : 2 * hidden] = d_update
        d_inputs[t, :, 2 * hidden :] = d_candidate
        d_hu[t, :, : 2 * hidden] = d_inputs[t, :, : 2 * hidden]
        # Linear-before-reset GRU: the reset gate scales only the candidate's recurrent term.
        d_hu[t, :, 2 * hidden :] = d_candidate * reset
        d_next = dh * update + d_hu[t] @ recurrent_t
    flat_states = states[:-1].reshape(steps * batch, hidden)
    flat_hu = d_hu.reshape(steps * batch, 3 * hidden)
    grads["recurrent"] = flat_states.T @ flat_hu
    grads["recurrent_bias"] = flat_hu.sum(axis=0)
    embedding = np.zeros_like(params["embedding"])
    np.add.at(embedding, x.reshape(-1), d_inputs.reshape(steps * batch, 3 * hidden))
    grads["embedding"] = embedding
    return loss, grads


def _batch(tokens: np.ndarray, rng: np.random.Generator, seq_len: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
    starts = rng.integers(0, len(tokens) - seq_len - 1, size=batch)
    window = tokens[starts[None, :] + np.arange(seq_len + 1)[:, None]]
    return window[:-1], window[1:]


def evaluate(stepper: StepFunction, tokens: np.ndarray, hidden: int, streams: int = 64) -> tuple[float, float]:
    """Mean next-character cross-entropy (nats) and top-1 accuracy of ``stepper`` over ``tokens``.

    The text is cut into ``streams`` contiguous pieces read in parallel, each
    carrying its state from a zero start, as a served model would.
    """
    length = (len(tokens) - 1) // streams
    starts = np.arange(streams) * length
    state = np.zeros((streams, hidden), np.float32)
    total_loss, correct = 0.0, 0
    for t in range(length):
        logits, state = stepper(tokens[starts + t], state)
        targets = tokens[starts + t + 1]
        logits = logits.astype(np.float64)
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        total_loss -= float(log_probs[np.arange(streams), targets].sum())
        correct += int((logits.argmax(axis=1) == targets).sum())
    count = length * streams
    return total_loss / count, correct / count


def train_charlm(recipe: CharLMRecipe, corpus: Corpus | None = None) -> TrainedCharLM:
    """Train the GRU of ``recipe`` on ``corpus`` (the pydoc corpus by default); deterministic.

    Results are cached per recipe for the default corpus: training is a pure
    function of the recipe, so a second build in the same process reuses it.
    """
    if corpus is None:
        return _train_default(recipe)
    return _train(recipe, corpus)


@functools.lru_cache(maxsize=2)
def _train_default(recipe: CharLMRecipe) -> TrainedCharLM:
    return _train(recipe, load_corpus())


def _train(recipe: CharLMRecipe, corpus: Corpus) -> TrainedCharLM:
    begun = time.perf_counter()
    rng = np.random.default_rng(recipe.seed)
    params = init_params(len(corpus.vocab), recipe.hidden, rng)
    moments = {name: (np.zeros_like(p), np.zeros_like(p)) for name, p in params.items()}
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    curve = []
    for iteration in range(1, recipe.steps + 1):
        x, y = _batch(corpus.train, rng, recipe.seq_len, recipe.batch)
        loss, grads = loss_and_grads(params, x, y)
        curve.append(loss)
        norm = float(np.sqrt(sum(float((g * g).sum()) for g in grads.values())))
        scale = min(1.0, recipe.clip_norm / (norm + 1e-12))
        correction = np.sqrt(1.0 - beta2**iteration) / (1.0 - beta1**iteration)
        decay = 1.0 - 0.9 * (iteration - 1) / recipe.steps
        for name, grad in grads.items():
            grad = grad * scale
            first, second = moments[name]
            first += (1.0 - beta1) * (grad - first)
            second += (1.0 - beta2) * (grad * grad - second)
            params[name] -= (recipe.learning_rate * decay * correction) * first / (np.sqrt(second) + eps)
    params = {name: p.astype(np.float32) for name, p in params.items()}
    stepper = numpy_stepper(params)
    heldout_loss, heldout_accuracy = evaluate(stepper, corpus.heldout, recipe.hidden)
    train_loss, _ = evaluate(stepper, corpus.train[: len(corpus.heldout)], recipe.hidden)
    window = max(1, len(curve) // 10)
    smoothed = tuple(round(float(np.mean(curve[i : i + window])), 4) for i in range(0, len(curve), window))
    return TrainedCharLM(
        params=params,
        vocab=corpus.vocab,
        train_loss=round(train_loss, 4),
        heldout_loss=round(heldout_loss, 4),
        heldout_accuracy=round(heldout_accuracy, 6),
        loss_curve=smoothed,
        seconds=round(time.perf_counter() - begun, 2),
    )


def _step_initializers(params: Mapping[str, np.ndarray]) -> list:
    """The weights of one GRU step as ONNX initializers, one tensor per gate so no node has to slice."""
    from onnx import numpy_helper

    hidden = params["recurrent"].shape[0]
    initializers = []
    for index, gate in enumerate(GATES):
        columns = slice(index * hidden, (index + 1) * hidden)
        initializers += [
            numpy_helper.from_array(np.ascontiguousarray(params["embedding"][:, columns]), f"embedding_{gate}"),
            numpy_helper.from_array(np.ascontiguousarray(params["recurrent"][:, columns]), f"recurrent_{gate}"),
            numpy_helper.from_array(np.ascontiguousarray(params["recurrent_bias"][columns]), f"recurrent_bias_{gate}"),
        ]
    initializers += [
        numpy_helper.from_array(params["output"], "output_weight"),
        numpy_helper.from_array(params["output_bias"], "output_bias"),
    ]
    return initializers


def _step_nodes(token: str, state: str, logits: str, state_out: str, *, prefix: str = "") -> list:
    """The nodes of one GRU step, reading the ``_step_initializers`` weights by name.

    ``token``, ``state``, ``logits`` and ``state_out`` name the step's inputs
    and outputs; ``prefix`` goes before every intermediate name, so a copy
    inside a subgraph does not reuse a name of the graph around it.
    """
    from onnx import helper

    def name(base: str) -> str:
        return prefix + base

    nodes = []
    for gate in GATES:
        nodes += [
            helper.make_node("Gather", [f"embedding_{gate}", token], [name(f"x_{gate}")], axis=0),
            helper.make_node("MatMul", [state, f"recurrent_{gate}"], [name(f"hw_{gate}")]),
            helper.make_node("Add", [name(f"hw_{gate}"), f"recurrent_bias_{gate}"], [name(f"h_{gate}")]),
        ]
    nodes += [
        helper.make_node("Add", [name("x_reset"), name("h_reset")], [name("reset_pre")]),
        helper.make_node("Sigmoid", [name("reset_pre")], [name("reset")]),
        helper.make_node("Add", [name("x_update"), name("h_update")], [name("update_pre")]),
        helper.make_node("Sigmoid", [name("update_pre")], [name("update")]),
        helper.make_node("Mul", [name("reset"), name("h_candidate")], [name("gated_candidate")]),
        helper.make_node("Add", [name("x_candidate"), name("gated_candidate")], [name("candidate_pre")]),
        helper.make_node("Tanh", [name("candidate_pre")], [name("candidate")]),
        helper.make_node("Sub", [state, name("candidate")], [name("state_delta")]),
        helper.make_node("Mul", [name("update"), name("state_delta")], [name("kept")]),
        helper.make_node("Add", [name("candidate"), name("kept")], [state_out]),
        helper.make_node("MatMul", [state_out, "output_weight"], [name("logits_raw")]),
        helper.make_node("Add", [name("logits_raw"), "output_bias"], [logits]),
    ]
    return nodes


def _finish_model(graph, doc: str):
    """Wrap ``graph`` in a checked model with the zoo's opset."""
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="zoo.text")
    model.doc_string = doc
    onnx.checker.check_model(model)
    return model


def to_onnx(params: Mapping[str, np.ndarray], *, graph_name: str = "charlm-step", doc: str = ""):
    """The one-step ONNX model of trained ``params`` (see the module docstring for its signature)."""
    from onnx import TensorProto, helper

    hidden = params["recurrent"].shape[0]
    vocab = params["output"].shape[1]
    graph = helper.make_graph(
        _step_nodes(TOKEN_INPUT, STATE_INPUT, LOGITS_OUTPUT, STATE_OUTPUT),
        graph_name,
        [
            helper.make_tensor_value_info(TOKEN_INPUT, TensorProto.INT64, ["batch"]),
            helper.make_tensor_value_info(STATE_INPUT, TensorProto.FLOAT, ["batch", hidden]),
        ],
        [
            helper.make_tensor_value_info(LOGITS_OUTPUT, TensorProto.FLOAT, ["batch", vocab]),
            helper.make_tensor_value_info(STATE_OUTPUT, TensorProto.FLOAT, ["batch", hidden]),
        ],
        initializer=_step_initializers(params),
    )
    return _finish_model(graph, doc)


def to_onnx_prefill(params: Mapping[str, np.ndarray], *, graph_name: str = "charlm-prefill", doc: str = ""):
    """The prefill ONNX model of trained ``params``: a whole prompt in one call.

    ::

        inputs   tokens     INT64 [batch, time]    the prompt's character indices
                 state      FP32  [batch, hidden]  the state to start from (zeros for a fresh prompt)
        outputs  logits     FP32  [batch, vocab]   scores of the character after the last token
                 state_out  FP32  [batch, hidden]  the state after the last token

    A ``Scan`` over the time axis runs the same step as ``to_onnx``. The
    logits ride along as a second scan state (starting as zeros), so only the
    last step's are kept. The prompt must hold at least one token:
    onnxruntime's ``Scan`` fails on an empty time axis, and with a batch above
    one it dies with a floating-point exception rather than an error.
    """
    from onnx import TensorProto, helper

    hidden = params["recurrent"].shape[0]
    vocab = params["output"].shape[1]
    body = helper.make_graph(
        _step_nodes("step_token", "step_state", "step_logits", "step_state_out", prefix="step_"),
        f"{graph_name}-step",
        [
            helper.make_tensor_value_info("step_state", TensorProto.FLOAT, ["batch", hidden]),
            helper.make_tensor_value_info("step_logits_in", TensorProto.FLOAT, ["batch", vocab]),
            helper.make_tensor_value_info("step_token", TensorProto.INT64, ["batch"]),
        ],
        [
            helper.make_tensor_value_info("step_state_out", TensorProto.FLOAT, ["batch", hidden]),
            helper.make_tensor_value_info("step_logits", TensorProto.FLOAT, ["batch", vocab]),
        ],
    )
    nodes = [
        # Zero logits of shape [batch, vocab], the batch read from the tokens.
        helper.make_node("Shape", [PROMPT_INPUT], ["batch_size"], start=0, end=1),
        helper.make_node("Concat", ["batch_size", "vocab_size"], ["logits_shape"], axis=0),
        helper.make_node(
            "ConstantOfShape",
            ["logits_shape"],
            ["logits_initial"],
            value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0]),
        ),
        helper.make_node(
            "Scan",
            [STATE_INPUT, "logits_initial", PROMPT_INPUT],
            [STATE_OUTPUT, LOGITS_OUTPUT],
            body=body,
            num_scan_inputs=1,
            scan_input_axes=[1],
        ),
    ]
    graph = helper.make_graph(
        nodes,
        graph_name,
        [
            helper.make_tensor_value_info(PROMPT_INPUT, TensorProto.INT64, ["batch", "time"]),
            helper.make_tensor_value_info(STATE_INPUT, TensorProto.FLOAT, ["batch", hidden]),
        ],
        [
            helper.make_tensor_value_info(LOGITS_OUTPUT, TensorProto.FLOAT, ["batch", vocab]),
            helper.make_tensor_value_info(STATE_OUTPUT, TensorProto.FLOAT, ["batch", hidden]),
        ],
        initializer=[
            *_step_initializers(params),
            helper.make_tensor("vocab_size", TensorProto.INT64, [1], [vocab]),
        ],
    )
    return _finish_model(graph, doc)


def params_from_onnx(model) -> dict[str, np.ndarray]:
    """The numpy weights of a model written by ``to_onnx`` or ``to_onnx_prefill`` (a ``ModelProto``)."""
    from onnx import numpy_helper

    weights = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    return {
        "embedding": np.concatenate([weights[f"embedding_{g}"] for g in GATES], axis=1),
        "recurrent": np.concatenate([weights[f"recurrent_{g}"] for g in GATES], axis=1),
        "recurrent_bias": np.concatenate([weights[f"recurrent_bias_{g}"] for g in GATES]),
        "output": weights["output_weight"],
        "output_bias": weights["output_bias"],
    }


def numpy_stepper(params: Mapping[str, np.ndarray]) -> StepFunction:
    """A step function ``(token, state) -> (logits, state)`` over numpy weights."""
    return lambda token, state: step(params, token, state)


def onnx_stepper(session: Any) -> StepFunction:
    """A step function ``(token, state) -> (logits, state)`` over an onnxruntime session of the step model."""

    def run(token: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, new_state = session.run(
            [LOGITS_OUTPUT, STATE_OUTPUT],
            {TOKEN_INPUT: np.asarray(token, dtype=np.int64), STATE_INPUT: np.asarray(state, dtype=np.float32)},
        )
        return logits, new_state

    return run


def prefill(stepper: StepFunction, tokens: Sequence[int], hidden: int) -> tuple[np.ndarray, np.ndarray]:
    """Read a prompt of one sequence from a zero state: the last step's logits [1, vocab] and the state [1, hidden].

    The prompt must hold at least one token.
    """
    if len(tokens) == 0:
        raise ValueError("prefill needs a prompt of at least one token")
    state = np.zeros((1, hidden), np.float32)
    logits = np.empty((1, 0), np.float32)
    for token in tokens:
        logits, state = stepper(np.array([token], dtype=np.int64), state)
    return logits, state


def decode(
    stepper: StepFunction,
    logits: np.ndarray,
    state: np.ndarray,
    count: int,
    *,
    temperature: float = 0.0,
    rng: np.random.Generator | None = None,
) -> tuple[list[int], np.ndarray, np.ndarray]:
    """Generate ``count`` tokens from the ``logits``/``state`` prefill (or an earlier decode) left.

    Returns the tokens and the logits and state after the last one, from
    which decoding can continue, here or on another executor. ``temperature``
    0 is greedy (deterministic); above 0 samples with ``rng``.
    """
    produced = []
    for _ in range(count):
        if temperature <= 0.0:
            token = int(np.argmax(logits[0]))
        else:
            if rng is None:
                raise ValueError("sampling with a temperature needs an rng")
            scaled = logits[0].astype(np.float64) / temperature
            probabilities = np.exp(scaled - scaled.max())
            token = int(rng.choice(len(probabilities), p=probabilities / probabilities.sum()))
        produced.append(token)
        logits, state = stepper(np.array([token], dtype=np.int64), state)
    return produced, logits, state


def generate(stepper: StepFunction, vocab: str, prompt: str, count: int, hidden: int) -> str:
    """Greedy continuation of ``prompt`` by ``count`` characters (characters outside ``vocab`` are dropped)."""
    index = {char: i for i, char in enumerate(vocab)}
    tokens = [index[c] for c in prompt if c in index]
    logits, state = prefill(stepper, tokens, hidden)
    produced, _, _ = decode(stepper, logits, state, count)
    return "".join(vocab[t] for t in produced)
