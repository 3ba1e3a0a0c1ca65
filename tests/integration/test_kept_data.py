"""Kafka's data outlives a run: what ``din up`` keeps in ``<din-dir>/data`` so SREs can replay yesterday's incident.

A secure network with its own Kafka serves requests and stops; the next run (new CA, new keys, new NATS) starts
its Kafka on the kept log and ``din report``'s reader finds the first run's completions and requests. A Kafka user
DIN added after the log was formatted gets its SCRAM credential on the next start; a stack started the other way
(insecure on a secure log) is refused before anything starts; ``din up --fresh`` deletes what was kept, and is
refused while a stack runs from it.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from din.commands.report import KAFKA_USER as REPORT_USER
from din.commands.report import REPORT_TOPICS
from din.replay.reader import RecordRange
from din.replay.recorded import load_window
from din.shared.naming import Topics
from din.shared.topology import Topology
from din.stack.brokers import KafkaStore
from din.stack.launcher import (
    GATEWAY,
    SERVICE_KINDS,
    STATE_FILE_NAME,
    PortPlan,
    Stack,
    StackError,
    forget_data,
    kept_data_dir,
)
from tests.integration.network import INFERENCE_TOPOLOGY, RAW_CLIENT_POLICY, Network

pytestmark = pytest.mark.integration

REQUESTS = 5


def _stack(topology: Topology, din_dir, repo, *, services: bool, insecure: bool = False) -> Stack:
    edges = sum(1 for s in topology.sites if s.role == "edge")
    return Stack(
        topology,
        ports=PortPlan.free(edges),
        din_dir=din_dir,
        model_repo=repo,
        write_state=False,
        security_policy=RAW_CLIENT_POLICY,
        services=[kind for kind in SERVICE_KINDS if kind != GATEWAY] if services else [],
        insecure=insecure,
        data_dir=kept_data_dir(din_dir),
    )


async def _serve(stack: Stack, topology: Topology, digits) -> list[str]:
    x, _ = digits
    ids = [f"kept-{i}-{time.time_ns()}" for i in range(REQUESTS)]
    async with Network(stack, topology, "").client("acme") as client:
        for i, request_id in enumerate(ids):
            await client.infer("digits-small", {"input": np.asarray(x[i : i + 1], dtype=np.float32)},
                               request_id=request_id)
    return ids


async def test_the_next_run_reads_the_kafka_data_of_the_last_one(zoo_dir, digits, tmp_path):
    topology = Topology.model_validate(INFERENCE_TOPOLOGY)
    din_dir = tmp_path / "din"
    began_ms = time.time() * 1000.0
    first = _stack(topology, din_dir, zoo_dir, services=True).start()
    try:
        served = await _serve(first, topology, digits)
    finally:
        first.stop()
    store = KafkaStore(kept_data_dir(din_dir) / "kafka")
    assert store.formatted and json.loads(store.marker.read_text()) == {"secure": True}
    (store.users_dir / f"{REPORT_USER}.password").unlink()

    second = _stack(topology, din_dir, zoo_dir, services=False).start()
    try:
        assert second.run_dir != first.run_dir
        assert second.kafka.pending_users == ()
        window = await load_window(
            second.kafka_bootstrap, RecordRange(since_ms=began_ms, until_ms=None, offsets=None), requests=False,
            bases=REPORT_TOPICS, client_kwargs=second.kafka_access.client_kwargs(REPORT_USER))
        completed = {c.request_id for c in window.completions}
        assert set(served) <= completed
        requests = await load_window(
            second.kafka_bootstrap, RecordRange(since_ms=began_ms, until_ms=None, offsets=None),
            bases=(Topics.COMPLETIONS,), client_kwargs=second.kafka_access.client_kwargs("replay"))
        assert set(served) <= {r.meta.request_id for r in requests.requests}
    finally:
        second.stop()
    assert (store.users_dir / f"{REPORT_USER}.password").exists()

    with pytest.raises(StackError, match="secure stack.*din up --fresh"):
        _stack(topology, din_dir, zoo_dir, services=False, insecure=True).start()
    assert forget_data(din_dir) == kept_data_dir(din_dir)
    assert not kept_data_dir(din_dir).exists()
    assert forget_data(din_dir) is None


def test_fresh_is_refused_while_a_stack_runs_from_the_din_dir(tmp_path, test_topology):
    stack = Stack(test_topology, ports=PortPlan.free(edge_sites=2), din_dir=tmp_path, services=[], kafka=False,
                  data_dir=kept_data_dir(tmp_path))
    kept_data_dir(tmp_path).mkdir(parents=True)
    with stack:
        assert (tmp_path / STATE_FILE_NAME).exists()
        with pytest.raises(StackError, match="din down"):
            forget_data(tmp_path)
    assert kept_data_dir(tmp_path).exists()
