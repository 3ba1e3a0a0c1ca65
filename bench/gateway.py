"""Benchmark: what the HTTP gateway adds to a request, against the raw NATS path, in one run.

One stack (one site, one digits-small executor, Kafka); the same one-row
digits-small request sent one at a time, in alternating rounds, three ways:

* ``nats``: DIN's Python client without keys (JSON body, in clear, as the gateway sends);
* ``http-json``: an OIP v2 JSON body to the gateway (aiohttp client, keep-alive);
* ``http-binary``: the same over the binary tensor extension (raw input bytes, binary outputs).

Writes ``gateway.json`` and ``gateway.md`` to ``bench/results/`` (or ``--out``).

    din bench-gateway [--requests 300] [--rounds 3]
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp
import numpy as np
import uvloop

from din.bench import RESULTS_DIR, write_results

TENANT = "bench"
MODEL = "digits-small"
MODES = ("nats", "http-json", "http-binary")
TOPOLOGY = {
    "name": "bench-gateway",
    "sites": [{"name": "cloud", "role": "hub", "executors": [{"id": "cloud-1", "models": [MODEL]}]}],
    "links": [],
    "tenants": [{"name": TENANT, "rate_per_s": 100000, "burst": 100000}],
}


def _binary_body(row: np.ndarray) -> tuple[bytes, dict[str, str]]:
    head = json.dumps({"inputs": [{"name": "input", "shape": list(row.shape), "datatype": "FP32",
                                   "parameters": {"binary_data_size": row.nbytes}}],
                       "parameters": {"binary_data_output": True}}).encode()
    return head + row.tobytes(), {"Inference-Header-Content-Length": str(len(head)),
                                  "Content-Type": "application/octet-stream"}


async def _measure(stack, row: np.ndarray, requests: int, rounds: int) -> dict:
    from din.client import DinClient
    from din.shared.bus.permissions import tenant_user
    from din.shared.credentials import issue_token, read_credentials

    token = issue_token(TENANT, read_credentials(stack.credentials_file)[TENANT])
    client = await DinClient.connect(stack.hub_url, TENANT, token, None,
                                     options=stack.nats_options("cloud", tenant_user(TENANT)))
    url = f"http://127.0.0.1:{stack.ports.gateway_port(0)}/v2/models/{MODEL}/infer"
    auth = {"Authorization": f"Bearer {token}"}
    json_body = json.dumps({"inputs": [{"name": "input", "shape": list(row.shape), "datatype": "FP32",
                                        "data": row.reshape(-1).tolist()}]}).encode()
    binary_body, binary_headers = _binary_body(row)
    errors = dict.fromkeys(MODES, 0)
    async with aiohttp.ClientSession() as http:
        async def post(body: bytes, headers: dict[str, str], mode: str) -> None:
            async with http.post(url, data=body, headers={**auth, **headers}) as response:
                await response.read()
                errors[mode] += response.status != 200

        async def send(mode: str) -> None:
            if mode == "nats":
                await client.infer(MODEL, {"input": row}, sla="interactive", timeout_ms=5000)
            elif mode == "http-json":
                await post(json_body, {"Content-Type": "application/json"}, mode)
            else:
                await post(binary_body, binary_headers, mode)

        for mode in MODES:
            for _ in range(30):
                await send(mode)
        latencies: dict[str, list[float]] = {mode: [] for mode in MODES}
        per_round = max(1, requests // rounds)
        for _ in range(rounds):
            for mode in MODES:
                for _ in range(per_round):
                    started = time.perf_counter()
                    await send(mode)
                    latencies[mode].append((time.perf_counter() - started) * 1000.0)
    await client.close()
    summary = {}
    for mode, samples in latencies.items():
        ordered = sorted(samples)
        summary[mode] = {"requests": len(samples), "p50_ms": statistics.median(ordered),
                         "p99_ms": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
                         "mean_ms": statistics.fmean(ordered), "errors": errors[mode]}
    for mode in MODES:
        summary[mode]["added_p50_ms"] = summary[mode]["p50_ms"] - summary["nats"]["p50_ms"]
        summary[mode]["p50_ratio"] = summary[mode]["p50_ms"] / summary["nats"]["p50_ms"]
    return summary


def markdown(report: dict) -> str:
    lines = [
        "# The HTTP gateway against the raw NATS path, one run",
        "",
        f"{report['machine']}; one-row {MODEL} requests one at a time on a one-site stack, "
        f"{report['rounds']} alternating rounds, {report['requests']} requests per way.",
        "",
        "| path | p50 ms | p99 ms | mean ms | added p50 ms | p50 ratio | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode in MODES:
        r = report["results"][mode]
        lines.append(f"| {mode} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['mean_ms']:.2f} | "
                     f"{r['added_p50_ms']:+.2f} | {r['p50_ratio']:.2f} | {r['errors']} |")
    return "\n".join(lines)


def run_gateway_bench(requests: int = 300, rounds: int = 3, out: Path = RESULTS_DIR) -> int:
    """Start the stack, measure the three ways, write the results; returns the exit code."""
    from din.shared.security import CryptoPolicy
    from din.shared.topology import Topology
    from din.stack.launcher import DEFAULT_MODEL_REPO, PortPlan, Stack
    from din.workload import load_digits_test

    row = load_digits_test(DEFAULT_MODEL_REPO)[0][:1].astype(np.float32)
    with tempfile.TemporaryDirectory(prefix="din-bench-gateway-") as tmp:
        stack = Stack(Topology.model_validate(TOPOLOGY), ports=PortPlan.free(0), din_dir=Path(tmp),
                      model_repo=DEFAULT_MODEL_REPO, write_state=False,
                      security_policy=CryptoPolicy(plaintext_ingress=[TENANT]))
        with stack.start():
            results = uvloop.run(_measure(stack, row, requests, rounds))
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}",
              "requests": requests, "rounds": rounds, "results": results}
    write_results(out, "gateway", json.dumps(report, indent=2), markdown(report))
    return 0 if all(r["errors"] == 0 for r in results.values()) else 1
