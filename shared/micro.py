"""NATS micro discovery: every service instance answers ``$SRV.PING|INFO|STATS`` about its own subscriptions.

So the ``nats`` CLI (``nats micro ls``, ``nats micro info din-scheduler``, ``nats micro stats din-admission``)
and any NATS micro client list DIN's services, their instances at each site, every subscription (subject and
queue group) and what each has handled, without knowing DIN. The answers are NATS's own schemas
(``shared.contracts.micro``).

An ``EndpointCounter`` per subscription counts what its handler took: messages, time in the handler, and errors
(a DIN error answer encoded while the handler ran, ``shared.errors.error_observer``, or the handler failing).
Work a handler hands to a queue (an executor's batches) is counted where it is taken, not where it is answered.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.nuid import NUID

from din.shared import __version__
from din.shared.contracts.micro import (
    MicroEndpointInfoV1,
    MicroEndpointStatsV1,
    MicroInfoV1,
    MicroPingV1,
    MicroStatsV1,
)
from din.shared.errors import ErrorV1, error_observer
from din.shared.naming import MICRO_VERBS, Subjects, micro_name

Handler = Callable[[Msg], Awaitable[None]]


@dataclass
class EndpointCounter:
    """What one subscription's handler has taken since start-up (``kind``: raw, job, control or health)."""

    name: str
    subject: str
    queue: str
    kind: str
    requests: int = 0
    errors: int = 0
    last_error: str = ""
    nanos: int = 0

    def error(self, error: ErrorV1 | str) -> None:
        """Count one error answered (or a handler failure) on this subscription."""
        self.errors += 1
        self.last_error = error if isinstance(error, str) else f"{error.code.value}: {error.message}"

    def counted(self, handler: Handler) -> Handler:
        """``handler`` counted here: each call, its time, the errors it answers and its failures (re-raised)."""

        async def counting(msg: Msg) -> None:
            started = time.perf_counter_ns()
            observing = error_observer.set(self.error)
            try:
                await handler(msg)
            except Exception as exc:
                self.error(f"internal: {type(exc).__name__}")
                raise
            finally:
                error_observer.reset(observing)
                self.requests += 1
                self.nanos += time.perf_counter_ns() - started

        return counting

    def info(self) -> MicroEndpointInfoV1:
        return MicroEndpointInfoV1(name=self.name, subject=self.subject, queue_group=self.queue,
                                   metadata={"kind": self.kind})

    def stats(self) -> MicroEndpointStatsV1:
        return MicroEndpointStatsV1(
            name=self.name, subject=self.subject, queue_group=self.queue, num_requests=self.requests,
            num_errors=self.errors, last_error=self.last_error, processing_time=self.nanos,
            average_processing_time=self.nanos // self.requests if self.requests else 0)


def subject_matches(pattern: str, subject: str) -> bool:
    """Whether NATS would deliver ``subject`` to a subscription on ``pattern`` (``*`` one token, ``>`` the rest)."""
    wanted, given = pattern.split("."), subject.split(".")
    for index, part in enumerate(wanted):
        if part == ">":
            return len(given) > index
        if index >= len(given) or (part != "*" and part != given[index]):
            return False
    return len(wanted) == len(given)


class MicroDiscovery:
    """The micro identity of one service instance and the counters of its subscriptions."""

    def __init__(self, service: str, instance: str, site: str, description: str) -> None:
        self.service = service
        self.name = micro_name(service)
        self.id = NUID().next().decode()
        self.metadata = {"site": site, "instance": instance}
        self.description = description
        self.started = datetime.now(UTC)
        self.counters: list[EndpointCounter] = []

    def add(self, name: str, subject: str, queue: str | None, kind: str) -> EndpointCounter:
        """A counter for the subscription of endpoint ``name`` on ``subject``."""
        counter = EndpointCounter(name, subject, queue or "", kind)
        self.counters.append(counter)
        return counter

    def counter_for(self, subject: str, kinds: tuple[str, ...]) -> EndpointCounter | None:
        """The counter of the first subscription of one of ``kinds`` that ``subject`` reaches."""
        return next((c for c in self.counters if c.kind in kinds and subject_matches(c.subject, subject)), None)

    def subjects(self) -> list[str]:
        """Every discovery subject this instance answers: each verb for all services, its kind, itself."""
        return [subject for verb in MICRO_VERBS for subject in (
            Subjects.micro(verb), Subjects.micro(verb, self.service), Subjects.micro(verb, self.service, self.id))]

    def _identity(self) -> dict:
        return {"name": self.name, "id": self.id, "version": __version__, "metadata": self.metadata}

    def ping(self) -> MicroPingV1:
        return MicroPingV1(**self._identity())

    def info(self) -> MicroInfoV1:
        return MicroInfoV1(**self._identity(), description=self.description,
                           endpoints=[counter.info() for counter in self.counters])

    def stats(self) -> MicroStatsV1:
        started = self.started.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        return MicroStatsV1(**self._identity(), started=started,
                            endpoints=[counter.stats() for counter in self.counters])

    def answer(self, subject: str) -> bytes:
        """The answer to a discovery request on ``subject``."""
        verb = subject.split(".")[1]
        answer = {"PING": self.ping, "INFO": self.info, "STATS": self.stats}[verb]()
        return answer.model_dump_json().encode()

    async def open(self, nc: NatsClient) -> list:
        """Subscribe to ``subjects`` on ``nc``; each request is answered on its reply subject."""

        async def on_request(msg: Msg) -> None:
            if msg.reply:
                await nc.publish(msg.reply, self.answer(msg.subject))

        return [await nc.subscribe(subject, cb=on_request) for subject in self.subjects()]
