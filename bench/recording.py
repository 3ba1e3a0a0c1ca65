"""Benchmark: can Kafka recording keep up with the inference path, what it costs, and how fast replay reads.

Measures, on this machine, in about a minute:

1. ``hot_path``: what recording one request costs admission's event loop:
   ``request_record`` plus queueing the record on the event log, in microseconds.
2. ``inference``: the inference path's peak request rate: a whole stack (real
   NATS hub and leaves, Kafka, every service its own process), a closed loop of
   realtime binary requests at high concurrency; run once alone and once while
   a separate process records request records to the same Kafka at that peak
   rate (idempotent producer, acks=all) — the difference is what recording costs
   the request path on a shared 2-core machine.
3. ``recording``: sustained recording rate through ``EventLog`` (idempotent,
   acks=all): offered rates step up until records are dropped or fall behind.
4. ``replay_read``: records read and decoded per second by ``din replay``'s reader.

Writes ``recording.json`` and ``recording.md`` to ``bench/results/`` (or ``--out``).

    din bench-recording [--seconds 6] [--concurrency 64]
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import platform
import tempfile
import time
import timeit
import uuid
from pathlib import Path

import numpy as np

from din.bench import RESULTS_DIR, write_results
from din.client import DinClient, DinRequestError, NoAnswerError
from din.replay.reader import RecordRange, TopicReader
from din.replay.recorded import read_requests
from din.services.telemetry.settings import TelemetrySettings
from din.services.telemetry.topics import ensure_topics, topic_plan
from din.shared.bus.kafka import OPERATOR, KafkaAccess
from din.shared.bus.permissions import tenant_user
from din.shared.contracts.inference import SlaClass
from din.shared.contracts.job import JobV1
from din.shared.credentials import issue_token, read_credentials
from din.shared.eventlog import EventLog
from din.shared.naming import Topics
from din.shared.recording import request_record
from din.shared.tensors import encode_binary
from din.shared.topology import load_topology
from din.stack.launcher import DEFAULT_MODEL_REPO, DEFAULT_TOPOLOGY, PortPlan, Stack
from din.workload import load_digits_test

INFERENCE_RESULTS = RESULTS_DIR / "inference_path.json"
BODY_ITEMS = 64
RATE_STEPS = (2_000, 5_000, 10_000, 20_000, 40_000, 60_000)
TOP_UP = 20_000
REPLAY_RECORDS = 50_000
RECORDER = "admission"
"""The Kafka user the benchmark records as: admission, the requests topic's writer."""
READER = "replay"


def sample_record(i: int, tenant: str = "acme") -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    body, headers = encode_binary("input", np.zeros((1, BODY_ITEMS), dtype=np.float32))
    now = time.time() * 1000.0
    job = JobV1(request_id=uuid.uuid4().hex, tenant=tenant, model="digits-small", sla_class=SlaClass.REALTIME,
                deadline_ms=int(now) + 1000, reply_to="_INBOX.x", content_type="application/vnd.din.tensor",
                received_ms=now)
    return request_record(job, body, headers)


def emit_record(log: EventLog, base: str, key: bytes, value: bytes, headers) -> None:
    """``EventLog.emit_record`` when the event log has it, else the same put on its queue."""
    method = getattr(log, "emit_record", None)
    if method is not None:
        method(base, key, value, headers)
        return
    try:
        log._queue.put_nowait((log.topic(base), key, value, headers))
    except asyncio.QueueFull:
        log.dropped += 1


# --------------------------------------------------------------------------- 1. hot path cost


def hot_path_cost() -> dict[str, float]:
    body, headers = encode_binary("input", np.zeros((1, BODY_ITEMS), dtype=np.float32))
    now = time.time() * 1000.0
    job = JobV1(request_id=uuid.uuid4().hex, tenant="acme", model="digits-small", sla_class=SlaClass.REALTIME,
                deadline_ms=int(now) + 1000, reply_to="_INBOX.x", content_type="application/vnd.din.tensor",
                received_ms=now)
    n = 50_000
    build_us = timeit.timeit(lambda: request_record(job, body, headers), number=n) / n * 1e6

    async def queue_cost() -> float:
        log = EventLog("127.0.0.1:1", client_id="bench", max_buffered=n + 1)
        began = time.perf_counter()
        for _ in range(n):
            key, value, hdrs = request_record(job, body, headers)
            emit_record(log, Topics.REQUESTS, key, value, hdrs)
        return (time.perf_counter() - began) / n * 1e6

    total_us = asyncio.run(queue_cost())
    return {"request_record_us": round(build_us, 2), "record_and_queue_us": round(total_us, 2)}


# --------------------------------------------------------------------------- 2. inference path peak


async def closed_loop(stack: Stack, seconds: float, concurrency: int) -> dict[str, float]:
    secrets = read_credentials(stack.credentials_file)
    tenants = sorted(secrets)[:2]
    x, _ = load_digits_test(DEFAULT_MODEL_REPO)
    clients = [await DinClient.connect(stack.hub_url, t, issue_token(t, secrets[t]),
                                       stack.tenant_keys(t) if stack.security else None,
                                       options=stack.nats_options(user=tenant_user(t))) for t in tenants]
    latencies: list[float] = []
    errors: dict[str, int] = {}
    stop_at = time.monotonic() + seconds

    async def worker(k: int) -> None:
        client = clients[k % len(clients)]
        i = k
        while time.monotonic() < stop_at:
            started = time.perf_counter()
            try:
                await client.infer("digits-small", {"input": x[i % len(x): i % len(x) + 1]}, sla="realtime",
                                   binary=True, timeout_ms=2000)
                latencies.append((time.perf_counter() - started) * 1000.0)
            except DinRequestError as exc:
                errors[exc.error.code.value] = errors.get(exc.error.code.value, 0) + 1
            except NoAnswerError:
                errors["no_answer"] = errors.get("no_answer", 0) + 1
            i += concurrency

    # warm-up: model sessions, link probes, first batches
    warm = time.monotonic() + 2.0
    while time.monotonic() < warm:
        await asyncio.gather(*(clients[0].infer("digits-small", {"input": x[:1]}, sla="realtime", binary=True)
                               for _ in range(8)), return_exceptions=True)
    began = time.monotonic()
    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    wall = time.monotonic() - began
    for client in clients:
        await client.close()
    lat = np.asarray(latencies) if latencies else np.asarray([0.0])
    return {"requests_per_s": round(len(latencies) / wall, 1), "ok": len(latencies), "errors": errors,
            "p50_ms": round(float(np.percentile(lat, 50)), 2), "p99_ms": round(float(np.percentile(lat, 99)), 2)}


def create_request_topic(access: KafkaAccess, scope: str) -> None:
    """The requests topic under ``scope``, created by the operator as ``din up`` creates its run's (services may
    not create topics)."""
    plan = topic_plan(TelemetrySettings(nats_url="nats://unused:4222", kafka_bootstrap=access.bootstrap,
                                        site="cloud"))
    asyncio.run(ensure_topics(access.bootstrap, [t for t in plan if t.base == Topics.REQUESTS], scope=scope,
                              client_id="bench-operator", client_kwargs=access.client_kwargs(OPERATOR)))


def _recorder_process(access: KafkaAccess, topic_scope: str, rate: float, seconds: float, out) -> None:
    out.put(asyncio.run(offer(access, topic_scope, rate, seconds)))


async def offer(access: KafkaAccess, scope: str | None, rate: float | None, seconds: float) -> dict[str, float]:
    """Offer request records to an ``EventLog`` at ``rate``/s (None: as fast as it takes them) for ``seconds``,
    logged in as admission (the requests topic's writer); the topic exists (``create_request_topic``)."""
    log = EventLog(access.bootstrap, client_id=f"bench-{uuid.uuid4().hex[:6]}", topic_scope=scope,
                   client_kwargs=access.client_kwargs(RECORDER))
    await log.start()
    records = [sample_record(i, ("acme", "globex")[i % 2]) for i in range(1000)]
    while log._producer is None:  # connected: measure recording, not connection set-up
        await asyncio.sleep(0.05)
    offered = 0
    began = time.monotonic()
    tick = 0.01
    while (now := time.monotonic()) - began < seconds:
        if rate is None:  # keep the queue topped up: what the pump can hand to Kafka at most
            while log._queue.qsize() < TOP_UP:
                emit_record(log, Topics.REQUESTS, *records[offered % 1000])
                offered += 1
            await asyncio.sleep(0.001)
            continue
        due = int((now - began) * rate)
        while offered < due:
            emit_record(log, Topics.REQUESTS, *records[offered % 1000])
            offered += 1
        await asyncio.sleep(tick)
    emitting = time.monotonic() - began
    acked_in_time = log.sent
    await log.flush(timeout_s=30.0)
    total = time.monotonic() - began
    result = {"offered_per_s": round(offered / emitting, 1), "acked_per_s": round(log.sent / total, 1),
              "acked_while_offering_per_s": round(acked_in_time / emitting, 1),
              "offered": offered, "acked": log.sent, "dropped": log.dropped, "failed": log.failed,
              "flush_lag_s": round(total - emitting, 2)}
    await log.stop()
    return result


def _fresh_scope(access: KafkaAccess) -> str:
    scope = f"bench{uuid.uuid4().hex[:6]}"
    create_request_topic(access, scope)
    return scope


def recording_steps(access: KafkaAccess, seconds: float) -> dict[str, object]:
    steps = []
    sustained = 0.0
    for rate in RATE_STEPS:
        step = asyncio.run(offer(access, _fresh_scope(access), rate, seconds))
        step["target_per_s"] = rate
        steps.append(step)
        kept_up = step["dropped"] == 0 and step["failed"] == 0 and step["flush_lag_s"] <= 1.0
        print(f"  offered {step['offered_per_s']:>9,.0f}/s  acked {step['acked_per_s']:>9,.0f}/s  "
              f"dropped {step['dropped']}  flush lag {step['flush_lag_s']}s", flush=True)
        if not kept_up:
            break
        sustained = step["offered_per_s"]
    unbounded = asyncio.run(offer(access, _fresh_scope(access), None, seconds))
    print(f"  queue kept full: acked {unbounded['acked_while_offering_per_s']:,.0f}/s while offering", flush=True)
    return {"steps": steps, "sustained_per_s": sustained, "unbounded": unbounded}


# --------------------------------------------------------------------------- 4. replay read


def replay_read(access: KafkaAccess) -> dict[str, float]:
    return asyncio.run(_replay_read(access, _fresh_scope(access)))


async def _replay_read(access: KafkaAccess, scope: str) -> dict[str, float]:
    from aiokafka import AIOKafkaProducer

    topic = Topics.scoped(Topics.REQUESTS, scope)
    producer = AIOKafkaProducer(bootstrap_servers=access.bootstrap, enable_idempotence=True, acks="all",
                                linger_ms=20, max_batch_size=512 * 1024, **access.client_kwargs(RECORDER))
    await producer.start()
    records = [sample_record(i, ("acme", "globex", "initech")[i % 3]) for i in range(1000)]
    began = time.monotonic()
    futures = [await producer.send(topic, value, key=key, headers=headers)
               for i in range(REPLAY_RECORDS) for key, value, headers in (records[i % 1000],)]
    await asyncio.gather(*futures)
    await producer.stop()
    write_s = time.monotonic() - began
    async with TopicReader(access.bootstrap, client_kwargs=access.client_kwargs(READER)) as reader:
        began = time.perf_counter()
        window = await read_requests(reader, RecordRange(since_ms=0), scope=scope, keyring=None)
        read_s = time.perf_counter() - began
    return {"records": len(window.requests), "read_and_decode_per_s": round(len(window.requests) / read_s, 1),
            "seconds": round(read_s, 2), "write_per_s": round(REPLAY_RECORDS / write_s, 1)}


# --------------------------------------------------------------------------- main


def published_peak() -> float | None:
    """DIN's peak request rate from ``bench/results/inference_path.json`` (``din bench``, ``bench.inference_path``)."""
    try:
        return float(json.loads(INFERENCE_RESULTS.read_text())["summary"]["din_peak_rps"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def markdown(results: dict) -> str:
    inf, rec, hot, rr = results["inference"], results["recording"], results["hot_path"], results["replay_read"]
    base, loaded = inf["alone"], inf["with_recording"]
    lines = [
        "# Recording and replay benchmark",
        "",
        f"Machine: {results['machine']}. Run {results['started']}; `din bench-recording`.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| inference path peak (closed loop, {inf['concurrency']} in flight, realtime, binary) | "
        f"{base['requests_per_s']:,.0f} req/s (p50 {base['p50_ms']} ms, p99 {base['p99_ms']} ms) |",
        f"| same, while another process records {loaded['recording']['offered_per_s']:,.0f} req/s to Kafka | "
        f"{loaded['requests_per_s']:,.0f} req/s (p50 {loaded['p50_ms']} ms, p99 {loaded['p99_ms']} ms) |",
        f"| inference path peak used for the comparison (this run, or `inference_path.json` if higher) | "
        f"{inf['peak_per_s']:,.0f} req/s |",
        f"| recording sustained through `EventLog` (idempotent, acks=all, no drops, no backlog) | "
        f"{rec['sustained_per_s']:,.0f} records/s |",
        f"| recording with its queue kept full (the event log's ceiling) | "
        f"{rec['unbounded']['acked_while_offering_per_s']:,.0f} records/s acknowledged |",
        f"| headroom: sustained recording / inference peak | {results['headroom']:.1f}x |",
        f"| admission hot path: `request_record` | {hot['request_record_us']} us |",
        f"| admission hot path: `request_record` + queue on the event log | {hot['record_and_queue_us']} us |",
        f"| replay: records read and decoded | {rr['read_and_decode_per_s']:,.0f} records/s "
        f"({rr['records']:,} in {rr['seconds']} s) |",
        "",
        f"Admission itself recorded requests during the inference runs: {inf['admission_records']}.",
        "",
        "Recording steps (offered rate -> acknowledged):",
        "",
        "| target/s | offered/s | acked/s | dropped | flush lag s |",
        "|---|---|---|---|---|",
    ]
    for step in rec["steps"]:
        lines.append(f"| {step['target_per_s']:,} | {step['offered_per_s']:,.0f} | {step['acked_per_s']:,.0f} | "
                     f"{step['dropped']} | {step['flush_lag_s']} |")
    return "\n".join(lines) + "\n"


def run_recording_bench(seconds: float = 6.0, concurrency: int = 64, out: Path = RESULTS_DIR) -> int:
    """Run the four measurements, write ``recording.json`` and ``.md`` to ``out``; 1 when recording lacks headroom.

    ``seconds`` is the length of each measured run, ``concurrency`` the requests in flight in the inference runs.
    """
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    results: dict = {"started": started, "machine": f"{platform.machine()}, {multiprocessing.cpu_count()} cores, "
                                                     f"Python {platform.python_version()}"}
    print("1. admission hot path cost ...", flush=True)
    results["hot_path"] = hot_path_cost()
    print(f"  {results['hot_path']}", flush=True)

    topology = load_topology(DEFAULT_TOPOLOGY)
    scope = f"bench{uuid.uuid4().hex[:6]}"
    with tempfile.TemporaryDirectory() as tmp:
        stack = Stack(topology, topology_file=DEFAULT_TOPOLOGY, ports=PortPlan.free(edge_sites=2), din_dir=Path(tmp),
                      write_state=False, topic_scope=scope)
        print("2. starting a whole stack (NATS hub + leaves, Kafka, every service) ...", flush=True)
        with stack.start():
            alone = asyncio.run(closed_loop(stack, seconds, concurrency))
            access = stack.kafka_access
            create_request_topic(access, f"{scope}rec")
            print(f"  inference alone: {alone}", flush=True)
            peak = max(alone["requests_per_s"], published_peak() or 0.0)
            queue: multiprocessing.Queue = multiprocessing.Queue()
            recorder = multiprocessing.Process(
                target=_recorder_process,
                args=(access, f"{scope}rec", peak, seconds + 4.0, queue))
            recorder.start()
            time.sleep(1.0)
            loaded = asyncio.run(closed_loop(stack, seconds, concurrency))
            recorder.join(120)
            loaded["recording"] = queue.get(timeout=5)
            print(f"  inference while recording: {loaded}", flush=True)
            admission_records = asyncio.run(_count(access, scope))
            results["inference"] = {"concurrency": concurrency, "alone": alone, "with_recording": loaded,
                                    "admission_records": admission_records}
            print("3. recording rate through EventLog (idempotent, acks=all) ...", flush=True)
            results["recording"] = recording_steps(access, seconds / 2)
            print("4. replay read and decode ...", flush=True)
            results["replay_read"] = replay_read(access)
            print(f"  {results['replay_read']}", flush=True)
    results["inference"]["published_peak_per_s"] = published_peak()
    results["inference"]["peak_per_s"] = round(max(peak, 1.0), 1)
    results["headroom"] = round(results["recording"]["sustained_per_s"] / max(peak, 1.0), 2)
    write_results(out, "recording", json.dumps(results, indent=2), markdown(results))
    ok = results["headroom"] >= 1.0 and results["replay_read"]["read_and_decode_per_s"] >= 5000
    return 0 if ok else 1


async def _count(access: KafkaAccess, scope: str) -> str:
    try:
        async with TopicReader(access.bootstrap, client_kwargs=access.client_kwargs(READER)) as reader:
            window = await read_requests(reader, RecordRange(since_ms=0), scope=scope, keyring=None)
            return f"yes ({len(window.requests)} recorded)"
    except Exception as exc:  # noqa: BLE001 - no topic or no records: admission does not record yet
        return (f"no (admission does not record requests yet; the separate recorder stands in for it: "
                f"{exc.__class__.__name__}: {exc})")
