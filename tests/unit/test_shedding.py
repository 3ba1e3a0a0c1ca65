"""Shedding on real capacity with weighted fair shares (services/admission/shedding.py)."""

from collections import Counter

import pytest

from din.services.admission.shedding import DRAIN, RATE_WINDOW_MS, LoadShedder, fair_shares
from din.shared.contracts.events import PressureV1
from din.shared.errors import DinError

T0 = 1_700_000_000_000.0


def report(*, at_ms=T0, waited_ms=0.0, rate=400.0, queued=0, fastest_ms=5.0) -> PressureV1:
    return PressureV1(inflight=300, capacity=1024, fastest_ms=fastest_ms, executors=4, at_ms=at_ms, queued=queued,
                      completed_per_s=rate, waited_ms=waited_ms)


def outcome(shedder: LoadShedder, tenant: str, now_ms: float, deadline_ms: float | None = None,
            pending: int = 0) -> str:
    try:
        shedder.check_share(tenant, now_ms, pending)
        shedder.check_deadline(now_ms, now_ms + 2_000 if deadline_ms is None else deadline_ms)
    except DinError as error:
        assert error.retry_after_ms is None or error.retry_after_ms > 0
        return error.code.value
    return "ok"


def offer(shedder: LoadShedder, rates: dict[str, float], seconds: float, start_ms: float = T0) -> dict:
    """Offer each tenant's rate, evenly spread, against a congested report kept fresh; admitted per tenant."""
    admitted = {t: 0 for t in rates}
    step_ms = 1.0
    for tick in range(int(seconds * 1000 / step_ms)):
        now = start_ms + tick * step_ms
        if tick % 100 == 0:
            shedder.observe(report(at_ms=now, waited_ms=500.0))
        for tenant, rate in rates.items():
            if int((tick + 1) * rate * step_ms / 1000) > int(tick * rate * step_ms / 1000):
                admitted[tenant] += outcome(shedder, tenant, now) == "ok"
    return admitted


def test_fair_shares_fill_light_tenants_first_then_split_by_weight():
    shares, level = fair_shares({"a": 50, "b": 1000, "c": 1000}, {"a": 1, "b": 1, "c": 3}, 450)
    assert shares["a"] == 50
    assert shares["b"] == pytest.approx(100) and shares["c"] == pytest.approx(300)
    assert level == pytest.approx(100)
    shares, level = fair_shares({"a": 10, "b": 20}, {}, 450)
    assert shares == {"a": 10, "b": 20} and level == float("inf")
    assert fair_shares({}, {}, 100) == ({}, float("inf"))


def test_uncongested_path_sheds_nothing():
    shedder = LoadShedder({})
    shedder.observe(report(waited_ms=40.0))
    assert all(outcome(shedder, "acme", T0 + i * 0.4) == "ok" for i in range(1000))


def test_congested_path_holds_a_flooding_tenant_to_its_share_and_lets_a_light_one_through():
    shedder = LoadShedder({"acme": 1.0, "globex": 1.0}, target_ms=150.0)
    offer(shedder, {"acme": 50.0, "globex": 1000.0}, seconds=1.0)
    admitted = offer(shedder, {"acme": 50.0, "globex": 1000.0}, seconds=3.0, start_ms=T0 + 1_000)
    assert admitted["acme"] >= 0.95 * 50 * 3
    globex_share = DRAIN * 400 - 50
    assert admitted["globex"] <= 1.1 * globex_share * 3
    assert admitted["globex"] >= 0.9 * globex_share * 3


def test_weights_split_contended_capacity():
    shedder = LoadShedder({"acme": 3.0, "globex": 1.0})
    offer(shedder, {"acme": 1000.0, "globex": 1000.0}, seconds=1.0)
    admitted = offer(shedder, {"acme": 1000.0, "globex": 1000.0}, seconds=3.0, start_ms=T0 + 1_000)
    assert admitted["acme"] == pytest.approx(3 * admitted["globex"], rel=0.15)


def test_a_deadline_nearer_than_the_wait_is_refused_at_once():
    shedder = LoadShedder({})
    shedder.observe(report(waited_ms=800.0))
    outcome(shedder, "acme", T0 + 1_000)
    assert outcome(shedder, "acme", T0, deadline_ms=T0 + 500) == "overloaded"
    assert outcome(shedder, "acme", T0, deadline_ms=T0 + 2) == "deadline_exceeded"


def test_the_schedulers_own_queue_counts_as_congestion():
    shedder = LoadShedder({"acme": 1.0}, target_ms=150.0)
    shedder.observe(report(queued=200, rate=400.0, at_ms=T0 + 1_000))
    assert shedder.excess_ms(shedder.pressure) == pytest.approx(500.0)
    outcomes = [outcome(shedder, "acme", T0 + RATE_WINDOW_MS + i * 0.3) for i in range(1_000)]
    assert "overloaded" in outcomes and outcomes[0] == "ok"


def test_a_stale_report_sheds_nothing():
    shedder = LoadShedder({})
    shedder.observe(report(at_ms=T0 - 10_000, waited_ms=5_000.0))
    assert all(outcome(shedder, "acme", T0 + i) == "ok" for i in range(500))


def test_before_any_completion_the_executors_capacity_bounds_in_flight_jobs():
    shedder = LoadShedder({})
    shedder.observe(PressureV1(inflight=1024, capacity=1024, fastest_ms=5.0, executors=4, at_ms=T0))
    assert outcome(shedder, "acme", T0) == "overloaded"


def test_waiting_without_a_backlog_is_not_congestion():
    shedder = LoadShedder({"acme": 1.0})
    for i in range(1, 50):
        now = T0 + RATE_WINDOW_MS * i
        shedder.observe(PressureV1(inflight=3, capacity=1024, fastest_ms=5.0, executors=4, at_ms=now,
                                   completed_per_s=2.0, waited_ms=900.0))
        assert outcome(shedder, "acme", now) == "ok"


def test_the_schedulers_meter_reads_the_rate_and_the_wait_before_compute():
    from din.services.scheduler.reports import ServiceMeter

    meter = ServiceMeter(window_ms=1_000.0)
    for i in range(100):
        meter.note(T0 + i * 10, {"admission": 1.0, "classify": 1.0, "schedule": 2.0, "queue": 6.0, "compute": 50.0})
    assert meter.read(T0 + 990) == (pytest.approx(100.0), pytest.approx(10.0))
    assert meter.read(T0 + 5_000) == (0.0, 0.0)


def test_a_backlog_in_admissions_own_input_counts_as_congestion():
    shedder = LoadShedder({"acme": 1.0, "globex": 1.0})
    shedder.observe(report(at_ms=T0 + 2_000, waited_ms=5.0))
    assert outcome(shedder, "globex", T0, pending=100) == "ok"
    shedder.handled(2.0)
    assert shedder.own_wait_ms(100) == pytest.approx(130.0)
    outcomes = Counter()
    for i in range(3_000):
        now = T0 + i
        outcomes[("globex", outcome(shedder, "globex", now, pending=800))] += 1
        if i % 20 == 0:
            outcomes[("acme", outcome(shedder, "acme", now, pending=800))] += 1
    assert outcomes[("globex", "overloaded")] > 0
    assert outcomes[("acme", "overloaded")] == 0
