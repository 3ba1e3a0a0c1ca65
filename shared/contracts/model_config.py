"""What a model repository's ``<model>/config.json`` holds: the one typed reading of it.

The zoo (``zoo``) writes these files and every reader (executor repository,
model catalog, benchmarks, replay) reads them through ``ModelConfigV1``, so
there is one set of defaults. Keys the model does not use are absent; unknown
keys (training notes, corpus facts) are kept and ignored.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from din.shared.contracts.inference import Datatype

CONFIG_FILE = "config.json"
MODEL_FILE = "model.onnx"
"""A model repository's layout: ``<repo>/<model>/CONFIG_FILE`` and ``<repo>/<model>/<version>/MODEL_FILE``."""
DEFAULT_MAX_BATCH_SIZE = 64


class TensorConfigV1(BaseModel):
    """One input or output of a model: name, element type and shape (-1 for a dynamic dimension)."""

    name: str = Field(description="Tensor name, as in the ONNX graph.")
    datatype: Datatype = Field(description="Element type.")
    shape: list[int] = Field(description="Dimensions; -1 marks a dynamic one (the batch dimension first).")


class LeakageV1(BaseModel):
    """What a split head's intermediate gives away to an inversion attack, measured when the zoo is built."""

    model_config = ConfigDict(extra="allow")

    recovered_variance: float = Field(description="Share of the input's variance a decoder recovers (0..1).")
    attack: str = Field(default="", description="How it was measured.")


class ModelConfigV1(BaseModel):
    """A model's config in the repository: its interface, versions, accuracy and the role it plays."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    name: str = Field(description="Model name; equals the folder name.")
    task: str = Field(default="unknown", description="Task type, e.g. image-classification.")
    family: str | None = Field(default=None, description="Models of one family are variants of each other.")
    description: str = Field(default="", description="What the model is.")
    versions: list[str] = Field(description="Stored versions, each a folder holding model.onnx.")
    inputs: list[TensorConfigV1] = Field(description="Input tensors.")
    outputs: list[TensorConfigV1] = Field(description="Output tensors.")
    max_batch_size: int = Field(default=DEFAULT_MAX_BATCH_SIZE, ge=1, description="Largest batch one run takes.")
    accuracy: dict[str, float] = Field(default_factory=dict, description="Held-out accuracy per version.")
    accuracy_metric: str | None = Field(default=None, description="What accuracy measures, when not top-1.")
    input_bytes_per_item: int | None = Field(default=None, description="Bytes of one item's input.")
    intermediate_bytes_per_item: int | None = Field(default=None, description="Split parts: intermediate bytes.")
    state_bytes_per_item: int | None = Field(default=None, description="Token models: recurrent state bytes.")
    parameter_count: int | None = Field(default=None, description="Number of trained parameters.")
    role: str | None = Field(
        default=None, description="head, tail (split parts), prefill or autoregressive (token models); None: whole."
    )
    split_of: str | None = Field(default=None, description="Split parts: the whole model they were cut from.")
    split_point: str | None = Field(default=None, description="Split parts: the tensor the model was cut at.")
    split_points: list[str] = Field(default_factory=list, description="Whole models: points they can be cut at.")
    prefill_model: str | None = Field(default=None, description="Token models: the model that reads a prompt.")
    prefill_for: str | None = Field(default=None, description="Prefill models: the token model they read prompts for.")
    input_bytes_per_token: int | None = Field(default=None, description="Prefill models: input bytes per prompt token.")
    vocab: str | None = Field(default=None, description="Token models: the characters, by token id.")
    hidden: int | None = Field(default=None, description="Token models: width of the recurrent state.")
    leakage: LeakageV1 | None = Field(default=None, description="Split heads: measured inversion leakage.")

    def best_accuracy(self) -> float | None:
        """The best held-out accuracy of any version, or None when none is recorded."""
        return max(self.accuracy.values()) if self.accuracy else None

    def to_json(self) -> str:
        """The file's text: every key that has a value (None is left out), indented, with a final newline."""
        return json.dumps(self.model_dump(mode="json", exclude_none=True), indent=2) + "\n"

    @classmethod
    def read(cls, path: Path) -> ModelConfigV1:
        """The config at ``path``; ``ValueError`` naming the file when it is missing, not JSON or not valid."""
        try:
            return cls.model_validate(json.loads(Path(path).read_text()))
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: not a valid model config: {exc}") from None
