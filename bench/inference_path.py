"""``din bench``: the cost of DIN's path, measured side by side in one run.

* (a) direct: an in-process ONNX Runtime call on one row;
* (b) raw NATS: nats-py request-reply to a single ONNX Runtime responder process;
* (c) DIN: the full path (admission, classifier, scheduler, executor), one site, with payload
  security on (the default) and, in a second stack, off (``din-plaintext``).

Clients, the responder and DIN's services all run on uvloop.

Each is measured at light load (one request at a time: p50/p99 latency) and
under closed-loop load at several concurrencies (throughput, p50/p99). The
same model (digits-small), input (one held-out digit, binary tensor form) and
reply decoding are used for (b) and (c).
"""

from __future__ import annotations

import asyncio
import json
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nats
import numpy as np
import uvloop

from din.client import DinClient
from din.services.executor.repository import ModelRepository
from din.shared.bus.permissions import tenant_user
from din.shared.credentials import issue_token, read_credentials
from din.shared.tensors import decode_response, encode_binary
from din.shared.topology import Topology
from din.stack.launcher import PortPlan, Stack
from din.workload import load_digits_test

MODEL = "digits-small"
RAW_SUBJECT = "bench.raw.infer"
BENCH_TOPOLOGY = {
    "name": "bench",
    "sites": [{"name": "cloud", "role": "hub", "executors": [{"id": "bench-1", "models": [MODEL], "capacity": 1024}]}],
    "tenants": [{"name": "bench", "rate_per_s": 1_000_000, "burst": 1_000_000}],
}


@dataclass
class Measurement:
    """One path at one load level."""

    path: str
    concurrency: int
    requests: int
    errors: int
    seconds: float
    p50_ms: float
    p99_ms: float

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


@dataclass
class BenchReport:
    """Every measurement plus the headline ratios."""

    measurements: list[Measurement] = field(default_factory=list)
    environment: dict[str, str] = field(default_factory=dict)

    def light(self, path: str) -> Measurement:
        return next(m for m in self.measurements if m.path == path and m.concurrency == 1)

    def peak(self, path: str) -> Measurement:
        return max((m for m in self.measurements if m.path == path and m.errors == 0), key=lambda m: m.throughput)

    def summary(self) -> dict[str, float]:
        direct, raw, din = (self.light(p) for p in ("direct", "raw-nats", "din"))
        return {
            "din_added_p50_ms_over_direct": din.p50_ms - direct.p50_ms,
            "din_added_p50_ms_over_raw_nats": din.p50_ms - raw.p50_ms,
            "raw_nats_added_p50_ms_over_direct": raw.p50_ms - direct.p50_ms,
            "din_peak_rps": self.peak("din").throughput,
            "raw_nats_peak_rps": self.peak("raw-nats").throughput,
            "direct_peak_rps": self.peak("direct").throughput,
            "din_peak_over_raw_nats": self.peak("din").throughput / self.peak("raw-nats").throughput,
            "din_plaintext_added_p50_ms_over_direct": self.light("din-plaintext").p50_ms - direct.p50_ms,
            "din_plaintext_peak_rps": self.peak("din-plaintext").throughput,
        }

    def to_json(self) -> str:
        rows = [{**asdict(m), "throughput_rps": round(m.throughput, 1)} for m in self.measurements]
        return json.dumps(
            {"environment": self.environment, "summary": self.summary(), "measurements": rows}, indent=2
        )

    def to_markdown(self) -> str:
        lines = [
            "| path | concurrency | requests | errors | req/s | p50 ms | p99 ms |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for m in self.measurements:
            lines.append(
                f"| {m.path} | {m.concurrency} | {m.requests} | {m.errors} | {m.throughput:.0f} | "
                f"{m.p50_ms:.3f} | {m.p99_ms:.3f} |"
            )
        s = self.summary()
        lines += [
            "",
            f"- DIN adds **{s['din_added_p50_ms_over_direct']:.3f} ms** at p50 over a direct ONNX Runtime call "
            f"(raw NATS request-reply adds {s['raw_nats_added_p50_ms_over_direct']:.3f} ms).",
            f"- Peak sustained throughput: DIN **{s['din_peak_rps']:.0f} req/s**, raw NATS "
            f"{s['raw_nats_peak_rps']:.0f} req/s (ratio {s['din_peak_over_raw_nats']:.2f}), "
            f"direct {s['direct_peak_rps']:.0f} req/s.",
            f"- With payload security off (`DIN_SECURITY=off`, comparison only): DIN adds "
            f"{s['din_plaintext_added_p50_ms_over_direct']:.3f} ms at p50 and peaks at "
            f"{s['din_plaintext_peak_rps']:.0f} req/s.",
        ]
        return "\n".join(lines)


def _percentiles(latencies: list[float]) -> tuple[float, float]:
    if not latencies:
        return 0.0, 0.0
    arr = np.array(latencies) * 1000.0
    return float(np.percentile(arr, 50)), float(np.percentile(arr, 99))


def measure_direct(model_repo: Path, row: np.ndarray, count: int) -> Measurement:
    handle = ModelRepository(model_repo).load(MODEL)
    for _ in range(200):
        handle.run({"input": row})
    latencies = []
    started = time.perf_counter()
    for _ in range(count):
        t = time.perf_counter()
        handle.run({"input": row})
        latencies.append(time.perf_counter() - t)
    seconds = time.perf_counter() - started
    p50, p99 = _percentiles(latencies)
    return Measurement("direct", 1, count, 0, seconds, p50, p99)


async def closed_loop(path: str, send, concurrency: int, seconds: float, warmup_s: float = 0.5) -> Measurement:
    """``concurrency`` workers send back to back for ``seconds``; latencies after a warm-up count."""
    latencies: list[float] = []
    errors = 0
    start = time.perf_counter()
    measure_from = start + warmup_s
    stop_at = measure_from + seconds

    async def worker() -> None:
        nonlocal errors
        while True:
            t = time.perf_counter()
            if t >= stop_at:
                return
            try:
                await send()
            except Exception:
                errors += 1 if t >= measure_from else 0
                continue
            if t >= measure_from:
                latencies.append(time.perf_counter() - t)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    p50, p99 = _percentiles(latencies)
    return Measurement(path, concurrency, len(latencies), errors, seconds, p50, p99)


RESPONDER = """
import asyncio, sys
import nats
import uvloop
from din.services.executor.repository import ModelRepository
from din.shared.contracts.inference import InferResponseV1, ServedByV1
from din.shared.tensors import decode_binary, encode_outputs

async def main(url, repo, subject, creds=None):
    handle = ModelRepository(repo).load("digits-small")
    nc = await nats.connect(url, **({"user_credentials": creds} if creds else {}))

    async def on_request(msg):
        name, array = decode_binary(msg.data, msg.headers)
        outputs = handle.run({name: array})
        body = InferResponseV1(model_name=handle.name, model_version=handle.version, id="raw",
            outputs=encode_outputs(outputs), served_by=ServedByV1(site="raw", executor="raw", model=handle.name,
            model_version=handle.version, degraded=False, batch_size=1)).model_dump_json().encode()
        await nc.publish(msg.reply, body)

    await nc.subscribe(subject, cb=on_request)
    print("ready", flush=True)
    await asyncio.Event().wait()

uvloop.run(main(*sys.argv[1:]))
"""


async def measure_raw(url: str, model_repo: Path, row: np.ndarray, levels: list[int], seconds: float,
                      light_count: int, options: dict | None = None) -> list[Measurement]:
    """Raw request-reply to a responder process; ``options``: the connect options of both ends (on a closed bus
    the operator's, whose credentials the responder gets too)."""
    options = options or {}
    creds = [options["user_credentials"]] if "user_credentials" in options else []
    responder = subprocess.Popen(
        [sys.executable, "-c", RESPONDER, url, str(model_repo), RAW_SUBJECT, *creds], stdout=subprocess.PIPE,
        text=True,
    )
    try:
        responder.stdout.readline()
        nc = await nats.connect(url, **options)
        body, headers = encode_binary("input", row)

        async def send() -> None:
            reply = await nc.request(RAW_SUBJECT, body, headers=headers, timeout=5)
            decode_response(reply.data, reply.headers)

        results = [await _light("raw-nats", send, light_count)]
        for level in levels:
            results.append(await closed_loop("raw-nats", send, level, seconds))
        await nc.close()
        return results
    finally:
        responder.terminate()
        responder.wait(timeout=10)


async def _light(path: str, send, count: int) -> Measurement:
    for _ in range(100):
        await send()
    latencies = []
    started = time.perf_counter()
    for _ in range(count):
        t = time.perf_counter()
        await send()
        latencies.append(time.perf_counter() - t)
    p50, p99 = _percentiles(latencies)
    return Measurement(path, 1, count, 0, time.perf_counter() - started, p50, p99)


async def measure_din(stack: Stack, row: np.ndarray, levels: list[int], seconds: float,
                      light_count: int, path: str) -> list[Measurement]:
    secret = read_credentials(stack.credentials_file)["bench"]
    keys = stack.tenant_keys("bench") if stack.security else None
    client = await DinClient.connect(stack.hub_url, "bench", issue_token("bench", secret), keys,
                                     options=stack.nats_options(user=tenant_user("bench")))

    async def send() -> None:
        await client.infer(MODEL, {"input": row}, sla="realtime", binary=True, timeout_ms=5000)

    results = [await _light(path, send, light_count)]
    for level in levels:
        results.append(await closed_loop(path, send, level, seconds))
    await client.close()
    return results


def run_bench(model_repo: Path, din_dir: Path, *, levels: list[int], seconds: float, light_count: int,
              mode: str = "centralized") -> BenchReport:
    """Measure (a), (b) and (c) in one run and return the report."""
    x, _ = load_digits_test(model_repo)
    row = x[:1]
    report = BenchReport(environment={
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": str(__import__("os").cpu_count()),
        "mode": mode,
        "model": MODEL,
    })
    report.measurements.append(measure_direct(model_repo, row, light_count))
    topology = Topology.model_validate(BENCH_TOPOLOGY)
    for security, path in ((True, "din"), (False, "din-plaintext")):
        stack = Stack(topology, ports=PortPlan.free(0), din_dir=din_dir, mode=mode, model_repo=model_repo,
                      write_state=False, security=security)
        with stack.start():
            if security:
                report.measurements += uvloop.run(
                    measure_raw(stack.hub_url, model_repo, row, levels, seconds, light_count, stack.nats_options())
                )
            report.measurements += uvloop.run(measure_din(stack, row, levels, seconds, light_count, path))
    return report
