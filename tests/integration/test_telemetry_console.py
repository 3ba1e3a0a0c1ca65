"""The console-consumer command in docs/telemetry.md works as written and shows a recorded request's headers."""

from __future__ import annotations

import asyncio
import re
import shlex
import shutil
import time
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from din.shared.bus.kafka import KAFKA_DIR, OPERATOR, KafkaUsers
from din.shared.contracts.inference import SlaClass
from din.shared.naming import Topics
from din.shared.recording import request_record
from tests.support import make_job

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs" / "telemetry.md"
LIBS = ROOT / ".din" / "kafka" / "libs"


def documented_command() -> list[str]:
    text = DOCS.read_text()
    block = re.search(r"<!-- console-consumer -->\s*```bash\n(.*?)```", text, flags=re.S)
    assert block, "docs/telemetry.md has no console-consumer command block"
    return shlex.split(block.group(1).replace("\\\n", " "))


async def test_documented_console_consumer_prints_recorded_request_headers(kafka_access, kafka_operator, unique):
    if not shutil.which("java") or not (LIBS / ".complete").exists():
        pytest.skip("Kafka's jars are not in .din/kafka/libs (run `din setup`)")
    topic = Topics.scoped(Topics.REQUESTS, unique)
    now = time.time() * 1000.0
    job = make_job(request_id="req-console", model="digits-small", sla_class=SlaClass.BATCH,
                   deadline_ms=int(now) + 60_000, reply_to="", content_type="application/vnd.din.tensor",
                   received_ms=now, labels=["pii"])
    key, value, headers = request_record(job, b"\x00" * 256, {"Din-Tensor-Name": "input",
                                                               "Din-Tensor-Shape": "1,64",
                                                               "Din-Tensor-Datatype": "FP32"})
    kafka_bootstrap = kafka_access.bootstrap
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap, **kafka_operator)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=3, replication_factor=1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, enable_idempotence=True, acks="all",
                                **kafka_access.client_kwargs("admission"))
    await producer.start()
    try:
        await producer.send_and_wait(topic, value, key=key, headers=headers)
    finally:
        await producer.stop()

    argv = documented_command()
    argv[argv.index("--bootstrap-server") + 1] = kafka_bootstrap
    argv[argv.index("--topic") + 1] = topic
    argv[argv.index("--max-messages") + 1] = "1"
    if kafka_access.secure:
        config = str(KafkaUsers(kafka_access.bus_dir / KAFKA_DIR).properties_file(OPERATOR))
        if "--consumer.config" in argv:
            argv[argv.index("--consumer.config") + 1] = config
        else:
            argv += ["--consumer.config", config]
    proc = await asyncio.create_subprocess_exec(*argv, cwd=ROOT, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    lines = [line for line in out.decode().splitlines() if "din-event-type" in line]
    assert len(lines) == 1, err.decode()[-2000:]
    line = lines[0]
    for expected in ("din-event-type:din.v1.RecordedRequestV1", "din-request-id:req-console", "din-tenant:acme",
                     "din-sla-class:batch", "din-labels:pii", "Din-Tensor-Shape:1,64", "Partition:", "Offset:0"):
        assert expected in line, line
    assert line.endswith("\tacme"), "the key (tenant) ends the line"
