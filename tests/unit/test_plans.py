"""Multi-stage plans: where prefill/decode and split head/tail run, over the real zoo's catalog.

Stages are placed the way the scheduler places them (``stage_placer``): each stage is a copy of the job for the
stage's model and sites, handed to ``pick_executor``.
"""

from __future__ import annotations

import random

import pytest

from din.services.scheduler.links import LinkTable
from din.services.scheduler.plans import Plan, is_multi_stage, make_plan, place_job, stage_placer
from din.services.scheduler.registry import ExecutorState
from din.services.scheduler.split_point import LOCAL, NO_SPLIT
from din.shared.catalog import ModelCatalog
from din.shared.contracts.events import HeartbeatV1, ModelLoadedV1
from din.shared.contracts.inference import SlaClass
from din.shared.contracts.job import JobV1, StageKind, WorkloadClassV1
from din.shared.errors import DinError, ErrorCode
from din.shared.topology import Topology
from tests.unit.test_security_keys import TOPOLOGY as SITES_TOPOLOGY

NOW_MS = 1_000_000.0
LARGE = "digits-large"
HEAD = {p: f"digits-large-head-{p}" for p in ("hidden_1", "hidden_2")}
TAIL = {p: f"digits-large-tail-{p}" for p in ("hidden_1", "hidden_2")}
HEADS, TAILS = list(HEAD.values()), list(TAIL.values())

TOPOLOGY = Topology.model_validate(
    {
        **SITES_TOPOLOGY.model_dump(include={"sites", "links"}),
        "name": "plans",
        "tenants": [
            {"name": "acme", "sensitive_sites": ["factory"]},
            {"name": "vault", "always_sensitive": True, "sensitive_sites": ["factory", "cloud"]},
            {"name": "careful", "sensitive_sites": ["factory"], "max_leakage": 0.95},
            {"name": "paranoid", "sensitive_sites": ["factory"], "max_leakage": 0.5},
        ],
    }
)


@pytest.fixture(scope="module")
def catalog(zoo_dir) -> ModelCatalog:
    return ModelCatalog.from_repository(zoo_dir)


def executor(executor_id: str, site: str, models: list[str], *, per_item: float = 1.0,
             per_model: dict[str, float] | None = None) -> ExecutorState:
    per_model = per_model or {}
    beat = HeartbeatV1(
        executor=executor_id,
        site=site,
        models=[ModelLoadedV1(name=m, version="1", max_batch_size=8, compute_ms_per_item=per_model.get(m, per_item))
                for m in models],
        capacity=100,
        queue_depth={},
        inflight=0,
        recent_latency_ms=1.0,
        draining=False,
        interval_s=0.5,
        sent_ms=NOW_MS,
    )
    return ExecutorState(heartbeat=beat, last_seen=0.0)


def job(model: str = LARGE, *, tenant: str = "acme", allowed: list[str] | None = None, max_tokens: int | None = None,
        split: str | None = None) -> JobV1:
    return JobV1(
        request_id="r1",
        tenant=tenant,
        model=model,
        sla_class=SlaClass.INTERACTIVE,
        deadline_ms=int(NOW_MS + 1000),
        reply_to="_INBOX.x",
        content_type="application/json",
        received_ms=NOW_MS,
        max_tokens=max_tokens,
        split=split,
        workload=WorkloadClassV1(
            task="any",
            sla_class=SlaClass.INTERACTIVE,
            input_bytes=256,
            size_class="small",
            sensitive=allowed is not None,
            allowed_sites=allowed,
            candidates=[model],
        ),
    )


def links(factory: float = 1.0, branch: float = 1.0) -> LinkTable:
    table = LinkTable(TOPOLOGY, home="cloud")
    table.observe_rtt("factory", factory)
    table.observe_rtt("branch", branch)
    return table


def plan(j: JobV1, catalog: ModelCatalog, executors: list[ExecutorState], table: LinkTable | None = None, *,
         queue_at_site: bool = False) -> Plan:
    """``make_plan`` with each stage placed as the scheduler places it (``stage_placer``)."""
    table = table or links()
    place_stage = stage_placer(j, executors, table, TOPOLOGY, NOW_MS, {}, queue_at_site=queue_at_site,
                               rng=random.Random(0))
    return make_plan(j, catalog, place_stage, table, TOPOLOGY, queue_at_site=queue_at_site)


def refused(code: ErrorCode, call) -> DinError:
    with pytest.raises(DinError) as caught:
        call()
    assert caught.value.code == code, caught.value.message
    return caught.value


def test_the_zoo_catalog_has_the_parts_these_tests_place(catalog):
    assert catalog.split_parts(LARGE) == {p: (HEAD[p], TAIL[p]) for p in HEAD}
    assert catalog.get("charlm").prefill_model == "charlm-prefill"
    assert catalog.split_parts("digits-small") == {}


def test_which_jobs_need_a_plan():
    assert is_multi_stage(job("charlm", max_tokens=4))
    assert is_multi_stage(job(split="auto"))
    assert is_multi_stage(job(split="hidden_1"))
    assert not is_multi_stage(job(split="none"))
    assert not is_multi_stage(job())


def test_place_job_gives_a_multi_stage_job_its_plan_and_a_plain_job_none(catalog):
    executors = [executor("factory-1", "factory", ["charlm-prefill"]), executor("cloud-1", "cloud", ["charlm"]),
                 executor("cloud-2", "cloud", [LARGE])]
    streamed = job("charlm", max_tokens=8)
    first = place_job(streamed, catalog, executors, links(), TOPOLOGY, NOW_MS, {}, queue_at_site=False)
    assert [s.kind for s in streamed.plan] == [StageKind.PREFILL, StageKind.DECODE] and streamed.stage == 0
    assert first.executor.id == "factory-1" and "disaggregated" in first.reason
    whole = job()
    assert place_job(whole, catalog, executors, links(), TOPOLOGY, NOW_MS, {}, queue_at_site=False).executor.id \
        == "cloud-2"
    assert whole.plan == [] and whole.split_chosen is None


# --- generation: prefill then decode ---------------------------------------------------------------------------------


def test_generation_co_locates_decode_with_prefill_when_that_executor_serves_the_decode_model(catalog):
    executors = [
        executor("factory-1", "factory", ["charlm-prefill", "charlm"], per_item=2.0),
        executor("cloud-1", "cloud", ["charlm"], per_item=0.01),  # a faster decode elsewhere does not split them
    ]
    result = plan(job("charlm", max_tokens=8), catalog, executors)
    prefill, decode = result.stages
    assert (prefill.kind, prefill.model, prefill.output) == (StageKind.PREFILL, "charlm-prefill", "state")
    assert (decode.kind, decode.model, decode.output) == (StageKind.DECODE, "charlm", "stream")
    assert prefill.executor == decode.executor == "factory-1"
    assert prefill.site == decode.site == "factory"
    assert result.first.executor.id == "factory-1" and result.first.model == "charlm-prefill"
    assert "co-located" in result.reason and result.split_point is None


def test_generation_disaggregates_when_the_prefill_executor_cannot_decode(catalog):
    executors = [executor("factory-1", "factory", ["charlm-prefill"]), executor("cloud-1", "cloud", ["charlm"])]
    result = plan(job("charlm", max_tokens=8), catalog, executors)
    prefill, decode = result.stages
    assert (prefill.executor, prefill.site) == ("factory-1", "factory")
    assert (decode.executor, decode.site) == ("cloud-1", "cloud")
    assert "disaggregated" in result.reason


def test_generation_keeps_both_stages_at_the_jobs_allowed_sites(catalog):
    executors = [
        executor("cloud-1", "cloud", ["charlm-prefill", "charlm"], per_item=0.01),
        executor("factory-1", "factory", ["charlm-prefill"], per_item=5.0),
        executor("factory-2", "factory", ["charlm"], per_item=5.0),
    ]
    free = plan(job("charlm", max_tokens=8), catalog, executors)
    assert [s.executor for s in free.stages] == ["cloud-1", "cloud-1"]  # unconstrained: the fast cloud executor
    held = plan(job("charlm", max_tokens=8, allowed=["factory"]), catalog, executors)
    assert [s.executor for s in held.stages] == ["factory-1", "factory-2"]
    assert all(s.site == "factory" and s.sites == ["factory"] for s in held.stages)

    no_decode_at_factory = [e for e in executors if e.id != "factory-2"]
    refused(ErrorCode.NO_ELIGIBLE_EXECUTOR,
            lambda: plan(job("charlm", max_tokens=8, allowed=["factory"]), catalog, no_decode_at_factory))


def test_generation_needs_a_model_with_a_prefill_part(catalog):
    executors = [executor("cloud-1", "cloud", [LARGE, "charlm"])]
    assert "prefill" in refused(ErrorCode.BAD_REQUEST,
                                lambda: plan(job(LARGE, max_tokens=4), catalog, executors)).message
    refused(ErrorCode.BAD_REQUEST, lambda: plan(job("no-such-model", max_tokens=4), catalog, executors))


# --- split: forced point ---------------------------------------------------------------------------------------------


def test_forced_split_puts_the_head_at_allowed_sites_and_the_tail_at_the_tenants_serving_sites(catalog):
    executors = [
        executor("factory-1", "factory", [HEAD["hidden_2"]], per_item=3.0),
        executor("branch-1", "branch", [HEAD["hidden_2"], TAIL["hidden_2"]], per_item=0.1),  # fastest for both
        executor("cloud-1", "cloud", [TAIL["hidden_2"]], per_item=5.0),
    ]
    result = plan(job(tenant="vault", allowed=["factory"], split="hidden_2"), catalog, executors)
    head, tail = result.stages
    assert (head.kind, head.model, head.output) == (StageKind.SPLIT_HEAD, HEAD["hidden_2"], "hidden_2")
    assert (tail.kind, tail.model, tail.output) == (StageKind.SPLIT_TAIL, TAIL["hidden_2"], "answer")
    assert (head.executor, head.sites) == ("factory-1", ["factory"])
    assert (tail.executor, tail.sites) == ("cloud-1", ["factory", "cloud"])  # vault's data may not reach branch
    assert result.split_point == "hidden_2" and result.first.executor.id == "factory-1"

    anywhere = plan(job(tenant="acme", allowed=["factory"], split="hidden_2"), catalog, executors)
    assert [s.executor for s in anywhere.stages] == ["factory-1", "branch-1"]
    assert anywhere.stages[1].sites == ["cloud", "factory", "branch"]


def test_forced_split_at_a_point_the_model_lacks_is_a_bad_request(catalog):
    executors = [executor("cloud-1", "cloud", [LARGE, *HEADS, *TAILS])]
    error = refused(ErrorCode.BAD_REQUEST, lambda: plan(job(split="hidden_9"), catalog, executors))
    assert "hidden_1, hidden_2" in error.message
    refused(ErrorCode.BAD_REQUEST, lambda: plan(job("digits-small", split="hidden_1"), catalog, executors))
    refused(ErrorCode.BAD_REQUEST, lambda: plan(job("digits-small", split="auto"), catalog, executors))


def test_forced_split_without_a_head_at_an_allowed_site_finds_no_executor(catalog):
    executors = [executor("cloud-1", "cloud", [LARGE, *HEADS, *TAILS])]
    refused(ErrorCode.NO_ELIGIBLE_EXECUTOR,
            lambda: plan(job(allowed=["factory"], split="hidden_1"), catalog, executors))


# --- split: auto -----------------------------------------------------------------------------------------------------


def test_auto_splits_when_the_data_site_has_no_whole_model(catalog):
    executors = [
        executor("factory-1", "factory", HEADS),
        executor("cloud-1", "cloud", [LARGE, *TAILS]),
    ]
    result = plan(job(allowed=["factory"], split="auto"), catalog, executors)
    assert result.split_point in HEAD
    head, tail = result.stages
    assert (head.model, head.executor, head.site, head.output) == (HEAD[result.split_point], "factory-1", "factory",
                                                                   result.split_point)
    assert (tail.model, tail.executor, tail.site) == (TAIL[result.split_point], "cloud-1", "cloud")
    assert result.first.executor.id == "factory-1" and result.reason


def test_the_zoo_records_what_each_split_point_leaks(catalog):
    leaks = {point: catalog.get(HEAD[point]).leakage for point in HEAD}
    assert 0.9 < leaks["hidden_2"] < leaks["hidden_1"] <= 1.0, leaks


def test_a_tenants_leakage_limit_keeps_leaky_intermediates_at_home(catalog):
    executors = [executor("factory-1", "factory", HEADS), executor("cloud-1", "cloud", [LARGE, *TAILS])]
    fast_hidden_1 = [executor("factory-1", "factory", HEADS, per_model={HEAD["hidden_2"]: 5.0}),
                     executor("cloud-1", "cloud", [LARGE, *TAILS])]
    assert plan(job(allowed=["factory"], split="auto"), catalog, fast_hidden_1).split_point == "hidden_1"
    careful = job(tenant="careful", allowed=["factory"], split="auto")
    assert plan(careful, catalog, fast_hidden_1).split_point == "hidden_2", "hidden_1 leaks more than 0.95"
    with pytest.raises(DinError) as refused:
        plan(job(tenant="careful", allowed=["factory"], split="hidden_1"), catalog, executors)
    assert refused.value.code == ErrorCode.BAD_REQUEST and "allows at most 0.950" in refused.value.message
    assert plan(job(tenant="careful", allowed=["factory"], split="hidden_2"), catalog, executors).split_point == \
        "hidden_2"
    with pytest.raises(DinError) as nothing:
        plan(job(tenant="paranoid", allowed=["factory"], split="auto"), catalog, executors)
    assert nothing.value.code == ErrorCode.NO_ELIGIBLE_EXECUTOR and "privacy" in nothing.value.message


def test_auto_runs_local_when_the_data_site_serves_the_whole_model_and_the_link_is_slow(catalog):
    executors = [
        executor("factory-1", "factory", [LARGE, *HEADS], per_model={LARGE: 8.0}),
        executor("cloud-1", "cloud", [LARGE, *TAILS], per_item=0.5),
    ]
    slow = plan(job(allowed=["factory"], split="auto"), catalog, executors, links(factory=300.0))
    assert (slow.split_point, slow.stages) == (LOCAL, [])
    assert (slow.first.executor.id, slow.first.model) == ("factory-1", LARGE)
    # The same executors over a fast link: the whole model is slow at the factory, so cutting it pays.
    fast = plan(job(allowed=["factory"], split="auto"), catalog, executors, links(factory=0.2))
    assert fast.split_point in HEAD
    assert [s.site for s in fast.stages] == ["factory", "cloud"]


@pytest.mark.parametrize("tenant", ["acme", "vault"])
def test_auto_never_ships_sensitive_raw_input_whole(catalog, tenant):
    # Shipping the raw input to the fast whole model at the cloud would be quickest by far; sovereignty forbids it.
    executors = [
        executor("factory-1", "factory", HEADS, per_item=20.0),
        executor("cloud-1", "cloud", [LARGE, *TAILS], per_item=0.1),
    ]
    result = plan(job(tenant=tenant, allowed=["factory"], split="auto"), catalog, executors, links(factory=0.2))
    assert result.split_point not in (NO_SPLIT, LOCAL)
    assert "no-split (sovereignty" in result.reason
    assert result.first.executor.site == "factory"
    assert result.stages[0].site == "factory" and result.stages[0].kind == StageKind.SPLIT_HEAD


def test_auto_without_a_head_or_whole_model_at_an_allowed_site_finds_no_executor(catalog):
    executors = [executor("cloud-1", "cloud", [LARGE, *HEADS, *TAILS]), executor("branch-1", "branch", HEADS)]
    refused(ErrorCode.NO_ELIGIBLE_EXECUTOR, lambda: plan(job(allowed=["factory"], split="auto"), catalog, executors))


# --- distributed mode ------------------------------------------------------------------------------------------------


def test_distributed_mode_places_stages_at_sites_but_leaves_the_executor_to_the_site_queue(catalog):
    gen = plan(job("charlm", max_tokens=4), catalog,
               [executor("factory-1", "factory", ["charlm-prefill"]), executor("cloud-1", "cloud", ["charlm"])],
               queue_at_site=True)
    assert [(s.site, s.executor) for s in gen.stages] == [("factory", None), ("cloud", None)]
    split = plan(job(allowed=["factory"], split="hidden_1"), catalog,
                 [executor("factory-1", "factory", HEADS), executor("cloud-1", "cloud", TAILS)], queue_at_site=True)
    assert [(s.site, s.executor) for s in split.stages] == [("factory", None), ("cloud", None)]
    assert split.first.executor.id == "factory-1"  # the placement still says which executor the plan assumed
