"""Bringing your own model: an ONNX graph added to a model repository, its config derived from the graph.

The repository's layout (what ``services.executor.repository`` serves and ``shared.catalog`` lists)::

    <repo>/<model>/config.json            a ModelConfigV1 (schemas/json/din.v1.model_config.schema.json)
    <repo>/<model>/<version>/model.onnx

``add_model`` reads the graph's inputs and outputs (``shared.model_graph``), runs it once, and writes the graph
then the config, each beside its path and renamed over it, so a reader never sees half a model: the services'
catalogs pick the model up on their next look (``shared.catalog.REFRESH_S``). A graph added to an existing model
is its next version and must keep the model's interface.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from din.shared.contracts.model_config import CONFIG_FILE, MODEL_FILE, ModelConfigV1
from din.shared.model_graph import GraphError, derive_config, mismatches, read_graph
from din.shared.naming import InvalidNameError, token


class ModelImportError(ValueError):
    """A graph that cannot be added as asked; the message says why and names the file."""


@dataclass(frozen=True)
class AddedModel:
    """What ``add_model`` wrote: the model's config now and the version added."""

    config: ModelConfigV1
    version: str
    graph: Path
    left_out: list[str]


def _next_version(config: ModelConfigV1) -> str:
    numbers = [int(v) for v in config.versions if v.isdigit()]
    return str(max(numbers, default=0) + 1)


def _replace(target: Path, write) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    write(partial)
    os.replace(partial, target)


def add_model(repo: Path, graph: Path, name: str, *, version: str | None = None, task: str | None = None,
              description: str = "", accuracy: float | None = None, max_batch_size: int | None = None) -> AddedModel:
    """Add ``graph`` to ``repo`` as model ``name`` (a new model, or the next version of an existing one)."""
    try:
        token(name, what="model name")
        if version is not None:
            token(version, what="version")
    except InvalidNameError as exc:
        raise ModelImportError(str(exc)) from None
    config_path = Path(repo) / name / CONFIG_FILE
    existing = None
    if config_path.exists():
        try:
            existing = ModelConfigV1.read(config_path)
        except ValueError as exc:
            raise ModelImportError(f"{exc}: fix or remove it before adding a version") from None
    version = version or (_next_version(existing) if existing else "1")
    if existing is not None and version in existing.versions:
        raise ModelImportError(f"model {name!r} already has version {version!r} ({config_path}): add another")
    try:
        found = read_graph(graph)
    except GraphError as exc:
        raise ModelImportError(str(exc)) from None
    fixed = any(t.shape[0] != -1 for t in found.inputs)
    if max_batch_size is not None and fixed and max_batch_size > found.max_batch_size:
        raise ModelImportError(f"{graph}: its inputs fix the batch to {found.max_batch_size}; --max-batch-size "
                               f"{max_batch_size} is more")
    if existing is None:
        config = derive_config(found, name, version, task=task or "unknown", description=description,
                               accuracy={version: accuracy} if accuracy is not None else {},
                               **({"max_batch_size": max_batch_size} if max_batch_size else {}))
    else:
        problems = mismatches(existing, found)
        if problems:
            raise ModelImportError(f"{graph} does not have the interface of model {name!r} ({'; '.join(problems)}): "
                                   "a new version must keep it; add the graph under another name")
        accuracies = {**existing.accuracy, **({version: accuracy} if accuracy is not None else {})}
        config = existing.model_copy(update={"versions": [*existing.versions, version], "accuracy": accuracies,
                                             "max_batch_size": max_batch_size or existing.max_batch_size,
                                             **({"task": task} if task else {}),
                                             **({"description": description} if description else {})})
    target = Path(repo) / name / version / MODEL_FILE
    _replace(target, lambda partial: shutil.copyfile(graph, partial))
    _replace(config_path, lambda partial: partial.write_text(config.to_json()))
    return AddedModel(config, version, target, found.left_out)
