"""Benchmark: what the closed bus costs, open against closed in the same run.

1. ``raw``: nats-py request-reply from a client at an edge site's server to a
   responder process at the hub (every request crosses the leaf link twice), on
   three networks started side by side and measured in alternating order:

   * ``open``: no authentication, plaintext (``--insecure``);
   * ``closed``: DIN's default: JWT users with least-privilege permissions, the
     leaf link over TLS verified against DIN's CA, client connections on loopback
     in plaintext;
   * ``closed+tls``: plus TLS on client connections (compose, where they leave
     the machine).

   For each: p50/p99 one request at a time, throughput with ``--concurrency`` in
   flight, and connection set-up time (connect, authenticate, first round trip).
2. ``din`` (``--din``, needs Kafka and the model zoo): the full DIN inference path,
   client at the hub and the model served at the edge, on a closed stack and an
   ``--insecure`` one, one after the other.

Writes ``bus.json`` and ``bus.md`` to ``bench/results/`` (or ``--out``).

    din bench-bus [--seconds 2] [--concurrency 16] [--rounds 3] [--din]

The responder is this module run as ``python -m bench.bus URL [CREDS CA]``.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nats
import numpy as np
import uvloop

from din.bench import RESULTS_DIR, write_results
from din.shared.bus.connect import nats_options
from din.shared.bus.permissions import Permissions, service_inbox
from din.shared.naming import Subjects
from din.shared.topology import Topology

HUB, EDGE = "cloud", "factory"
SUBJECT = Subjects.schedule(HUB)
"""A subject an edge site's leaf may send to the hub (these networks run no DIN service)."""
MODES = ("open", "closed", "closed+tls")
PAYLOAD = 1024
DIN_CONCURRENCY = 4
"""Requests in flight on the DIN path: the edge executor's capacity (more is shed as overloaded)."""
BENCH_USER = "bench-client"
RESPONDER_USER = "bench-responder"
TOPOLOGY = {
    "name": "bench-bus",
    "sites": [
        {"name": HUB, "role": "hub", "executors": []},
        {"name": EDGE, "role": "edge", "executors": [{"id": f"{EDGE}-1", "models": ["digits-small"], "capacity": 4}]},
    ],
    "links": [{"between": [HUB, EDGE], "path": "dedicated"}],
    "tenants": [{"name": "bench", "rate_per_s": 100000, "burst": 100000}],
}


def _topology() -> Topology:
    return Topology.model_validate(TOPOLOGY)


# --------------------------------------------------------------------------- responder


async def respond(url: str, creds: str | None, ca: str | None) -> None:
    nc = await nats.connect(url, **nats_options(url, HUB, creds, ca))

    async def echo(msg) -> None:
        await msg.respond(msg.data)

    await nc.subscribe(SUBJECT, cb=echo, pending_msgs_limit=1_000_000, pending_bytes_limit=2**31)
    await nc.flush()
    print("ready", flush=True)
    await asyncio.Event().wait()


# --------------------------------------------------------------------------- networks


class Network:
    """A hub and one edge server of one mode, its responder process, and how the client connects."""

    def __init__(self, mode: str, din_dir: Path) -> None:
        from din.stack.launcher import Stack

        self.mode = mode
        self.stack = Stack.brokers_only(_topology(), kafka=False, din_dir=din_dir / mode.replace("+", "-"),
                                        insecure=mode == "open", client_tls=mode == "closed+tls")
        self.responder: subprocess.Popen | None = None

    def start(self) -> Network:
        self.stack.start()
        argv = [sys.executable, "-m", "din.bench.bus", self.stack.nats_urls[HUB]]
        if self.stack.bus is not None:
            bus = self.stack.bus
            client = Permissions(publish=(SUBJECT,), subscribe=(f"{service_inbox(EDGE, BENCH_USER)}.>",),
                                 inbox_prefix=service_inbox(EDGE, BENCH_USER))
            responder = Permissions(subscribe=(SUBJECT,), responses=1)
            bus.nats.ensure(BENCH_USER, client)
            argv += [str(bus.nats.ensure(RESPONDER_USER, responder)), str(bus.ca.cert_path)]
        self.responder = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        if self.responder.stdout.readline().strip() != "ready":
            raise RuntimeError(f"responder of {self.mode} did not start")
        return self

    def options(self) -> dict:
        if self.stack.bus is None:
            return {}
        return nats_options(self.url, EDGE, self.stack.bus.creds(BENCH_USER), self.stack.bus.ca.cert_path)

    @property
    def url(self) -> str:
        return self.stack.nats_urls[EDGE]

    def stop(self) -> None:
        if self.responder is not None:
            self.responder.terminate()
            self.responder.wait(timeout=10)
        self.stack.stop()


def _ms(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values) * 1e3, q)) if values else 0.0


async def connect_times(net: Network, count: int) -> float:
    """p50 ms of connecting, authenticating and one round trip."""
    times = []
    for _ in range(count):
        t = time.perf_counter()
        nc = await nats.connect(net.url, **net.options())
        await nc.request(SUBJECT, b"x", timeout=5)
        times.append(time.perf_counter() - t)
        await nc.close()
    return _ms(times, 50)


async def measure_round(net: Network, payload: bytes, count: int, seconds: float, concurrency: int) -> dict:
    nc = await nats.connect(net.url, **net.options())
    for _ in range(200):
        await nc.request(SUBJECT, payload, timeout=5)
    latencies = []
    for _ in range(count):
        t = time.perf_counter()
        await nc.request(SUBJECT, payload, timeout=5)
        latencies.append(time.perf_counter() - t)
    done = 0
    errors = 0
    stop_at = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done, errors
        while time.perf_counter() < stop_at:
            try:
                await nc.request(SUBJECT, payload, timeout=5)
                done += 1
            except Exception:  # noqa: BLE001 - counted
                errors += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    await nc.close()
    return {"p50_ms": _ms(latencies, 50), "p99_ms": _ms(latencies, 99), "rps": done / seconds, "errors": errors}


async def measure_raw(nets: dict[str, Network], *, seconds: float, concurrency: int, rounds: int) -> dict:
    payload = np.random.default_rng(7).bytes(PAYLOAD)
    rows: dict[str, list[dict]] = {mode: [] for mode in nets}
    for round_ in range(rounds):
        order = MODES if round_ % 2 == 0 else tuple(reversed(MODES))
        for mode in order:
            row = await measure_round(nets[mode], payload, 1500, seconds, concurrency)
            rows[mode].append(row)
            print(f"  round {round_} {mode:<11} p50 {row['p50_ms']:.3f} ms  {row['rps']:8.0f} req/s", flush=True)
    summary = {}
    for mode, mode_rows in rows.items():
        summary[mode] = {key: statistics.median(r[key] for r in mode_rows) for key in ("p50_ms", "p99_ms", "rps")}
        summary[mode]["errors"] = sum(r["errors"] for r in mode_rows)
        summary[mode]["connect_ms"] = await connect_times(nets[mode], 30)
    for mode in nets:
        summary[mode]["added_p50_ms"] = summary[mode]["p50_ms"] - summary["open"]["p50_ms"]
        summary[mode]["throughput_ratio"] = summary[mode]["rps"] / summary["open"]["rps"]
    return summary


# --------------------------------------------------------------------------- the DIN path


def measure_din(din_dir: Path, seconds: float, concurrency: int, rounds: int) -> dict:
    from din.stack.launcher import DEFAULT_MODEL_REPO, PortPlan, Stack
    from din.workload import load_digits_test

    row = load_digits_test(DEFAULT_MODEL_REPO)[0][:1]
    results = {}
    for insecure in (False, True):
        stack = Stack(_topology(), ports=PortPlan.free(1), din_dir=din_dir / f"din-{insecure}",
                      model_repo=DEFAULT_MODEL_REPO, write_state=False, insecure=insecure)
        with stack.start():
            mode = "open" if insecure else "closed"
            results[mode] = uvloop.run(_din_path(stack, row, seconds, concurrency, rounds))
            print(f"  DIN {mode}: {results[mode]}", flush=True)
    for mode in results:
        results[mode]["added_p50_ms"] = results[mode]["p50_ms"] - results["open"]["p50_ms"]
        results[mode]["throughput_ratio"] = results[mode]["loaded_rps"] / results["open"]["loaded_rps"]
    return results


async def _din_path(stack, row: np.ndarray, seconds: float, concurrency: int, rounds: int) -> dict:
    from din.bench.inference_path import closed_loop
    from din.client import DinClient
    from din.shared.bus.permissions import tenant_user
    from din.shared.credentials import issue_token, read_credentials

    token = issue_token("bench", read_credentials(stack.credentials_file)["bench"])
    client = await DinClient.connect(stack.hub_url, "bench", token, stack.tenant_keys("bench"),
                                     options=stack.nats_options(HUB, tenant_user("bench")))

    seen: collections.Counter = collections.Counter()

    async def send() -> None:
        try:
            await client.infer("digits-small", {"input": row}, sla="interactive", binary=True, timeout_ms=5000)
        except Exception as exc:
            seen[getattr(getattr(exc, "error", None), "code", type(exc).__name__)] += 1
            raise

    for _ in range(50):
        await send()
    ones, manys = [], []
    for _ in range(rounds):
        ones.append(await closed_loop("din", send, 1, seconds))
        manys.append(await closed_loop("din", send, DIN_CONCURRENCY, seconds))
    await client.close()
    return {"p50_ms": statistics.median(r.p50_ms for r in ones), "p99_ms": statistics.median(r.p99_ms for r in ones),
            "loaded_rps": statistics.median(r.throughput for r in manys),
            "errors": sum(r.errors for r in ones + manys), "error_kinds": {str(k): n for k, n in seen.most_common(3)}}


# --------------------------------------------------------------------------- report


def markdown(report: dict) -> str:
    lines = [
        "# The closed bus: open against closed, one run",
        "",
        f"{report['machine']}; {PAYLOAD} B request-reply from a client at the edge server to a responder at the "
        f"hub (two leaf crossings per request), {report['rounds']} alternating rounds of {report['seconds']} s, "
        f"{report['concurrency']} in flight under load; medians of the rounds.",
        "",
        "| bus | p50 ms | p99 ms | added p50 ms | req/s loaded | throughput vs open | connect ms (p50) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for mode, row in report["raw"].items():
        lines.append(f"| {mode} | {row['p50_ms']:.3f} | {row['p99_ms']:.3f} | {row['added_p50_ms']:+.3f} | "
                     f"{row['rps']:.0f} | {row['throughput_ratio']:.2f}x | {row['connect_ms']:.2f} |")
    lines += ["", "`open`: no authentication, plaintext (`din up --insecure`). `closed`: DIN's default, JWT users "
              "with least-privilege permissions and the leaf link over TLS. `closed+tls`: plus TLS on client "
              "connections (compose)."]
    if report.get("din"):
        lines += ["", "## The DIN inference path", "",
                  "Client at the hub, `digits-small` served at the edge (requests cross the leaf link), security "
                  f"(payload envelopes) on in both, {DIN_CONCURRENCY} in flight under load; one stack after the "
                  "other. Requests shed as `overloaded` count as errors (column).", "",
                  "| bus | p50 ms | p99 ms | added p50 ms | req/s loaded | throughput vs open | errors |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for mode, row in report["din"].items():
            lines.append(f"| {mode} | {row['p50_ms']:.3f} | {row['p99_ms']:.3f} | {row['added_p50_ms']:+.3f} | "
                         f"{row['loaded_rps']:.0f} | {row['throughput_ratio']:.2f}x | {row['errors']} |")
        if any(row["errors"] > row["loaded_rps"] * report["seconds"] for row in report["din"].values()):
            lines += ["", "**Not a measurement of the bus**: in this run admission shed most requests of this path "
                      "(`overloaded`) in both modes, so the rows compare shedding, not the bus; the raw table above "
                      "is the bus's cost."]
    return "\n".join(lines) + "\n"


def run_bus_bench(seconds: float = 2.0, concurrency: int = 16, rounds: int = 3, din: bool = False,
                  out: Path = RESULTS_DIR) -> int:
    """Run the benchmark and write ``bus.json`` / ``bus.md``; returns the exit code."""
    logging.getLogger("asyncio").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="din-bench-bus-") as tmp:
        nets: dict[str, Network] = {}
        try:
            for mode in MODES:
                nets[mode] = Network(mode, Path(tmp)).start()
            raw = uvloop.run(measure_raw(nets, seconds=seconds, concurrency=concurrency, rounds=rounds))
        finally:
            for net in nets.values():
                net.stop()
        din_rows = measure_din(Path(tmp), seconds, concurrency, rounds) if din else None
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    report = {"machine": machine,
              "seconds": seconds, "concurrency": concurrency, "rounds": rounds, "raw": raw, "din": din_rows}
    write_results(out, "bus", json.dumps(report, indent=2), markdown(report))
    return 0


if __name__ == "__main__":
    uvloop.run(respond(sys.argv[1], *(sys.argv[2:4] if len(sys.argv) > 3 else (None, None))))
