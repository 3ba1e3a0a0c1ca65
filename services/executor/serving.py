"""The models an executor serves: loaded from the repository, configured in the batcher, warmed up, reported.

No NATS here: the executor calls ``load`` in its start-up hook and on an
operator's command, and puts ``reports()`` into its heartbeats.
"""

from __future__ import annotations

import time

import numpy as np

from din.services.executor.batcher import BatchOutput, DynamicBatcher
from din.services.executor.repository import ModelHandle, ModelRepository
from din.shared.contracts.events import ModelLoadedV1
from din.shared.tensors import DYNAMIC_DIM, WIRE_DTYPES

WARM_UP_RUNS = 20
UNMEASURED_MS_PER_ITEM = 0.2
NO_WINDOW_ROLES = ("autoregressive", "prefill", "tail")
"""Model roles that run without a batching window: token steps (continuous batching) and split tails, whose
requests already waited for a window at their head."""


def warm_up(handle: ModelHandle, runs: int = WARM_UP_RUNS) -> float:
    """Run a one-item batch of zeros a few times; return the mean ms of the warm runs.

    The first heartbeats then carry a measured compute time, so the scheduler prices a new executor
    fairly instead of on a guess, and the first real request does not pay the session's cold start.
    """
    inputs = {
        spec.name: np.zeros([1 if dim == DYNAMIC_DIM else dim for dim in spec.shape], WIRE_DTYPES[spec.datatype])
        for spec in handle.inputs
    }
    handle.run(inputs)
    started = time.perf_counter()
    for _ in range(runs):
        handle.run(inputs)
    return (time.perf_counter() - started) * 1000.0 / runs


class ServedModels:
    """The repository's current handles behind one batcher, with each model's measured compute time."""

    def __init__(self, repository: ModelRepository, batcher: DynamicBatcher) -> None:
        self.repository = repository
        self.batcher = batcher
        self.warm_ms: dict[str, float] = {}

    def run_batch(self, model: str, inputs) -> BatchOutput:
        """The batcher's runner: ``model``'s current version on one batch."""
        handle = self.repository.current(model)
        return BatchOutput(handle.run(inputs), handle.version)

    def configure(self, handle: ModelHandle) -> None:
        """Set ``handle``'s model's batching from its config: its largest batch, and no window for token steps
        and split tails."""
        config = handle.config
        self.batcher.set_max_batch_size(handle.name, config.max_batch_size)
        if config.role in NO_WINDOW_ROLES:
            self.batcher.set_queue_delay(handle.name, 0.0)

    def warm(self, handle: ModelHandle) -> float:
        """Warm ``handle`` up (blocking) and keep its measured ms per item until the batcher measures it."""
        self.warm_ms[handle.name] = warm_up(handle)
        return self.warm_ms[handle.name]

    def report(self, handle: ModelHandle, measured: dict[str, float] | None = None) -> ModelLoadedV1:
        """What a heartbeat (or an operator's load command) says about ``handle``; ``measured``: the batcher's
        recent compute ms per item by model, when already at hand."""
        if measured is None:
            measured = self.batcher.stats().compute_ms_per_item
        return ModelLoadedV1(
            name=handle.name,
            version=handle.version,
            max_batch_size=self.batcher.max_batch_size(handle.name),
            compute_ms_per_item=measured.get(handle.name, self.warm_ms.get(handle.name, UNMEASURED_MS_PER_ITEM)),
            accuracy=handle.accuracy,
        )

    def reports(self, measured: dict[str, float]) -> list[ModelLoadedV1]:
        """Every served model, as a heartbeat lists them."""
        return [self.report(handle, measured) for handle in self.repository.loaded()]
