"""The autoscaler's rules: out, in, hysteresis, cool-downs, bounds, zero and bursting (pure, no brokers)."""

from pathlib import Path

import pytest

from din.services.autoscaler.policy import PoolView, size_pools
from din.services.autoscaler.signals import TrafficWindow
from din.shared.contracts.events import AdmissionDecisionV1, CompletionV1
from din.shared.contracts.inference import SlaClass
from din.shared.contracts.scaling import PoolSignalsV1
from din.shared.topology import load_topology

TOPOLOGY = load_topology(Path(__file__).resolve().parents[2] / "ops" / "topology" / "elastic.yaml")
SPEC = TOPOLOGY.scaling


def signals(busy=0.0, executors=1, wait=0.0, refused=0.0, done=10.0, idle=0.0):
    return PoolSignalsV1(completions_per_s=done, busy=busy, executors=executors, queue_wait_ms=wait,
                         refused_per_s=refused, idle_s=idle)


def view(site="cloud", wanted=1, fixed=0, last_out=None, last_change=None, **kw):
    s = TOPOLOGY.site(site)
    return PoolView(site, s.pools[0], s.burst is not None, wanted, fixed, signals(executors=wanted + fixed, **kw),
                    last_out, last_change)


def sizes(*views, now=1000.0):
    return {k: v.size for k, v in size_pools(views, TOPOLOGY, now).items()}


def test_a_busy_pool_grows_to_what_its_load_needs_and_says_why():
    verdict = size_pools([view(busy=0.9)], TOPOLOGY, 1000.0)[("cloud", "small")]
    assert verdict.size == 2
    assert "busy 0.9" in verdict.reason and "needs 2" in verdict.reason


def test_growth_waits_out_its_cool_down_and_stops_at_max():
    assert sizes(view(busy=0.9, last_out=1000.0 - SPEC.scale_out_cooldown_s / 2))[("cloud", "small")] == 1
    assert sizes(view(busy=5.0))[("cloud", "small")] == 2


def test_long_queues_grow_a_pool_even_at_low_utilisation():
    assert sizes(view(busy=0.1, wait=SPEC.max_wait_ms * 2))[("cloud", "small")] == 2


def test_refusals_grow_a_pool_only_when_its_executors_work():
    assert sizes(view(busy=0.5, refused=20.0))[("cloud", "small")] == 2
    assert sizes(view(busy=0.05, refused=20.0))[("cloud", "small")] == 1


def test_between_the_two_thresholds_a_pool_keeps_its_size_either_way():
    band = (SPEC.scale_in_utilisation + SPEC.target_utilisation) / 2
    assert sizes(view(wanted=2, busy=2 * band))[("cloud", "small")] == 2


def test_an_idle_pool_shrinks_after_its_cool_down_never_below_min():
    assert sizes(view(wanted=2, busy=0.1))[("cloud", "small")] == 1
    assert sizes(view(wanted=2, busy=0.1, last_change=1000.0 - 1))[("cloud", "small")] == 2
    assert sizes(view(wanted=1, busy=0.0))[("cloud", "small")] == 1


def test_a_pool_with_min_zero_stops_when_idle_long_enough_and_starts_on_demand():
    rented = TOPOLOGY.site("rented")
    idle = PoolView("rented", rented.pools[0], True, 1, 0, signals(idle=SPEC.idle_to_zero_s + 1, done=0.0))
    assert sizes(idle)[("rented", "small")] == 0


def test_a_burst_pool_takes_only_the_on_prem_shortfall():
    cloud = view("cloud", wanted=2, busy=2.5)
    rented = TOPOLOGY.site("rented")
    burst = PoolView("rented", rented.pools[0], True, 0, 0, signals(done=0.0))
    result = size_pools([cloud, burst], TOPOLOGY, 1000.0)
    assert result[("cloud", "small")].size == 2
    assert result[("rented", "small")].size == 3
    assert "at their max" in result[("rented", "small")].reason
    calm = size_pools([view("cloud", wanted=2, busy=1.0), burst], TOPOLOGY, 1000.0)
    assert calm[("rented", "small")].size == 0


def test_a_burst_pool_that_is_not_busy_yet_absorbs_the_shortfall_before_growing_again():
    rented = TOPOLOGY.site("rented")
    burst = PoolView("rented", rented.pools[0], True, 1, 0, signals(busy=0.2))
    assert sizes(view("cloud", wanted=2, busy=2.5), burst)[("rented", "small")] == 1


def test_on_prem_gives_back_only_after_the_burst_pool_did():
    rented = TOPOLOGY.site("rented")
    burst = PoolView("rented", rented.pools[0], True, 1, 0, signals(busy=0.05))
    result = sizes(view("cloud", wanted=2, busy=0.1), burst)
    assert result == {("cloud", "small"): 2, ("rented", "small"): 0}


def completion(site="cloud", model="digits-small", compute=8.0, batch=2, queue=4.0):
    return CompletionV1(request_id="r", tenant="acme", site=site, executor=f"{site}-small-1", model=model,
                        model_version="1", sla_class=SlaClass.BATCH, ok=True, batch_size=batch, degraded=False,
                        timings_ms={"compute": compute, "queue": queue}, at_ms=0.0)


def test_the_window_counts_busy_share_waits_and_capacity_refusals_and_forgets_old_traffic():
    window = TrafficWindow(window_s=10.0)
    for i in range(100):
        window.completion(completion(), at_s=100.0 + i * 0.1)
    window.admission(AdmissionDecisionV1(request_id="r", tenant="acme", model="digits-small", admitted=False,
                                         reason="overloaded", input_bytes=1, at_ms=0.0, count=30), at_s=105.0)
    window.admission(AdmissionDecisionV1(request_id="r", tenant="acme", model="digits-small", admitted=False,
                                         reason="unauthenticated", input_bytes=1, at_ms=0.0), at_s=105.0)
    seen = window.signals("cloud", ["digits-small"], executors=1, now_s=110.0)
    assert seen.completions_per_s == pytest.approx(10.0)
    assert seen.busy == pytest.approx(100 * 4.0 / 10_000.0)
    assert seen.queue_wait_ms == pytest.approx(4.0)
    assert seen.refused_per_s == pytest.approx(3.0)
    assert seen.idle_s == pytest.approx(0.1)
    later = window.signals("cloud", ["digits-small"], executors=1, now_s=200.0)
    assert later.completions_per_s == 0 and later.refused_per_s == 0 and later.idle_s == pytest.approx(90.1)
    assert window.signals("factory", ["digits-small"], executors=1, now_s=110.0).busy == 0


def test_a_pool_at_zero_starts_on_demand_unless_other_executors_cover_it():
    cold = PoolView("cloud", TOPOLOGY.site("cloud").pools[0].model_copy(update={"min": 0}), False, 0, 0,
                    signals(refused=2.0, done=0.0, executors=0))
    assert "cold start" in size_pools([cold], TOPOLOGY, 1000.0)[("cloud", "small")].reason
    covered = PoolView("cloud", cold.pool, False, 0, 1, signals(busy=0.1, executors=1))
    assert size_pools([covered], TOPOLOGY, 1000.0)[("cloud", "small")].size == 0
    history = PoolView("cloud", cold.pool, False, 0, 0, signals(done=5.0, executors=0))
    assert size_pools([history], TOPOLOGY, 1000.0)[("cloud", "small")].size == 0, "served before: not demand now"
    last = PoolView("cloud", cold.pool, False, 1, 0, signals(busy=0.0, idle=1.0))
    assert size_pools([last], TOPOLOGY, 1000.0)[("cloud", "small")].size == 1, "only idleness stops the last"


def test_a_job_of_many_rows_counts_its_rows_share_of_the_batch():
    window = TrafficWindow(window_s=10.0)
    window.completion(completion(compute=40.0, batch=32).model_copy(update={"items": 32}), at_s=100.0)
    window.completion(completion(compute=40.0, batch=32), at_s=100.0)
    seen = window.signals("cloud", ["digits-small"], executors=1, now_s=100.0)
    assert seen.busy == pytest.approx((40.0 + 40.0 / 32) / 10_000.0, abs=1e-4)
