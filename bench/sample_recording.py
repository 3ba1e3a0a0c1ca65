"""Record a sample window on a whole local stack and render it with ``din report`` (docs/report-screenshot.png).

Starts NATS (hub and leaves), Kafka and every service as processes on free
ports (the default topology), then drives three phases of mixed traffic:
steady, a burst that overloads realtime and floods the rate-limited tenant,
steady again. SLA alerts use a short window so they fire and resolve within
the run. Writes the report, and with ``--screenshot`` a PNG taken with headless
Chromium.

    din bench-sample-recording --out /tmp/din-report.html [--screenshot docs/report-screenshot.png]
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from din.client import DinClient, DinRequestError, NoAnswerError
from din.replay.reader import RecordRange
from din.replay.recorded import load_window
from din.replay.report import render_report
from din.shared.bus.permissions import tenant_user
from din.shared.credentials import issue_token, read_credentials
from din.shared.naming import Topics
from din.shared.topology import load_topology
from din.stack.launcher import DEFAULT_MODEL_REPO, DEFAULT_TOPOLOGY, PortPlan, Stack
from din.workload import load_digits_test

PHASES = (("steady", 14.0, 6, 0.0), ("burst", 10.0, 96, 0.004), ("steady", 14.0, 6, 0.0))
KINDS = (  # (weight, model, sla, allow_degrade, labels, timeout_ms): tight large-model requests degrade under load
    (0.35, "digits-small", "realtime", False, (), None),
    (0.20, "digits-large", "interactive", True, (), None),
    (0.10, "digits-large", "interactive", True, (), 12),
    (0.20, "digits-large", "batch", False, (), None),
    (0.15, "digits-small", "interactive", False, ("pii",), None),
)


def pick_kind(rng: random.Random) -> tuple:
    roll, acc = rng.random(), 0.0
    for kind in KINDS:
        acc += kind[0]
        if roll <= acc:
            return kind
    return KINDS[-1]


async def run_phase(clients: dict[str, DinClient], x, rng: random.Random, name: str, seconds: float,
                    concurrency: int, pause: float) -> None:
    tenants = sorted(clients)
    stop_at = time.monotonic() + seconds

    async def worker(k: int) -> None:
        while time.monotonic() < stop_at:
            tenant = "initech" if name == "burst" and k % 4 == 0 else tenants[rng.randrange(len(tenants))]
            _, model, sla, degrade, labels, timeout_ms = pick_kind(rng)
            i = rng.randrange(len(x))
            try:
                await clients[tenant].infer(model, {"input": x[i:i + 1]}, sla=sla, allow_degrade=degrade,
                                            labels=list(labels), binary=k % 2 == 0, timeout_ms=timeout_ms)
            except (DinRequestError, NoAnswerError):
                pass
            await asyncio.sleep(pause or rng.uniform(0.005, 0.03))

    await asyncio.gather(*(worker(k) for k in range(concurrency)))


async def drive(stack: Stack) -> None:
    secrets = read_credentials(stack.credentials_file)
    x, _ = load_digits_test(DEFAULT_MODEL_REPO)
    clients = {t: await DinClient.connect(stack.hub_url, t, issue_token(t, s),
                                          options=stack.nats_options(user=tenant_user(t)))
               for t, s in secrets.items()}
    rng = random.Random(5)
    for name, seconds, concurrency, pause in PHASES:
        print(f"  phase {name}: {seconds:.0f}s, {concurrency} in flight", flush=True)
        await run_phase(clients, x, rng, name, seconds, concurrency, pause)
    for client in clients.values():
        await client.close()


def record_sample(out: Path, screenshot: Path | None = None) -> int:
    """Record the three phases on a fresh local stack, write the report to ``out`` (and a PNG to ``screenshot``)."""
    os.environ.update({"DIN_TELEMETRY_SLA_WINDOW_S": "10", "DIN_TELEMETRY_ALERT_INTERVAL_S": "1"})
    topology = load_topology(DEFAULT_TOPOLOGY)
    scope = f"sample{uuid.uuid4().hex[:6]}"
    with tempfile.TemporaryDirectory() as tmp:
        stack = Stack(topology, topology_file=DEFAULT_TOPOLOGY, ports=PortPlan.free(edge_sites=2), din_dir=Path(tmp),
                      write_state=False, topic_scope=scope)
        print("starting a whole stack ...", flush=True)
        with stack.start():
            began = time.time() * 1000.0
            asyncio.run(drive(stack))
            time.sleep(12.0)  # let the last alert resolve and every event reach Kafka
            ended = time.time() * 1000.0
            window = asyncio.run(load_window(
                stack.kafka_bootstrap, RecordRange(since_ms=began, until_ms=ended), scope=scope, requests=False,
                bases=(Topics.ADMISSION_DECISIONS, Topics.SCHEDULING_DECISIONS, Topics.COMPLETIONS, Topics.ALERTS),
                client_kwargs=stack.kafka_access.client_kwargs("report")))
    out.write_text(render_report(window, title="DIN recorded window: steady, burst, steady",
                                      source="a local stack (din bench-sample-recording)", scope=scope))
    print(f"wrote {out}: {len(window.completions)} completions, {len(window.alerts)} alerts", flush=True)
    if screenshot:
        browser = shutil.which("chromium") or shutil.which("chromium-browser")
        if browser is None:
            print("chromium not found: apt-get install chromium", file=sys.stderr)
            return 1
        with tempfile.TemporaryDirectory() as profile:
            subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                            "--disable-component-update", "--disable-sync", "--no-first-run",
                            f"--user-data-dir={profile}", f"--screenshot={screenshot.resolve()}",
                            "--window-size=1400,2000", f"file://{out.resolve()}"],
                           check=True, timeout=120, capture_output=True)
        print(f"wrote {screenshot}", flush=True)
    return 0
