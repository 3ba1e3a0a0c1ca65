"""The dynamic batcher: batch formation, SLA isolation, overload, deadlines, failures and drain.

Tests hold the first batch at a gate so that everything submitted meanwhile
queues up; what happens after the gate opens is then fully determined by the
batcher's rules, not by timing.
"""

import asyncio
import threading

import numpy as np
import pytest

from din.services.executor.batcher import BatchOutput, DynamicBatcher
from din.shared.contracts.inference import SlaClass
from din.shared.errors import DinError, ErrorCode


class GatedRunner:
    """A run function that holds batches until ``gate`` opens and records each batch's item ids."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.started = asyncio.Event()
        self.batches: list[tuple[str, list[int]]] = []

    async def run(self, model: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.started.set()
        await self.gate.wait()
        ids = inputs["x"][:, 0].astype(int).tolist()
        self.batches.append((model, ids))
        if any(i < 0 for i in ids):
            raise ValueError("poisoned batch")
        return {"double": inputs["x"] * 2, "rowsum": inputs["x"].sum(axis=1)}


def item(identifier: int, rows: int = 1) -> dict[str, np.ndarray]:
    return {"x": np.full((rows, 3), identifier, dtype=np.float32)}


async def hold_first_batch(batcher: DynamicBatcher, runner: GatedRunner, model: str = "m") -> asyncio.Future:
    """Submit item 0 and wait until its batch is running (and blocked at the gate)."""
    first = batcher.submit_nowait(model, item(0), sla_class=SlaClass.REALTIME)
    await asyncio.wait_for(runner.started.wait(), 5)
    return first


async def test_batches_fill_up_to_max_size_and_results_go_back_to_their_items():
    runner = GatedRunner()
    batcher = DynamicBatcher(runner.run, max_batch_size=8, capacity=100)
    first = await hold_first_batch(batcher, runner)
    futures = [batcher.submit_nowait("m", item(i), sla_class=SlaClass.INTERACTIVE) for i in range(1, 21)]
    runner.gate.set()
    results = await asyncio.gather(first, *futures)

    assert [len(ids) for _, ids in runner.batches] == [1, 8, 8, 4]
    assert sorted(i for _, ids in runner.batches for i in ids) == list(range(21))
    for identifier, result in enumerate(results):
        np.testing.assert_array_equal(result.outputs["double"], np.full((1, 3), 2 * identifier, np.float32))
        np.testing.assert_array_equal(result.outputs["rowsum"], [3 * identifier])
    assert [r.batch_size for r in results[1:9]] == [8] * 8
    stats = batcher.stats()
    assert stats.batch_size_histogram == {1: 1, 4: 1, 8: 2}
    assert stats.mean_batch_size == pytest.approx(21 / 4)
    assert stats.completed == 21 and stats.queued == 0 and stats.inflight == 0
    assert set(stats.compute_ms_per_item) == {"m"}
    await batcher.drain()


async def test_a_model_without_a_batching_window_runs_what_is_queued_at_once():
    runner = GatedRunner()
    runner.gate.set()
    batcher = DynamicBatcher(runner.run, max_batch_size=8, max_queue_delay_ms=60_000, capacity=100)
    batcher.set_queue_delay("tok", 0.0)
    steps = await asyncio.wait_for(asyncio.gather(*(batcher.submit_nowait("tok", item(i)) for i in range(3))), 5)
    assert runner.batches == [("tok", [0, 1, 2])], "steps queued together still batch together"
    assert [r.batch_size for r in steps] == [3, 3, 3]
    windowed = batcher.submit_nowait("m", item(9))
    await asyncio.sleep(0.05)
    assert not windowed.done(), "other models still wait for their window"
    with pytest.raises(ValueError):
        batcher.set_queue_delay("tok", -1.0)
    await batcher.drain()
    assert windowed.done()


async def test_multi_row_items_are_never_split_across_batches():
    runner = GatedRunner()
    batcher = DynamicBatcher(runner.run, max_batch_size=8, capacity=100)
    first = await hold_first_batch(batcher, runner)
    futures = [batcher.submit_nowait("m", item(i, rows=3)) for i in (1, 2, 3)]
    oversized = batcher.submit_nowait("m", item(4, rows=12))
    runner.gate.set()
    await first
    results = await asyncio.gather(*futures, oversized)

    assert [ids for _, ids in runner.batches[1:]] == [[1, 1, 1, 2, 2, 2], [3, 3, 3], [4] * 12]
    for identifier, result in zip((1, 2, 3, 4), results):
        assert np.all(result.outputs["double"] == 2 * identifier)
    assert results[0].outputs["double"].shape == (3, 3)
    await batcher.drain()


async def test_items_with_different_signatures_or_models_are_not_mixed():
    runner = GatedRunner()
    batcher = DynamicBatcher(runner.run, max_batch_size=8, capacity=100)
    first = await hold_first_batch(batcher, runner)
    wide = batcher.submit_nowait("m", {"x": np.full((1, 5), 1, np.float32)})
    narrow = batcher.submit_nowait("m", item(2))
    other_model = batcher.submit_nowait("n", item(3))
    runner.gate.set()
    await asyncio.gather(first, wide, narrow, other_model)
    assert sorted(runner.batches[1:]) == [("m", [1]), ("m", [2]), ("n", [3])]
    await batcher.drain()


async def test_realtime_goes_first_through_a_batch_flood():
    runner = GatedRunner()
    batcher = DynamicBatcher(runner.run, max_batch_size=8, capacity=200)
    first = await hold_first_batch(batcher, runner)
    flood = [batcher.submit_nowait("m", item(i), sla_class=SlaClass.BATCH) for i in range(1, 61)]
    realtime = [batcher.submit_nowait("m", item(i), sla_class=SlaClass.REALTIME) for i in (101, 102, 103)]
    runner.gate.set()
    await asyncio.gather(first, *flood, *realtime)

    first_after_gate = runner.batches[1][1]
    assert first_after_gate[:3] == [101, 102, 103]
    assert all(i < 100 for _, ids in runner.batches[2:] for i in ids)
    assert all(r.result().batch_size == 8 for r in realtime)
    await batcher.drain()


async def test_a_realtime_lane_is_served_before_a_full_batch_lane_of_another_model():
    runner = GatedRunner()
    batcher = DynamicBatcher(runner.run, max_batch_size=4, capacity=100)
    first = await hold_first_batch(batcher, runner)
    flood = [batcher.submit_nowait("bulk", item(i), sla_class=SlaClass.BATCH) for i in range(1, 9)]
    urgent = batcher.submit_nowait("fast", item(50), sla_class=SlaClass.REALTIME)
    runner.gate.set()
    await asyncio.gather(first, *flood, urgent)
    assert runner.batches[1] == ("fast", [50])
    await batcher.drain()


async def test_weighted_fairness_keeps_batch_work_moving_under_a_realtime_flood():
    runner = GatedRunner()
    batcher = DynamicBatcher(runner.run, max_batch_size=8, capacity=200)
    first = await hold_first_batch(batcher, runner)
    realtime = [batcher.submit_nowait("m", item(i), sla_class=SlaClass.REALTIME) for i in range(1, 81)]
    background = [batcher.submit_nowait("m", item(i), sla_class=SlaClass.BATCH) for i in range(201, 205)]
    runner.gate.set()
    await asyncio.gather(first, *realtime, *background)

    after_gate = [ids for _, ids in runner.batches[1:]]
    batch_slots = [sum(1 for i in ids if i > 200) for ids in after_gate]
    assert batch_slots[:4] == [1, 1, 1, 1]
    assert sum(len(ids) - slots for ids, slots in zip(after_gate[:4], batch_slots)) == 28
    await batcher.drain()


async def test_queue_bound_refuses_with_overloaded_and_keeps_headroom_for_realtime():
    runner = GatedRunner()
    batcher = DynamicBatcher(runner.run, max_batch_size=8, capacity=4)
    first = await hold_first_batch(batcher, runner)
    accepted = [batcher.submit_nowait("m", item(i), sla_class=SlaClass.BATCH) for i in (1, 2)]
    with pytest.raises(DinError) as excinfo:
        batcher.submit_nowait("m", item(3), sla_class=SlaClass.BATCH)
    assert excinfo.value.code is ErrorCode.OVERLOADED
    assert excinfo.value.retriable and excinfo.value.retry_after_ms > 0

    accepted += [batcher.submit_nowait("m", item(i), sla_class=SlaClass.REALTIME) for i in (4, 5)]
    with pytest.raises(DinError) as excinfo:
        batcher.submit_nowait("m", item(6), sla_class=SlaClass.REALTIME)
    assert excinfo.value.code is ErrorCode.OVERLOADED

    stats = batcher.stats()
    assert stats.queue_depth == {"realtime": 2, "interactive": 0, "batch": 2}
    assert stats.inflight == 1 and stats.rejected == 2
    runner.gate.set()
    await asyncio.gather(first, *accepted)
    await batcher.drain()


async def test_items_past_their_deadline_fail_before_compute():
    clock = [1_000_000.0]
    runner = GatedRunner()
    batcher = DynamicBatcher(runner.run, max_batch_size=8, capacity=100, now_ms=lambda: clock[0])
    first = await hold_first_batch(batcher, runner)
    late = batcher.submit_nowait("m", item(1), sla_class=SlaClass.REALTIME, deadline_ms=clock[0] + 100)
    patient = batcher.submit_nowait("m", item(2), sla_class=SlaClass.REALTIME, deadline_ms=clock[0] + 5000)
    unbounded = batcher.submit_nowait("m", item(3))
    clock[0] += 1000
    with pytest.raises(DinError) as excinfo:
        batcher.submit_nowait("m", item(4), deadline_ms=clock[0] - 1)
    assert excinfo.value.code is ErrorCode.DEADLINE_EXCEEDED

    runner.gate.set()
    await first
    with pytest.raises(DinError) as excinfo:
        await late
    assert excinfo.value.code is ErrorCode.DEADLINE_EXCEEDED
    assert (await patient).outputs["double"][0, 0] == 4
    assert (await unbounded).outputs["double"][0, 0] == 6
    assert all(1 not in ids for _, ids in runner.batches)
    assert batcher.stats().expired == 2
    await batcher.drain()


async def test_a_failing_batch_fails_only_its_own_items():
    runner = GatedRunner()
    batcher = DynamicBatcher(runner.run, max_batch_size=2, capacity=100)
    first = await hold_first_batch(batcher, runner)
    poisoned = [batcher.submit_nowait("m", item(i)) for i in (-1, 1)]
    healthy = [batcher.submit_nowait("m", item(i)) for i in (2, 3)]
    runner.gate.set()
    await first
    for future in poisoned:
        with pytest.raises(DinError) as excinfo:
            await future
        assert excinfo.value.code is ErrorCode.INFERENCE_FAILED
    assert [(await f).outputs["double"][0, 0] for f in healthy] == [4, 6]
    assert batcher.stats().failed == 2
    await batcher.drain()


async def test_din_errors_from_the_run_function_keep_their_code():
    async def unknown(model, inputs):
        raise DinError(ErrorCode.UNKNOWN_MODEL, "unloaded")

    batcher = DynamicBatcher(unknown, max_queue_delay_ms=0)
    with pytest.raises(DinError) as excinfo:
        await batcher.submit("m", item(1))
    assert excinfo.value.code is ErrorCode.UNKNOWN_MODEL
    await batcher.drain()


async def test_wrong_output_length_fails_the_batch():
    batcher = DynamicBatcher(lambda model, inputs: {"y": np.zeros(5)}, max_queue_delay_ms=0)
    with pytest.raises(DinError) as excinfo:
        await batcher.submit("m", item(1, rows=2))
    assert excinfo.value.code is ErrorCode.INFERENCE_FAILED
    await batcher.drain()


async def test_plain_functions_run_in_a_worker_thread_and_may_report_the_version():
    threads: list[threading.Thread] = []

    def run(model, inputs):
        threads.append(threading.current_thread())
        return BatchOutput({"y": inputs["x"] + 1}, model_version="7")

    batcher = DynamicBatcher(run, max_queue_delay_ms=0)
    result = await batcher.submit("m", item(4, rows=2), sla_class="realtime")
    np.testing.assert_array_equal(result.outputs["y"], np.full((2, 3), 5, np.float32))
    assert result.model_version == "7" and result.batch_size == 2
    assert threads and threads[0] is not threading.main_thread()
    await batcher.drain()


async def test_inputs_without_a_common_batch_dimension_are_refused():
    batcher = DynamicBatcher(lambda model, inputs: inputs)
    for bad in ({}, {"x": np.float32(1)}, {"a": np.zeros((2, 1)), "b": np.zeros((3, 1))}):
        with pytest.raises(DinError) as excinfo:
            batcher.submit_nowait("m", bad)
        assert excinfo.value.code is ErrorCode.BAD_TENSOR


async def test_cancelled_items_are_skipped():
    runner = GatedRunner()
    batcher = DynamicBatcher(runner.run, max_batch_size=8, capacity=100)
    first = await hold_first_batch(batcher, runner)
    abandoned = batcher.submit_nowait("m", item(1))
    kept = batcher.submit_nowait("m", item(2))
    abandoned.cancel()
    runner.gate.set()
    await asyncio.gather(first, kept)
    assert runner.batches[1] == ("m", [2])
    await batcher.drain()


async def test_drain_refuses_new_items_and_finishes_queued_ones():
    runner = GatedRunner()
    batcher = DynamicBatcher(runner.run, max_batch_size=4, max_queue_delay_ms=10_000, capacity=100)
    first = await hold_first_batch(batcher, runner)
    queued = [batcher.submit_nowait("m", item(i)) for i in range(1, 7)]
    draining = asyncio.create_task(batcher.drain())
    await asyncio.sleep(0)
    assert batcher.draining
    with pytest.raises(DinError) as excinfo:
        batcher.submit_nowait("m", item(99))
    assert excinfo.value.code is ErrorCode.OVERLOADED
    assert not draining.done()

    runner.gate.set()
    await asyncio.wait_for(draining, 5)
    assert first.done() and all(f.done() and f.exception() is None for f in queued)
    stats = batcher.stats()
    assert stats.queued == 0 and stats.inflight == 0 and stats.draining and stats.completed == 7


async def test_tiny_batches_run_on_the_event_loop_once_measured_fast():
    threads = []

    def run(model, inputs):
        threads.append(threading.current_thread() is threading.main_thread())
        return {"y": inputs["x"] * 2}

    batcher = DynamicBatcher(run, max_queue_delay_ms=0.0, inline_below_ms=1000.0)
    for _ in range(40):
        await batcher.submit("m", {"x": np.ones((1, 2), np.float32)}, sla_class="realtime")
    await batcher.drain()
    assert threads[0] is False and threads[-1] is True

    slow = DynamicBatcher(run, max_queue_delay_ms=0.0, inline_below_ms=0.0)
    threads.clear()
    for _ in range(40):
        await slow.submit("m", {"x": np.ones((1, 2), np.float32)}, sla_class="realtime")
    await slow.drain()
    assert not any(threads)


async def test_a_tenant_flooding_the_queue_does_not_hold_back_another_tenants_items():
    runner = GatedRunner()
    batcher = DynamicBatcher(runner.run, max_batch_size=8, capacity=200)
    first = await hold_first_batch(batcher, runner)
    flood = [batcher.submit_nowait("m", item(i), tenant="globex") for i in range(1, 61)]
    light = [batcher.submit_nowait("m", item(i), tenant="acme") for i in (101, 102, 103)]
    runner.gate.set()
    await asyncio.gather(first, *flood, *light)

    first_after_gate = runner.batches[1][1]
    assert [i for i in first_after_gate if i > 100] == [101, 102, 103], "acme's items in arrival order, at once"
    assert len(first_after_gate) == 8
    await batcher.drain()


async def test_fairness_holds_across_lanes_of_different_models():
    """Without a batching window every lane is ready at once, so the order is the fair order alone."""
    runner = GatedRunner()
    batcher = DynamicBatcher(runner.run, max_batch_size=8, max_queue_delay_ms=0.0, capacity=200)
    first = await hold_first_batch(batcher, runner)
    flood = [batcher.submit_nowait("bulk", item(i), tenant="globex") for i in range(1, 61)]
    light = batcher.submit_nowait("fast", item(101), tenant="acme")
    runner.gate.set()
    await asyncio.gather(first, *flood, light)

    served = [model for model, _ in runner.batches[1:]]
    assert served.index("fast") <= 1, f"acme's lane waited behind globex's: {served}"
    await batcher.drain()


async def test_tenants_share_a_flooded_class_by_weight():
    runner = GatedRunner()
    batcher = DynamicBatcher(runner.run, max_batch_size=8, capacity=200, tenant_weights={"acme": 3.0})
    first = await hold_first_batch(batcher, runner)
    futures = [batcher.submit_nowait("m", item(i), tenant="globex") for i in range(1, 41)]
    futures += [batcher.submit_nowait("m", item(i), tenant="acme") for i in range(101, 141)]
    runner.gate.set()
    await asyncio.gather(first, *futures)

    first_four = [i for _, ids in runner.batches[1:5] for i in ids]
    assert sum(i > 100 for i in first_four) == 24 and sum(i < 100 for i in first_four) == 8
    await batcher.drain()


async def test_sla_classes_still_go_first_whatever_the_tenant():
    runner = GatedRunner()
    batcher = DynamicBatcher(runner.run, max_batch_size=8, capacity=200)
    first = await hold_first_batch(batcher, runner)
    background = [batcher.submit_nowait("m", item(i), sla_class=SlaClass.BATCH, tenant="acme")
                  for i in range(1, 11)]
    realtime = [batcher.submit_nowait("m", item(i), sla_class=SlaClass.REALTIME, tenant="globex")
                for i in range(101, 121)]
    runner.gate.set()
    await asyncio.gather(first, *background, *realtime)

    first_after_gate = runner.batches[1][1]
    assert first_after_gate[:7] == list(range(101, 108)) and sum(i < 100 for i in first_after_gate) == 1
    await batcher.drain()


async def test_a_full_queue_pushes_out_the_flooding_tenants_newest_item_for_a_tenant_below_its_share():
    runner = GatedRunner()
    batcher = DynamicBatcher(runner.run, max_batch_size=8, capacity=10)
    first = await hold_first_batch(batcher, runner)
    flood = [batcher.submit_nowait("m", item(i), tenant="globex") for i in range(1, 9)]
    with pytest.raises(DinError) as excinfo:
        batcher.submit_nowait("m", item(9), tenant="globex")
    assert excinfo.value.code is ErrorCode.OVERLOADED

    light = [batcher.submit_nowait("m", item(i), tenant="acme") for i in (101, 102, 103, 104)]
    with pytest.raises(DinError) as excinfo:
        batcher.submit_nowait("m", item(105), tenant="acme")
    assert excinfo.value.code is ErrorCode.OVERLOADED, "acme holds half the queue: no more room to take"
    pushed_out = [f for f in flood if f.done()]
    assert len(pushed_out) == 4 and flood[4:] == pushed_out
    for future in pushed_out:
        assert future.exception().code is ErrorCode.OVERLOADED and future.exception().retry_after_ms > 0
    assert batcher.stats().queue_depth["interactive"] == 8 and batcher.stats().rejected == 6

    runner.gate.set()
    await asyncio.gather(first, *flood[:4], *light)
    assert sorted(i for _, ids in runner.batches[1:] for i in ids) == [1, 2, 3, 4, 101, 102, 103, 104]
    await batcher.drain()
