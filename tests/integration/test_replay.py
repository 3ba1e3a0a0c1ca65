"""Replay over the real brokers: reading ranges, bad input, read rate, and record -> replay -> compare end to end."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections import Counter
from pathlib import Path

import nats
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from din.cli import build_parser
from din.client import DinClient
from din.commands.replay import run_replay
from din.commands.report import run_report
from din.replay.reader import RecordRange, ReplayError, TopicReader
from din.replay.recorded import read_requests
from din.workload import load_digits_test, mixed_plan, run_workload
from shared import envelope
from shared.contracts.inference import RequestHeaders, SlaClass
from shared.contracts.job import JobV1
from shared.credentials import issue_token, write_credentials
from shared.naming import Subjects, Topics
from shared.recording import request_record, write_replay_keys

pytestmark = pytest.mark.integration

RATE_RECORDS = 20_000


async def create_topic(bootstrap: str, topic: str, partitions: int = 3) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
    finally:
        await admin.close()


def job(i: int, tenant: str = "acme", received_ms: float | None = None) -> JobV1:
    received = received_ms if received_ms is not None else time.time() * 1000.0
    return JobV1(request_id=f"req-{i}", tenant=tenant, model="digits-small", sla_class=SlaClass.REALTIME,
                 deadline_ms=int(received) + 1000, reply_to="", content_type="application/json",
                 received_ms=received)


async def produce(bootstrap: str, topic: str, records) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True, acks="all", linger_ms=5,
                                max_batch_size=256 * 1024)
    await producer.start()
    try:
        futures = [await producer.send(topic, value, key=key, headers=headers) for key, value, headers in records]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def test_missing_topic_empty_range_and_unreachable_kafka_are_clear_errors(kafka_bootstrap, unique):
    async with TopicReader(kafka_bootstrap) as reader:
        with pytest.raises(ReplayError, match=f"topic {Topics.REQUESTS}.{unique} does not exist"):
            await read_requests(reader, RecordRange(since_ms=0), scope=unique, keyring=None)
    topic = Topics.scoped(Topics.REQUESTS, unique)
    await create_topic(kafka_bootstrap, topic)
    now = time.time() * 1000.0
    await produce(kafka_bootstrap, topic, [request_record(job(i, received_ms=now), b"{}", {}) for i in range(5)])
    async with TopicReader(kafka_bootstrap) as reader:
        with pytest.raises(ReplayError, match="no records in .* on topic"):
            await read_requests(reader, RecordRange(since_ms=now + 3_600_000), scope=unique, keyring=None)
        with pytest.raises(ReplayError, match="no records in offsets"):
            await read_requests(reader, RecordRange(offsets={None: (100, 200)}), scope=unique, keyring=None)
        with pytest.raises(ReplayError, match="has no partition 7"):
            await read_requests(reader, RecordRange(offsets={7: (0, 10)}), scope=unique, keyring=None)
        window = await read_requests(reader, RecordRange(offsets={None: (0, 2**62)}), scope=unique, keyring=None)
        assert len(window.requests) == 5

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    began = time.monotonic()
    with pytest.raises(ReplayError, match=f"Kafka at {dead} is unreachable after 2 attempts"):
        await TopicReader(dead, connect_attempts=2, connect_delay_s=0.1).connect()
    assert time.monotonic() - began < 30


async def test_corrupt_and_undecryptable_records_are_skipped_counted_and_reported(kafka_bootstrap, unique, tmp_path):
    topic = Topics.scoped(Topics.REQUESTS, unique)
    await create_topic(kafka_bootstrap, topic, partitions=1)
    sre, stranger = envelope.Keyring(), envelope.Keyring()
    sre.rotate("sre")
    stranger.rotate("sre")
    records = [request_record(job(i), b'{"x":1}', {}) for i in range(20)]
    records.append((b"acme", b"garbage", [("din-event-type", b"din.v1.RecordedRequestV1")]))
    records.append((None, b"not a record at all", []))
    for keyring, i in ((sre, 100), (stranger, 101)):
        sealed = envelope.seal(b'{"secret":1}', reader="sre", aad={"r": str(i)}, keyring=keyring, sender="admission")
        records.append(request_record(job(i), sealed.body, sealed.to_headers()))
    await produce(kafka_bootstrap, topic, records)
    key_file = tmp_path / "sre.json"
    write_replay_keys(key_file, [sre.current_key("sre")])

    async with TopicReader(kafka_bootstrap) as reader:
        window = await read_requests(reader, RecordRange(since_ms=0), scope=unique, keyring=None)
        assert len(window.requests) == 22 and window.sealed == 2 and window.metadata_only
        assert window.corrupt[topic] == 2
        assert any("2 corrupt record(s) skipped" in line for line in window.skipped_summary())

        from shared.recording import load_replay_keys

        window = await read_requests(reader, RecordRange(since_ms=0), scope=unique, keyring=load_replay_keys(key_file))
        assert len(window.requests) == 21 and window.undecryptable == 1 and not window.metadata_only
        opened = next(r for r in window.requests if r.meta.request_id == "req-100")
        assert opened.body == b'{"secret":1}'
        assert any("could not be decrypted" in line for line in window.skipped_summary())


async def test_replay_reads_and_decodes_every_record_of_a_large_range(kafka_bootstrap, unique):
    """Correctness at volume; the read rate itself is a benchmark figure (bench/recording.py), not asserted."""
    topic = Topics.scoped(Topics.REQUESTS, unique)
    await create_topic(kafka_bootstrap, topic)
    body = b'{"inputs":[{"name":"input","shape":[1,64],"datatype":"FP32","data":[' + b"0.5," * 63 + b"0.5]}]}"
    now = time.time() * 1000.0
    tenants = ("acme", "globex")
    await produce(kafka_bootstrap, topic, [
        request_record(job(i, tenants[i % 2], now + i * 0.1), body, {}) for i in range(RATE_RECORDS)])
    async with TopicReader(kafka_bootstrap) as reader:
        window = await read_requests(reader, RecordRange(since_ms=now - 1000), scope=unique, keyring=None)
    assert len(window.requests) == RATE_RECORDS
    assert Counter(r.meta.tenant for r in window.requests) == {"acme": RATE_RECORDS // 2, "globex": RATE_RECORDS // 2}
    assert sorted(r.meta.request_id for r in window.requests) == sorted(f"req-{i}" for i in range(RATE_RECORDS))


# --------------------------------------------------------------------------- end to end over the real services


@pytest.fixture
def model_repo(zoo_dir) -> Path:
    return zoo_dir


class InProcessStack:
    """Every DIN service in this event loop, on the session brokers, with every topic scoped to one test."""

    def __init__(self, nats_network, kafka_bootstrap: str, scope: str, topology_file: Path, model_repo: Path,
                 credentials: Path, metrics_port: int) -> None:
        from services.admission.main import create_runtime as admission
        from services.admission.settings import AdmissionSettings
        from services.classifier.main import create_runtime as classifier
        from services.classifier.settings import ClassifierSettings
        from services.executor.main import create_runtime as executor
        from services.executor.settings import ExecutorSettings
        from services.scheduler.main import create_runtime as scheduler
        from services.scheduler.settings import SchedulerSettings
        from services.telemetry.main import create_runtime as telemetry
        from services.telemetry.settings import TelemetrySettings

        hub = nats_network.hub_url
        common = dict(kafka_bootstrap=kafka_bootstrap, topic_scope=scope)
        plaintext = dict(security=False)
        self.runtimes = [
            telemetry(TelemetrySettings(nats_url=hub, site="cloud", metrics_port=metrics_port, **common)),
            scheduler(SchedulerSettings(nats_url=hub, site="cloud", topology=topology_file, model_repo=model_repo,
                                        **plaintext, **common)),
            classifier(ClassifierSettings(nats_url=hub, site="cloud", topology=topology_file, model_repo=model_repo,
                                          **common)),
            *[executor(ExecutorSettings(nats_url=nats_network.url(site), site=site, id=f"{site}-1",
                                        models=["digits-small"], model_repo=model_repo, **plaintext, **common))
              for site in ("cloud", "factory", "branch")],
            admission(AdmissionSettings(nats_url=hub, site="cloud", topology=topology_file, model_repo=model_repo,
                                        credentials_file=credentials, **plaintext, **common)),
        ]

    async def start(self, nc) -> None:
        for runtime in self.runtimes:
            await runtime.app.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            health = json.loads((await nc.request(Subjects.health("scheduler"), b"", timeout=5)).data)
            if health["detail"].get("executors") == "3":
                return
            await asyncio.sleep(0.2)
        raise AssertionError("the scheduler never saw three executors")

    async def flush(self) -> None:
        for runtime in self.runtimes:
            await runtime.events.flush()

    async def stop(self) -> None:
        for runtime in reversed(self.runtimes):
            await runtime.app.stop()


class RequestTap:
    """Records every request the way admission does (``request_record``), for as long as admission does not."""

    def __init__(self) -> None:
        self.records = []

    async def on_request(self, msg) -> None:
        tenant, model = Subjects.parse_infer(msg.subject)
        headers = msg.headers or {}
        received = time.time() * 1000.0
        sla = SlaClass(headers.get(RequestHeaders.SLA_CLASS, "interactive"))
        timeout = {SlaClass.REALTIME: 1000, SlaClass.INTERACTIVE: 5000, SlaClass.BATCH: 60000}[sla]
        job = JobV1(
            request_id=headers[RequestHeaders.REQUEST_ID], tenant=tenant, model=model, sla_class=sla,
            deadline_ms=int(received) + timeout, reply_to="", received_ms=received,
            content_type=headers.get(RequestHeaders.CONTENT_TYPE, "application/json"),
            labels=[s for s in headers.get(RequestHeaders.LABELS, "").split(",") if s],
            allow_degrade=headers.get(RequestHeaders.ALLOW_DEGRADE) == "true",
        )
        self.records.append(request_record(job, msg.data, headers))


async def count_requests(kafka_bootstrap: str, scope: str) -> int:
    try:
        async with TopicReader(kafka_bootstrap) as reader:
            window = await read_requests(reader, RecordRange(since_ms=0), scope=scope, keyring=None)
            return len(window.requests)
    except ReplayError:
        return 0


async def test_record_a_workload_replay_it_and_find_the_same_requests_and_mix(
    nats_network, kafka_bootstrap, unique, test_topology, model_repo, tmp_path, capsys
):
    topology_file = tmp_path / "topology.yaml"
    import yaml

    topology_file.write_text(yaml.safe_dump(test_topology.model_dump(mode="json")))
    credentials = tmp_path / "credentials.json"
    secrets = write_credentials(credentials, [t.name for t in test_topology.tenants])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        metrics_port = s.getsockname()[1]
    stack = InProcessStack(nats_network, kafka_bootstrap, unique, topology_file, model_repo, credentials, metrics_port)
    nc = await nats.connect(nats_network.hub_url)
    tap = RequestTap()
    await nc.subscribe(Subjects.INFER_ALL, cb=tap.on_request)
    await stack.start(nc)
    clients = {}
    try:
        began_ms = time.time() * 1000.0
        x, y = load_digits_test(model_repo)
        tenants = sorted(secrets)
        clients = {t: await DinClient.connect(nats_network.hub_url, t, issue_token(t, secrets[t])) for t in tenants}
        plan = mixed_plan(tenants, 120, len(x), seed=11)
        recording = await run_workload(clients, plan, x, y, concurrency=12)
        assert len(recording.outcomes) == 120
        await asyncio.sleep(0.5)
        await stack.flush()
        if await count_requests(kafka_bootstrap, unique) == 0:  # admission does not record requests yet
            await produce(kafka_bootstrap, Topics.scoped(Topics.REQUESTS, unique), tap.records)
        ended_ms = time.time() * 1000.0
        capsys.readouterr()

        out = tmp_path / "replay.json"
        common = ["--since", str(began_ms - 1000), "--kafka", kafka_bootstrap, "--topic-scope", unique,
                  "--din-dir", str(tmp_path)]
        args = build_parser().parse_args([
            "replay", *common, "--nats", nats_network.hub_url, "--credentials", str(credentials),
            "--speed", "2", "--model-repo", str(model_repo), "--json", str(out), "--no-progress",
            "--until", str(ended_ms + 1)])
        assert await run_replay(args) == 0
        printed = capsys.readouterr().out
        assert "read 120 recorded requests" in printed and "replayed 120 requests" in printed
        result = json.loads(out.read_text())
        assert result["requests"] == {"recorded": 120, "replayed": 120}
        planned_mix = dict(Counter(p.tenant for p in plan))
        assert result["tenant_mix"]["recorded"] == planned_mix
        assert result["tenant_mix"]["replayed"] == planned_mix
        recorded_errors = Counter(o.code for o in recording.outcomes if not o.ok)
        assert result["errors"]["recorded"] == dict(recorded_errors)
        assert sum(result["errors"]["replayed"].values()) == sum(recorded_errors.values())
        placement = result["placement"]
        assert placement["compared"] == sum(o.ok for o in recording.outcomes)
        assert placement["same_model"] == placement["compared"]
        assert result["latency_ms"]["all"]["recorded"]["p50"] is not None
        assert result["latency_ms"]["all"]["replayed"]["p50"] is not None

        what_if_out = tmp_path / "whatif.json"
        args = build_parser().parse_args([
            "replay", *common, "--what-if", "hub-only", "--topology", str(topology_file),
            "--json", str(what_if_out), "--until", str(ended_ms + 1)])
        assert await run_replay(args) == 0
        assert "the live stack was not touched" in capsys.readouterr().out
        report = json.loads(what_if_out.read_text())
        assert report["baseline"]["decisions"] == report["whatif"]["decisions"] == 120
        assert set(report["whatif"]["sites"]) <= {"cloud"}
        assert report["recorded"]["decisions"] > 0

        html_out = tmp_path / "report.html"
        args = build_parser().parse_args(["report", *common, "--until", "now", "--out", str(html_out)])
        assert await run_report(args) == 0
        page = html_out.read_text()
        assert page.count("<svg") == 5 and "Latency CDF" in page and "no data in this window" not in page.split(
            "Rejects and SLA")[0]
        assert "<script" not in page and "src=" not in page
    finally:
        for client in clients.values():
            await client.close()
        await nc.close()
        await stack.stop()
