"""``din bench-cascade``: a large-small cascade against each model alone, through the real stack.

Every held-out digit is sent one at a time (light load) as (a) digits-small
alone, (b) digits-large alone and (c) a cascade at each threshold (``Din-Cascade``):
digits-small answers and escalates answers less confident than the threshold
to digits-large. Reported per path: accuracy, escalation fraction, mean and
p99 client-side latency. One site, one executor per model, payload security on.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import uvloop

from din.client import DinClient
from din.shared.bus.permissions import tenant_user
from din.shared.credentials import issue_token, read_credentials
from din.shared.topology import Topology
from din.stack.launcher import PortPlan, Stack
from din.workload import load_digits_test

SMALL, LARGE = "digits-small", "digits-large"
CASCADE_TOPOLOGY = {
    "name": "bench-cascade",
    "sites": [{"name": "cloud", "role": "hub", "executors": [
        {"id": "small-1", "models": [SMALL], "capacity": 64},
        {"id": "large-1", "models": [LARGE], "capacity": 64},
    ]}],
    "tenants": [{"name": "bench", "rate_per_s": 1_000_000, "burst": 1_000_000}],
}


@dataclass
class CascadeMeasurement:
    """One path over the held-out split."""

    path: str
    threshold: float | None
    items: int
    accuracy: float
    escalation_rate: float
    mean_ms: float
    p50_ms: float
    p99_ms: float
    mean_escalated_ms: float | None


@dataclass
class CascadeReport:
    """Each model alone and the cascade at each threshold, on the same items."""

    measurements: list[CascadeMeasurement] = field(default_factory=list)
    environment: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"environment": self.environment,
                           "measurements": [asdict(m) for m in self.measurements]}, indent=2)

    def to_markdown(self) -> str:
        lines = [
            "# Large-small cascade through the DIN stack",
            "",
            f"Held-out digits, one request at a time, payload security on; "
            f"{self.environment.get('cpus')} CPUs, Python {self.environment.get('python')}.",
            "",
            "| path | accuracy | escalated | mean ms | p50 ms | p99 ms | mean ms when escalated |",
            "|---|---|---|---|---|---|---|",
        ]
        for m in self.measurements:
            escalated_ms = f"{m.mean_escalated_ms:.2f}" if m.mean_escalated_ms is not None else "-"
            lines.append(f"| {m.path} | {m.accuracy:.4f} | {m.escalation_rate:.1%} | {m.mean_ms:.2f} | "
                         f"{m.p50_ms:.2f} | {m.p99_ms:.2f} | {escalated_ms} |")
        return "\n".join(lines)


async def measure(client: DinClient, path: str, model: str, threshold: float | None, x: np.ndarray,
                  y: np.ndarray, *, rate: float | None = None) -> CascadeMeasurement:
    """Send every item once, sequentially; score answers and client-side latency. ``threshold`` or ``rate``
    (a target escalation rate) asks for a cascade."""
    latencies, correct, escalated = [], [], []
    for i in range(len(x)):
        started = time.perf_counter()
        result = await client.infer(model, {"input": x[i : i + 1]}, timeout_ms=5000, cascade=threshold,
                                    cascade_rate=rate)
        latencies.append((time.perf_counter() - started) * 1000.0)
        correct.append(int(result.outputs["label"][0]) == int(y[i]))
        escalated.append(result.served_by.escalated)
    lat, up = np.array(latencies), np.array(escalated)
    return CascadeMeasurement(
        path=path, threshold=threshold, items=len(x), accuracy=round(float(np.mean(correct)), 6),
        escalation_rate=round(float(up.mean()), 6), mean_ms=round(float(lat.mean()), 3),
        p50_ms=round(float(np.percentile(lat, 50)), 3), p99_ms=round(float(np.percentile(lat, 99)), 3),
        mean_escalated_ms=round(float(lat[up].mean()), 3) if up.any() else None,
    )


async def measure_paths(client: DinClient, x: np.ndarray, y: np.ndarray, thresholds: list[float], warm_up: int,
                        target_rates: list[float] = ()) -> list[CascadeMeasurement]:
    """Warm both models up, then each alone and the cascade at each threshold and each target escalation rate."""
    for model in (SMALL, LARGE):
        for i in range(warm_up):
            await client.infer(model, {"input": x[i % len(x) : i % len(x) + 1]})
    results = [await measure(client, f"{SMALL} alone", SMALL, None, x, y),
               await measure(client, f"{LARGE} alone", LARGE, None, x, y)]
    for threshold in thresholds:
        results.append(await measure(client, f"cascade @ {threshold:g}", LARGE, threshold, x, y))
    for rate in target_rates:
        results.append(await measure(client, f"cascade, target rate {rate:g}", LARGE, None, x, y, rate=rate))
    return results


async def measure_all(stack: Stack, x: np.ndarray, y: np.ndarray, thresholds: list[float],
                      warm_up: int) -> list[CascadeMeasurement]:
    token = issue_token("bench", read_credentials(stack.credentials_file)["bench"])
    client = await DinClient.connect(stack.hub_url, "bench", token, stack.tenant_keys("bench"),
                                     options=stack.nats_options(user=tenant_user("bench")))
    try:
        return await measure_paths(client, x, y, thresholds, warm_up)
    finally:
        await client.close()


def run_cascade_bench(model_repo: Path, din_dir: Path, *, thresholds: list[float], warm_up: int = 100,
                      mode: str = "centralized") -> CascadeReport:
    """Start a one-site stack and measure each model alone and the cascade at each threshold."""
    x, y = load_digits_test(model_repo)
    report = CascadeReport(environment={
        "python": platform.python_version(), "machine": platform.machine(), "cpus": str(os.cpu_count()),
        "mode": mode, "items": str(len(x)),
    })
    stack = Stack(Topology.model_validate(CASCADE_TOPOLOGY), ports=PortPlan.free(0), din_dir=din_dir, mode=mode,
                  model_repo=model_repo, write_state=False)
    with stack.start():
        report.measurements = uvloop.run(measure_all(stack, x, y, thresholds, warm_up))
    return report

