"""Cutting a model into a head and a tail at a named tensor, for split inference across sites.

The head maps the model's inputs to the split tensor; the tail maps the split
tensor to the model's outputs. Running the tail on the head's output gives
the full model's outputs. Only a tensor that every path from the inputs to
the outputs passes through is a valid cut: the tail must need nothing but
the split tensor and its own weights.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnx.utils

from din.shared.errors import DinError, ErrorCode


@dataclass(frozen=True)
class SplitPair:
    """Where a split wrote its two models, and the tensor that flows between them."""

    head: Path
    tail: Path
    split_point: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


def _refuse(model: onnx.ModelProto, split_point: str, why: str) -> DinError:
    return DinError(ErrorCode.BAD_REQUEST, f"cannot split model {model.graph.name!r} at {split_point!r}: {why}")


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {output: node for node in graph.node for output in node.output if output}


def _ancestors(graph: onnx.GraphProto, targets: list[str], stop: set[str]) -> set[str]:
    """Every tensor the ``targets`` are computed from, not looking past the tensors in ``stop``."""
    producers = _producers(graph)
    seen: set[str] = set()
    pending = list(targets)
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in stop or name not in producers:
            continue
        pending.extend(i for i in producers[name].input if i)
    return seen


def check_split_point(model: onnx.ModelProto, split_point: str) -> None:
    """Raise ``DinError(BAD_REQUEST)`` unless ``model`` can be cut cleanly at ``split_point``."""
    graph = model.graph
    initializers = {init.name for init in graph.initializer}
    graph_inputs = [i.name for i in graph.input if i.name not in initializers]
    graph_outputs = [o.name for o in graph.output]
    producers = _producers(graph)
    if split_point in graph_inputs:
        raise _refuse(model, split_point, "it is a model input, so the head would be empty")
    if split_point in initializers:
        raise _refuse(model, split_point, "it is a weight (initializer), not a tensor computed from the input")
    if split_point not in producers:
        raise _refuse(model, split_point, "the graph has no tensor of that name")
    if split_point in graph_outputs:
        raise _refuse(model, split_point, "it is a model output, so the tail would compute nothing")
    reached = _ancestors(graph, graph_outputs, stop={split_point})
    if split_point not in reached:
        raise _refuse(model, split_point, "the model's outputs do not depend on it")
    if set(graph_inputs) & reached:
        head_side = _ancestors(graph, [split_point], stop=set()) - initializers
        tail_nodes = [producers[name] for name in reached - head_side if name in producers]
        crossing = {i for node in tail_nodes for i in node.input if i in head_side or i in graph_inputs}
        crossing |= {name for name in graph_outputs if name in head_side}
        crossing.discard(split_point)
        raise _refuse(
            model,
            split_point,
            f"the tail would also need {sorted(crossing)} from the head's side; cut at a tensor "
            "that every path from the input to the outputs passes through",
        )


def split_model(model_path: Path, split_point: str, out_head: Path, out_tail: Path) -> SplitPair:
    """Cut the ONNX model at ``model_path`` at tensor ``split_point`` into ``out_head`` and ``out_tail``.

    The head takes the model's inputs and answers ``split_point``; the tail
    takes ``split_point`` and answers the model's outputs. Both are extracted
    with ``onnx.utils.extract_model`` (shapes inferred, both checked) and
    written atomically. A point where the graph cannot be cut cleanly raises
    ``DinError(BAD_REQUEST)`` naming the reason, and nothing is written.
    """
    model_path, out_head, out_tail = Path(model_path), Path(out_head), Path(out_tail)
    model = onnx.load(str(model_path))
    check_split_point(model, split_point)
    initializers = {init.name for init in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in initializers]
    outputs = [o.name for o in model.graph.output]
    for path, names in ((out_head, (inputs, [split_point])), (out_tail, ([split_point], outputs))):
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        onnx.utils.extract_model(str(model_path), str(partial), names[0], names[1])
        os.replace(partial, path)
    return SplitPair(out_head, out_tail, split_point, tuple(inputs), tuple(outputs))
