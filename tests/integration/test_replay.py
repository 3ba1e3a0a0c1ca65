"""Replay over the real brokers: reading ranges, bad input, read rate, and record -> replay -> compare end to end."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections import Counter
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from din.cli import build_parser
from din.client import DinClient
from din.commands.replay import run_replay
from din.commands.report import run_report
from din.replay.compare import Outcome
from din.replay.driver import ReplayDriver, served_into, stream_into
from din.replay.outcomes import final_outcomes, replay_request_id
from din.replay.reader import RecordRange, ReplayError, TopicReader
from din.replay.recorded import RecordedWindow, read_events, read_requests
from din.replay.report import render_report
from din.replay.whatif import placing_decisions
from din.shared import envelope
from din.shared.bus.kafka import OPERATOR, KafkaAccess
from din.shared.bus.nats_auth import NATS_DIR
from din.shared.contracts.inference import SlaClass
from din.shared.contracts.job import JobV1
from din.shared.contracts.telemetry import RecordedRequestV1
from din.shared.credentials import issue_token, write_credentials
from din.shared.naming import Subjects, Topics
from din.shared.recording import request_record, write_replay_keys
from din.shared.security.keyfiles import KEYSTORE_FILE, KeyStore
from din.shared.security.records import RecordSigner, RecordVerifier
from din.shared.topology import Topology
from din.workload import load_digits_test, mixed_plan, run_workload
from tests.integration.network import running_network
from tests.support import make_job, wait_for

pytestmark = pytest.mark.integration

RATE_RECORDS = 20_000


def replay_reader(kafka: KafkaAccess, **options) -> TopicReader:
    """A reader logged in as ``din replay``'s Kafka user."""
    return TopicReader(kafka.bootstrap, client_kwargs=kafka.client_kwargs("replay"), **options)


async def create_topic(kafka: KafkaAccess, topic: str, partitions: int = 3) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap, **kafka.client_kwargs(OPERATOR))
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
    finally:
        await admin.close()


def job(i: int, tenant: str = "acme", received_ms: float | None = None) -> JobV1:
    """Recorded request ``req-{i}``: a realtime digits-small job received at ``received_ms`` (default now)."""
    received = received_ms if received_ms is not None else time.time() * 1000.0
    return make_job(request_id=f"req-{i}", tenant=tenant, model="digits-small", sla_class=SlaClass.REALTIME,
                    deadline_ms=int(received) + 1000, reply_to="", received_ms=received)


async def produce(kafka: KafkaAccess, topic: str, records, user: str = "admission") -> None:
    """Write ``records`` as ``user`` does (admission: the only user that may write the requests topic)."""
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, enable_idempotence=True, acks="all", linger_ms=5,
                                max_batch_size=256 * 1024, **kafka.client_kwargs(user))
    await producer.start()
    try:
        futures = [await producer.send(topic, value, key=key, headers=headers) for key, value, headers in records]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def test_missing_topic_empty_range_and_unreachable_kafka_are_clear_errors(kafka_access, unique):
    async with replay_reader(kafka_access) as reader:
        with pytest.raises(ReplayError, match=f"topic {Topics.REQUESTS}.{unique} does not exist"):
            await read_requests(reader, RecordRange(since_ms=0), scope=unique, keyring=None)
    topic = Topics.scoped(Topics.REQUESTS, unique)
    await create_topic(kafka_access, topic)
    now = time.time() * 1000.0
    await produce(kafka_access, topic, [request_record(job(i, received_ms=now), b"{}", {}) for i in range(5)])
    async with replay_reader(kafka_access) as reader:
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
    with pytest.raises(ReplayError, match=f"Kafka at {dead} is unreachable after 2 attempts"):
        async with asyncio.timeout(30):
            await TopicReader(dead, connect_attempts=2, connect_delay_s=0.1).connect()


async def test_corrupt_and_undecryptable_records_are_skipped_counted_and_reported(kafka_access, unique, tmp_path):
    topic = Topics.scoped(Topics.REQUESTS, unique)
    await create_topic(kafka_access, topic, partitions=1)
    sre, stranger = envelope.Keyring(), envelope.Keyring()
    sre.rotate("sre")
    stranger.rotate("sre")
    records = [request_record(job(i), b'{"x":1}', {}) for i in range(20)]
    records.append((b"acme", b"garbage", [("din-event-type", b"din.v1.RecordedRequestV1")]))
    records.append((None, b"not a record at all", []))
    for keyring, i in ((sre, 100), (stranger, 101)):
        sealed = envelope.seal(b'{"secret":1}', reader="sre", aad={"r": str(i)}, keyring=keyring, sender="admission")
        records.append(request_record(job(i), sealed.body, sealed.to_headers()))
    await produce(kafka_access, topic, records)
    key_file = tmp_path / "sre.json"
    write_replay_keys(key_file, [sre.current_key("sre")])

    async with replay_reader(kafka_access) as reader:
        window = await read_requests(reader, RecordRange(since_ms=0), scope=unique, keyring=None)
        assert len(window.requests) == 22 and window.sealed == 2 and window.metadata_only
        assert window.corrupt[topic] == 2
        assert any("2 corrupt record(s) skipped" in line for line in window.skipped_summary())

        from din.shared.recording import load_replay_keys

        window = await read_requests(reader, RecordRange(since_ms=0), scope=unique, keyring=load_replay_keys(key_file))
        assert len(window.requests) == 21 and window.undecryptable == 1 and not window.metadata_only
        opened = next(r for r in window.requests if r.meta.request_id == "req-100")
        assert opened.body == b'{"secret":1}'
        assert any("could not be decrypted" in line for line in window.skipped_summary())


async def test_replay_reads_and_decodes_every_record_of_a_large_range(kafka_access, unique):
    """Correctness at volume; the read rate itself is a benchmark figure (bench/recording.py), not asserted."""
    topic = Topics.scoped(Topics.REQUESTS, unique)
    await create_topic(kafka_access, topic)
    body = b'{"inputs":[{"name":"input","shape":[1,64],"datatype":"FP32","data":[' + b"0.5," * 63 + b"0.5]}]}"
    now = time.time() * 1000.0
    tenants = ("acme", "globex")
    await produce(kafka_access, topic, [
        request_record(job(i, tenants[i % 2], now + i * 0.1), body, {}) for i in range(RATE_RECORDS)])
    async with replay_reader(kafka_access) as reader:
        window = await read_requests(reader, RecordRange(since_ms=now - 1000), scope=unique, keyring=None)
    assert len(window.requests) == RATE_RECORDS
    assert Counter(r.meta.tenant for r in window.requests) == {"acme": RATE_RECORDS // 2, "globex": RATE_RECORDS // 2}
    assert sorted(r.meta.request_id for r in window.requests) == sorted(f"req-{i}" for i in range(RATE_RECORDS))


# --------------------------------------------------------------------------- end to end over the real services


@pytest.fixture
def model_repo(zoo_dir) -> Path:
    return zoo_dir


SMALL_EVERYWHERE = {site: ["digits-small"] for site in ("cloud", "factory", "branch")}
EVERY_KIND = {
    "cloud": ["digits-small", "digits-large", "digits-large-tail-hidden_1", "digits-large-tail-hidden_2",
              "charlm-prefill", "charlm"],
    "factory": ["digits-small", "digits-large-head-hidden_1", "digits-large-head-hidden_2"],
    "branch": ["digits-small"],
}
"""Executors that serve every kind of request: plain, cascade (small and large), split (heads at factory, tails
in the cloud) and generation (prefill and decode in the cloud)."""


class InProcessStack:
    """Every DIN service in this event loop, on the session brokers, with every topic scoped to one test."""

    def __init__(self, nats_network, kafka: KafkaAccess, scope: str, topology_file: Path, model_repo: Path,
                 credentials: Path, metrics_port: int, models: dict[str, list[str]] | None = None) -> None:
        from din.services.admission.main import create_runtime as admission
        from din.services.admission.settings import AdmissionSettings
        from din.services.classifier.main import create_runtime as classifier
        from din.services.classifier.settings import ClassifierSettings
        from din.services.executor.main import create_runtime as executor
        from din.services.executor.settings import ExecutorSettings
        from din.services.scheduler.main import create_runtime as scheduler
        from din.services.scheduler.settings import SchedulerSettings
        from din.services.telemetry.main import create_runtime as telemetry
        from din.services.telemetry.settings import TelemetrySettings

        hub = nats_network.hub_url

        deployed = Topology.model_validate(yaml.safe_load(topology_file.read_text()))

        def common(service: str, site: str = "cloud", instance: str | None = None) -> dict:
            # its own NATS user, with the permissions of this stack's topology (one control plane, at the hub);
            # the session Kafka's CA is its bus_ca_file (the session NATS takes plain client connections)
            login = nats_network.service_login(service, site, instance=instance, topology=deployed)
            return dict(topic_scope=scope, **(login | kafka.settings(service)))

        plaintext = dict(security=False)
        self.runtimes = [
            telemetry(TelemetrySettings(nats_url=hub, site="cloud", metrics_port=metrics_port, **common("telemetry"))),
            scheduler(SchedulerSettings(nats_url=hub, site="cloud", topology=topology_file, model_repo=model_repo,
                                        **plaintext, **common("scheduler"))),
            classifier(ClassifierSettings(nats_url=hub, site="cloud", topology=topology_file, model_repo=model_repo,
                                          **plaintext, **common("classifier"))),
            *[executor(ExecutorSettings(nats_url=nats_network.url(site), site=site, id=f"{site}-1",
                                        models=served, model_repo=model_repo, **plaintext,
                                        **common("executor", site, f"{site}-1")))
              for site, served in (models or SMALL_EVERYWHERE).items()],
            admission(AdmissionSettings(nats_url=hub, site="cloud", topology=topology_file, model_repo=model_repo,
                                        credentials_file=credentials, **plaintext, **common("admission"))),
        ]

    async def start(self, nc) -> None:
        for runtime in self.runtimes:
            await runtime.app.start()

        async def scheduler_sees_every_executor() -> bool:
            health = json.loads((await nc.request(Subjects.health("scheduler"), b"", timeout=5)).data)
            return health["detail"].get("executors") == str(len(self.runtimes) - 4)

        await wait_for(scheduler_sees_every_executor, 30, "the scheduler sees every executor", interval=0.2)

    async def flush(self) -> None:
        for runtime in self.runtimes:
            await runtime.events.flush()

    async def stop(self) -> None:
        for runtime in reversed(self.runtimes):
            await runtime.app.stop()


def deployment_bus(tmp_path: Path, kafka: KafkaAccess, nats_network) -> Path:
    """One bus folder, as a deployment has: the session Kafka's CA and users beside the session NATS's users
    (the session's brokers keep theirs apart); what ``din replay --bus-dir`` reads."""
    root = tmp_path / "bus"
    if not root.exists():
        root.mkdir()
        for entry in kafka.bus_dir.iterdir():
            if entry.name != NATS_DIR:
                (root / entry.name).symlink_to(entry)
        if nats_network.bus is not None:
            (root / NATS_DIR).symlink_to(nats_network.bus.nats.root)
    return root


async def count_requests(kafka_access: KafkaAccess, scope: str) -> int:
    try:
        async with replay_reader(kafka_access) as reader:
            window = await read_requests(reader, RecordRange(since_ms=0), scope=scope, keyring=None)
            return len(window.requests)
    except ReplayError:
        return 0


async def recorded_requests(kafka_access: KafkaAccess, scope: str) -> dict[str, RecordedRequestV1]:
    """Every request recorded under ``scope``, by request id."""
    async with replay_reader(kafka_access) as reader:
        window = await read_requests(reader, RecordRange(since_ms=0), scope=scope, keyring=None)
    return {r.meta.request_id: r.meta for r in window.requests}


async def completed_requests(stack: InProcessStack, kafka_access: KafkaAccess, scope: str, since_ms: float) -> int:
    """How many requests have a completion on the Kafka log (after flushing every service's events)."""
    await stack.flush()
    window = RecordedWindow(rng=RecordRange(since_ms=since_ms), since_ms=since_ms, until_ms=time.time() * 1000 + 1)
    async with replay_reader(kafka_access) as reader:
        await read_events(reader, window, scope=scope, bases=(Topics.COMPLETIONS,))
    return len({c.request_id for c in window.completions})


@asynccontextmanager
async def running_stack(nats_network, kafka_access: KafkaAccess, scope: str, topology: dict, model_repo: Path,
                        tmp_path: Path, recorded_topics, models: dict[str, list[str]] | None = None):
    """Every service in process under ``topology``; yields (stack, topology file, credentials file, secrets, nc)."""
    import yaml

    topology_file = tmp_path / "topology.yaml"
    # One control plane, at the hub: every service runs in this process on the hub's server.
    topology_file.write_text(yaml.safe_dump({**topology, "control_plane": "hub"}))
    credentials = tmp_path / "credentials.json"
    secrets = write_credentials(credentials, [t["name"] for t in topology["tenants"]])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        metrics_port = s.getsockname()[1]
    await recorded_topics(scope)
    stack = InProcessStack(nats_network, kafka_access, scope, topology_file, model_repo, credentials, metrics_port,
                           models)
    nc = await nats_network.connect()
    try:
        await stack.start(nc)
        yield SimpleNamespace(stack=stack, topology_file=topology_file, credentials=credentials, secrets=secrets,
                              nc=nc)
    finally:
        await nc.close()
        await stack.stop()


async def test_record_a_workload_replay_it_and_find_the_same_requests_and_mix(
    nats_network, kafka_access, recorded_topics, unique, test_topology, model_repo, tmp_path, capsys
):
    async with running_stack(nats_network, kafka_access, unique, test_topology.model_dump(mode="json"),
                             model_repo, tmp_path, recorded_topics) as running:
        stack, topology_file, credentials, secrets = (running.stack, running.topology_file, running.credentials,
                                                      running.secrets)
        began_ms = time.time() * 1000.0
        clients = {}
        try:
            x, y = load_digits_test(model_repo)
            tenants = sorted(secrets)
            clients = {t: await DinClient.connect(nats_network.hub_url, t, issue_token(t, secrets[t]),
                                                  options=nats_network.tenant_options(t)) for t in tenants}
            plan = mixed_plan(tenants, 120, len(x), seed=11)
            recording = await run_workload(clients, plan, x, y, concurrency=12)
            assert len(recording.outcomes) == 120
            served = sum(o.ok for o in recording.outcomes)

            async def every_completion_recorded() -> bool:
                return await completed_requests(stack, kafka_access, unique, began_ms) >= served

            await wait_for(every_completion_recorded, 20, f"completions of the {served} served requests are logged")
            assert await count_requests(kafka_access, unique) == 120, "admission records every admitted request"
            ended_ms = time.time() * 1000.0
            capsys.readouterr()

            out = tmp_path / "replay.json"
            common = ["--since", str(began_ms - 1000), "--kafka", kafka_access.bootstrap, "--topic-scope", unique,
                      *(["--bus-dir", str(deployment_bus(tmp_path, kafka_access, nats_network))]
                        if kafka_access.secure else []),
                      "--din-dir", str(tmp_path)]
            args = build_parser().parse_args([
                # the topology names the hub, whose inboxes the replay's NATS users answer on
                "replay", *common, "--nats", nats_network.hub_url, "--credentials", str(credentials),
                "--topology", str(topology_file),
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


KIND_REQUESTS = {
    "single": dict(tenant="acme", model="digits-small", options=dict(
        sla="realtime", labels=["pii"], allow_degrade=True, min_accuracy=0.5, version="2", timeout_ms=4000)),
    "cascade by threshold": dict(tenant="globex", model="digits-large", options=dict(cascade=0.0, timeout_ms=8000)),
    "cascade by rate": dict(tenant="globex", model="digits-large", options=dict(cascade_rate=1.0, sla="batch")),
    "split with protection": dict(tenant="acme", model="digits-large", options=dict(
        labels=["pii"], split="hidden_1", split_protection="quantize:4", timeout_ms=8000)),
    "streamed generation": dict(tenant="globex", model="charlm", prompt="def ", options=dict(
        max_tokens=6, timeout_ms=20000)),
}
"""One request of each kind, with options that change how it is served: a threshold of 0 never escalates (the
small variant answers), a target rate of 1 always does, the split is forced at one point, the stream has 7 chunks."""


async def send_kind(client: DinClient, kind: dict, x, request_id: str) -> Outcome:
    """Send one request of ``kind`` and say how it was served, as the replay's outcomes do."""
    outcome = Outcome(request_id, kind["tenant"], "", False)
    options = dict(kind["options"], request_id=request_id)
    if "prompt" in kind:
        max_tokens = options.pop("max_tokens")
        await stream_into(outcome, client.generate(kind["model"], kind["prompt"], max_tokens, **options))
    else:
        result = await client.infer(kind["model"], {"input": x[:1]}, **options)
        served_into(outcome, result.served_by, result.response.timings_ms)
    return outcome


def every_kind_topology(test_topology) -> dict:
    """The test topology with one executor per site serving every model ``EVERY_KIND`` puts there."""
    topology = test_topology.model_dump(mode="json")
    for site in topology["sites"]:
        site["executors"] = [{"id": f"{site['name']}-1", "models": EVERY_KIND[site["name"]]}]
    return topology


def served_as(outcome: Outcome) -> tuple:
    return outcome.ok, outcome.model, outcome.escalated, outcome.split_point, outcome.chunks


async def test_every_kind_of_request_replays_with_its_options_and_is_served_the_same_way(
    nats_network, kafka_access, recorded_topics, unique, test_topology, model_repo, tmp_path
):
    async with running_stack(nats_network, kafka_access, unique, every_kind_topology(test_topology), model_repo,
                             tmp_path, recorded_topics, models=EVERY_KIND) as running:
        x, _ = load_digits_test(model_repo)
        tokens = {t: issue_token(t, secret) for t, secret in running.secrets.items()}
        clients = {t: await DinClient.attach(running.nc, t, token) for t, token in tokens.items()}
        try:
            original = {name: await send_kind(clients[kind["tenant"]], kind, x, f"kind-{i}")
                        for i, (name, kind) in enumerate(KIND_REQUESTS.items())}
        finally:
            for client in clients.values():
                await client.close()
        kept = original["cascade by threshold"]
        assert kept.model == "digits-small" and not kept.escalated
        assert original["cascade by rate"].escalated and original["cascade by rate"].model == "digits-large"
        assert original["split with protection"].split_point == "hidden_1"
        assert original["streamed generation"].chunks == 7
        assert original["single"].split_point is None and original["single"].chunks is None

        await running.stack.flush()
        recorded = await recorded_requests(kafka_access, unique)
        assert sorted(recorded) == sorted(f"kind-{i}" for i in range(len(KIND_REQUESTS)))
        async with replay_reader(kafka_access) as reader:
            window = await read_requests(reader, RecordRange(since_ms=0), scope=unique, keyring=None)
        driver = ReplayDriver(running.nc, tokens, speed=0, progress=False, run_id="kinds")
        replay = await driver.run(window.requests)

        await running.stack.flush()
        rerecorded = await recorded_requests(kafka_access, unique)
        for i, name in enumerate(KIND_REQUESTS):
            request_id = f"kind-{i}"
            again = rerecorded[f"replay-kinds-{request_id}"]
            assert again.serving_options() == recorded[request_id].serving_options(), name
            assert abs(again.timeout_ms - recorded[request_id].timeout_ms) <= 1, f"{name}: the same budget, to the ms"
            assert served_as(replay.outcomes[request_id]) == served_as(original[name]), name


# --------------------------------------------------------------------------- what-if and report on live runs


def kafka_source(kafka: KafkaAccess, scope: str, since_ms: float, until_ms: float | None = None) -> list[str]:
    """The options naming the recording for ``din replay`` and ``din report``: this Kafka (read as their own
    users), ``scope``'s topics, the time range."""
    return ["--kafka", kafka.bootstrap, "--topic-scope", scope, "--since", str(since_ms),
            "--until", str(until_ms) if until_ms is not None else "now",
            *(["--bus-dir", str(kafka.bus_dir)] if kafka.secure else [])]


async def recorded_until_done(kafka: KafkaAccess, scope: str, since_ms: float, ids: set[str],
                              timeout_s: float = 30.0) -> RecordedWindow:
    """The events recorded since ``since_ms`` once every request of ``ids`` has its placing decision and its final
    outcome on the log (decisions come straight from each site's scheduler, completions through telemetry)."""
    seen: dict[str, int] = {}

    async def complete() -> RecordedWindow | None:
        window = RecordedWindow(rng=RecordRange(since_ms=since_ms), since_ms=since_ms,
                                until_ms=time.time() * 1000.0 + 1)
        async with replay_reader(kafka) as reader:
            await read_events(reader, window, scope=scope, bases=(Topics.SCHEDULING_DECISIONS, Topics.COMPLETIONS))
        decided = ids & set(placing_decisions(window))
        ended = {rid for rid, o in final_outcomes([], window.schedulings, window.completions).items()
                 if rid in ids and o.stage is not None}
        seen.update(decided=len(decided), ended=len(ended))
        return window if len(decided) == len(ended) == len(ids) else None

    return await wait_for(complete, timeout_s, lambda: f"every one of {len(ids)} requests decided and ended on the "
                          f"log (saw {seen})", interval=0.5)


@pytest.fixture(scope="module")
def wan_network(kafka_access, zoo_dir, tmp_path_factory):
    """The inference-test topology, a control plane per site, each leaf behind its Toxiproxy link: factory over a
    dedicated line, branch over the internet (the topology's figures: tens of ms each way, jitter, loss)."""
    with running_network(kafka_access, zoo_dir, tmp_path_factory.mktemp("din"), "centralized", wan=True) as net:
        yield net


WAN_MIX = (("globex", {}), ("globex", {}), ("acme", {"labels": ["pii"]}), ("initech", {}))
"""Open traffic (placed by the hub's scheduler: the hub is nearest), acme's sensitive requests (opened and placed
at factory) and initech's (always sensitive: branch)."""


async def test_what_if_under_the_live_policy_reproduces_the_live_placement_over_wan_links(
    wan_network, kafka_access, digits, zoo_dir, tmp_path
):
    """The issue's case: a control plane per site over WAN links. Branch's scheduler places initech's requests on
    its own executor (its own site: 0.1 ms), the hub's prices branch's link at what its probes measure; the what-if
    must take each decision from the scheduler that made it, at the links it priced, and so place every request
    where it was placed live (it priced the branch round trip at 0.0 ms and moved the hub's traffic to branch)."""
    net = wan_network
    await net.wait_fleet_in_view()
    x, _ = digits
    began_ms = time.time() * 1000.0
    live: dict[str, str] = {}
    async with net.client("globex") as globex, net.client("acme") as acme, net.client("initech") as initech:
        clients = {"globex": globex, "acme": acme, "initech": initech}
        for i in range(80):
            tenant, options = WAN_MIX[i % len(WAN_MIX)]
            rid = f"wan-{i}"
            result = await clients[tenant].infer("digits-small", {"input": x[i : i + 1]}, request_id=rid, **options)
            live[rid] = result.served_by.site
    ended_ms = time.time() * 1000.0
    assert Counter(live.values()) == {"cloud": 40, "factory": 20, "branch": 20}, "sovereignty and the WAN links"
    window = await recorded_until_done(kafka_access, net.topic_scope, began_ms - 1000, set(live))
    deciders = Counter(placing_decisions(window)[rid].scheduler_site for rid in live)
    assert deciders == {"cloud": 40, "factory": 20, "branch": 20}, "each site's scheduler placed its own requests"

    out = tmp_path / "whatif.json"
    topology = net.stack.run_dir / "topology.yaml"
    args = build_parser().parse_args([
        "replay", "--what-if", "latency", *kafka_source(kafka_access, net.topic_scope, began_ms - 1000, ended_ms + 1),
        "--topology", str(topology), "--model-repo", str(zoo_dir), "--json", str(out), "--din-dir", str(tmp_path)])
    assert await run_replay(args) == 0
    report = json.loads(out.read_text())
    live_sites = dict(Counter(live.values()))
    assert report["recorded"]["sites"] == live_sites
    assert report["baseline"]["sites"] == live_sites, \
        f"the live policy, offline, places as the live scheduler did (links {report['link_rtt_ms_by_scheduler']})"
    reproduced = report["reproduced"]
    assert reproduced["compared"] == 80 and reproduced["same_placement"] == 80, reproduced
    internet = net.topology.hub_link("branch").conditions()
    assert report["link_rtt_ms"]["branch"] >= 2 * (internet.latency_ms - internet.jitter_ms), \
        "the hub priced branch's round trip at least at what the link's latency allows, not 0"
    assert report["links_recorded"] and not any("predate" in note for note in report["notes"])


async def test_report_after_live_traffic_and_a_replay_shows_them_apart_with_the_right_counts(
    nats_network, kafka_access, recorded_topics, unique, test_topology, model_repo, tmp_path
):
    async with running_stack(nats_network, kafka_access, unique, test_topology.model_dump(mode="json"),
                             model_repo, tmp_path, recorded_topics) as running:
        x, _ = load_digits_test(model_repo)
        tokens = {t: issue_token(t, secret) for t, secret in running.secrets.items()}
        began_ms = time.time() * 1000.0
        clients = {t: await DinClient.attach(running.nc, t, token) for t, token in tokens.items()}
        try:
            for i in range(12):
                tenant = ("acme", "globex")[i % 2]
                await clients[tenant].infer("digits-small", {"input": x[i : i + 1]}, request_id=f"live-{i}")
        finally:
            for client in clients.values():
                await client.close()
        await running.stack.flush()
        async with replay_reader(kafka_access) as reader:
            window = await read_requests(reader, RecordRange(since_ms=began_ms - 1000), scope=unique, keyring=None)
        assert len(window.requests) == 12
        replay = await ReplayDriver(running.nc, tokens, speed=0, progress=False, run_id="again").run(window.requests)
        assert sum(o.ok for o in replay.outcomes.values()) == 12
        await running.stack.flush()
        ids = {f"live-{i}" for i in range(12)} | {replay_request_id("again", f"live-{i}") for i in range(12)}
        await recorded_until_done(kafka_access, unique, began_ms - 1000, ids)

        out, counts = tmp_path / "report.html", tmp_path / "report.json"
        args = build_parser().parse_args(["report", *kafka_source(kafka_access, unique, began_ms - 1000),
                                          "--out", str(out), "--json", str(counts), "--din-dir", str(tmp_path)])
        assert await run_report(args) == 0
        summary = json.loads(counts.read_text())
        assert (summary["live"]["requests"], summary["live"]["answered"]) == (12, 12)
        assert list(summary["replayed"]) == ["again"]
        assert (summary["replayed"]["again"]["requests"], summary["replayed"]["again"]["answered"]) == (12, 12)
        assert summary["replayed_requests"] == 12 and summary["completion_records"] == 24
        page = out.read_text()
        assert "12</b><span>live requests" in page and "12</b><span>replayed requests (1 run), apart" in page


async def test_report_counts_a_multi_stage_request_once_and_its_stage_hand_offs_apart(
    nats_network, kafka_access, recorded_topics, unique, test_topology, model_repo, tmp_path
):
    async with running_stack(nats_network, kafka_access, unique, every_kind_topology(test_topology), model_repo,
                             tmp_path, recorded_topics, models=EVERY_KIND) as running:
        x, _ = load_digits_test(model_repo)
        tokens = {t: issue_token(t, secret) for t, secret in running.secrets.items()}
        began_ms = time.time() * 1000.0
        kinds = {name: KIND_REQUESTS[name] for name in ("split with protection", "cascade by rate", "single")}
        clients = {t: await DinClient.attach(running.nc, t, token) for t, token in tokens.items()}
        try:
            served = {name: await send_kind(clients[kind["tenant"]], kind, x, f"multi-{i}")
                      for i, (name, kind) in enumerate(kinds.items())}
        finally:
            for client in clients.values():
                await client.close()
        assert served["split with protection"].split_point == "hidden_1" and served["cascade by rate"].escalated
        await running.stack.flush()
        window = await recorded_until_done(kafka_access, unique, began_ms - 1000, {f"multi-{i}" for i in range(3)})
        # The relay delivers at least once: under load a completion may be recorded twice, never a different one.
        stages = {(c.request_id, c.model, c.plan_stage, c.cascade_step) for c in window.completions}
        assert len(stages) == 5, "the split's head and the cascade's first step completed as well"

        counts = tmp_path / "report.json"
        args = build_parser().parse_args(["report", *kafka_source(kafka_access, unique, began_ms - 1000),
                                          "--out", str(tmp_path / "report.html"), "--json", str(counts),
                                          "--din-dir", str(tmp_path)])
        assert await run_report(args) == 0
        summary = json.loads(counts.read_text())
        live = summary["live"]
        assert (live["requests"], live["answered"]) == (3, 3), "each request once, by its final outcome"
        assert live["stage_hand_offs"] == {"split-head": 1, "cascade step 1": 1}
        assert live["models"] == {"digits-large-tail-hidden_1": 1, "digits-large": 1, "digits-small": 1}
        assert summary["completion_records"] == len(window.completions) and summary["replayed"] == {}


SIGNED_TOPICS = (Topics.ADMISSION_DECISIONS, Topics.CLASSIFICATIONS, Topics.SCHEDULING_DECISIONS, Topics.COMPLETIONS)


async def test_records_not_signed_by_a_din_site_are_skipped_counted_and_reported(wan_network, kafka_access, digits):
    """Every record the live services write verifies under the sites' public identities; three completions planted
    by someone holding telemetry's Kafka login (unsigned, a real one with its value changed, one signed by a
    tenant's identity) are skipped and counted by reason, and the report renders the window."""
    net = wan_network
    x, _ = digits
    began_ms = time.time() * 1000.0
    ids = {f"signed-{i}" for i in range(6)}
    async with net.client("acme") as acme:
        for i, rid in enumerate(sorted(ids)):
            await acme.infer("digits-small", {"input": x[i : i + 1]}, request_id=rid)
    await recorded_until_done(kafka_access, net.topic_scope, began_ms - 1000, ids)
    verifier = RecordVerifier(KeyStore.load(net.stack.keys_dir / KEYSTORE_FILE).publics)
    topic = Topics.scoped(Topics.COMPLETIONS, net.topic_scope)
    async with replay_reader(kafka_access) as reader:
        genuine = [r async for batch in reader.read(topic, RecordRange(since_ms=began_ms - 1000)) for r in batch][-1]
    kind = [("din-event-type", b"din.v1.CompletionV1")]
    tenant = RecordSigner(net.keys("acme").identity)
    await produce(kafka_access, topic, [
        (genuine.key, genuine.value, kind),
        (genuine.key, genuine.value + b" ", list(genuine.headers)),
        (genuine.key, genuine.value, [*kind, tenant.header(topic, genuine.key, kind[0][1], 0, genuine.value)]),
    ], user="telemetry")

    async def planted_seen() -> RecordedWindow | None:
        window = RecordedWindow(rng=RecordRange(since_ms=began_ms - 1000), since_ms=began_ms - 1000,
                                until_ms=time.time() * 1000.0 + 1)
        async with replay_reader(kafka_access) as reader:
            await read_events(reader, window, scope=net.topic_scope, bases=SIGNED_TOPICS, verifier=verifier)
        return window if window.forged[topic] >= 3 else None

    window = await wait_for(planted_seen, 30, "the three planted completions refused")
    assert dict(window.forged) == {topic: 3}, "every record the services wrote verifies"
    assert dict(window.forged_reasons) == {"unsigned": 1, "bad_signature": 1, "unknown_signer": 1}
    assert ids <= {c.request_id for c in window.completions}
    assert any("not signed by a DIN site" in line for line in window.skipped_summary())
    assert "not signed by a DIN site" in render_report(window, title="t", source="kafka", scope=net.topic_scope)
