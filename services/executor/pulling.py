"""Distributed mode: an executor pulls its models' jobs from its site's JetStream work queue while it has room.

A pulled job is claimed (marked in progress every ``IN_PROGRESS_EVERY_S``)
while it is served, so only a dead executor's job is offered again (after
``PULL_ACK_WAIT_S``) to another executor of the site; once served it is
settled as ``shared.lifecycle.settlement`` says (ack, NAK with a delay, or term).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import ConsumerConfig
from nats.js.errors import ServiceUnavailableError

from din.shared.lifecycle import Settlement
from din.shared.naming import Subjects, work_stream
from din.shared.workqueue import work_stream_config

PULL_ACK_WAIT_S = 0.6
"""A pulled job unclaimed this long is offered to another executor: short against deadlines (a realtime job's
default is 1 s), so a dead executor's jobs are served elsewhere in time."""
IN_PROGRESS_EVERY_S = 0.2
"""How often a job being served is claimed again (well within ``PULL_ACK_WAIT_S``)."""
PULL_MAX_DELIVER = 50
PULL_WAIT_S = 1.0
PULL_MORE_WAIT_S = 0.001
FULL_WAIT_S = 0.001
LEADERLESS_WAIT_S = 0.2
"""How long to wait before pulling again while the consumer has no leader (a clustered hub lost a server)."""
LEADERLESS = (ServiceUnavailableError, NoRespondersError)


def fetch_more(room: int, max_batch_size: int) -> int:
    """How many more jobs to take at once after the first: enough for a batch, no more than there is room for."""
    return min(room, max_batch_size) - 1


async def ensure_work_stream(nc: NatsClient, site: str, replicas: int = 1) -> None:
    """Create the site's work-queue stream unless it exists (the scheduler creates it too)."""
    with contextlib.suppress(Exception):
        await nc.jetstream().add_stream(work_stream_config(site, replicas))


async def pull_jobs(nc: NatsClient, site: str, model: str, *, room: Callable[[], int],
                    max_batch_size: Callable[[], int], take: Callable[[Msg], Awaitable[None]]) -> None:
    """Take ``model``'s jobs from ``site``'s queue and hand each to ``take`` while ``room()`` is positive.

    While the consumer has no leader (its JetStream server died and the others elect a new one) it keeps
    asking. The pull subscription is unsubscribed explicitly on the way out: draining the connection would otherwise
    wait forever on a ``next_msg``-style subscription's internal queue (nats-py).
    """
    subscription = await nc.jetstream().pull_subscribe(
        Subjects.work(site, model),
        durable=f"work-{model}",
        stream=work_stream(site),
        config=ConsumerConfig(ack_wait=PULL_ACK_WAIT_S, max_deliver=PULL_MAX_DELIVER),
    )
    try:
        while True:
            free = room()
            if free <= 0:
                await asyncio.sleep(FULL_WAIT_S)
                continue
            try:
                msgs = await subscription.fetch(1, timeout=PULL_WAIT_S)
            except (TimeoutError, NatsTimeout):
                continue
            except LEADERLESS:
                await asyncio.sleep(LEADERLESS_WAIT_S)
                continue
            more = fetch_more(free, max_batch_size())
            if more > 0:
                with contextlib.suppress(NatsTimeout, asyncio.TimeoutError, *LEADERLESS):
                    msgs += await subscription.fetch(more, timeout=PULL_MORE_WAIT_S)
            for msg in msgs:
                await take(msg)
    finally:
        await subscription.unsubscribe()


async def keep_claimed(pulled: Msg) -> None:
    """Tell JetStream a pulled job is still being worked on, until cancelled."""
    while True:
        await asyncio.sleep(IN_PROGRESS_EVERY_S)
        with contextlib.suppress(Exception):
            await pulled.in_progress()


async def settle(pulled: Msg, how: Settlement, retry_after_ms: float | None = None) -> None:
    """Ack, NAK (offered again after ``retry_after_ms``, 10 ms when unset) or term a pulled message."""
    if how == Settlement.NAK:
        await pulled.nak(delay=(retry_after_ms or 10) / 1000.0)
    elif how == Settlement.TERM:
        await pulled.term()
    else:
        await pulled.ack()
