"""Jobs held while a pool scales from zero (pure)."""

from din.services.scheduler.coldstart import MAX_HELD, ColdStarts, Held, cold_startable
from din.shared.contracts.job import WorkloadClassV1
from din.shared.topology import Topology
from tests.support import make_job

TOPOLOGY = Topology.model_validate({
    "name": "cold",
    "sites": [{"name": "cloud", "role": "hub", "pools": [{"name": "large", "models": ["digits-large"], "min": 0,
                                                          "max": 1}]},
              {"name": "factory", "role": "edge", "pools": [{"name": "small", "models": ["digits-small"], "min": 1,
                                                             "max": 2}]}],
    "tenants": [{"name": "acme"}],
})


def job(model="digits-large", allowed=None, rid="r1"):
    workload = WorkloadClassV1(task="t", sla_class="batch", input_bytes=1, size_class="small", sensitive=False,
                               allowed_sites=allowed, candidates=[model])
    return make_job(tenant="acme", model=model, request_id=rid).model_copy(update={"workload": workload})


def test_only_a_pool_that_may_scale_from_zero_at_an_allowed_scheduled_site_holds_a_job():
    assert cold_startable(job(), TOPOLOGY, ["cloud", "factory"])
    assert not cold_startable(job(), TOPOLOGY, ["factory"]), "not a site this scheduler places on"
    assert not cold_startable(job(allowed=["factory"]), TOPOLOGY, ["cloud", "factory"]), "data may not go there"
    assert not cold_startable(job("digits-small"), TOPOLOGY, ["cloud", "factory"]), "min 1: it is running"


def test_held_jobs_leave_when_servable_or_due_and_the_hold_is_bounded():
    cold = ColdStarts()
    assert cold.hold(Held(job(rid="a"), b"", {}, {}, until_ms=100.0))
    assert cold.hold(Held(job(rid="b", model="digits-small"), b"", {}, {}, until_ms=200.0))
    assert [h.job.request_id for h in cold.servable({"digits-small"}.__contains__)] == ["b"]
    assert cold.due(99.0) == [] and [h.job.request_id for h in cold.due(100.0)] == ["a"]
    assert not cold
    for n in range(MAX_HELD):
        cold.held[str(n)] = Held(job(rid=str(n)), b"", {}, {}, 1.0)
    assert not cold.hold(Held(job(rid="x"), b"", {}, {}, 1.0))
    assert len(cold.take_all()) == MAX_HELD and not cold
