"""``din bench-elastic``: a diurnal ramp with a 5x spike against a fixed fleet, on-prem autoscaling, and
autoscaling with bursting to rented capacity, in one run (issue 15).

The executors must be the bottleneck, so the model is ``digits-wide`` (``zoo.build.WIDE_RECIPE``, trained here
once) and every request carries ``ROWS`` real digits: a few tens of ms of one core per request. One executor's
capacity is measured first (closed loop); the trace is then set from it: base ``BASE_OF_CAPACITY`` of it, a
diurnal ramp to 1.5x the base and back, and a spike of 5x the base for ``SPIKE_S`` in the middle. Each fleet
runs the same trace on its own stack (hub ``cloud``, on-prem; ``rented``, a provider's region over the internet
link with its latency, for bursting), every answer counted per request:

* (a) **fixed**: one executor, the fleet sized for the diurnal peak;
* (b) **on-prem autoscaling**: a pool at cloud, min 1, max 2;
* (c) **bursting**: (b) plus a pool at ``rented`` (min 0, max 2, 3x the hourly price of on-prem).

SLO: answered ok within ``SLO_MS``. Cost: every second, each site's running executors (the autoscaler's wanted
ones, as its health reports them) times the site's ``executor_hour_cost``; set against provisioning for the peak
all day (the most executors (c) ran, at on-prem price, for the whole trace), and projected to a 24 h day with the
one spike. Goal: (c) holds the SLO through the spike at no more than 60% of that.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nats
import numpy as np
import uvloop

from din.bench.sites import _percentile
from din.bench.tally import Load
from din.shared.contracts.events import HealthV1
from din.shared.credentials import issue_token, read_credentials
from din.shared.naming import Subjects
from din.shared.tensors import encode_request_json
from din.shared.topology import Topology
from din.stack.launcher import PortPlan, Stack
from din.zoo.build import WIDE_RECIPE, build_wide_model
from din.zoo.digits import load_digits_split

MODEL = WIDE_RECIPE.name
ROWS = 32
TENANT = "globex"
DEADLINE_MS = 5_000
SLO_MS = 1_000
BASE_OF_CAPACITY = 0.2
RAMP_S = 40.0
SPIKE_S = 60.0
SPIKE = 5.0
DIURNAL_PEAK = 1.5
SCALING = {"interval_s": 1.0, "window_s": 6.0, "target_utilisation": 0.4, "scale_in_utilisation": 0.15}
"""Pools sized for 40% busy executors: on two cores, executors at 60% each leave the control plane too little
CPU (the first run of this bench, with the defaults, showed it)."""
DAY_S = 86_400.0


def _sites(pools: bool, burst: bool) -> list[dict]:
    cloud: dict = {"name": "cloud", "role": "hub", "executor_hour_cost": 1.0}
    if pools:
        cloud["pools"] = [{"name": "wide", "models": [MODEL], "min": 1, "max": 2}]
    else:
        cloud["executors"] = [{"id": "cloud-1", "models": [MODEL]}]
    sites = [cloud]
    if burst:
        sites.append({"name": "rented", "role": "edge", "control_plane": False, "executor_hour_cost": 3.0,
                      "burst": {"startup_s": 3, "max_executors": 2},
                      "pools": [{"name": "wide", "models": [MODEL], "min": 0, "max": 2}]})
    return sites


FLEETS = {
    "fixed": _sites(pools=False, burst=False),
    "on-prem autoscaling": _sites(pools=True, burst=False),
    "bursting": _sites(pools=True, burst=True),
}


def topology(sites: list[dict]) -> Topology:
    return Topology.model_validate({
        "name": "bench-elastic", "sites": sites, "control_plane": "hub",
        "links": [{"between": ["cloud", "rented"], "path": "internet"}] if len(sites) > 1 else [],
        "security": {"plaintext_ingress": [TENANT]},
        "tenants": [{"name": TENANT, "rate_per_s": 5000, "burst": 5000}], "scaling": SCALING})


def rate_at(t: float, base: float) -> float:
    """The trace: a diurnal ramp from ``base`` to ``DIURNAL_PEAK`` x base and back, with ``SPIKE`` x base for
    ``SPIKE_S`` seconds after the ramp up."""
    if RAMP_S <= t < RAMP_S + SPIKE_S:
        return SPIKE * base
    total = 2 * RAMP_S + SPIKE_S
    return base * (1 + (DIURNAL_PEAK - 1) * math.sin(math.pi * min(t, total) / total))


@dataclass
class FleetRun:
    name: str
    sent: int = 0
    outcome: dict[str, int] = field(default_factory=dict)
    slo_attainment: float = 0.0
    spike_slo_attainment: float = 0.0
    p50_ms: float | None = None
    p99_ms: float | None = None
    failed: int = 0
    executor_seconds: float = 0.0
    cost: float = 0.0
    most_executors: int = 0
    timeline: list[dict] = field(default_factory=list)


@dataclass
class ElasticReport:
    machine: dict[str, str]
    executor_capacity_per_s: float = 0.0
    base_per_s: float = 0.0
    trace_s: float = 2 * RAMP_S + SPIKE_S
    fleets: list[FleetRun] = field(default_factory=list)
    peak_provisioning_cost: float = 0.0
    projected_day: dict[str, float] = field(default_factory=dict)
    ratios: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def to_markdown(self) -> str:
        lines = [
            "# Elastic capacity: a diurnal ramp and a 5x spike (`din bench-elastic`)", "",
            f"One executor of `{MODEL}` ({ROWS} digits per request) serves **{self.executor_capacity_per_s} "
            f"req/s** (closed loop). Trace: base {self.base_per_s} req/s, diurnal ramp to {DIURNAL_PEAK}x and "
            f"back, {SPIKE}x the base for {SPIKE_S:.0f} s in the middle; {self.trace_s:.0f} s in all. SLO: ok "
            f"within {SLO_MS} ms. Machine: {self.machine}.", "",
            "| fleet | sent | SLO attainment | in the spike | p50 / p99 ms | failed | most executors | "
            "executor-s | cost | of peak provisioning |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for f in self.fleets:
            lines.append(
                f"| {f.name} | {f.sent} | {f.slo_attainment:.3f} | {f.spike_slo_attainment:.3f} | "
                f"{f.p50_ms} / {f.p99_ms} | {f.failed} ({', '.join(f'{k} {v}' for k, v in f.outcome.items())}) | "
                f"{f.most_executors} | {f.executor_seconds:.0f} | {f.cost:.4f} | "
                f"{f.cost / self.peak_provisioning_cost:.2f} |")
        lines += ["", f"Peak provisioning (the most executors the bursting fleet ran, at on-prem price, all "
                      f"trace): cost {self.peak_provisioning_cost:.4f}.", "",
                  "The trace compresses a day into a few minutes, so the spike is a large share of it. Projected to "
                  "a day (the base fleet all day, plus what each fleet ran beyond its base during this trace's "
                  "spike and scale-in, once): " + ", ".join(f"{k} {v}" for k, v in self.projected_day.items())
                  + " of provisioning for the peak all day.", "",
                  "Ratios: " + ", ".join(f"{k} {v}" for k, v in self.ratios.items())]
        return "\n".join(lines)


def _tokens(stack: Stack) -> dict[str, str]:
    return {TENANT: issue_token(TENANT, read_credentials(stack.credentials_file)[TENANT], ttl_s=3600)}


def _body() -> bytes:
    images = load_digits_split().x_test[:ROWS].astype(np.float32)
    return encode_request_json({"input": images})


async def _capacity(load: Load, seconds: float, window: int = 8) -> float:
    start, done = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        ids = [await load.request(TENANT, MODEL, timeout_ms=DEADLINE_MS) for _ in range(window)]
        await load.settle(DEADLINE_MS / 1000 + 2)
        done += sum(1 for r in ids if load.tally.answers.get(r, [None])[0] == "ok")
    return done / (time.perf_counter() - start)


async def _running(stack: Stack, costs: dict[str, float], nc: nats.NATS) -> tuple[float, int]:
    """Executors running now, priced: the autoscaler's wanted ones per site (asked over ``nc``), or the fixed
    fleet."""
    fixed = {s.name: len(s.executors) for s in stack.topology.sites}
    if not stack.topology.elastic:
        return sum(costs[s] * n for s, n in fixed.items()), sum(fixed.values())
    reply = await nc.request(Subjects.health("autoscaler"), b"", timeout=1.0)
    pools = HealthV1.model_validate_json(reply.data).detail["pools"]
    running = dict(fixed)
    for entry in filter(None, pools.split(",")):
        where, counts = entry.split(":")
        running[where.split("/")[0]] += int(counts.split("/")[1])
    return sum(costs[s] * n for s, n in running.items()), sum(running.values())


async def _run_trace(stack: Stack, name: str, base: float, body: bytes) -> FleetRun:
    run = FleetRun(name)
    costs = {s.name: s.executor_hour_cost for s in stack.topology.sites}
    total_s = 2 * RAMP_S + SPIKE_S
    sent_at: dict[str, float] = {}
    async with Load(stack.nats_urls["cloud"], _tokens(stack), stack.nats_options("cloud"), body=body) as load:
        start = time.perf_counter()
        next_sample, sent = 0.0, 0.0
        while (t := time.perf_counter() - start) < total_s:
            sent += rate_at(t, base) * 0.005
            while sent >= 1:
                sent -= 1
                sent_at[await load.request(TENANT, MODEL, timeout_ms=DEADLINE_MS)] = t
            if t >= next_sample:
                next_sample += 1.0
                with contextlib.suppress(Exception):
                    per_hour, executors = await _running(stack, costs, load.nc)
                    run.cost += per_hour / 3600.0
                    run.executor_seconds += executors
                    run.most_executors = max(run.most_executors, executors)
                    run.timeline.append({"t": round(t, 1), "offered_per_s": round(rate_at(t, base), 1),
                                         "executors": executors, "cost_per_hour": per_hour})
            await asyncio.sleep(0.005)
        await load.settle(DEADLINE_MS / 1000 + 10)
    tally = load.tally
    ids = list(sent_at)
    run.sent = len(ids)
    run.outcome = tally.outcome(ids)
    ok = [r for r in ids if tally.answers.get(r, [None])[0] == "ok"]
    within = {r for r in ok if tally.latency_ms.get(r, 1e9) <= SLO_MS}
    spike = [r for r in ids if RAMP_S <= sent_at[r] < RAMP_S + SPIKE_S]
    run.slo_attainment = round(len(within) / max(1, len(ids)), 4)
    run.spike_slo_attainment = round(sum(1 for r in spike if r in within) / max(1, len(spike)), 4)
    latencies = sorted(tally.latency_ms[r] for r in ok)
    run.p50_ms = round(_percentile(latencies, 0.5), 1) if latencies else None
    run.p99_ms = round(_percentile(latencies, 0.99), 1) if latencies else None
    run.failed = len(ids) - len(ok)
    for second in run.timeline:
        lo = second["t"]
        second["ok_within_slo"] = sum(1 for r in within if lo - 1.0 <= sent_at[r] < lo)
    return run


def _stack(sites: list[dict], repo: Path, din_dir: Path) -> Stack:
    spec = topology(sites)
    edges = sum(1 for s in spec.sites if s.role == "edge")
    return Stack(spec, ports=PortPlan.free(edges), din_dir=din_dir, model_repo=repo, write_state=False,
                 wan=edges > 0)


async def _measure_capacity(stack: Stack, body: bytes) -> float:
    async with Load(stack.nats_urls["cloud"], _tokens(stack), stack.nats_options("cloud"), body=body) as warm:
        await _capacity(warm, 3.0)
    async with Load(stack.nats_urls["cloud"], _tokens(stack), stack.nats_options("cloud"), body=body) as load:
        return await _capacity(load, 8.0)


def run_elastic_bench(repo: Path, din_dir: Path) -> ElasticReport:
    """Build the model, measure one executor, run the trace against each fleet (see the module docstring)."""
    build_wide_model(repo, max_batch_size=ROWS)
    body = _body()
    report = ElasticReport(machine={"cpus": str(os.cpu_count()), "python": platform.python_version()})
    for name, sites in FLEETS.items():
        with _stack(sites, repo, din_dir) as stack:
            if not report.executor_capacity_per_s:
                report.executor_capacity_per_s = round(uvloop.run(_measure_capacity(stack, body)), 1)
                report.base_per_s = round(BASE_OF_CAPACITY * report.executor_capacity_per_s, 1)
                time.sleep(2.0)
            report.fleets.append(uvloop.run(_run_trace(stack, name, report.base_per_s, body)))
    bursting = report.fleets[-1]
    report.peak_provisioning_cost = round(bursting.most_executors * report.trace_s / 3600.0, 6)
    for run in report.fleets:
        base = run.timeline[0]["cost_per_hour"] if run.timeline else 0.0
        extra = sum(max(0.0, second["cost_per_hour"] - base) for second in run.timeline) / 3600.0
        report.projected_day[run.name] = round((base * DAY_S / 3600.0 + extra)
                                               / (bursting.most_executors * DAY_S / 3600.0), 3)
    report.ratios = {
        "bursting_cost_of_peak_provisioning": round(bursting.cost / report.peak_provisioning_cost, 3),
        "bursting_cost_of_peak_provisioning_projected_day": report.projected_day[bursting.name],
        "bursting_slo_attainment_in_spike": bursting.spike_slo_attainment,
        "fixed_slo_attainment_in_spike": report.fleets[0].spike_slo_attainment,
        "on_prem_slo_attainment_in_spike": report.fleets[1].spike_slo_attainment,
    }
    return report
