"""Helpers shared by the unit and integration tests: bounded waiting, an injected clock, job and heartbeat
builders and the three-site topology most tests run on.

Waiting is always bounded and explained: ``wait_for`` polls a condition a bounded number of times and then
fails with a message naming what it waited for, never a bare ``sleep`` that a verdict depends on.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from din.shared.contracts.events import HeartbeatV1, ModelLoadedV1
from din.shared.contracts.inference import SlaClass
from din.shared.contracts.job import JobV1

T = TypeVar("T")
Description = str | Callable[[], str]

T0 = 1_700_000_000.0
"""Unix seconds where an injected ``ManualClock`` starts."""

NOW_MS = 1_000_000.0
"""Milliseconds the job and heartbeat builders stamp by default."""

THREE_SITES = [
    {"name": "cloud", "role": "hub"},
    {"name": "factory", "role": "edge"},
    {"name": "branch", "role": "edge"},
]
"""The sites most tests run on: hub ``cloud``, edges ``factory`` and ``branch``."""

THREE_SITE_LINKS = [
    {"between": ["cloud", "factory"], "path": "dedicated"},
    {"between": ["cloud", "branch"], "path": "internet"},
    {"between": ["factory", "branch"], "path": "vpn"},
]
"""How the three sites are linked: a dedicated line, the internet and a VPN."""


class WaitTimeout(AssertionError):
    """A condition did not hold within its bound; the message names what was awaited."""


def _describe(what: Description) -> str:
    return what() if callable(what) else what


def _polls(timeout: float, interval: float) -> int:
    return max(1, math.ceil(timeout / interval)) + 1


def _failure(what: Description, timeout: float, last_error: BaseException | None) -> WaitTimeout:
    cause = f" (last attempt raised {last_error!r})" if last_error is not None else ""
    return WaitTimeout(f"{_describe(what)}: not within {timeout:g}s{cause}")


async def wait_for(
    condition: Callable[[], T | Awaitable[T]],
    timeout: float,
    what: Description,
    *,
    interval: float = 0.05,
    retry_on: tuple[type[BaseException], ...] = (),
) -> T:
    """Poll ``condition`` (sync or async) until it returns something truthy, and return that.

    It is polled at most ``timeout / interval + 1`` times and never after ``timeout`` seconds; then the wait
    fails with ``WaitTimeout`` naming ``what`` (a string, or a callable evaluated at failure time to say what
    was seen). Exceptions listed in ``retry_on`` count as "not yet"; any other propagates at once.
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    for attempt in range(_polls(timeout, interval)):
        if attempt:
            await asyncio.sleep(interval)
        try:
            value = condition()
            if inspect.isawaitable(value):
                value = await value
        except retry_on as exc:
            last_error = exc
            value = None
        if value:
            return value
        if time.monotonic() >= deadline:
            break
    raise _failure(what, timeout, last_error)


def wait_for_sync(
    condition: Callable[[], T], timeout: float, what: Description, *, interval: float = 0.05
) -> T:
    """``wait_for`` for tests that run no event loop (they drive processes and CLIs synchronously)."""
    deadline = time.monotonic() + timeout
    for attempt in range(_polls(timeout, interval)):
        if attempt:
            time.sleep(interval)
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            break
    raise _failure(what, timeout, None)


def subject_covers(allow: str, subject: str) -> bool:
    """NATS semantics: whether ``allow`` (a permission or a subscription) covers ``subject`` (itself possibly a
    wildcard subscription)."""
    a, s = allow.split("."), subject.split(".")
    for i, part in enumerate(a):
        if part == ">":
            return len(s) > i
        if i >= len(s):
            return False
        if part == "*":
            if s[i] == ">":
                return False
            continue
        if part != s[i]:
            return False
    return len(a) == len(s)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ManualClock:
    """An injected clock (seconds) that moves only when the test says so."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_job(**fields: Any) -> JobV1:
    """A ``JobV1`` with plausible defaults (tenant acme, digits-large, interactive, 1 s budget from ``NOW_MS``);
    ``fields`` override any of them."""
    defaults: dict[str, Any] = {
        "request_id": "r1",
        "tenant": "acme",
        "model": "digits-large",
        "sla_class": SlaClass.INTERACTIVE,
        "deadline_ms": int(NOW_MS + 1000),
        "reply_to": "_INBOX.x",
        "content_type": "application/json",
        "received_ms": NOW_MS,
    }
    return JobV1(**(defaults | fields))


def make_heartbeat(executor: str, site: str, models: list[str], *, max_batch_size: int = 8,
                   compute_ms_per_item: float = 1.0, **fields: Any) -> HeartbeatV1:
    """An idle executor's ``HeartbeatV1`` serving version 1 of ``models``; ``fields`` override the rest."""
    defaults: dict[str, Any] = {
        "executor": executor,
        "site": site,
        "models": [ModelLoadedV1(name=m, version="1", max_batch_size=max_batch_size,
                                 compute_ms_per_item=compute_ms_per_item) for m in models],
        "capacity": 100,
        "queue_depth": {},
        "inflight": 0,
        "recent_latency_ms": 1.0,
        "draining": False,
        "interval_s": 0.5,
        "sent_ms": NOW_MS,
    }
    return HeartbeatV1(**(defaults | fields))


def three_site_topology(name: str, executors: dict[str, list[dict]], tenants: list[dict],
                        links: list[dict] = THREE_SITE_LINKS) -> dict:
    """A topology spec over ``THREE_SITES`` with ``executors`` per site name (sites not named get none)."""
    return {
        "name": name,
        "sites": [{**site, "executors": executors.get(site["name"], [])} for site in THREE_SITES],
        "links": links,
        "tenants": tenants,
    }
