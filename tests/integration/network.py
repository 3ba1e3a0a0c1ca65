"""A whole DIN network for integration tests: real NATS (hub + leaves), the session's Kafka, every service a process."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import nats
import numpy as np
from aiokafka import AIOKafkaConsumer

from din.client import DinClient
from din.shared.bus.connect import nats_servers
from din.shared.bus.kafka import OPERATOR, KafkaAccess
from din.shared.bus.permissions import tenant_user
from din.shared.contracts.events import HealthV1
from din.shared.contracts.inference import RequestHeaders
from din.shared.credentials import issue_token, read_credentials, request_proof
from din.shared.errors import DIN_ERROR_HEADER, ErrorReplyV1
from din.shared.naming import Subjects
from din.shared.security import (
    CryptoPolicy,
    JobFacts,
    KeyAgent,
    PayloadSecurity,
    PrincipalKeys,
    key_file,
    site_principal,
)
from din.shared.tensors import encode_request_json
from din.shared.topology import Topology
from din.stack.launcher import CONTROL_SERVICES, GATEWAY, SERVICE_KINDS, PortPlan, Stack, executors_in_view
from din.stack.processes import ManagedProcess
from tests.support import three_site_topology, wait_for

REPO_ROOT = Path(__file__).resolve().parents[2]

INFERENCE_TOPOLOGY = three_site_topology(
    "inference-tests",
    {
        "cloud": [{"id": "cloud-1", "models": ["digits-large"], "capacity": 2},
                  {"id": "cloud-2", "models": ["digits-small"]}],
        "factory": [{"id": "factory-1", "models": ["digits-small"]}],
        "branch": [{"id": "branch-1", "models": ["digits-small"]}],
    },
    [
        {"name": "acme", "sensitive_sites": ["factory"], "rate_per_s": 5000, "burst": 5000},
        {"name": "globex", "rate_per_s": 5000, "burst": 5000},
        {"name": "initech", "sensitive_sites": ["branch"], "always_sensitive": True, "rate_per_s": 5000,
         "burst": 5000},
        {"name": "tiny", "rate_per_s": 1, "burst": 2},
    ],
)


@dataclass
class Network:
    """A running stack plus what tests need to talk to it."""

    stack: Stack
    topology: Topology
    topic_scope: str

    @property
    def hub_url(self) -> str:
        return self.stack.hub_url

    def token(self, tenant: str) -> str:
        return issue_token(tenant, read_credentials(self.stack.credentials_file)[tenant])

    def keys(self, tenant: str) -> PrincipalKeys:
        return self.stack.tenant_keys(tenant)

    @contextlib.asynccontextmanager
    async def client(self, tenant: str):
        client = await DinClient.connect(self.hub_url, tenant, self.token(tenant), self.keys(tenant),
                                         options=self.stack.nats_options(user=tenant_user(tenant)))
        try:
            yield client
        finally:
            await client.close()

    def process(self, name: str) -> ManagedProcess:
        return next(p for p in self.stack.processes if p.name == name)

    def kill(self, name: str, sig: signal.Signals = signal.SIGKILL) -> ManagedProcess:
        """Send ``sig`` to process ``name``; a SIGKILL returns once the process is gone."""
        proc = self.process(name)
        os.kill(proc.pid, sig)
        if sig == signal.SIGKILL:
            proc.popen.wait(timeout=10)
        return proc

    def start_executor(self, executor_id: str, site: str, like: str) -> ManagedProcess:
        """Start a new executor process at ``site`` configured like existing executor ``like``."""
        env = dict(self.stack.environments()[f"executor-{like}"])
        env.update(DIN_EXECUTOR_ID=executor_id, DIN_SITE=site, DIN_NATS_URL=self.stack.nats_urls[site],
                   PYTHONUNBUFFERED="1")
        if self.stack.bus is not None:
            env["DIN_NATS_CREDS"] = str(self.stack.bus.issue_executor(executor_id, site))
        proc = ManagedProcess(
            name=f"executor-{executor_id}",
            argv=[sys.executable, "-m", "din.services.executor"],
            log_path=self.stack.run_dir / "logs" / f"executor-{executor_id}.log",
            env=env,
            cwd=REPO_ROOT,
        ).start()
        self.stack.processes.append(proc)
        return proc

    @contextlib.asynccontextmanager
    async def site_job_facts(self, site: str, nc):
        """``JobFacts`` with ``site``'s keys (its agent watching over ``nc``): tags job headers as a service of
        that site would, for tests that hand jobs to a stage themselves."""
        security = PayloadSecurity(KeyAgent(PrincipalKeys.load(key_file(self.stack.keys_dir, site_principal(site)))))
        await security.start(nc, readers=lambda agent: [site_principal(site)])
        try:
            yield JobFacts(security, site)
        finally:
            await security.stop()

    async def detail(self, service: str, instance: str | None = None) -> dict[str, str]:
        """One instance's health detail (``health``)."""
        return (await self.health(service, instance)).detail

    async def health(self, service: str, instance: str | None = None, timeout: float = 2.0) -> HealthV1:
        """One instance's health; a control-plane service's at the hub unless ``instance`` names its site."""
        if instance is None and service in CONTROL_SERVICES:
            instance = self.topology.hub.name
        nc = await nats.connect(nats_servers(self.hub_url), **self.stack.nats_options())
        try:
            reply = await nc.request(Subjects.health(service, instance), b"", timeout=timeout)
            return HealthV1.model_validate_json(reply.data)
        finally:
            await nc.close()

    async def wait_ready(self, service: str, instance: str | None = None, timeout_s: float = 30.0) -> HealthV1:
        """Poll ``service``'s health until it answers ready."""

        async def ready() -> HealthV1 | None:
            health = await self.health(service, instance)
            return health if health.ready else None

        return await wait_for(ready, timeout_s, f"{service} {instance or ''} ready", interval=0.2,
                              retry_on=(Exception,))

    async def live_executors(self) -> int:
        """How many executors the scheduler counts as live (heartbeating and not draining)."""
        return int((await self.health("scheduler")).detail["executors"])

    async def wait_live_executors(self, count: int, timeout_s: float = 30.0) -> None:
        """Wait until the scheduler counts exactly ``count`` live executors."""
        seen: list[int] = []

        async def counted() -> bool:
            seen.append(await self.live_executors())
            return seen[-1] == count

        await wait_for(counted, timeout_s, lambda: f"scheduler counting {count} live executors (last saw {seen[-1:]})",
                       interval=0.1, retry_on=(Exception,))

    def topology_executors(self) -> dict[str, tuple[str, str]]:
        """``process name: (executor id, site)`` of every executor the topology declares."""
        return {f"executor-{e.id}": (e.id, site.name) for site in self.topology.sites for e in site.executors}

    async def restore(self) -> None:
        """Bring the stack back to its topology: stop executors a test added, restart the ones a test killed or
        froze, and wait until they are ready and the scheduler counts exactly the topology's executors."""
        declared = self.topology_executors()
        changed = False
        for proc in [p for p in self.stack.processes if p.name.startswith("executor-") and p.name not in declared]:
            proc.stop()
            self.stack.processes.remove(proc)
            changed = True
        restarted = []
        for name, (executor_id, site) in declared.items():
            proc = self.process(name)
            if proc.alive() and not _frozen(proc.pid):
                continue
            if proc.alive():
                os.kill(proc.pid, signal.SIGKILL)
                proc.popen.wait(timeout=10)
            self.stack.processes.remove(proc)
            restarted.append(self.start_executor(executor_id, site, like=executor_id))
            changed = True
        if not changed:
            return
        for executor_id, _ in (declared[p.name] for p in restarted):
            await self.wait_ready("executor", executor_id, timeout_s=60.0)
        await self.wait_fleet_in_view()

    async def wait_fleet_in_view(self, timeout_s: float = 30.0) -> None:
        """Wait until every scheduler counts exactly the declared executors of the sites it places on (a site's
        scheduler hears its own executors before the hub's hears them in that site's roster)."""
        wanted = executors_in_view(self.topology, self.stack.instances)
        schedulers = {i.name: i for i in self.stack.instances if i.service == "scheduler"}
        seen: dict[str, int] = {}

        async def counted() -> bool:
            for name in wanted:
                inst = schedulers[name]
                seen[name] = int((await self.health("scheduler", inst.instance)).detail["executors"])
            return all(seen[name] == want for name, want in wanted.items())

        await wait_for(counted, timeout_s, lambda: f"schedulers counting {wanted} live executors (last saw {seen})",
                       interval=0.1, retry_on=(Exception,))

    async def barrier(self, nc: nats.NATS, inbox: str, answers: list, headers: dict[str, str] | None = None) -> None:
        """Send one more good request (globex, digits-small, ``headers`` added) answered on ``inbox`` and wait for
        its answer, then drop it from ``answers``. An answer still owed to an earlier request on that inbox, having
        travelled the same hops, has had the time a whole later request needed: a barrier, instead of a fixed
        sleep."""
        request_id = f"barrier-{uuid.uuid4().hex[:8]}"
        body = encode_request_json({"input": np.zeros((1, 64), dtype=np.float32)})
        await nc.publish(Subjects.infer("globex", "digits-small"), body, reply=inbox,
                         headers={RequestHeaders.TOKEN: request_proof(self.token("globex"), "digits-small",
                                                                      request_id, inbox),
                                  RequestHeaders.REQUEST_ID: request_id,
                                  **(headers or {})})

        def answered() -> bool:
            return any(reply_id(msg) == request_id for msg in answers)

        await wait_for(answered, 10.0, f"the answer to barrier request {request_id}")
        answers[:] = [msg for msg in answers if reply_id(msg) != request_id]


def reply_id(msg) -> str | None:
    """The request id an answer on a reply subject belongs to (a result's ``id`` or an error's ``request_id``)."""
    if DIN_ERROR_HEADER in (msg.headers or {}):
        return ErrorReplyV1.model_validate_json(msg.data).error.request_id
    return json.loads(msg.data).get("id")


def _frozen(pid: int) -> bool:
    """True when process ``pid`` is stopped (SIGSTOP) rather than running."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except (OSError, IndexError):
        return False


@dataclass
class KafkaEvents:
    """JSON events read from Kafka topics, as ``(topic, event)`` pairs."""

    found: list[tuple[str, dict]]


async def read_events(kafka: KafkaAccess, topics: list[str], keep: Callable[[dict], bool],
                      enough: Callable[[KafkaEvents], bool], what: str, timeout_s: float = 20.0) -> KafkaEvents:
    """Read ``topics`` from the start (as the operator), keeping the events ``keep`` accepts, until ``enough``
    holds; a bounded wait that fails naming ``what``."""
    consumer = AIOKafkaConsumer(*topics, bootstrap_servers=kafka.bootstrap, auto_offset_reset="earliest",
                                **kafka.client_kwargs(OPERATOR))
    await consumer.start()
    events = KafkaEvents([])

    async def poll() -> bool:
        for records in (await consumer.getmany(timeout_ms=200)).values():
            for record in records:
                event = json.loads(record.value)
                if keep(event):
                    events.found.append((record.topic, event))
        return enough(events)

    try:
        await wait_for(poll, timeout_s, lambda: f"{what} (found {len(events.found)})", interval=0.01)
    finally:
        await consumer.stop()
    return events


RAW_CLIENT_POLICY = CryptoPolicy(plaintext_ingress=[t["name"] for t in INFERENCE_TOPOLOGY["tenants"]])
"""The inference-path tests also send raw NATS requests and use clients without key files: let them in."""


@contextlib.contextmanager
def running_network(
    kafka: KafkaAccess, model_repo: Path, din_dir: Path, mode: str,
    security_policy: CryptoPolicy = RAW_CLIENT_POLICY, topology_spec: dict = INFERENCE_TOPOLOGY, wan: bool = False,
    gateway: bool = False,
) -> Iterator[Network]:
    """Start a topology (the inference-test one by default) with every service (the HTTP gateways only with
    ``gateway``: only their own tests pay for them); stop it all afterwards."""
    topology = Topology.model_validate(topology_spec)
    scope = f"it{uuid.uuid4().hex[:8]}"
    edges = sum(1 for s in topology.sites if s.role == "edge")
    stack = Stack(
        topology,
        ports=PortPlan.free(edges, hub_servers=topology.hub.servers),
        din_dir=din_dir,
        mode=mode,
        model_repo=model_repo,
        write_state=False,
        topic_scope=scope,
        external_kafka=kafka,
        security_policy=security_policy,
        wan=wan,
        services=None if gateway else [kind for kind in SERVICE_KINDS if kind != GATEWAY],
    )
    stack.start()
    try:
        yield Network(stack, topology, scope)
    finally:
        stack.stop()


def decode_json(data: bytes) -> dict:
    return json.loads(data)
