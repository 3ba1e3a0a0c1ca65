"""``din bench-sites``: every site standing on its own, measured over real WAN links in one run.

Three stacks of the same topology (hub ``cloud``; ``factory`` behind a dedicated line, 2 ms one way;
``branch`` behind the internet, 40 ± 10 ms), payload security on, clients at the factory's own NATS server:

* **Edge-local latency**: digits-small requests from the factory, one at a time, served by the factory's
  executor, against (a) a control plane per site over the WAN links, (b) one control plane at the hub over
  the same links (every request crosses the WAN to be admitted, classified and placed), (c) a control plane
  per site on a loopback-only stack (no WAN). Goal: (a) within 1 ms of (c) at p50; (b) pays at least two WAN
  round trips.
* **Partition** (stack a): the factory's link cut for ``partition_s``; factory-local requests and requests
  that need the hub's large model sent throughout, then the link restored. Counted: ok, each error code,
  unanswered, duplicated.
* **Kill -9 under load** (stack a, supervised as ``din up`` supervises): each factory control-plane process in
  turn; the counts over the load and the time until the process answers health again.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import signal
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import uvloop

from bench.tally import Load, Tally
from din.stack.launcher import PortPlan, Stack
from din.stack.supervision import RestartPolicy, Supervisor
from din.stack.wan import ToxiproxyClient
from shared.contracts.events import HealthV1
from shared.credentials import issue_token, read_credentials
from shared.naming import Subjects
from shared.topology import Topology

TENANTS = ("globex",)
SITES_TOPOLOGY = {
    "name": "bench-sites",
    "control_plane": "per-site",
    "sites": [
        {"name": "cloud", "role": "hub", "cost_per_1k": 0.4,
         "executors": [{"id": "cloud-1", "models": ["digits-large", "digits-small"]}]},
        {"name": "factory", "role": "edge", "cost_per_1k": 0.1,
         "executors": [{"id": "factory-1", "models": ["digits-small"]}]},
        {"name": "branch", "role": "edge", "cost_per_1k": 0.1,
         "executors": [{"id": "branch-1", "models": ["digits-small"]}]},
    ],
    "links": [{"between": ["cloud", "factory"], "path": "dedicated"},
              {"between": ["cloud", "branch"], "path": "internet"}],
    "security": {"plaintext_ingress": list(TENANTS)},
    "tenants": [{"name": "globex", "rate_per_s": 5000, "burst": 5000}],
}
KILLED = ("scheduler-factory", "classifier-factory", "admission-factory")


@dataclass
class LatencyRow:
    """Edge-local requests from the factory under one arrangement."""

    arrangement: str
    requests: int
    ok: int
    served_at_factory: int
    p50_ms: float
    p99_ms: float
    mean_ms: float


@dataclass
class FaultRow:
    """One fault under load: what every request got, and how long recovery took."""

    fault: str
    traffic: str
    sent: int
    outcome: dict[str, int]
    recovery_s: float | None = None


@dataclass
class SitesReport:
    """Everything ``din bench-sites`` measured in one run."""

    latency: list[LatencyRow] = field(default_factory=list)
    faults: list[FaultRow] = field(default_factory=list)
    partition_s: float = 0.0
    machine: dict[str, str] = field(default_factory=dict)

    def ratios(self) -> dict[str, float]:
        by = {row.arrangement: row for row in self.latency}
        local, hub, loopback = by["per-site, WAN"], by["hub control plane, WAN"], by["per-site, loopback"]
        return {
            "per_site_minus_loopback_p50_ms": round(local.p50_ms - loopback.p50_ms, 3),
            "hub_routed_over_per_site_p50": round(hub.p50_ms / local.p50_ms, 2),
            "hub_routed_minus_per_site_p50_ms": round(hub.p50_ms - local.p50_ms, 3),
        }

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "ratios": self.ratios()}, indent=2, sort_keys=True)

    def to_markdown(self) -> str:
        ratios = self.ratios()
        lines = [
            "# Sites: a control plane per site, over WAN links (din bench-sites)",
            "",
            f"Machine: {self.machine.get('cpus')} CPUs, {self.machine.get('python')}; payload security on; links "
            "through Toxiproxy (factory dedicated 2 ms one way, branch internet 40 ± 10 ms).",
            "",
            "## Edge-local requests at the factory (digits-small, one at a time)",
            "",
            "| arrangement | requests | ok | served at factory | p50 ms | p99 ms | mean ms |",
            "|---|---:|---:|---:|---:|---:|---:|",
            *(f"| {r.arrangement} | {r.requests} | {r.ok} | {r.served_at_factory} | {r.p50_ms:.2f} | "
              f"{r.p99_ms:.2f} | {r.mean_ms:.2f} |" for r in self.latency),
            "",
            f"Per-site over WAN minus loopback-only, p50: {ratios['per_site_minus_loopback_p50_ms']:+.2f} ms; "
            f"hub-routed over per-site, p50: {ratios['hub_routed_over_per_site_p50']:.2f}x "
            f"({ratios['hub_routed_minus_per_site_p50_ms']:+.2f} ms).",
            "",
            f"## Faults under load (partition {self.partition_s:g} s; kill -9, supervised restart)",
            "",
            "| fault | traffic | sent | outcome | recovery s |",
            "|---|---|---:|---|---:|",
            *(f"| {r.fault} | {r.traffic} | {r.sent} | "
              f"{', '.join(f'{k} {v}' for k, v in sorted(r.outcome.items()))} | "
              f"{'' if r.recovery_s is None else f'{r.recovery_s:.2f}'} |" for r in self.faults),
        ]
        return "\n".join(lines)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def _stack(topology: Topology, din_dir: Path, model_repo: Path, *, wan: bool) -> Stack:
    edges = sum(1 for s in topology.sites if s.role == "edge")
    return Stack(topology, ports=PortPlan.free(edges), din_dir=din_dir, model_repo=model_repo, write_state=False,
                 wan=wan)


def _tokens(stack: Stack) -> dict[str, str]:
    secrets = read_credentials(stack.credentials_file)
    return {tenant: issue_token(tenant, secrets[tenant], ttl_s=3600) for tenant in TENANTS}


async def _health(url: str, service: str, instance: str, options: dict) -> HealthV1 | None:
    import nats

    nc = await nats.connect(url, **options)
    try:
        reply = await nc.request(Subjects.health(service, instance), b"", timeout=0.5)
        return HealthV1.model_validate_json(reply.data)
    except Exception:
        return None
    finally:
        await nc.close()


async def _edge_latency(stack: Stack, arrangement: str, requests: int) -> LatencyRow:
    async with Load(stack.nats_urls["factory"], _tokens(stack), stack.nats_options("factory")) as load:
        for _ in range(20):
            await load.request("globex", "digits-small")
            await load.settle(5.0)
        load.tally = Tally()
        for _ in range(requests):
            await load.request("globex", "digits-small")
            await load.settle(5.0)
        times = list(load.tally.latency_ms.values())
        outcome = load.tally.outcome()
    return LatencyRow(arrangement, requests, outcome.get("ok", 0), load.tally.sites.get("factory", 0),
                      round(statistics.median(times), 3), round(_percentile(times, 0.99), 3),
                      round(statistics.fmean(times), 3))


async def _partition(stack: Stack, seconds: float) -> list[FaultRow]:
    links = ToxiproxyClient(stack.toxiproxy.api_url)
    async with Load(stack.nats_urls["factory"], _tokens(stack), stack.nats_options("factory")) as load:
        links.set_enabled("factory", False)
        local, remote = [], []
        try:
            ends = time.monotonic() + seconds
            while time.monotonic() < ends:
                local.append(await load.request("globex", "digits-small"))
                remote.append(await load.request("globex", "digits-large"))
                await asyncio.sleep(0.05)
            await load.settle(10.0)
        finally:
            links.set_enabled("factory", True)
    return [FaultRow("factory partitioned", "factory-local (digits-small)", len(local), load.tally.outcome(local)),
            FaultRow("factory partitioned", "needs the hub (digits-large)", len(remote), load.tally.outcome(remote))]


async def _kill(stack: Stack, name: str, requests: int) -> FaultRow:
    proc = next(p for p in stack.processes if p.name == name)
    service = name.split("-")[0]
    async with Load(stack.nats_urls["factory"], _tokens(stack), stack.nats_options("factory")) as load:
        sender = asyncio.create_task(load.send("globex", "digits-small", requests, every_s=0.025))
        await asyncio.sleep(1.0)
        old = proc.pid
        killed = time.monotonic()
        os.kill(old, signal.SIGKILL)
        recovered = None
        while recovered is None and time.monotonic() - killed < 60:
            health = await _health(stack.nats_urls["factory"], service, "factory", stack.nats_options("factory"))
            if proc.pid != old and health is not None and health.ready:
                recovered = time.monotonic() - killed
            await asyncio.sleep(0.05)
        await sender
        outcome = await load.settle(10.0)
    return FaultRow(f"kill -9 {name}", "factory-local (digits-small)", requests, outcome,
                    None if recovered is None else round(recovered, 2))


def run_sites_bench(model_repo: Path, din_dir: Path, *, requests: int = 300, partition_s: float = 30.0,
                    kill_requests: int = 200) -> SitesReport:
    """Start the three stacks in turn and measure them (see the module docstring)."""
    report = SitesReport(partition_s=partition_s, machine={"cpus": str(os.cpu_count()),
                                                           "python": platform.python_version()})
    per_site = Topology.model_validate(SITES_TOPOLOGY)
    hub_only = per_site.model_copy(update={"control_plane": "hub"})
    for arrangement, topology, wan in (("hub control plane, WAN", hub_only, True),
                                       ("per-site, loopback", per_site, False)):
        with _stack(topology, din_dir / arrangement.split(",")[0].replace(" ", "-"), model_repo, wan=wan) as stack:
            report.latency.append(uvloop.run(_edge_latency(stack, arrangement, requests)))
    with _stack(per_site, din_dir / "per-site-wan", model_repo, wan=True) as stack:
        report.latency.insert(0, uvloop.run(_edge_latency(stack, "per-site, WAN", requests)))
        report.faults += uvloop.run(_partition(stack, partition_s))
        stop = threading.Event()
        supervisor = Supervisor(stack, RestartPolicy(first_delay_s=0.2), report=lambda line: None)
        watcher = threading.Thread(target=supervisor.run, kwargs={"poll_s": 0.1, "until": stop}, daemon=True)
        watcher.start()
        try:
            for name in KILLED:
                report.faults.append(uvloop.run(_kill(stack, name, kill_requests)))
        finally:
            stop.set()
            watcher.join(timeout=5)
    return report
