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
* **Hub message rate against executors** (stacks a and b; last, since thousands of heartbeats a second load the
  factory's scheduler on this 2-core machine): ``SIMULATED`` extra executors at the factory (the
  operator publishes their heartbeats every ``SIM_INTERVAL_S``, serving a model nobody asks for), and the hub
  NATS server's messages in plus out per second from its monitoring endpoint (``/varz``) over a window. Goal:
  with a control plane per site, independent of the executors at the factory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import signal
import statistics
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import uvloop

from din.bench.tally import Load, Tally
from din.shared.contracts.events import HealthV1, HeartbeatV1, ModelLoadedV1
from din.shared.credentials import issue_token, read_credentials
from din.shared.naming import Subjects
from din.shared.security import ControlSigner, PrincipalKeys, key_file, site_principal
from din.shared.topology import Topology
from din.stack.launcher import PortPlan, Stack
from din.stack.supervision import RestartPolicy, Supervisor
from din.stack.wan import ToxiproxyClient

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
SIMULATED = (0, 100, 1000)
SIM_INTERVAL_S = 0.5
SIM_MODEL = "bench-simulated"
RATE_WINDOW_S = 4.0


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
class HubRateRow:
    """The hub NATS server's traffic with ``executors`` extra (simulated) executors at the factory."""

    arrangement: str
    executors: int
    heartbeats_per_s: float
    hub_msgs_per_s: float
    hub_kb_per_s: float


@dataclass
class SitesReport:
    """Everything ``din bench-sites`` measured in one run."""

    latency: list[LatencyRow] = field(default_factory=list)
    faults: list[FaultRow] = field(default_factory=list)
    hub_rate: list[HubRateRow] = field(default_factory=list)
    partition_s: float = 0.0
    machine: dict[str, str] = field(default_factory=dict)

    def ratios(self) -> dict[str, float]:
        by = {row.arrangement: row for row in self.latency}
        local, hub, loopback = by["per-site, WAN"], by["hub control plane, WAN"], by["per-site, loopback"]
        ratios = {
            "per_site_minus_loopback_p50_ms": round(local.p50_ms - loopback.p50_ms, 3),
            "hub_routed_over_per_site_p50": round(hub.p50_ms / local.p50_ms, 2),
            "hub_routed_minus_per_site_p50_ms": round(hub.p50_ms - local.p50_ms, 3),
        }
        for arrangement, key in (("per-site, WAN", "per_site"), ("hub control plane, WAN", "hub_control_plane")):
            rows = sorted((r for r in self.hub_rate if r.arrangement == arrangement), key=lambda r: r.executors)
            if len(rows) > 1 and rows[0].hub_msgs_per_s > 0:
                ratios[f"{key}_hub_rate_most_over_fewest_executors"] = round(
                    rows[-1].hub_msgs_per_s / rows[0].hub_msgs_per_s, 2)
        return ratios

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
            "",
            f"## The hub's message rate against executors at the factory (simulated, heartbeat every "
            f"{SIM_INTERVAL_S:g} s; hub NATS server in + out over {RATE_WINDOW_S:g} s)",
            "",
            "| arrangement | extra executors | their heartbeats/s | hub msgs/s | hub KB/s |",
            "|---|---:|---:|---:|---:|",
            *(f"| {r.arrangement} | {r.executors} | {r.heartbeats_per_s:.0f} | {r.hub_msgs_per_s:.0f} | "
              f"{r.hub_kb_per_s:.1f} |" for r in self.hub_rate),
            "",
            "Hub rate with the most executors over the fewest: per-site "
            f"{ratios.get('per_site_hub_rate_most_over_fewest_executors', float('nan')):.2f}x, hub control plane "
            f"{ratios.get('hub_control_plane_hub_rate_most_over_fewest_executors', float('nan')):.2f}x.",
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


def _hub_traffic(stack: Stack) -> tuple[int, int]:
    """The hub NATS server's messages and bytes in plus out so far (its ``/varz``)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.ports.hub_monitor}/varz", timeout=5) as answer:
        varz = json.load(answer)
    return varz["in_msgs"] + varz["out_msgs"], varz["in_bytes"] + varz["out_bytes"]


async def _simulate_executors(nc, count: int, stop: asyncio.Event, signer: ControlSigner) -> None:
    """Heartbeats of ``count`` made-up executors at the factory, each every ``SIM_INTERVAL_S``, signed with the
    factory's key (as its executors sign theirs)."""
    beats = [HeartbeatV1(executor=f"sim-{i}", site="factory", capacity=8, queue_depth={}, inflight=0,
                         recent_latency_ms=1.0, interval_s=SIM_INTERVAL_S, sent_ms=0.0,
                         models=[ModelLoadedV1(name=SIM_MODEL, version="1", max_batch_size=8,
                                               compute_ms_per_item=1.0)]) for i in range(count)]
    while not stop.is_set():
        for beat in beats:
            beat.sent_ms = time.time() * 1000.0
            subject, body = Subjects.heartbeat("factory", beat.executor), beat.model_dump_json().encode()
            await nc.publish(subject, body, headers=signer.headers(subject, body))
        await nc.flush()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(SIM_INTERVAL_S):
                await stop.wait()


async def _hub_rate(stack: Stack, arrangement: str, executors: int) -> HubRateRow:
    import nats

    nc = await nats.connect(stack.nats_urls["factory"], **stack.nats_options("factory"))
    stop = asyncio.Event()
    keys = key_file(stack.keys_dir, site_principal("factory"))
    signer = ControlSigner(PrincipalKeys.load(keys).identity if stack.security else None)
    simulator = asyncio.create_task(_simulate_executors(nc, executors, stop, signer))
    try:
        await asyncio.sleep(3 * SIM_INTERVAL_S)
        msgs, size = _hub_traffic(stack)
        started = time.monotonic()
        await asyncio.sleep(RATE_WINDOW_S)
        msgs_after, size_after = _hub_traffic(stack)
        elapsed = time.monotonic() - started
    finally:
        stop.set()
        await simulator
        await nc.close()
    return HubRateRow(arrangement, executors, round(executors / SIM_INTERVAL_S, 1),
                      round((msgs_after - msgs) / elapsed, 1), round((size_after - size) / elapsed / 1024, 2))


async def _hub_rates(stack: Stack, arrangement: str) -> list[HubRateRow]:
    return [await _hub_rate(stack, arrangement, count) for count in SIMULATED]


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
            if wan:
                report.hub_rate += uvloop.run(_hub_rates(stack, arrangement))
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
        report.hub_rate += uvloop.run(_hub_rates(stack, "per-site, WAN"))
    return report
