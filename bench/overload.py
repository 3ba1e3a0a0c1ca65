"""``din bench-overload``: goodput under overload and isolation between tenants, in one run.

One stack (hub ``cloud`` with two digits-small executors; security on, plaintext ingress for the load's
tenants), raw NATS requests with a 2 s deadline, every answer counted per request (ok, each error code,
unanswered, duplicated):

* **Capacity**: a closed loop keeping ``WINDOW`` requests outstanding; ok answers per second.
* **Goodput curve**: open-loop load at 0.5x to 4x that capacity, ``seconds`` each; goodput is ok answers
  within the deadline per second, as a fraction of capacity, and at 3x as a fraction of the curve's peak
  goodput (the closed loop's queue makes it shed, so it measures less than the stack sustains open-loop).
  Refusals are counted with whether they carry a ``retry_after_ms``. Goal (issue 14): at 3x, goodput >= 90%
  of capacity, 0 unanswered, 0 duplicated.
* **Isolation**: acme at a light rate alone, then the same acme load while globex floods at its quota; acme's
  p50/p99 and their ratio. Goal: p99 rises by at most 25%.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import uvloop

from din.bench.sites import _percentile
from din.bench.tally import Load, Tally
from din.shared.credentials import issue_token, read_credentials
from din.shared.errors import DIN_ERROR_HEADER, ErrorReplyV1
from din.shared.topology import Topology
from din.stack.launcher import PortPlan, Stack

TENANTS = ("acme", "globex")
DEADLINE_MS = 2_000
WINDOW = 160
FACTORS = (0.5, 1.0, 2.0, 3.0, 4.0)
FLOOD_PER_S = 1_000.0
BREAKDOWN = ("client", "total", "admission", "classify", "schedule", "queue", "compute")
OVERLOAD_TOPOLOGY = {
    "name": "bench-overload",
    "sites": [{"name": "cloud", "role": "hub", "cost_per_1k": 0.4,
               "executors": [{"id": "cloud-1", "models": ["digits-small"]},
                             {"id": "cloud-2", "models": ["digits-small"]}]}],
    "links": [],
    "security": {"plaintext_ingress": list(TENANTS)},
    "tenants": [{"name": "acme", "rate_per_s": 5000, "burst": 5000},
                {"name": "globex", "rate_per_s": FLOOD_PER_S, "burst": 1000}],
}


class CountingLoad(Load):
    """``Load`` that also notes refusals without ``retry_after_ms`` and wakes a closed loop on each answer."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.no_retry_after = 0
        self.answered = asyncio.Event()
        self.timings: dict[str, dict[str, float]] = {}

    async def _answer(self, msg) -> None:
        if DIN_ERROR_HEADER in (msg.headers or {}):
            error = ErrorReplyV1.model_validate_json(msg.data).error
            if error.code.value in ("overloaded", "rate_limited") and not error.retry_after_ms:
                self.no_retry_after += 1
        else:
            self.timings[msg.subject.rsplit(".", 1)[1]] = json.loads(msg.data).get("timings_ms") or {}
        await super()._answer(msg)
        self.answered.set()


@dataclass
class Phase:
    """One load level: what was offered and what came back."""

    name: str
    offered_per_s: float
    seconds: float
    sent: int
    outcome: dict[str, int]
    goodput_per_s: float
    goodput_of_capacity: float
    p50_ms: float
    p99_ms: float
    refused_without_retry_after: int
    breakdown_ms: dict[str, float] = field(default_factory=dict)
    """Means over ok answers: the client's latency and the parts the executor's answer reports (admission,
    classify, schedule, queue, compute; ``total`` from admission's receipt to the answer)."""


@dataclass
class OverloadReport:
    capacity_per_s: float = 0.0
    curve: list[Phase] = field(default_factory=list)
    isolation: list[Phase] = field(default_factory=list)
    machine: dict[str, str] = field(default_factory=dict)

    def ratios(self) -> dict[str, float]:
        three = next((p for p in self.curve if p.name == "3.0x"), None)
        alone, flooded = (self.isolation + [None, None])[:2]
        out = {}
        if three:
            out["goodput_at_3x_of_capacity"] = three.goodput_of_capacity
            peak = max(p.goodput_per_s for p in self.curve)
            out["goodput_at_3x_of_peak"] = round(three.goodput_per_s / peak, 3) if peak else 0.0
        if alone and flooded and alone.p99_ms:
            out["acme_p99_flooded_over_alone"] = round(flooded.p99_ms / alone.p99_ms, 3)
            out["acme_p50_flooded_over_alone"] = round(flooded.p50_ms / max(alone.p50_ms, 1e-9), 3)
        return out

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "ratios": self.ratios()}, indent=2)

    def to_markdown(self) -> str:
        lines = ["# Overload: goodput and isolation (`din bench-overload`)", "",
                 f"Capacity (closed loop, {WINDOW} outstanding): **{self.capacity_per_s:.0f} ok/s**. "
                 f"Deadline {DEADLINE_MS} ms. Machine: {self.machine}.", "",
                 "| load | offered/s | sent | ok in deadline/s | of capacity | p50 ms | p99 ms | outcome |"
                 " refusals w/o retry_after |",
                 "|---|---|---|---|---|---|---|---|---|"]
        for p in self.curve + self.isolation:
            codes = ", ".join(f"{k} {v}" for k, v in sorted(p.outcome.items()) if v)
            lines.append(f"| {p.name} | {p.offered_per_s:.0f} | {p.sent} | {p.goodput_per_s:.0f} | "
                         f"{p.goodput_of_capacity:.2f} | {p.p50_ms:.1f} | {p.p99_ms:.1f} | {codes} | "
                         f"{p.refused_without_retry_after} |")
        lines += ["", "Where an ok answer's time went (means, ms):", "",
                  "| load | " + " | ".join(BREAKDOWN) + " |", "|---|" + "---|" * len(BREAKDOWN)]
        for p in self.curve + self.isolation:
            lines.append(f"| {p.name} | " + " | ".join(str(p.breakdown_ms.get(k, "")) for k in BREAKDOWN) + " |")
        lines += ["", "Ratios: " + ", ".join(f"{k} {v}" for k, v in self.ratios().items()), ""]
        return "\n".join(lines)


def _tokens(stack: Stack) -> dict[str, str]:
    secrets = read_credentials(stack.credentials_file)
    return {tenant: issue_token(tenant, secrets[tenant], ttl_s=3600) for tenant in TENANTS}


async def _paced(load: Load, tenant: str, rate: float, seconds: float) -> list[str]:
    """Open loop: ``rate`` requests/s for ``seconds``, sent in 5 ms ticks; their ids."""
    ids: list[str] = []
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        due = int(elapsed * rate) + 1
        while len(ids) < due:
            ids.append(await load.request(tenant, "digits-small", timeout_ms=DEADLINE_MS))
        await asyncio.sleep(0.005)
    return ids


def _phase(name: str, load: CountingLoad, ids: list[str], rate: float, seconds: float, capacity: float) -> Phase:
    tally: Tally = load.tally
    outcome = tally.outcome(ids)
    in_time = [tally.latency_ms[r] for r in ids if tally.answers.get(r, [None])[0] == "ok"
               and tally.latency_ms.get(r, 1e9) <= DEADLINE_MS]
    late = sum(1 for r in ids if tally.answers.get(r, [None])[0] == "ok") - len(in_time)
    outcome = {**outcome, "ok_late": late}
    goodput = len(in_time) / seconds
    times = sorted(tally.latency_ms[r] for r in ids if tally.answers.get(r, [None])[0] == "ok")
    parts = [load.timings[r] for r in ids if r in load.timings]
    breakdown = {"client": round(sum(times) / len(times), 1)} if times else {}
    for part in ("total", "admission", "classify", "schedule", "queue", "compute"):
        values = [t[part] for t in parts if part in t]
        if values:
            breakdown[part] = round(sum(values) / len(values), 1)
    return Phase(name, rate, seconds, len(ids), outcome, round(goodput, 1),
                 round(goodput / capacity, 3) if capacity else 0.0,
                 round(_percentile(times, 0.5), 2) if times else 0.0,
                 round(_percentile(times, 0.99), 2) if times else 0.0, load.no_retry_after, breakdown)


async def _capacity(load: CountingLoad, seconds: float) -> float:
    start = time.perf_counter()
    sent: list[str] = []
    while time.perf_counter() - start < seconds:
        answered = sum(1 for r in sent if r in load.tally.answers)
        for _ in range(WINDOW - (len(sent) - answered)):
            sent.append(await load.request("globex", "digits-small", timeout_ms=DEADLINE_MS))
        load.answered.clear()
        try:
            await asyncio.wait_for(load.answered.wait(), 0.5)
        except TimeoutError:
            pass
    elapsed = time.perf_counter() - start
    await load.settle(10.0)
    return Counter(load.tally.answers[r][0] for r in sent if r in load.tally.answers)["ok"] / elapsed


async def _measure(stack: Stack, seconds: float) -> OverloadReport:
    report = OverloadReport(machine={"cpus": str(os.cpu_count()), "python": platform.python_version()})
    url, options, tokens = stack.nats_urls["cloud"], stack.nats_options("cloud"), _tokens(stack)
    async with CountingLoad(url, tokens, options) as warm:
        await _capacity(warm, 3.0)
    async with CountingLoad(url, tokens, options) as load:
        report.capacity_per_s = round(await _capacity(load, max(5.0, seconds / 2)), 1)
    capacity = report.capacity_per_s
    for factor in FACTORS:
        await asyncio.sleep(2.0)
        async with CountingLoad(url, tokens, options) as load:
            ids = await _paced(load, "globex", factor * capacity, seconds)
            await load.settle(DEADLINE_MS / 1000 + 8)
            report.curve.append(_phase(f"{factor}x", load, ids, factor * capacity, seconds, capacity))
    light = round(0.15 * capacity, 1)
    for name, flood in (("acme alone", False), ("acme, globex flooding", True)):
        await asyncio.sleep(2.0)
        async with CountingLoad(url, tokens, options) as load, CountingLoad(url, tokens, options) as other:
            flooding = asyncio.create_task(_paced(other, "globex", FLOOD_PER_S, seconds)) if flood else None
            ids = await _paced(load, "acme", light, seconds)
            if flooding:
                await flooding
            await load.settle(DEADLINE_MS / 1000 + 8)
            await other.settle(DEADLINE_MS / 1000 + 8)
            report.isolation.append(_phase(name, load, ids, light, seconds, capacity))
    return report


def run_overload_bench(model_repo: Path, din_dir: Path, *, seconds: float = 15.0) -> OverloadReport:
    """Start the stack and measure it (see the module docstring)."""
    topology = Topology.model_validate(OVERLOAD_TOPOLOGY)
    with Stack(topology, ports=PortPlan.free(0), din_dir=din_dir, model_repo=model_repo, write_state=False) as stack:
        return uvloop.run(_measure(stack, seconds))
