"""Placement over the indexed registry: bounded work, the same choice as a scan of every executor, an index
that stays current."""

import random

import pytest

from din.bench.placement import scan_all_reference
from din.services.scheduler.links import LinkTable
from din.services.scheduler.placement import (
    MAX_ALTERNATIVES,
    NEAR_TIE,
    NEAR_TIE_MS,
    PER_POOL,
    SAMPLE_PER_POOL,
    Placement,
    pick_executor,
)
from din.services.scheduler.registry import CLASSES, ExecutorPool, ExecutorRegistry
from din.shared.contracts.events import HeartbeatV1, ModelLoadedV1
from din.shared.contracts.inference import SlaClass
from din.shared.contracts.job import JobV1, WorkloadClassV1
from din.shared.errors import DinError
from din.shared.topology import Topology

NOW_MS = 1_000_000.0
SITES = ("cloud", "factory", "branch")
TOPOLOGY = Topology.model_validate({
    "name": "t",
    "sites": [{"name": "cloud", "role": "hub", "cost_per_1k": 1.0},
              {"name": "factory", "role": "edge", "cost_per_1k": 0.1},
              {"name": "branch", "role": "edge", "cost_per_1k": 0.3}],
    "links": [{"between": ["cloud", "factory"], "path": "dedicated"},
              {"between": ["cloud", "branch"], "path": "internet"}],
    "tenants": [{"name": "acme"}, {"name": "cheap", "max_cost_per_1k": 0.5}],
})
COST_LIMITS = {"acme": None, "cheap": 0.5}


def links() -> LinkTable:
    table = LinkTable(TOPOLOGY, home="cloud")
    table.observe_rtt("factory", 2.0)
    table.observe_rtt("branch", 6.0)
    return table


def beat(executor, site, models=("m",), *, queue=None, inflight=0, capacity=100, per_item=1.0, draining=False,
         version="1"):
    return HeartbeatV1(
        executor=executor, site=site,
        models=[ModelLoadedV1(name=m, version=version, max_batch_size=8, compute_ms_per_item=per_item)
                for m in models],
        capacity=capacity, queue_depth=queue or {}, inflight=inflight, recent_latency_ms=1.0, draining=draining,
        interval_s=0.5, sent_ms=NOW_MS,
    )


def job(model="m", *, tenant="acme", sla=SlaClass.INTERACTIVE, budget_ms=1000.0, candidates=None, allowed=None,
        avoid=()):
    return JobV1(
        request_id="r1", tenant=tenant, model=model, sla_class=sla, deadline_ms=int(NOW_MS + budget_ms),
        reply_to="_INBOX.x", content_type="application/json", received_ms=NOW_MS, avoid=list(avoid),
        workload=WorkloadClassV1(task="t", sla_class=sla, input_bytes=300, size_class="small",
                                 sensitive=allowed is not None, allowed_sites=allowed,
                                 candidates=candidates or [model]),
    )


def random_fleet(rng: random.Random, size: int, *, skewed: bool) -> list[HeartbeatV1]:
    """Executors over the three sites; skewed: heavy-tailed backlogs, speeds over two orders of magnitude, a
    third of them near or at capacity, two model variants."""
    beats = []
    for i in range(size):
        if skewed:
            queue = {c.value: int(rng.paretovariate(1.2)) - 1 + (30 if rng.random() < 0.3 else 0) for c in SlaClass}
            per_item = 10 ** rng.uniform(-1, 1)
            models = rng.choice([("m",), ("small",), ("m", "small")])
        else:
            queue = {c.value: rng.randrange(0, 5) for c in SlaClass}
            per_item = rng.uniform(0.8, 1.2)
            models = ("m", "small")
        beats.append(beat(f"e{i}", rng.choice(SITES), models, queue=queue, inflight=rng.randrange(0, 3),
                          capacity=rng.choice([40, 100]), per_item=per_item))
    return beats


def random_job(rng: random.Random, executors: list[str]) -> JobV1:
    return job(
        "m", tenant=rng.choice(["acme", "cheap"]), sla=rng.choice(list(SlaClass)),
        budget_ms=rng.choice([15.0, 60.0, 1000.0]), candidates=rng.choice([["m"], ["m", "small"]]),
        allowed=rng.choice([None, None, ["factory"], ["cloud", "branch"]]),
        avoid=rng.sample(executors, min(2, len(executors))) if rng.random() < 0.2 else (),
    )


def scan_choices(scan: Placement) -> set[str]:
    """Every executor the scan may pick (it picks at random among the least loaded near-ties)."""
    feasible = [a for a in scan.alternatives if a.excluded_by is None and a.model == scan.model]
    fastest = min(a.predicted_ms for a in feasible)
    near = [a for a in feasible if a.predicted_ms <= fastest * (1 + NEAR_TIE) + NEAR_TIE_MS + 0.002]
    return {a.executor for a in near}


def outcome(place, *args, **kwargs):
    try:
        return place(*args, **kwargs), None
    except DinError as error:
        return None, error.code


@pytest.mark.parametrize("skewed", [False, True])
@pytest.mark.parametrize("size", [3, 12, 60, 400])
def test_the_indexed_choice_is_one_the_full_scan_could_make(size, skewed):
    rng = random.Random(size * 2 + skewed)
    table = links()
    for trial in range(40):
        reg = ExecutorRegistry(rng=random.Random(trial))
        for hb in random_fleet(rng, size, skewed=skewed):
            reg.observe(hb, now=0.0)
        j = random_job(rng, [s.id for s in reg.live()])
        mine, my_error = outcome(pick_executor, j, reg, table, TOPOLOGY, NOW_MS, COST_LIMITS,
                                 rng=random.Random(trial))
        scan, scan_error = outcome(scan_all_reference, j, reg.live(), table, TOPOLOGY, NOW_MS, COST_LIMITS)
        assert my_error == scan_error
        if scan is None:
            continue
        assert (mine.model, mine.degraded) == (scan.model, scan.degraded)
        assert mine.executor.id in scan_choices(scan)
        if len(scan_choices(scan)) == 1:
            assert mine.executor.id == scan.executor.id


def test_a_large_pool_is_evaluated_a_bounded_number_of_times():
    reg = ExecutorRegistry()
    rng = random.Random(3)
    for i in range(3_000):
        reg.observe(beat(f"e{i}", SITES[i % 3], queue={"interactive": rng.randrange(0, 50)},
                         per_item=rng.uniform(0.5, 2.0)), now=0.0)
    placement = pick_executor(job("m"), reg, links(), TOPOLOGY, NOW_MS, COST_LIMITS)
    assert placement.counts.candidates == 3_000
    assert 1 <= placement.counts.considered <= len(SITES) * (PER_POOL + SAMPLE_PER_POOL) + MAX_ALTERNATIVES
    assert len(placement.alternatives) <= MAX_ALTERNATIVES
    best = min(reg.live(), key=lambda s: table_prediction(s))
    assert placement.predicted_ms <= table_prediction(best) * (1 + NEAR_TIE) + NEAR_TIE_MS + 0.002


def table_prediction(state) -> float:
    return links().rtt_ms(state.site) + state.queue_ms("m", SlaClass.INTERACTIVE)


def test_counts_say_how_many_were_refused_and_why():
    reg = ExecutorRegistry()
    for i in range(10):
        reg.observe(beat(f"cloud{i}", "cloud"), now=0.0)
    for i in range(4):
        reg.observe(beat(f"full{i}", "factory", inflight=100), now=0.0)
    reg.observe(beat("branch0", "branch"), now=0.0)
    placement = pick_executor(job("m", allowed=["factory", "branch"]), reg, links(), TOPOLOGY, NOW_MS, COST_LIMITS)
    assert placement.executor.id == "branch0"
    assert placement.counts.excluded == {"sovereignty": 10, "outranked": 4}
    assert placement.counts.candidates == 15 and placement.counts.feasible == 1


def test_the_best_executor_is_found_behind_a_full_head_of_its_pool():
    reg = ExecutorRegistry()
    for i in range(20):
        reg.observe(beat(f"full{i}", "cloud", per_item=0.1, capacity=5, inflight=5), now=0.0)
    reg.observe(beat("free", "cloud", per_item=0.1, queue={"interactive": 3}), now=0.0)
    for i in range(50):
        reg.observe(beat(f"far{i}", "branch"), now=0.0)
    assert pick_executor(job("m"), reg, links(), TOPOLOGY, NOW_MS, COST_LIMITS).executor.id == "free"


def test_a_view_leaves_out_sites_that_may_get_no_work():
    reg = ExecutorRegistry()
    reg.observe(beat("c", "cloud"), now=0.0)
    reg.observe(beat("f", "factory", queue={"interactive": 40}), now=0.0)
    view = reg.view(lambda site: site != "cloud")
    assert pick_executor(job("m"), view, links(), TOPOLOGY, NOW_MS, COST_LIMITS).executor.id == "f"


def test_a_pinned_version_uses_only_its_pool():
    reg = ExecutorRegistry()
    reg.observe(beat("old", "cloud", version="1"), now=0.0)
    reg.observe(beat("new", "cloud", version="2", queue={"interactive": 10}), now=0.0)
    pinned = job("m")
    pinned.model_version = "2"
    assert pick_executor(pinned, reg, links(), TOPOLOGY, NOW_MS, COST_LIMITS).executor.id == "new"
    assert pick_executor(job("m"), reg, links(), TOPOLOGY, NOW_MS, COST_LIMITS).executor.id == "old"


def pool_contents(reg: ExecutorRegistry) -> dict:
    """Each pool's members, and per class the order of its members (the index as the registry keeps it)."""
    contents = {}
    for model in ("m", "small"):
        for pool in reg.pools(model):
            contents[(pool.model, pool.version, pool.site)] = {
                c: [s.id for s in pool.best(c)] for c in CLASSES
            }
    return contents


def rebuilt(reg: ExecutorRegistry) -> dict:
    """The same index built from scratch from the live executors' current state."""
    contents = {}
    for model in ("m", "small"):
        for state in reg.live():
            for m in state.heartbeat.models:
                if m.name == model:
                    contents.setdefault((model, m.version, state.site), []).append(state)
    return {
        key: {c: sorted((s.id for s in states), key=lambda i, c=c, key=key: reg.get(i).queue_ms(key[0], c))
              for c in CLASSES}
        for key, states in contents.items()
    }


def same_order(mine: dict, truth: dict, reg: ExecutorRegistry) -> bool:
    if mine.keys() != truth.keys():
        return False
    for key, by_class in mine.items():
        for c, ids in by_class.items():
            if sorted(ids) != sorted(truth[key][c]):
                return False
            figures = [reg.get(i).queue_ms(key[0], c) for i in ids]
            if figures != sorted(figures):
                return False
    return True


def test_the_index_stays_current_through_heartbeats_dispatches_moves_and_expiry():
    rng = random.Random(11)
    reg = ExecutorRegistry(rng=random.Random(1))
    now = 0.0
    for step in range(600):
        now += 0.01
        executor = f"e{rng.randrange(0, 25)}"
        action = rng.random()
        if action < 0.55:
            reg.observe(beat(executor, rng.choice(SITES), rng.choice([("m",), ("small",), ("m", "small")]),
                             queue={c.value: rng.randrange(0, 6) for c in SlaClass}, inflight=rng.randrange(0, 3),
                             per_item=rng.choice([0.5, 1.0, 2.0]), draining=rng.random() < 0.1), now=now)
        elif action < 0.8:
            reg.note_dispatch(executor, rng.choice(list(SlaClass)))
        elif action < 0.9:
            reg.note_completion(executor, rng.choice(list(SlaClass)))
        elif action < 0.95:
            reg.forget(executor)
        else:
            reg.expire(now)
        assert same_order(pool_contents(reg), rebuilt(reg), reg), f"step {step}"


def test_a_heartbeat_with_the_same_models_moves_nothing(monkeypatch):
    reg = ExecutorRegistry()
    reg.observe(beat("a", "cloud", ("m", "small")), now=0.0)
    joined = []
    monkeypatch.setattr(ExecutorPool, "add", lambda self, state, rank: joined.append(state.id))
    reg.observe(beat("a", "cloud", ("m", "small"), queue={"batch": 3}), now=0.1)
    assert joined == []
    assert [s.id for s in reg.pools("small")[0].best(SlaClass.BATCH)] == ["a"]
    reg.observe(beat("a", "cloud", ("m",)), now=0.2)
    assert joined == ["a"]


def test_expiry_drops_exactly_the_silent_executors():
    reg = ExecutorRegistry()
    reg.observe(beat("quiet", "cloud"), now=0.0)
    reg.observe(beat("chatty", "cloud"), now=0.0)
    for t in (0.5, 1.0, 1.5):
        reg.observe(beat("chatty", "cloud"), now=t)
    assert reg.expire(now=1.4) == []
    assert [s.id for s in reg.expire(now=1.6)] == ["quiet"]
    assert [s.id for s in reg.pools("m")[0].best(SlaClass.REALTIME)] == ["chatty"]
    assert reg.expire(now=3.1) != [] and reg.pools("m") == []
