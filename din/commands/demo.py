"""``din demo``: the main job. Start the whole network, drive a mixed workload, print a summary, stop."""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path

from din.client import DinClient, DinRequestError
from din.commands.report import KAFKA_USER as REPORT_USER
from din.commands.report import REPORT_TOPICS
from din.replay.endpoints import Endpoints
from din.replay.reader import RecordRange
from din.replay.recorded import load_window
from din.replay.report import render_report
from din.shared.bus.permissions import tenant_user
from din.shared.credentials import issue_token, read_credentials
from din.shared.security import PrincipalKeys
from din.shared.topology import load_topology
from din.stack.launcher import (
    DEFAULT_DIN_DIR,
    DEFAULT_MODEL_REPO,
    DEFAULT_TOPOLOGY,
    SCHEDULER_MODES,
    PortPlan,
    Stack,
    kept_data_dir,
)
from din.stack.wan import ToxiproxyClient
from din.workload import load_digits_test, mixed_plan, run_workload

REPORT_SETTLE_S = 1.0


def register(subparsers: argparse._SubParsersAction) -> None:
    demo = subparsers.add_parser(
        "demo",
        help="start the network, run a mixed workload across tenants, SLA classes and sites, print a summary",
        description="Starts NATS (hub and leaves), Kafka and every service, sends a mixed workload of held-out "
        "digits as several tenants, prints where each class was served and how fast, then stops everything.",
    )
    demo.add_argument("--topology", type=Path, default=DEFAULT_TOPOLOGY)
    demo.add_argument("--mode", choices=SCHEDULER_MODES, default="centralized")
    demo.add_argument("--requests", type=int, default=1500, help="how many requests to send (default %(default)s)")
    demo.add_argument("--concurrency", type=int, default=32, help="requests in flight at once")
    demo.add_argument("--port-offset", type=int, default=0, help="add N to every port")
    demo.add_argument("--din-dir", type=Path, default=DEFAULT_DIN_DIR)
    demo.add_argument("--no-wan", action="store_true", help="plain loopback links instead of Toxiproxy WAN links")
    demo.set_defaults(handler=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    topology = load_topology(args.topology)
    stack = Stack(
        topology,
        topology_file=args.topology,
        ports=PortPlan().offset(args.port_offset),
        din_dir=args.din_dir,
        mode=args.mode,
        wan=not args.no_wan,
        data_dir=kept_data_dir(args.din_dir),
    )
    print(f"Starting DIN '{topology.name}' ({args.mode} scheduling): {len(topology.sites)} sites, "
          f"{sum(len(s.executors) for s in topology.sites)} executors ...", flush=True)
    with stack.start():
        print(stack.describe(), flush=True)
        credentials = read_credentials(stack.credentials_file)
        keys = {tenant: stack.tenant_keys(tenant) for tenant in credentials}
        started_ms = time.time() * 1000.0
        report = asyncio.run(_drive(stack, credentials, keys, args.requests, args.concurrency))
        print("\nSummary (latency is client-observed, end to end):\n")
        print(report.table())
        print("\nMulti-stage requests:\n")
        print(asyncio.run(_multi_stage(stack, credentials, keys)))
        if stack.toxiproxy is not None and "factory" in stack.nats_urls:
            print("\nSites (clients at the factory's own NATS server, links through Toxiproxy):\n")
            print(asyncio.run(_sites(stack, credentials, keys["acme"])))
        html = stack.run_dir / "report.html"
        asyncio.run(_write_report(stack.kafka_bootstrap, started_ms - 1000.0, html,
                                  stack.kafka_access.client_kwargs(REPORT_USER), stack.keys_dir))
        print(f"\nEvery decision, completion and (sealed) request is in Kafka at {stack.kafka_bootstrap}; "
              f"the recorded window as a self-contained HTML report: {html}; logs under {stack.run_dir}.")
    print("Stack stopped.")
    return 0


async def _write_report(bootstrap: str, since_ms: float, out: Path, client_kwargs: dict, keys_dir: Path) -> None:
    """Render the demo's recorded window (what `din report` does for any window, as its Kafka user, checking
    every record's signature)."""
    await asyncio.sleep(REPORT_SETTLE_S)
    endpoints = Endpoints(kafka=bootstrap, nats=None, credentials=None, topology=None, keys_dir=keys_dir)
    window = await load_window(bootstrap, RecordRange(since_ms=since_ms, until_ms=None, offsets=None),
                               requests=False, bases=REPORT_TOPICS, client_kwargs=client_kwargs,
                               verifier=endpoints.record_verifier())
    out.write_text(render_report(window, title="DIN demo", source=bootstrap, scope=None))


async def _client(stack: Stack, tenant: str, credentials: dict[str, str], keys: PrincipalKeys | None,
                  site: str | None = None) -> DinClient:
    """A client of ``tenant`` at ``site`` (default: the hub), logged in as the tenant's NATS user."""
    site = site or stack.topology.hub.name
    return await DinClient.connect(stack.nats_urls[site], tenant, issue_token(tenant, credentials[tenant]), keys,
                                   options=stack.nats_options(site, tenant_user(tenant)), site=site)


async def _multi_stage(stack: Stack, credentials: dict[str, str], keys: dict[str, PrincipalKeys],
                       splits: int = 40) -> str:
    """A few split requests whose raw input must stay at factory, and streamed generations, co-located at factory
    for acme's sensitive data and disaggregated from branch to cloud for initech's."""
    x, y = load_digits_test(DEFAULT_MODEL_REPO)
    lines = []
    async with await _client(stack, "acme", credentials, keys["acme"]) as client:
        points: dict[str, int] = {}
        correct = 0
        for i in range(splits):
            result = await client.infer("digits-large", {"input": x[i : i + 1]}, labels=["pii"], split="auto",
                                        split_protection="quantize:4")
            points[result.served_by.split_point] = points.get(result.served_by.split_point, 0) + 1
            correct += int(result.outputs["label"][0]) == int(y[i])
        lines.append(f"  split inference (acme, pii, auto, quantize:4): {correct}/{splits} correct; split points "
                     f"{points}; stages {' -> '.join(result.served_by.stages)}")
        lines.append(await _stream_line(client, "acme", "def ", labels=["pii"]))
    async with await _client(stack, "initech", credentials, keys["initech"]) as client:
        lines.append(await _stream_line(client, "initech", "import "))
    return "\n".join(lines)


async def _sites(stack: Stack, credentials: dict[str, str], keys: PrincipalKeys, count: int = 50) -> str:
    """Edge-local requests from the factory, then the same with the factory's link to the hub cut."""
    x, _ = load_digits_test(DEFAULT_MODEL_REPO)
    links = ToxiproxyClient(stack.toxiproxy.api_url)
    lines = []
    async with await _client(stack, "acme", credentials, keys, "factory") as client:
        for state in ("link up", "link to the hub cut"):
            if state != "link up":
                links.set_enabled("factory", False)
            times, sites, errors = [], {}, {}
            try:
                for i in range(count):
                    started = time.perf_counter()
                    try:
                        result = await client.infer("digits-small", {"input": x[i : i + 1]}, labels=["pii"])
                    except DinRequestError as error:
                        errors[error.error.code.value] = errors.get(error.error.code.value, 0) + 1
                        continue
                    times.append((time.perf_counter() - started) * 1000.0)
                    sites[result.served_by.site] = sites.get(result.served_by.site, 0) + 1
            finally:
                links.set_enabled("factory", True)
            median = f"p50 {statistics.median(times):.1f} ms" if times else "none answered"
            lines.append(f"  acme pii digits-small from the factory, {state}: {len(times)}/{count} ok, served at "
                         f"{sites}, {median}{f', errors {errors}' if errors else ''}")
    return "\n".join(lines)


async def _stream_line(client: DinClient, tenant: str, prompt: str, **options) -> str:
    chunks = [chunk async for chunk in client.generate("charlm", prompt, max_tokens=48, **options)]
    last = chunks[-1]
    text = (prompt + "".join(c.text for c in chunks)).replace("\n", "\\n")
    return (f"  generation ({tenant}): {text!r}\n    ttft {last.timings_ms['ttft']:.1f} ms, tpot "
            f"{last.timings_ms['tpot']:.2f} ms, stages {' -> '.join(last.served_by.stages)}")


async def _drive(stack: Stack, credentials: dict[str, str], keys: dict[str, PrincipalKeys], count: int,
                 concurrency: int):
    x, y = load_digits_test(DEFAULT_MODEL_REPO)
    tenants = sorted(credentials)
    clients = {t: await _client(stack, t, credentials, keys[t]) for t in tenants}
    try:
        plan = mixed_plan(tenants, count, len(x))
        print(f"\nSending {count} requests as {', '.join(tenants)} ({concurrency} in flight) ...", flush=True)
        return await run_workload(clients, plan, x, y, concurrency=concurrency, progress=True)
    finally:
        for client in clients.values():
            await client.close()
