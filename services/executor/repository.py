"""Model repository: the zoo layout on disk, and one onnxruntime session per served model version.

Layout (written by ``zoo.build.build_zoo``)::

    <root>/<model>/config.json          a ``ModelConfigV1``
    <root>/<model>/<version>/model.onnx

Each model has one *current* handle. ``load`` builds the new version's session
first and then swaps it in atomically, so a batch already holding the old
handle finishes on it while new batches get the new one.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnxruntime

from din.shared.contracts.model_config import CONFIG_FILE, MODEL_FILE, ModelConfigV1, TensorConfigV1
from din.shared.errors import DinError, ErrorCode
from din.shared.model_graph import GraphError, interface, mismatches, open_session
from din.shared.naming import TOKEN_PATTERN
from din.shared.tensors import TensorSpec


def _tensor_spec(tensor: TensorConfigV1) -> TensorSpec:
    return TensorSpec(name=tensor.name, datatype=tensor.datatype, shape=tuple(tensor.shape))


def _version_order(version: str) -> tuple[int, int, str]:
    return (0, int(version), "") if version.isdigit() else (1, 0, version)


class ModelHandle:
    """One loaded version of one model: its onnxruntime session and its config.

    ``run`` is safe to call from several threads at once.
    """

    def __init__(self, name: str, version: str, config: ModelConfigV1, session: onnxruntime.InferenceSession):
        self.name = name
        self.version = version
        self.config = config
        self.inputs = [_tensor_spec(tensor) for tensor in config.inputs]
        self.outputs = [_tensor_spec(tensor) for tensor in config.outputs]
        self.output_names = [spec.name for spec in self.outputs]
        self.max_batch_size = config.max_batch_size
        self._session = session

    @property
    def accuracy(self) -> float | None:
        """Held-out accuracy of this version, from the config."""
        return self.config.accuracy.get(self.version)

    def run(
        self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Run the model on ``inputs`` and return ``outputs`` (all declared outputs when None)."""
        names = list(outputs) if outputs is not None else self.output_names
        try:
            results = self._session.run(names, dict(inputs))
        except Exception as exc:
            raise DinError(ErrorCode.INFERENCE_FAILED, f"{self.name} v{self.version} failed: {exc}") from exc
        return dict(zip(names, results, strict=True))

    def __repr__(self) -> str:
        return f"ModelHandle({self.name!r}, version={self.version!r})"


class ModelRepository:
    """Models stored under ``root`` in the zoo layout, and the version of each that serves now."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._current: dict[str, ModelHandle] = {}
        self._lock = threading.Lock()

    def list_models(self) -> list[str]:
        """Names of the models stored under the root, sorted."""
        if not self.root.is_dir():
            return []
        return sorted(
            entry.name
            for entry in self.root.iterdir()
            if TOKEN_PATTERN.match(entry.name) and (entry / CONFIG_FILE).is_file()
        )

    def config(self, name: str) -> ModelConfigV1:
        """The stored config of model ``name``.

        ``UNKNOWN_MODEL`` when there is none; ``INTERNAL``, naming the file, when it is not JSON or not a valid
        ``ModelConfigV1``.
        """
        path = self._model_dir(name) / CONFIG_FILE
        if not path.is_file():
            raise DinError(ErrorCode.UNKNOWN_MODEL, f"unknown model {name!r}")
        try:
            return ModelConfigV1.read(path)
        except ValueError as exc:
            raise DinError(ErrorCode.INTERNAL, f"config of model {name!r} is invalid: {exc}") from None

    def versions(self, name: str) -> list[str]:
        """Versions of model ``name`` listed in its config, oldest first."""
        return sorted(self.config(name).versions, key=_version_order)

    def latest_version(self, name: str) -> str:
        """The newest version of model ``name``."""
        versions = self.versions(name)
        if not versions:
            raise DinError(ErrorCode.UNKNOWN_MODEL, f"model {name!r} has no versions")
        return versions[-1]

    def open(self, name: str, version: str | None = None) -> ModelHandle:
        """A new handle for ``name`` at ``version`` (the latest when None), not made current."""
        config = self.config(name)
        version = str(version) if version is not None else self.latest_version(name)
        if version not in self.versions(name):
            raise DinError(ErrorCode.UNKNOWN_MODEL, f"model {name!r} has no version {version!r}")
        path = self._model_dir(name) / version / MODEL_FILE
        if not path.is_file():
            raise DinError(
                ErrorCode.UNKNOWN_MODEL, f"model {name!r} version {version!r} has no {MODEL_FILE}"
            )
        try:
            session = open_session(path)
            problems = mismatches(config, interface(session, path))
        except GraphError as exc:
            raise DinError(ErrorCode.INTERNAL, f"model {name!r} version {version!r} cannot be served: {exc}") from None
        if problems:
            raise DinError(ErrorCode.INTERNAL, f"config of model {name!r} ({self._model_dir(name) / CONFIG_FILE}) "
                           f"does not describe version {version!r}'s graph: {'; '.join(problems)}")
        return ModelHandle(name, version, config, session)

    def load(self, name: str, version: str | None = None) -> ModelHandle:
        """Open ``name`` at ``version`` and make it current; the previous handle keeps working for its holders."""
        return self.install(self.open(name, version))

    def install(self, handle: ModelHandle) -> ModelHandle:
        """Make ``handle`` (from ``open``) its model's current one."""
        with self._lock:
            self._current[handle.name] = handle
        return handle

    def current(self, name: str) -> ModelHandle:
        """The handle serving ``name`` now; ``UNKNOWN_MODEL`` when it is not loaded."""
        with self._lock:
            handle = self._current.get(name)
        if handle is None:
            raise DinError(ErrorCode.UNKNOWN_MODEL, f"model {name!r} is not loaded here")
        return handle

    def handle(self, name: str, version: str | None = None) -> ModelHandle:
        """The current handle of ``name``, which must be ``version`` when one is asked for."""
        handle = self.current(name)
        if version is not None and str(version) != handle.version:
            raise DinError(
                ErrorCode.UNKNOWN_MODEL,
                f"model {name!r} serves version {handle.version!r} here, not {version!r}",
            )
        return handle

    def has(self, name: str) -> bool:
        """Whether ``name`` is loaded here."""
        with self._lock:
            return name in self._current

    def loaded(self) -> list[ModelHandle]:
        """Current handles of every loaded model, sorted by name."""
        with self._lock:
            return [self._current[name] for name in sorted(self._current)]

    def unload(self, name: str) -> ModelHandle | None:
        """Stop serving ``name``; returns the handle that was current, which its holders may still use."""
        with self._lock:
            return self._current.pop(name, None)

    def _model_dir(self, name: str) -> Path:
        if not isinstance(name, str) or not TOKEN_PATTERN.match(name):
            raise DinError(ErrorCode.UNKNOWN_MODEL, f"unknown model {name!r}")
        return self.root / name
