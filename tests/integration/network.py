"""A whole DIN network for integration tests: real NATS (hub + leaves), the session's Kafka, every service a process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nats

from din.client import DinClient
from din.stack.launcher import PortPlan, Stack
from din.stack.processes import ManagedProcess
from shared.contracts.events import HealthV1
from shared.credentials import issue_token, read_credentials
from shared.naming import Subjects
from shared.security import CryptoPolicy, PrincipalKeys
from shared.topology import Topology

REPO_ROOT = Path(__file__).resolve().parents[2]

INFERENCE_TOPOLOGY = {
    "name": "inference-tests",
    "sites": [
        {
            "name": "cloud",
            "role": "hub",
            "executors": [
                {"id": "cloud-1", "models": ["digits-large"], "capacity": 2},
                {"id": "cloud-2", "models": ["digits-small"]},
            ],
        },
        {"name": "factory", "role": "edge", "executors": [{"id": "factory-1", "models": ["digits-small"]}]},
        {"name": "branch", "role": "edge", "executors": [{"id": "branch-1", "models": ["digits-small"]}]},
    ],
    "links": [
        {"between": ["cloud", "factory"], "path": "dedicated"},
        {"between": ["cloud", "branch"], "path": "internet"},
        {"between": ["factory", "branch"], "path": "vpn"},
    ],
    "tenants": [
        {"name": "acme", "sensitive_sites": ["factory"], "rate_per_s": 5000, "burst": 5000},
        {"name": "globex", "rate_per_s": 5000, "burst": 5000},
        {"name": "initech", "sensitive_sites": ["branch"], "always_sensitive": True, "rate_per_s": 5000,
         "burst": 5000},
        {"name": "tiny", "rate_per_s": 1, "burst": 2},
    ],
}


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
        client = await DinClient.connect(self.hub_url, tenant, self.token(tenant), self.keys(tenant))
        try:
            yield client
        finally:
            await client.close()

    def process(self, name: str) -> ManagedProcess:
        return next(p for p in self.stack.processes if p.name == name)

    def kill(self, name: str, sig: signal.Signals = signal.SIGKILL) -> ManagedProcess:
        proc = self.process(name)
        os.kill(proc.pid, sig)
        return proc

    def start_executor(self, executor_id: str, site: str, like: str) -> ManagedProcess:
        """Start a new executor process at ``site`` configured like existing executor ``like``."""
        env = dict(self.stack.environments()[f"executor-{like}"])
        env.update(DIN_EXECUTOR_ID=executor_id, DIN_SITE=site, DIN_NATS_URL=self.stack.nats_urls[site],
                   PYTHONUNBUFFERED="1")
        proc = ManagedProcess(
            name=f"executor-{executor_id}",
            argv=[sys.executable, "-m", "services.executor"],
            log_path=self.stack.run_dir / "logs" / f"executor-{executor_id}.log",
            env=env,
            cwd=REPO_ROOT,
        ).start()
        self.stack.processes.append(proc)
        return proc

    async def health(self, service: str, instance: str | None = None, timeout: float = 2.0) -> HealthV1:
        nc = await nats.connect(self.hub_url)
        try:
            reply = await nc.request(Subjects.health(service, instance), b"", timeout=timeout)
            return HealthV1.model_validate_json(reply.data)
        finally:
            await nc.close()

    async def wait_ready(self, service: str, instance: str | None = None, timeout_s: float = 30.0) -> HealthV1:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                health = await self.health(service, instance)
                if health.ready:
                    return health
            except Exception:
                if time.monotonic() > deadline:
                    raise
            if time.monotonic() > deadline:
                raise AssertionError(f"{service} {instance or ''} not ready within {timeout_s}s")
            await asyncio.sleep(0.2)


RAW_CLIENT_POLICY = CryptoPolicy(plaintext_ingress=[t["name"] for t in INFERENCE_TOPOLOGY["tenants"]])
"""The inference-path tests also send raw NATS requests and use clients without key files: let them in."""


@contextlib.contextmanager
def running_network(
    kafka_bootstrap: str, model_repo: Path, din_dir: Path, mode: str,
    security_policy: CryptoPolicy = RAW_CLIENT_POLICY, topology_spec: dict = INFERENCE_TOPOLOGY,
) -> Iterator[Network]:
    """Start a topology (the inference-test one by default) with every service; stop it all afterwards."""
    topology = Topology.model_validate(topology_spec)
    scope = f"it{uuid.uuid4().hex[:8]}"
    edges = sum(1 for s in topology.sites if s.role == "edge")
    stack = Stack(
        topology,
        ports=PortPlan.free(edges),
        din_dir=din_dir,
        mode=mode,
        model_repo=model_repo,
        write_state=False,
        topic_scope=scope,
        external_kafka=kafka_bootstrap,
        security_policy=security_policy,
    )
    stack.start()
    try:
        yield Network(stack, topology, scope)
    finally:
        stack.stop()


def decode_json(data: bytes) -> dict:
    return json.loads(data)
