"""A hot-path subscription's backlog shared fairly between tenants, instead of one FIFO.

Under overload a service's input backs up. In the subscription's own buffer (one FIFO) a light tenant's
request waits behind every message a flooding tenant sent before it. A ``FairInput`` takes each message off
the subscription at once (``put``: the subscription's callback, which only queues) and hands them to the
handler in weighted fair order (``shared.fairness.FairQueue``, weights from the topology): while several
tenants have messages waiting, each is served in proportion to its weight, and a tenant asking for less than
its share waits at most about one round. Each tenant's messages keep their order.

Which tenant a message belongs to is ``tenant_of(msg)`` (from its subject, or its job header); a message whose
tenant cannot be read shares one lane (``UNKNOWN``), and its handler refuses it as before.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable, Mapping

from nats.aio.msg import Msg

from din.shared.contracts.job import HEADER_PREFIX
from din.shared.fairness import FairClock, FairQueue

UNKNOWN = ""
MAX_QUEUED = 200_000
MAX_QUEUED_BYTES = 128 * 1024 * 1024
"""Messages and payload bytes a fair input holds at most (the bounds the subscription's own buffer had); past
either, the newest message of the tenant holding most is dropped, as a NATS slow consumer would drop it."""

_JOB_TENANT = re.compile(r'"tenant":("(?:[^"\\]|\\.){0,200}")')


def request_tenant(msg: Msg) -> str:
    """The tenant of a request on ``din.v1.infer.<tenant>.<model>`` or ``din.v1.admit.<site>.<tenant>.<model>``."""
    parts = msg.subject.split(".")
    if len(parts) == 5 and parts[2] == "infer":
        return parts[3]
    if len(parts) == 6 and parts[2] == "admit":
        return parts[4]
    return UNKNOWN


def job_tenant(msg: Msg) -> str:
    """The tenant named in a job's header (read without decoding the whole job: the handler does that)."""
    raw = (msg.headers or {}).get(HEADER_PREFIX + "V1", "")
    found = _JOB_TENANT.search(raw)
    if found is None:
        return UNKNOWN
    try:
        return json.loads(found.group(1))
    except ValueError:
        return UNKNOWN


class FairInput:
    """Messages of one subscription, waiting by tenant; ``run`` serves them to ``handler`` in fair order."""

    def __init__(self, subject: str, handler: Callable[[Msg], Awaitable[None]], tenant_of: Callable[[Msg], str],
                 weights: Mapping[str, float] | None = None, max_queued: int = MAX_QUEUED,
                 max_bytes: int = MAX_QUEUED_BYTES) -> None:
        self.subject = subject
        self.handler = handler
        self.tenant_of = tenant_of
        self.queue: FairQueue[Msg] = FairQueue(FairClock(weights or {}))
        self.max_queued = max_queued
        self.max_bytes = max_bytes
        self.bytes = 0
        self.dropped = 0
        self._waiting = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()

    def __len__(self) -> int:
        return len(self.queue)

    async def put(self, msg: Msg) -> None:
        """Queue ``msg`` under its tenant (the subscription's callback: it never waits)."""
        tenant = self.tenant_of(msg)
        while self.queue and (len(self.queue) >= self.max_queued or self.bytes + len(msg.data) > self.max_bytes):
            self.dropped += 1
            evicted = self.queue.evict_for(tenant)
            if evicted is None:
                return
            self.bytes -= len(evicted.data)
        self.queue.push(tenant, msg)
        self.bytes += len(msg.data)
        self._idle.clear()
        self._waiting.set()

    async def run(self) -> None:
        """Hand queued messages to the handler, fairest first, for as long as the service runs."""
        while True:
            if not self.queue:
                self._waiting.clear()
                self._idle.set()
                await self._waiting.wait()
                continue
            msg = self.queue.pop()
            self.bytes -= len(msg.data)
            await self.handler(msg)

    async def drained(self, timeout_s: float) -> bool:
        """Wait until every queued message has been handled (at shutdown); False on timeout."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
            return True
        except TimeoutError:
            return False
