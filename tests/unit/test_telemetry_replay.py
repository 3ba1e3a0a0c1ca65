"""Replay's offline pieces: ranges, comparison, what-if, the HTML report and its charts, a stalled read."""

from __future__ import annotations

import re
from types import SimpleNamespace
from xml.etree import ElementTree

import pytest

from din.replay.compare import NO_OUTCOME, Comparison, Outcome, recorded_outcomes
from din.replay.reader import RecordRange, ReplayError, TopicReader, parse_offsets, parse_time
from din.replay.recorded import RecordedWindow
from din.replay.report import bucket_seconds, render_report
from din.replay.svg import bar_chart, line_chart, time_ticks
from din.replay.whatif import POLICIES, what_if
from din.shared.contracts.events import (
    AdmissionDecisionV1,
    AlternativeV1,
    ClassificationV1,
    CompletionV1,
    SchedulingDecisionV1,
)
from din.shared.contracts.job import WorkloadClassV1
from din.shared.contracts.telemetry import SlaViolationV1
from din.shared.recording import parse_request_record, request_record
from din.shared.topology import Topology
from tests.support import ManualClock, make_heartbeat, make_job

T0 = 1_700_000_000_000.0

TOPOLOGY = Topology.model_validate({
    "name": "two-sites",
    "sites": [
        {"name": "cloud", "role": "hub", "cost_per_1k": 4.0, "executors": [{"id": "cloud-1", "models": ["small"]}]},
        {"name": "edge", "role": "edge", "cost_per_1k": 1.0, "executors": [{"id": "edge-1", "models": ["small"]}]},
    ],
    "links": [{"between": ["cloud", "edge"], "path": "vpn"}],
    "tenants": [{"name": "acme"}, {"name": "globex"}],
})


def recorded(i: int, tenant: str, sla: str = "realtime", at: float = 0.0):
    job = make_job(request_id=f"r{i}", tenant=tenant, model="small", sla_class=sla,
                   deadline_ms=int(T0 + at) + 1000, reply_to="", received_ms=T0 + at)
    key, value, headers = request_record(job, b"{}", {})
    return parse_request_record(SimpleNamespace(key=key, value=value, headers=headers))


def completion(rid: str, tenant: str, site: str, total: float, at: float, ok: bool = True, sla: str = "realtime",
               degraded: bool = False, model: str = "small") -> CompletionV1:
    return CompletionV1(request_id=rid, tenant=tenant, site=site, executor=f"{site}-1", model=model, model_version="1",
                        sla_class=sla, ok=ok, error_code=None if ok else "inference_failed", batch_size=1,
                        degraded=degraded, timings_ms={"total": total}, at_ms=T0 + at)


def window_of(n: int = 40) -> RecordedWindow:
    window = RecordedWindow(rng=RecordRange(since_ms=T0))
    tenants = ("acme", "globex")
    for i in range(n):
        at = i * 100.0
        tenant = tenants[i % 2]
        window.requests.append(recorded(i, tenant, at=at))
        window.classifications.append(ClassificationV1(
            request_id=f"r{i}", tenant=tenant, at_ms=T0 + at, workload=WorkloadClassV1(
                task="t", sla_class="realtime", input_bytes=2, size_class="small", sensitive=False,
                candidates=["small"])))
        window.schedulings.append(SchedulingDecisionV1(
            request_id=f"r{i}", tenant=tenant, mode="centralized", sla_class="realtime", chosen_executor="cloud-1",
            chosen_site="cloud", chosen_model="small", degraded=False, predicted_ms=1.1, reason="lowest",
            alternatives=[AlternativeV1(executor="cloud-1", site="cloud", model="small", predicted_ms=1.1),
                          AlternativeV1(executor="edge-1", site="edge", model="small", predicted_ms=4.0)],
            attempt=1, at_ms=T0 + at + 0.5))
        if i % 10 == 9:
            window.admissions.append(AdmissionDecisionV1(request_id=f"x{i}", tenant=tenant, model="small",
                                                         admitted=False, reason="rate_limited", input_bytes=2,
                                                         at_ms=T0 + at))
        window.completions.append(completion(f"r{i}", tenant, "cloud", 2.0 + i, at + 5, ok=i != 3,
                                             degraded=i % 4 == 0))
    window.heartbeats = [make_heartbeat(executor, site, ["small"], sent_ms=T0 + t)
                         for executor, site in (("cloud-1", "cloud"), ("edge-1", "edge"))
                         for t in range(-500, 4000, 500)]
    window.alerts.append(SlaViolationV1(sla_class="realtime", firing=True, quantile=0.99, observed_ms=60.0,
                                        target_ms=50.0, window_s=60.0, samples=30, worst_site="cloud", at_ms=T0 + 2000))
    window.since_ms, window.until_ms = T0, T0 + n * 100.0 + 2000
    return window


def test_times_and_offsets_parse_or_fail_clearly():
    now = 1_000_000_000_000.0
    assert parse_time("now", now) == now
    assert parse_time("-15m", now) == now - 900_000
    assert parse_time("-2h", now) == now - 7_200_000
    assert parse_time("90s", now) == now - 90_000, "a duration without a sign is also 'ago' (argparse eats '-')"
    assert parse_time("1700000000", now) == 1_700_000_000_000.0
    assert parse_time("1700000000000", now) == 1_700_000_000_000.0
    assert parse_time("2023-11-14T22:13:20Z", now) == 1_700_000_000_000.0
    with pytest.raises(ReplayError, match="cannot read time 'yesterday'"):
        parse_time("yesterday", now)
    assert parse_offsets("10-20") == {None: (10, 20)}
    assert parse_offsets("0:5-,2:1-3") == {0: (5, 2**62), 2: (1, 3)}
    for bad in ("5", "a-b", "9-3"):
        with pytest.raises(ReplayError):
            parse_offsets(bad)
    assert "offsets *:10-20" in RecordRange(offsets={None: (10, 20)}).describe()


def test_recorded_outcomes_prefer_the_final_completion_then_refusals():
    window = window_of(4)
    window.requests.append(recorded(98, "acme"))
    window.requests.append(recorded(99, "acme"))
    window.schedulings.append(SchedulingDecisionV1(
        request_id="r98", tenant="acme", mode="centralized", sla_class="realtime", chosen_executor=None,
        chosen_site=None, chosen_model=None, degraded=False, predicted_ms=None, reason="overloaded",
        alternatives=[], attempt=1, at_ms=T0))
    outcomes = recorded_outcomes(window)
    assert outcomes["r0"].ok and outcomes["r0"].site == "cloud" and outcomes["r0"].latency_ms == 2.0
    assert outcomes["r3"].code == "inference_failed"
    assert outcomes["r98"].code == "overloaded"
    assert outcomes["r99"].code == NO_OUTCOME


def test_comparison_counts_mix_latency_errors_and_placement():
    recorded_side = {f"r{i}": Outcome(f"r{i}", "acme" if i % 2 else "globex", "realtime", True, "ok", 10.0 + i,
                                      site="cloud", model="small") for i in range(10)}
    replayed = {rid: Outcome(rid, o.tenant, o.sla_class, True, "ok", 5.0, 7.0, site="edge" if rid == "r1" else "cloud",
                             model="small") for rid, o in recorded_side.items()}
    replayed["r2"] = Outcome("r2", "globex", "realtime", False, "overloaded")
    data = Comparison(recorded_side, replayed, notes=["hello"]).as_dict()
    assert data["requests"] == {"recorded": 10, "replayed": 10}
    assert data["tenant_mix"]["recorded"] == data["tenant_mix"]["replayed"] == {"globex": 5, "acme": 5}
    assert data["errors"] == {"recorded": {}, "replayed": {"overloaded": 1}}
    assert data["latency_ms"]["realtime"]["recorded"]["p50"] == pytest.approx(14.5)
    assert data["latency_ms"]["realtime"]["replay_client"]["p50"] == 7.0
    assert data["placement"]["compared"] == 9 and data["placement"]["same_site"] == 8
    assert data["placement"]["site_moves"] == {"cloud->edge": 1}
    text = Comparison(recorded_side, replayed, notes=["hello"]).text()
    assert "acme 5 -> 5" in text and "overloaded 0 -> 1" in text and "note: hello" in text


def test_what_if_cost_moves_to_the_cheap_site_and_hub_only_stays_home():
    window = window_of()
    cost = what_if(window, TOPOLOGY, "cost").as_dict()
    assert cost["baseline"]["sites"] == {"cloud": 40}, "the live policy prefers the faster hub"
    assert cost["whatif"]["sites"] == {"edge": 40}
    assert cost["whatif"]["cost"] < cost["baseline"]["cost"]
    assert cost["whatif"]["predicted_ms"]["all"]["p50"] > cost["baseline"]["predicted_ms"]["all"]["p50"]
    assert cost["changes"]["changed"] == 40 and cost["changes"]["moves"] == {"cloud->edge": 40}
    assert cost["recorded"]["sites"] == {"cloud": 40}
    assert cost["link_rtt_ms"]["edge"] == pytest.approx(3.0)

    closed = Topology.model_validate({**TOPOLOGY.model_dump(mode="json"), "sites": [
        {"name": "cloud", "role": "hub", "executors": []},
        {"name": "edge", "role": "edge", "cost_per_1k": 1.0, "executors": [{"id": "edge-1", "models": ["small"]}]}]})
    moved = what_if(window, TOPOLOGY, "latency", closed).as_dict()
    assert moved["whatif"]["sites"] == {"edge": 40}, "a topology without the hub's executor places at the edge"
    assert set(what_if(window, TOPOLOGY, "hub-only").as_dict()["whatif"]["sites"]) == {"cloud"}
    assert set(POLICIES) == {"latency", "cost", "edge-first", "hub-only", "no-degrade"}
    with pytest.raises(ReplayError, match="unknown what-if policy 'fastest'"):
        what_if(window, TOPOLOGY, "fastest")


def test_report_is_self_contained_html_with_every_plot():
    page = render_report(window_of(), title="A <test> window", source="kafka:9092", scope="t1")
    assert page.startswith("<!DOCTYPE html>") and "A &lt;test&gt; window" in page
    svgs = re.findall(r"<svg.*?</svg>", page, flags=re.S)
    assert len(svgs) == 5
    for svg in svgs:
        ElementTree.fromstring(svg)  # well-formed XML
    for title in ("Latency CDF per SLA class", "Throughput per site", "Rejects and SLA target misses",
                  "Model mix per SLA class", "Degradation (cascade"):
        assert title in page
    assert "admission: rate_limited" in page and "executor: inference_failed" in page
    assert "realtime SLA violated" in page, "the alert is drawn as a marker"
    assert not re.search(r"(src|href)=\"?(https?:)?//", page), "nothing is loaded from the network"


def test_empty_window_renders_no_data_instead_of_failing():
    page = render_report(RecordedWindow(rng=RecordRange(), since_ms=T0, until_ms=T0 + 1000))
    assert page.count("no data in this window") == 5


def test_charts_handle_single_points_and_time_ticks_are_round():
    svg = line_chart({"a": [(T0, 1.0)]}, title="t", x_label="x", y_label="y", x_clock=True)
    ElementTree.fromstring(svg)
    ElementTree.fromstring(bar_chart(["a", "b"], {"s": [1.0, 0.0]}, title="t", y_label="y"))
    ticks = time_ticks(T0 + 123, T0 + 61_000)
    assert all(t % 15_000 == 0 for t in ticks) and len(ticks) >= 4
    assert bucket_seconds(60_000) == 1 and bucket_seconds(3_600_000) == 60


async def test_a_read_that_stops_making_progress_fails_with_a_clear_message(monkeypatch):
    clock = ManualClock()
    monkeypatch.setattr("din.replay.reader.time", SimpleNamespace(monotonic=clock, perf_counter=clock, time=clock))
    polls = []

    class SilentConsumer:
        """Never returns a record; each poll waits out its timeout on the reader's (manual) clock."""

        def assign(self, tps): ...
        def seek(self, tp, offset): ...
        def pause(self, tp): ...
        def unsubscribe(self): ...

        async def getmany(self, *tps, timeout_ms, max_records):
            polls.append(timeout_ms)
            assert len(polls) < 1000, "the reader kept polling a silent broker"
            clock.advance(timeout_ms / 1000)
            return {}

        async def position(self, tp):
            return 0

    reader = TopicReader("kafka:9092", stall_timeout_s=30.0)
    reader._consumer = SilentConsumer()
    reader._topics = {"din.v1.admission.requests"}

    async def bounds(topic, rng):
        from aiokafka import TopicPartition
        return {TopicPartition(topic, 0): (0, 10)}

    reader._bounds = bounds
    with pytest.raises(ReplayError, match="stopped answering while reading din.v1.admission.requests"):
        async for _ in reader.read("din.v1.admission.requests", RecordRange()):
            pass
    assert sum(polls) / 1000 > 30.0, "it gave up only after the stall timeout"
