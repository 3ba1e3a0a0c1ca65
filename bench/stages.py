"""``din bench-stages``: multi-stage inference through the real stack, side by side in one run.

One three-site stack (payload security on) serves the three multi-stage patterns:

* **Large-small cascade** (held-out digits, one request at a time): digits-small
  alone, digits-large alone and the cascade at each threshold and each target
  escalation rate (calibrated online at the small model's executor).

* **Split inference** (held-out digits, one request at a time): tenant ``bench``
  sends each digit as (a) plain data, which may travel, so the whole
  digits-large runs at cloud on the raw input; and as ``pii`` data, which may not
  leave factory: (b) split at each point, (c) ``auto`` (the scheduler picks the
  point per request), (d) with the intermediate quantised or noised. Reported:
  accuracy, client-side p50/p99, the points ``auto`` chose.
* **Prefill/decode** (charlm, open-loop Poisson arrivals, a seeded mix of long
  and short prompts from Python's documentation text): the same workload against
  two executors each serving prefill and decode (co-located, at factory) and
  against one prefill-only and one decode-only executor (disaggregated, at
  branch). Reported per arrangement and prompt kind: time to first token and time
  per output token (client side) at p50 and p99, the p99 gap between tokens, and
  requests meeting a TTFT and a TPOT objective, at each load, and the ratios
  disaggregated over co-located.
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

import numpy as np
import uvloop

from din.bench.cascade import CascadeMeasurement, measure_paths
from din.client import DinClient
from din.shared.bus.permissions import tenant_user
from din.shared.credentials import issue_token, read_credentials
from din.shared.topology import Topology
from din.stack.launcher import PortPlan, Stack
from din.workload import load_digits_test
from din.zoo.text import load_corpus

HEADS = ["digits-large-head-hidden_1", "digits-large-head-hidden_2"]
TAILS = ["digits-large-tail-hidden_1", "digits-large-tail-hidden_2", "digits-large"]
GENERATE = ["charlm-prefill", "charlm"]
STAGES_TOPOLOGY = {
    "name": "bench-stages",
    "sites": [
        {"name": "cloud", "role": "hub", "executors": [
            {"id": "tail-1", "models": TAILS, "capacity": 64},
            {"id": "small-1", "models": ["digits-small"], "capacity": 64},
        ]},
        {"name": "factory", "role": "edge", "executors": [
            {"id": "head-1", "models": HEADS, "capacity": 64},
            {"id": "colo-1", "models": GENERATE, "capacity": 64},
            {"id": "colo-2", "models": GENERATE, "capacity": 64},
        ]},
        {"name": "branch", "role": "edge", "executors": [
            {"id": "prefill-1", "models": ["charlm-prefill"], "capacity": 64},
            {"id": "decode-1", "models": ["charlm"], "capacity": 64},
        ]},
    ],
    "links": [
        {"between": ["cloud", "factory"], "path": "dedicated"},
        {"between": ["cloud", "branch"], "path": "dedicated"},
        {"between": ["factory", "branch"], "path": "vpn"},
    ],
    "tenants": [
        {"name": "bench", "sensitive_sites": ["factory"], "rate_per_s": 1_000_000, "burst": 1_000_000},
        {"name": "colocated", "sensitive_sites": ["factory"], "always_sensitive": True, "rate_per_s": 1_000_000,
         "burst": 1_000_000},
        {"name": "disaggregated", "sensitive_sites": ["branch"], "always_sensitive": True,
         "rate_per_s": 1_000_000, "burst": 1_000_000},
    ],
}
SPLIT_PATHS = [
    ("whole model at cloud (raw input shipped)", {}),
    ("split hidden_1", {"split": "hidden_1"}),
    ("split hidden_2", {"split": "hidden_2"}),
    ("split auto", {"split": "auto"}),
    ("split hidden_1 + quantize:4", {"split": "hidden_1", "split_protection": "quantize:4"}),
    ("split hidden_1 + noise:0.5", {"split": "hidden_1", "split_protection": "noise:0.5"}),
]


def _percentile(values, q: float) -> float | None:
    return round(float(np.percentile(values, q)), 3) if len(values) else None


@dataclass
class SplitMeasurement:
    """One path over the held-out digits."""

    path: str
    items: int
    accuracy: float
    p50_ms: float
    p99_ms: float
    mean_ms: float
    points: dict[str, int]


@dataclass
class GenerationMeasurement:
    """One arrangement (or one prompt kind within it) under the mixed workload; times in ms, client side."""

    arrangement: str
    rate_per_s: float
    prompts: str
    requests: int
    errors: int
    ttft_p50: float | None
    ttft_p99: float | None
    tpot_p50: float | None
    tpot_p99: float | None
    gap_p99: float | None
    within_slo: float


@dataclass
class StagesReport:
    """Both measurements and what they ran on."""

    cascade: list[CascadeMeasurement] = field(default_factory=list)
    split: list[SplitMeasurement] = field(default_factory=list)
    generation: list[GenerationMeasurement] = field(default_factory=list)
    environment: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"environment": self.environment, "cascade": [asdict(m) for m in self.cascade],
                           "split": [asdict(m) for m in self.split],
                           "generation": [asdict(m) for m in self.generation],
                           "disaggregated_over_colocated": {f"{k:g}": v for k, v in self.ratios().items()}},
                          indent=2)

    def to_markdown(self) -> str:
        env = self.environment
        lines = [
            "# Multi-stage inference through the DIN stack",
            "",
            f"One run, payload security on, {env.get('cpus')} CPUs, Python {env.get('python')}, "
            f"{env.get('mode')} scheduling.",
            "",
            "## Large-small cascade (held-out digits, one at a time)",
            "",
            "| path | accuracy | escalated | mean ms | p50 ms | p99 ms | mean ms when escalated |",
            "|---|---:|---:|---:|---:|---:|---:|",
            *(f"| {m.path} | {m.accuracy:.4f} | {m.escalation_rate:.1%} | {m.mean_ms:.2f} | {m.p50_ms:.2f} | "
              f"{m.p99_ms:.2f} | {_fmt(m.mean_escalated_ms)} |" for m in self.cascade),
            "",
            "## Split inference (digits-large, held-out digits, one at a time)",
            "",
            f"{env.get('split_items')} items (the cascade used the same ones). pii data may not leave factory: "
            "only the intermediate crosses to cloud.",
            "",
            "| path | accuracy | p50 ms | p99 ms | mean ms | split points used |",
            "|---|---:|---:|---:|---:|---|",
        ]
        for m in self.split:
            points = ", ".join(f"{k} {v}" for k, v in sorted(m.points.items())) or "-"
            lines.append(f"| {m.path} | {m.accuracy:.4f} | {m.p50_ms:.2f} | {m.p99_ms:.2f} | {m.mean_ms:.2f} | "
                         f"{points} |")
        lines += [
            "",
            "## Prefill/decode: co-located against disaggregated (charlm)",
            "",
            f"{env.get('generation_requests')} requests per arrangement and load, Poisson arrivals at "
            f"{env.get('rates_per_s')} per second, {env.get('long_fraction')} long prompts "
            f"({env.get('long_chars')} chars) "
            f"among short ones ({env.get('short_chars')} chars), {env.get('max_tokens')} tokens each. Both "
            "arrangements have two executors. SLO: TTFT <= "
            f"{env.get('slo_ttft_ms')} ms and TPOT <= {env.get('slo_tpot_ms')} ms.",
            "",
            "| arrangement | load /s | prompts | requests | errors | TTFT p50 | TTFT p99 | TPOT p50 | TPOT p99 | "
            "gap p99 | within SLO |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for m in self.generation:
            cells = [_fmt(v) for v in (m.ttft_p50, m.ttft_p99, m.tpot_p50, m.tpot_p99, m.gap_p99)]
            lines.append(f"| {m.arrangement} | {m.rate_per_s:g} | {m.prompts} | {m.requests} | {m.errors} | "
                         f"{' | '.join(cells)} | {m.within_slo:.0%} |")
        lines += ["", "Disaggregated / co-located, all prompts (latencies: below 1 means disaggregated is better; "
                  "within SLO: above 1):", "",
                  "| load /s | TTFT p50 | TTFT p99 | TPOT p50 | TPOT p99 | gap p99 | within SLO |",
                  "|---:|---:|---:|---:|---:|---:|---:|"]
        for rate, ratios in self.ratios().items():
            lines.append(f"| {rate:g} | " + " | ".join(_fmt(r) for r in ratios.values()) + " |")
        return "\n".join(lines)

    def ratios(self) -> dict[float, dict[str, float | None]]:
        """Per load: disaggregated over co-located for each figure of the 'all prompts' rows."""
        rows = {(m.arrangement, m.rate_per_s): m for m in self.generation if m.prompts == "all"}
        out = {}
        for rate in sorted({r for _, r in rows}):
            colo, disagg = rows.get(("colocated", rate)), rows.get(("disaggregated", rate))
            if colo is None or disagg is None:
                continue
            out[rate] = {name: (round(getattr(disagg, name) / getattr(colo, name), 3)
                                if getattr(colo, name) and getattr(disagg, name) is not None else None)
                         for name in ("ttft_p50", "ttft_p99", "tpot_p50", "tpot_p99", "gap_p99", "within_slo")}
        return out


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


async def _client(stack: Stack, tenant: str) -> DinClient:
    token = issue_token(tenant, read_credentials(stack.credentials_file)[tenant])
    return await DinClient.connect(stack.hub_url, tenant, token, stack.tenant_keys(tenant),
                                   options=stack.nats_options(user=tenant_user(tenant)))


async def measure_split(client: DinClient, x: np.ndarray, y: np.ndarray, warm_up: int) -> list[SplitMeasurement]:
    """Every path over the same items, sequentially."""
    results = []
    for path, options in SPLIT_PATHS:
        labels = ["pii"] if options else []
        for i in range(warm_up):
            await client.infer("digits-large", {"input": x[i % len(x) : i % len(x) + 1]}, labels=labels, **options)
        latencies, correct, points = [], [], Counter()
        for i in range(len(x)):
            started = time.perf_counter()
            result = await client.infer("digits-large", {"input": x[i : i + 1]}, labels=labels, timeout_ms=5000,
                                        **options)
            latencies.append((time.perf_counter() - started) * 1000.0)
            correct.append(int(result.outputs["label"][0]) == int(y[i]))
            points[result.served_by.split_point or "none"] += 1
        lat = np.array(latencies)
        results.append(SplitMeasurement(path, len(x), round(float(np.mean(correct)), 6), _percentile(lat, 50),
                                        _percentile(lat, 99), round(float(lat.mean()), 3), dict(points)))
    return results


@dataclass
class _Stream:
    kind: str
    ttft: float | None = None
    tpot: float | None = None
    gaps: list[float] = field(default_factory=list)
    error: str | None = None


async def _one_stream(client: DinClient, prompt: str, kind: str, max_tokens: int) -> _Stream:
    out = _Stream(kind)
    started = time.perf_counter()
    arrivals = []
    try:
        async for chunk in client.generate("charlm", prompt, max_tokens=max_tokens, timeout_ms=30_000):
            if not chunk.done:
                arrivals.append((time.perf_counter() - started) * 1000.0)
    except Exception as exc:
        out.error = exc.__class__.__name__
        return out
    out.ttft = arrivals[0]
    out.gaps = list(np.diff(arrivals))
    out.tpot = (arrivals[-1] - arrivals[0]) / max(1, len(arrivals) - 1)
    return out


def prompts(count: int, long_fraction: float, long_chars: int, short_chars: int, seed: int) -> list[tuple[str, str]]:
    """A seeded mix of (kind, prompt) cut from the held-out documentation text."""
    rng = np.random.default_rng(seed)
    corpus = load_corpus()
    text = corpus.decode(corpus.heldout)
    mix = []
    for _ in range(count):
        kind, size = ("long", long_chars) if rng.random() < long_fraction else ("short", short_chars)
        start = int(rng.integers(0, len(text) - size))
        mix.append((kind, text[start : start + size]))
    return mix


async def measure_generation(client: DinClient, arrangement: str, mix: list[tuple[str, str]], rate_per_s: float,
                             max_tokens: int, seed: int, slo: tuple[float, float]) -> list[GenerationMeasurement]:
    """Open loop: start each request at its Poisson arrival time, whatever the others are doing."""
    for kind, prompt in mix[:4]:
        await _one_stream(client, prompt, kind, max_tokens)
    gaps = np.random.default_rng(seed).exponential(1.0 / rate_per_s, len(mix))
    tasks = []
    for (kind, prompt), gap in zip(mix, gaps):
        tasks.append(asyncio.create_task(_one_stream(client, prompt, kind, max_tokens)))
        await asyncio.sleep(gap)
    streams = await asyncio.gather(*tasks)
    rows = []
    for label in ("all", "long", "short"):
        chosen = [s for s in streams if label == "all" or s.kind == label]
        done = [s for s in chosen if s.error is None]
        ttft = [s.ttft for s in done]
        tpot = [s.tpot for s in done]
        gap_all = [g for s in done for g in s.gaps]
        within = sum(1 for s in done if s.ttft <= slo[0] and s.tpot <= slo[1])
        rows.append(GenerationMeasurement(
            arrangement=arrangement, rate_per_s=rate_per_s, prompts=label, requests=len(chosen),
            errors=len(chosen) - len(done),
            ttft_p50=_percentile(ttft, 50), ttft_p99=_percentile(ttft, 99), tpot_p50=_percentile(tpot, 50),
            tpot_p99=_percentile(tpot, 99), gap_p99=_percentile(gap_all, 99),
            within_slo=round(within / max(1, len(chosen)), 4),
        ))
    return rows


async def measure_all(stack: Stack, x: np.ndarray, y: np.ndarray, *, warm_up: int, mix: list[tuple[str, str]],
                      rates_per_s: list[float], max_tokens: int, seed: int, slo: tuple[float, float],
                      thresholds: list[float], target_rates: list[float]) -> StagesReport:
    report = StagesReport()
    client = await _client(stack, "bench")
    try:
        report.cascade = await measure_paths(client, x, y, thresholds, warm_up, target_rates)
        report.split = await measure_split(client, x, y, warm_up)
    finally:
        await client.close()
    for rate_per_s in rates_per_s:
        for tenant in ("colocated", "disaggregated"):
            client = await _client(stack, tenant)
            try:
                report.generation += await measure_generation(client, tenant, mix, rate_per_s, max_tokens, seed, slo)
            finally:
                await client.close()
    return report


def run_stages_bench(model_repo: Path, din_dir: Path, *, items: int = 300, requests: int = 240,
                     rates_per_s: tuple[float, ...] = (30.0, 60.0), long_fraction: float = 0.3, long_chars: int = 2000,
                     short_chars: int = 16, max_tokens: int = 32, warm_up: int = 20, seed: int = 0,
                     slo_ttft_ms: float = 50.0, slo_tpot_ms: float = 1.0,
                     thresholds: tuple[float, ...] = (0.8,), target_rates: tuple[float, ...] = (0.1, 0.25),
                     mode: str = "centralized") -> StagesReport:
    """Start the three-site stack and run both measurements (see the module docstring)."""
    x, y = load_digits_test(model_repo)
    x, y = x[:items], y[:items]
    mix = prompts(requests, long_fraction, long_chars, short_chars, seed)
    stack = Stack(Topology.model_validate(STAGES_TOPOLOGY), ports=PortPlan.free(2), din_dir=din_dir, mode=mode,
                  model_repo=model_repo, write_state=False)
    with stack.start():
        report = uvloop.run(measure_all(stack, x, y, warm_up=warm_up, mix=mix, rates_per_s=list(rates_per_s),
                                        max_tokens=max_tokens, seed=seed, slo=(slo_ttft_ms, slo_tpot_ms),
                                        thresholds=list(thresholds), target_rates=list(target_rates)))
    report.environment = {
        "python": platform.python_version(), "machine": platform.machine(), "cpus": str(os.cpu_count()),
        "mode": mode, "split_items": str(len(x)), "generation_requests": str(requests),
        "rates_per_s": ", ".join(f"{r:g}" for r in rates_per_s), "long_fraction": f"{long_fraction:.0%}",
        "long_chars": str(long_chars),
        "short_chars": str(short_chars), "max_tokens": str(max_tokens), "slo_ttft_ms": f"{slo_ttft_ms:g}",
        "slo_tpot_ms": f"{slo_tpot_ms:g}", "seed": str(seed),
    }
    return report
