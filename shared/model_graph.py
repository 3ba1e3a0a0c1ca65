"""An ONNX graph's interface, read with ONNX Runtime: what ``din models add`` derives a config from and what an
executor checks a config against before it serves the graph.

A graph's inputs and outputs become ``TensorConfigV1`` entries: the element type mapped to its OIP datatype and
the shape with every symbolic or unknown dimension as -1. The first dimension is the batch dimension: DIN batches
along it, so every input and tensor output must have one (a fixed first dimension of 1 gives
``max_batch_size`` 1). Outputs that are not tensors (scikit-learn's ZipMap of probabilities) cannot travel as OIP
tensors and are left out; a graph with no tensor output cannot be served.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime

from din.shared.contracts.inference import Datatype
from din.shared.contracts.model_config import DEFAULT_MAX_BATCH_SIZE, ModelConfigV1, TensorConfigV1
from din.shared.tensors import WIRE_DTYPES

ORT_TYPES: dict[str, Datatype] = {
    "tensor(float)": Datatype.FP32, "tensor(double)": Datatype.FP64, "tensor(float16)": Datatype.FP16,
    "tensor(int64)": Datatype.INT64, "tensor(int32)": Datatype.INT32, "tensor(int16)": Datatype.INT16,
    "tensor(int8)": Datatype.INT8, "tensor(uint64)": Datatype.UINT64, "tensor(uint32)": Datatype.UINT32,
    "tensor(uint16)": Datatype.UINT16, "tensor(uint8)": Datatype.UINT8, "tensor(bool)": Datatype.BOOL,
}
"""ONNX Runtime's element type names and the OIP datatype each travels as."""


class GraphError(ValueError):
    """A graph DIN cannot serve, or a config that does not describe its graph; the message names the file."""


def session_options() -> onnxruntime.SessionOptions:
    """One thread, sequential execution: the executor scales by processes, not by threads per session."""
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return options


def open_session(path: Path | str) -> onnxruntime.InferenceSession:
    """An ONNX Runtime session of the graph at ``path``; ``GraphError`` naming it when it is missing or not a
    graph ONNX Runtime can run."""
    path = Path(path)
    if not path.is_file():
        raise GraphError(f"{path}: no such ONNX graph")
    try:
        return onnxruntime.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own pybind exception types for corrupt or unsupported graphs
        raise GraphError(f"{path}: not an ONNX graph ONNX Runtime can run ({_first_line(exc)})") from None


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def _tensor(node, path: Path, what: str) -> TensorConfigV1 | None:
    datatype = ORT_TYPES.get(node.type)
    if datatype is None:
        if not node.type.startswith("tensor("):
            return None
        raise GraphError(f"{path}: {what} {node.name!r} is a {node.type}, which DIN does not serve "
                         f"(it serves {', '.join(sorted(ORT_TYPES))})")
    shape = [dim if isinstance(dim, int) and dim >= 0 else -1 for dim in (node.shape or [])]
    if not shape:
        raise GraphError(f"{path}: {what} {node.name!r} has no batch dimension (a scalar): DIN batches along the "
                         "first dimension")
    return TensorConfigV1(name=node.name, datatype=datatype, shape=shape)


@dataclass(frozen=True)
class GraphInterface:
    """A graph's inputs and its tensor outputs, and the outputs left out (not tensors)."""

    inputs: list[TensorConfigV1]
    outputs: list[TensorConfigV1]
    left_out: list[str]

    @property
    def max_batch_size(self) -> int:
        """The largest batch the graph takes: 1 when an input fixes its first dimension to 1."""
        fixed = {t.shape[0] for t in self.inputs if t.shape[0] != -1}
        return min(fixed) if fixed else DEFAULT_MAX_BATCH_SIZE


def interface(session: onnxruntime.InferenceSession, path: Path | str) -> GraphInterface:
    """The interface of ``session``'s graph (read from ``path``)."""
    path = Path(path)
    inputs = [_tensor(node, path, "input") for node in session.get_inputs()]
    if any(tensor is None for tensor in inputs):
        raise GraphError(f"{path}: an input is not a tensor")
    outputs, left_out = [], []
    for node in session.get_outputs():
        tensor = _tensor(node, path, "output")
        (outputs.append(tensor) if tensor is not None else left_out.append(f"{node.name} ({node.type})"))
    if not outputs:
        raise GraphError(f"{path}: no output is a tensor ({', '.join(left_out)}); for scikit-learn classifiers "
                         "convert with options={'zipmap': False}")
    return GraphInterface(inputs, outputs, left_out)


def smoke_run(session: onnxruntime.InferenceSession, inputs: list[TensorConfigV1], path: Path | str) -> None:
    """Run the graph once on a batch of one item of zeros; ``GraphError`` when it fails."""
    feed = {t.name: np.zeros([1 if d == -1 else d for d in t.shape], dtype=WIRE_DTYPES[t.datatype]) for t in inputs}
    try:
        session.run(None, feed)
    except Exception as exc:  # any runtime failure of the graph itself
        raise GraphError(f"{path}: the graph fails on a batch of zeros ({_first_line(exc)})") from None


def mismatches(config: ModelConfigV1, graph: GraphInterface) -> list[str]:
    """How ``config``'s inputs and outputs differ from ``graph``'s: names, datatypes, shapes (a config's -1 or a
    fixed size must agree with the graph's; a graph's dynamic dimension takes any size). Empty when they agree;
    a config may declare only some of the graph's outputs."""
    problems = []
    declared_inputs = {t.name: t for t in config.inputs}
    graph_inputs = {t.name: t for t in graph.inputs}
    if set(declared_inputs) != set(graph_inputs):
        problems.append(f"inputs {sorted(declared_inputs)} are not the graph's {sorted(graph_inputs)}")
    graph_outputs = {t.name: t for t in graph.outputs}
    missing = [t.name for t in config.outputs if t.name not in graph_outputs]
    if missing:
        problems.append(f"outputs {missing} are not tensor outputs of the graph ({sorted(graph_outputs)})")
    for declared, actual in [(t, graph_inputs.get(t.name)) for t in config.inputs] + [
            (t, graph_outputs.get(t.name)) for t in config.outputs]:
        if actual is None:
            continue
        if declared.datatype != actual.datatype:
            problems.append(f"{declared.name} is {declared.datatype.value} in the config, {actual.datatype.value} "
                            "in the graph")
        if len(declared.shape) != len(actual.shape) or any(
                g != -1 and d != g for d, g in zip(declared.shape, actual.shape, strict=False)):
            problems.append(f"{declared.name} has shape {declared.shape} in the config, {actual.shape} in the graph")
    return problems


def read_graph(path: Path | str) -> GraphInterface:
    """The interface of the graph at ``path``, checked by one run on zeros (``GraphError`` naming the file)."""
    session = open_session(path)
    graph = interface(session, path)
    smoke_run(session, graph.inputs, path)
    return graph


def derive_config(graph: GraphInterface, name: str, version: str, **fields) -> ModelConfigV1:
    """A config serving ``graph`` as model ``name`` ``version`` (``fields``: the config's other keys, e.g. task,
    description, accuracy)."""
    return ModelConfigV1(name=name, versions=[version], inputs=graph.inputs, outputs=graph.outputs,
                         **{"max_batch_size": graph.max_batch_size, **fields})
