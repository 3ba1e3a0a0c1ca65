import asyncio

from nats.aio.msg import Msg

from din.shared.contracts.job import JobV1
from din.shared.fair_input import UNKNOWN, FairInput, job_tenant, request_tenant


def msg(subject: str, headers: dict[str, str] | None = None, data: bytes = b"") -> Msg:
    return Msg(_client=None, subject=subject, headers=headers, data=data)


def test_a_request_and_a_job_name_their_tenant():
    assert request_tenant(msg("din.v1.infer.acme.digits-small")) == "acme"
    assert request_tenant(msg("din.v1.admit.factory.acme.digits-small")) == "acme"
    assert request_tenant(msg("din.v1.infer.acme")) == UNKNOWN
    job = JobV1(request_id="r1", tenant='ac"me', model="m", deadline_ms=1, reply_to="_INBOX.x",
                content_type="application/json", received_ms=0.0)
    assert job_tenant(msg("din.v1.schedule.cloud", job.to_headers())) == 'ac"me'
    assert job_tenant(msg("din.v1.schedule.cloud", {"Din-Job-V1": "not json"})) == UNKNOWN
    assert job_tenant(msg("din.v1.schedule.cloud")) == UNKNOWN


async def test_a_light_tenant_is_served_within_a_round_of_a_flood_and_each_keeps_its_order():
    served: list[str] = []

    async def handler(m: Msg) -> None:
        served.append(m.subject)

    fair = FairInput("din.v1.infer.>", handler, request_tenant, {"globex": 1.0, "acme": 1.0})
    for i in range(100):
        await fair.put(msg(f"din.v1.infer.globex.m{i}"))
    await fair.put(msg("din.v1.infer.acme.first"))
    await fair.put(msg("din.v1.infer.acme.second"))
    assert len(fair) == 102
    worker = asyncio.create_task(fair.run())
    try:
        assert await fair.drained(5.0)
    finally:
        worker.cancel()
    assert served.index("din.v1.infer.acme.first") <= 2
    assert served.index("din.v1.infer.acme.second") <= 4
    flood = [s for s in served if ".globex." in s]
    assert flood == [f"din.v1.infer.globex.m{i}" for i in range(100)]


async def test_a_full_input_drops_the_heaviest_tenants_newest_message():
    fair = FairInput("s", lambda m: asyncio.sleep(0), request_tenant, max_queued=3)
    for i in range(3):
        await fair.put(msg(f"din.v1.infer.globex.m{i}"))
    await fair.put(msg("din.v1.infer.acme.a"))
    assert len(fair) == 3 and fair.dropped == 1
    assert fair.queue.queued("acme") == 1


async def test_a_full_input_by_bytes_makes_room_from_the_heaviest_tenant():
    fair = FairInput("s", lambda m: asyncio.sleep(0), request_tenant, max_bytes=300)
    for i in range(3):
        await fair.put(msg(f"din.v1.infer.globex.m{i}", data=b"x" * 100))
    await fair.put(msg("din.v1.infer.acme.a", data=b"y" * 100))
    assert fair.bytes == 300 and fair.dropped == 1
    assert fair.queue.queued("acme") == 1 and fair.queue.queued("globex") == 2
