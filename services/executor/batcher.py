"""Dynamic batching with SLA isolation, independent of any transport.

Callers ``submit`` items (a dict of input arrays whose first dimension is the
batch dimension) for a model, with an SLA class and an optional deadline. The
batcher groups queued items of the same model and input signature into a
batch of at most ``max_batch_size`` rows, runs it in a worker thread, and
hands each item its slice of the outputs.

Isolation between SLA classes:

* A lane holding realtime items is served before lanes without, and
  realtime items do not wait for the batching window (``realtime_queue_delay_ms``).
* Inside a batch, slots go to classes by smooth weighted round robin
  (realtime 8, interactive 4, batch 1 by default) with credit kept across
  batches, so a flood of one class never starves another.
* A model may have its own batching window (``set_queue_delay``): token-by-token
  models use none, so each step runs with whatever steps of other streams are
  queued at that moment (continuous batching) instead of adding the window to
  every token; so do split tails, whose requests waited once at their head.
* Batches of a model whose recent batches took under ``inline_below_ms``
  run on the event loop itself: for tiny models the hand-off to a worker
  thread costs more than the computation.
* Each class may fill only its share of the queue (batch half of it by
  default), so a batch flood leaves room for realtime and interactive work.

Isolation between tenants, inside each SLA class (``shared.fairness``):

* Each class's items are ordered by weighted fair queuing over tenants
  (``tenant_weights``, the topology's ``TenantSpec.weight``), with one clock
  per class shared by all lanes: among ready lanes of the same best class, the
  one whose next item has the smallest finish tag goes first, and inside a
  batch a class's slots go to its tenants in tag order. A tenant flooding the
  queue gets its weighted share; another tenant's item waits for at most
  about two items of each busy tenant (the rest of the round and the next),
  so once its lane is ready it runs in the next batch.
* When the queue is full, an item of a tenant holding less than its share of
  its lane and class pushes out the newest item of the tenant holding most
  (which fails ``OVERLOADED``) instead of being refused.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from din.shared.contracts.inference import SlaClass
from din.shared.errors import DinError, ErrorCode
from din.shared.fairness import FairClock, FairQueue

CLASS_PRIORITY: tuple[SlaClass, ...] = (SlaClass.REALTIME, SlaClass.INTERACTIVE, SlaClass.BATCH)
DEFAULT_CLASS_WEIGHTS: dict[SlaClass, int] = {SlaClass.REALTIME: 8, SlaClass.INTERACTIVE: 4, SlaClass.BATCH: 1}
DEFAULT_QUEUE_SHARES: dict[SlaClass, float] = {
    SlaClass.REALTIME: 1.0,
    SlaClass.INTERACTIVE: 0.8,
    SlaClass.BATCH: 0.5,
}
RECENT_WINDOW = 256
INLINE_WARMUP_BATCHES = 16
MIN_RETRY_AFTER_MS = 10


@dataclass(frozen=True)
class BatchOutput:
    """What a run function may return instead of a plain mapping: outputs plus the model version that ran."""

    outputs: Mapping[str, np.ndarray]
    model_version: str | None = None


RunResult = Mapping[str, np.ndarray] | BatchOutput
RunBatch = Callable[[str, dict[str, np.ndarray]], RunResult | Awaitable[RunResult]]


@dataclass(frozen=True)
class ItemResult:
    """One item's slice of its batch's outputs, and how it was served."""

    outputs: dict[str, np.ndarray]
    model_version: str | None
    batch_size: int
    queue_ms: float
    compute_ms: float

    @property
    def items(self) -> int | None:
        """Rows of the batch that were this item's (its outputs' first dimension)."""
        first = next(iter(self.outputs.values()), None)
        return int(first.shape[0]) if first is not None and first.ndim else None


@dataclass(frozen=True)
class BatcherStats:
    """A snapshot of the batcher's load, for heartbeats and metrics."""

    queue_depth: dict[str, int]
    capacity_by_class: dict[str, int]
    queued: int
    inflight: int
    capacity: int
    draining: bool
    recent_latency_ms: float
    compute_ms_per_item: dict[str, float]
    mean_batch_size: float
    batch_size_histogram: dict[int, int]
    completed: int
    failed: int
    rejected: int
    expired: int


@dataclass(eq=False)
class _Item:
    model: str
    inputs: dict[str, np.ndarray]
    rows: int
    sla_class: SlaClass
    tenant: str
    deadline_ms: float | None
    enqueued: float
    future: asyncio.Future


@dataclass(eq=False)
class _Lane:
    """Queued items of one model that share one input signature, so they can be concatenated."""

    key: tuple
    model: str
    queues: dict[SlaClass, FairQueue[_Item]]
    credits: dict[SlaClass, float] = field(default_factory=lambda: {sla: 0.0 for sla in CLASS_PRIORITY})
    rows: int = 0

    def empty(self) -> bool:
        return not any(self.queues.values())

    def best_class_rank(self) -> int:
        return next(rank for rank, sla in enumerate(CLASS_PRIORITY) if self.queues[sla])

    def oldest(self) -> float:
        return min(queue.oldest().enqueued for queue in self.queues.values() if queue)

    def order(self) -> tuple[int, float]:
        """Where this lane stands among ready lanes: its best class, then that class's next fair finish tag."""
        rank = self.best_class_rank()
        return rank, self.queues[CLASS_PRIORITY[rank]].head_tag()


class DynamicBatcher:
    """Forms batches per model from submitted items and runs them off the event loop.

    ``run_batch(model, inputs)`` computes one batch; it may be a plain
    function (run in a worker thread) or a coroutine function. It returns the
    outputs by name, each with the batch's rows as its first dimension, or a
    ``BatchOutput`` that also names the model version that ran.
    """

    def __init__(
        self,
        run_batch: RunBatch,
        *,
        max_batch_size: int = 64,
        max_queue_delay_ms: float = 2.0,
        realtime_queue_delay_ms: float = 0.0,
        capacity: int = 512,
        concurrency: int = 1,
        inline_below_ms: float = 0.0,
        class_weights: Mapping[SlaClass, int] | None = None,
        queue_shares: Mapping[SlaClass, float] | None = None,
        tenant_weights: Mapping[str, float] | None = None,
        now_ms: Callable[[], float] | None = None,
    ):
        if max_batch_size < 1 or capacity < 1 or concurrency < 1:
            raise ValueError("max_batch_size, capacity and concurrency must be at least 1")
        self._run = run_batch
        self._run_is_async = inspect.iscoroutinefunction(run_batch) or inspect.iscoroutinefunction(
            run_batch.__call__
        )
        self._default_max_batch = max_batch_size
        self._max_batch: dict[str, int] = {}
        self._delay_s = max_queue_delay_ms / 1000.0
        self._model_delay_s: dict[str, float] = {}
        self._realtime_delay_s = min(realtime_queue_delay_ms, max_queue_delay_ms) / 1000.0
        self._max_delay_ms = max_queue_delay_ms
        self._capacity = capacity
        self._concurrency = concurrency
        self._inline_below_ms = inline_below_ms
        self._weights = dict(class_weights or DEFAULT_CLASS_WEIGHTS)
        shares = dict(queue_shares or DEFAULT_QUEUE_SHARES)
        self._class_limit = {sla: max(1, int(capacity * shares.get(sla, 1.0))) for sla in CLASS_PRIORITY}
        self._now_ms = now_ms or (lambda: time.time() * 1000.0)
        self._clocks = {sla: FairClock(tenant_weights) for sla in CLASS_PRIORITY}

        self._lanes: dict[tuple, _Lane] = {}
        self._depth: Counter[SlaClass] = Counter()
        self._queued = 0
        self._inflight = 0
        self._busy = 0
        self._draining = False
        self._wakeup: asyncio.Event | None = None
        self._dispatcher: asyncio.Task | None = None
        self._batch_tasks: set[asyncio.Task] = set()
        self._pool: ThreadPoolExecutor | None = None

        self._latencies_ms: deque[float] = deque(maxlen=RECENT_WINDOW)
        self._compute: dict[str, deque[tuple[float, int]]] = {}
        self._histogram: Counter[int] = Counter()
        self._completed = 0
        self._failed = 0
        self._rejected = 0
        self._expired = 0

    def set_queue_delay(self, model: str, delay_ms: float) -> None:
        """The batching window of ``model``, instead of ``max_queue_delay_ms``."""
        if delay_ms < 0:
            raise ValueError("a queue delay cannot be negative")
        self._model_delay_s[model] = delay_ms / 1000.0

    def set_max_batch_size(self, model: str, max_batch_size: int) -> None:
        """Largest batch, in rows, formed for ``model``."""
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self._max_batch[model] = max_batch_size

    def max_batch_size(self, model: str) -> int:
        """Largest batch, in rows, formed for ``model``."""
        return self._max_batch.get(model, self._default_max_batch)

    @property
    def draining(self) -> bool:
        """True once ``drain`` was called: no new items are accepted."""
        return self._draining

    def start(self) -> None:
        """Start the dispatcher on the running event loop; ``submit`` does it on first use."""
        if self._dispatcher is not None:
            return
        self._wakeup = asyncio.Event()
        self._pool = ThreadPoolExecutor(max_workers=self._concurrency, thread_name_prefix="din-batch")
        self._dispatcher = asyncio.get_running_loop().create_task(self._dispatch_loop(), name="din-batcher")

    async def submit(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        *,
        sla_class: SlaClass | str = SlaClass.INTERACTIVE,
        deadline_ms: float | None = None,
        tenant: str = "",
    ) -> ItemResult:
        """Queue one item and wait for its result; see ``submit_nowait`` for the refusals."""
        return await self.submit_nowait(model, inputs, sla_class=sla_class, deadline_ms=deadline_ms, tenant=tenant)

    def submit_nowait(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        *,
        sla_class: SlaClass | str = SlaClass.INTERACTIVE,
        deadline_ms: float | None = None,
        tenant: str = "",
    ) -> asyncio.Future[ItemResult]:
        """Queue one item of ``tenant`` and return the future of its result.

        Raises ``OVERLOADED`` (with ``retry_after_ms``) when draining or when
        the item's class has used its share of the queue and no tenant of its
        lane and class holds more than its share to make room, ``DEADLINE_EXCEEDED``
        when ``deadline_ms`` (epoch ms) has already passed, and ``BAD_TENSOR``
        when the inputs have no common batch dimension. The future fails with
        ``DEADLINE_EXCEEDED`` if the deadline passes before compute starts,
        with ``OVERLOADED`` if it was pushed out for a tenant below its share,
        and with ``INFERENCE_FAILED`` if the batch it ran in failed.
        """
        sla = SlaClass(sla_class)
        if self._draining:
            self._rejected += 1
            raise DinError(ErrorCode.OVERLOADED, "executor is draining", retry_after_ms=self._retry_after_ms())
        if deadline_ms is not None and deadline_ms <= self._now_ms():
            self._expired += 1
            raise DinError(ErrorCode.DEADLINE_EXCEEDED, "deadline passed before the request was queued")
        rows, signature = _describe(inputs)
        key = (model, signature)
        limit = self._class_limit[sla]
        if self._queued >= limit and not self._push_out(key, sla, tenant, rows):
            self._rejected += 1
            raise DinError(
                ErrorCode.OVERLOADED,
                f"queue full for {sla.value} requests ({self._queued} queued, limit {limit})",
                retry_after_ms=self._retry_after_ms(),
            )
        self.start()
        loop = asyncio.get_running_loop()
        item = _Item(
            model=model,
            inputs=dict(inputs),
            rows=rows,
            sla_class=sla,
            tenant=tenant,
            deadline_ms=deadline_ms,
            enqueued=time.perf_counter(),
            future=loop.create_future(),
        )
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = _Lane(key, model, {sla: FairQueue(self._clocks[sla]) for sla in CLASS_PRIORITY})
        lane.queues[sla].push(tenant, item, rows)
        lane.rows += rows
        self._queued += 1
        self._depth[sla] += 1
        self._wakeup.set()
        return item.future

    def _push_out(self, key: tuple, sla: SlaClass, tenant: str, rows: int) -> bool:
        """Make room for an item of ``tenant`` by failing the newest item of the tenant holding most of its lane
        and class, if that tenant holds more than its share; True when room was made."""
        lane = self._lanes.get(key)
        victim = lane.queues[sla].evict_for(tenant, rows) if lane is not None else None
        if victim is None:
            return False
        self._left(lane, victim)
        self._rejected += 1
        if not victim.future.done():
            victim.future.set_exception(DinError(
                ErrorCode.OVERLOADED, f"queue full: pushed out for a tenant below its share of {sla.value} work",
                retry_after_ms=self._retry_after_ms()))
        return True

    def stats(self) -> BatcherStats:
        """Current queue depths, inflight count and recent performance."""
        batches = sum(self._histogram.values())
        rows = sum(size * count for size, count in self._histogram.items())
        return BatcherStats(
            queue_depth={sla.value: self._depth[sla] for sla in CLASS_PRIORITY},
            capacity_by_class={sla.value: limit for sla, limit in self._class_limit.items()},
            queued=self._queued,
            inflight=self._inflight,
            capacity=self._capacity,
            draining=self._draining,
            recent_latency_ms=_mean(self._latencies_ms),
            compute_ms_per_item={model: self._compute_ms_per_item(model) for model in self._compute},
            mean_batch_size=rows / batches if batches else 0.0,
            batch_size_histogram=dict(sorted(self._histogram.items())),
            completed=self._completed,
            failed=self._failed,
            rejected=self._rejected,
            expired=self._expired,
        )

    async def drain(self) -> None:
        """Stop accepting items, run everything already queued, and stop the dispatcher."""
        self._draining = True
        if self._dispatcher is None:
            return
        self._wakeup.set()
        await self._dispatcher
        if self._batch_tasks:
            await asyncio.gather(*self._batch_tasks, return_exceptions=True)
        self._pool.shutdown(wait=False)

    async def _dispatch_loop(self) -> None:
        try:
            while True:
                self._wakeup.clear()
                next_ready = None
                while self._busy < self._concurrency:
                    lane, next_ready = self._pick_lane(time.perf_counter())
                    if lane is None:
                        break
                    items = self._take_batch(lane)
                    if lane.empty():
                        del self._lanes[lane.key]
                    if items:
                        self._launch(lane.model, items)
                if self._draining and not self._lanes and self._busy == 0:
                    return
                timeout = None
                if next_ready is not None and self._busy < self._concurrency:
                    timeout = max(0.0, next_ready - time.perf_counter())
                try:
                    await asyncio.wait_for(self._wakeup.wait(), timeout)
                except TimeoutError:
                    pass
        except asyncio.CancelledError:
            self._fail_queued(
                DinError(ErrorCode.OVERLOADED, "executor stopped before running the request", retry_after_ms=0)
            )
            raise
        except Exception:
            self._fail_queued(DinError(ErrorCode.INTERNAL, "batcher stopped unexpectedly"))
            raise

    def _pick_lane(self, now: float) -> tuple[_Lane | None, float | None]:
        """The ready lane to serve next, else the loop time at which the first lane becomes ready."""
        best: _Lane | None = None
        best_key: tuple[int, float] | None = None
        next_ready: float | None = None
        for lane in self._lanes.values():
            ready_at = self._ready_at(lane)
            if ready_at > now:
                next_ready = ready_at if next_ready is None else min(next_ready, ready_at)
                continue
            key = lane.order()
            if best_key is None or key < best_key:
                best, best_key = lane, key
        return best, next_ready

    def _ready_at(self, lane: _Lane) -> float:
        if self._draining or lane.rows >= self.max_batch_size(lane.model):
            return float("-inf")
        ready_at = lane.oldest() + self._model_delay_s.get(lane.model, self._delay_s)
        realtime = lane.queues[SlaClass.REALTIME]
        if realtime:
            ready_at = min(ready_at, realtime.oldest().enqueued + self._realtime_delay_s)
        return ready_at

    def _take_batch(self, lane: _Lane) -> list[_Item]:
        """Pick items for one batch by smooth weighted round robin over the lane's classes."""
        max_rows = self.max_batch_size(lane.model)
        now_ms = self._now_ms()
        taken: list[_Item] = []
        rows = 0
        while rows < max_rows:
            for sla in CLASS_PRIORITY:
                self._drop_stale_heads(lane, sla, now_ms)
            present = [sla for sla in CLASS_PRIORITY if lane.queues[sla]]
            if not present:
                break
            total = sum(self._weights[sla] for sla in present)
            for sla in present:
                lane.credits[sla] += self._weights[sla]
            chosen = max(present, key=lambda sla: lane.credits[sla])
            head = lane.queues[chosen].peek()
            if taken and rows + head.rows > max_rows:
                for sla in present:
                    lane.credits[sla] -= self._weights[sla]
                break
            lane.credits[chosen] -= total
            self._dequeue(lane, chosen)
            taken.append(head)
            rows += head.rows
        for sla in CLASS_PRIORITY:
            if not lane.queues[sla]:
                lane.credits[sla] = 0.0
        taken.sort(key=lambda item: CLASS_PRIORITY.index(item.sla_class))
        return taken

    def _drop_stale_heads(self, lane: _Lane, sla: SlaClass, now_ms: float) -> None:
        queue = lane.queues[sla]
        while queue:
            head = queue.peek()
            if head.future.done():
                self._left(lane, queue.drop())
            elif head.deadline_ms is not None and head.deadline_ms <= now_ms:
                self._left(lane, queue.drop())
                self._expired += 1
                head.future.set_exception(
                    DinError(ErrorCode.DEADLINE_EXCEEDED, "deadline passed while the request was queued")
                )
            else:
                return

    def _dequeue(self, lane: _Lane, sla: SlaClass) -> _Item:
        return self._left(lane, lane.queues[sla].pop())

    def _left(self, lane: _Lane, item: _Item) -> _Item:
        """Account for ``item`` having left ``lane``'s queues."""
        lane.rows -= item.rows
        self._queued -= 1
        self._depth[item.sla_class] -= 1
        return item

    def _launch(self, model: str, items: list[_Item]) -> None:
        self._busy += 1
        self._inflight += len(items)
        task = asyncio.get_running_loop().create_task(self._run_batch(model, items))
        self._batch_tasks.add(task)
        task.add_done_callback(self._batch_tasks.discard)

    async def _run_batch(self, model: str, items: list[_Item]) -> None:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        rows = sum(item.rows for item in items)
        try:
            inputs = _concatenate(items)
            if self._run_is_async:
                produced = await self._run(model, inputs)
            elif self._runs_inline(model):
                produced = self._run(model, inputs)
            else:
                produced = await loop.run_in_executor(self._pool, self._run, model, inputs)
                if inspect.isawaitable(produced):
                    produced = await produced
            outputs, version = _unpack(produced, rows)
        except DinError as error:
            self._fail(items, error)
        except Exception as exc:
            self._fail(
                items, DinError(ErrorCode.INFERENCE_FAILED, f"batch of {rows} for {model!r} failed: {exc}")
            )
        else:
            finished = time.perf_counter()
            compute_ms = (finished - started) * 1000.0
            self._histogram[rows] += 1
            self._compute.setdefault(model, deque(maxlen=RECENT_WINDOW)).append((compute_ms, rows))
            offset = 0
            for item in items:
                share = {name: array[offset : offset + item.rows] for name, array in outputs.items()}
                offset += item.rows
                self._completed += 1
                self._latencies_ms.append((finished - item.enqueued) * 1000.0)
                if not item.future.done():
                    item.future.set_result(
                        ItemResult(
                            outputs=share,
                            model_version=version,
                            batch_size=rows,
                            queue_ms=(started - item.enqueued) * 1000.0,
                            compute_ms=compute_ms,
                        )
                    )
        finally:
            self._inflight -= len(items)
            self._busy -= 1
            self._wakeup.set()

    def _fail(self, items: list[_Item], error: DinError) -> None:
        for item in items:
            self._failed += 1
            if not item.future.done():
                item.future.set_exception(error)

    def _fail_queued(self, error: DinError) -> None:
        for lane in list(self._lanes.values()):
            for sla in CLASS_PRIORITY:
                while lane.queues[sla]:
                    self._fail([self._left(lane, lane.queues[sla].drop())], error)
        self._lanes.clear()

    def _runs_inline(self, model: str) -> bool:
        """Batches this fast cost less on the event loop than the hand-off to a worker thread."""
        window = self._compute.get(model)
        if not window or len(window) < INLINE_WARMUP_BATCHES:
            return False
        return sum(ms for ms, _ in window) / len(window) < self._inline_below_ms

    def _compute_ms_per_item(self, model: str) -> float:
        window = self._compute.get(model)
        if not window:
            return 0.0
        rows = sum(count for _, count in window)
        return sum(ms for ms, _ in window) / rows if rows else 0.0

    def _retry_after_ms(self) -> int:
        per_item = [self._compute_ms_per_item(model) for model in self._compute]
        per_item_ms = _mean(per_item) if per_item else 1.0
        estimate = self._queued * per_item_ms / self._concurrency + self._max_delay_ms
        return max(MIN_RETRY_AFTER_MS, int(estimate))


def _describe(inputs: Mapping[str, np.ndarray]) -> tuple[int, tuple]:
    """Rows of an item and the signature items must share to be batched together."""
    if not inputs:
        raise DinError(ErrorCode.BAD_TENSOR, "an item needs at least one input")
    rows = None
    signature = []
    for name in sorted(inputs):
        array = inputs[name]
        if array.ndim == 0:
            raise DinError(ErrorCode.BAD_TENSOR, f"input {name!r} needs a batch dimension")
        if rows is None:
            rows = array.shape[0]
        elif array.shape[0] != rows:
            raise DinError(ErrorCode.BAD_TENSOR, "inputs disagree on the batch size")
        signature.append((name, array.dtype.str, array.shape[1:]))
    if rows == 0:
        raise DinError(ErrorCode.BAD_TENSOR, "an item needs at least one row")
    return rows, tuple(signature)


def _concatenate(items: list[_Item]) -> dict[str, np.ndarray]:
    if len(items) == 1:
        return dict(items[0].inputs)
    return {name: np.concatenate([item.inputs[name] for item in items]) for name in items[0].inputs}


def _unpack(produced: RunResult, rows: int) -> tuple[dict[str, np.ndarray], str | None]:
    if isinstance(produced, BatchOutput):
        outputs, version = dict(produced.outputs), produced.model_version
    else:
        outputs, version = dict(produced), None
    for name, array in outputs.items():
        if np.ndim(array) == 0 or len(array) != rows:
            raise DinError(
                ErrorCode.INFERENCE_FAILED,
                f"output {name!r} has shape {list(np.shape(array))}, expected {rows} rows",
            )
    return outputs, version


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0
