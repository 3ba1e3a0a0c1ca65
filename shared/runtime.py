"""The front door every service is built on: a FastStream app over NATS, a Kafka event log and health.

A service is a ``Service`` subclass whose handlers are methods declared with
``endpoint`` (a raw message on the request path), ``job_endpoint`` (a message
carrying a ``JobV1``: decoded, dead-lettered when it is not one, and traced as
one hop) or ``control`` (a typed FastStream subscriber of the control plane).
Each declaration names its channel (a key of ``shared.channels.CHANNELS``, e.g. ``keysBucket``),
the subject, the queue group and the channels it publishes to, so the class is
the service's map and the AsyncAPI document is generated from it.

Control-plane subscribers (health, heartbeats, probes) are ordinary FastStream
subscribers. Request-path handlers run as plain nats-py subscriptions on the
broker's own connection: FastStream's per-message pipeline measured ~300 us and
~3k msg/s per handler on our 2-core machine, against ~25k msg/s for a bare
nats-py callback, and every request crosses four handlers.
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import uvloop
from faststream import BaseMiddleware, FastStream
from faststream.nats import NatsBroker
from faststream.specification import AsyncAPI
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from din.shared import __version__, lifecycle
from din.shared.bus.connect import broker_options, nats_servers
from din.shared.bus.kafka import kafka_client_kwargs
from din.shared.contracts.events import DeadLetterV1, HealthV1
from din.shared.contracts.inference import RequestHeaders
from din.shared.contracts.job import JobV1
from din.shared.contracts.options import parse_request_id
from din.shared.errors import DinError, ErrorCode, error_reply
from din.shared.eventlog import EventLog
from din.shared.fair_input import FairInput
from din.shared.micro import EndpointCounter, MicroDiscovery
from din.shared.naming import Subjects, Topics
from din.shared.security.records import RecordSigner
from din.shared.settings import ServiceSettings
from din.shared.tracing import Tracing

Handler = Callable[[Msg], Awaitable[None]]
SubjectOf = str | Callable[[Any], str]
log = logging.getLogger(__name__)

RAW, JOB, CONTROL, HEALTH = "raw", "job", "control", "health"
NO_RESPONDERS_STATUS = "503"
UNTAKEN_CHECK_S = 0.05
"""How often a service looks for handed-on jobs nobody acknowledged by their deadline."""
FAIR_DRAIN_S = 10.0
"""At shutdown, how long the messages left in a fair input may take to be handled."""
HOT_PATH_SLICE_S = 0.002
"""How long a hot-path subscription may work through its backlog before it yields to the event loop."""
UNAVAILABLE_RETRY_MS = 1000


@dataclass(frozen=True)
class _HandedOn:
    """A job handed on and not yet acknowledged: whom to answer, and when (``due_ms``) if ``owns_answer``."""

    reply_to: str
    request_id: str | None
    missing: str
    due_ms: float
    owns_answer: bool


@dataclass(frozen=True)
class Endpoint:
    """One subscription a service declares: the channel it serves, where, and what handling it publishes to.

    ``subject`` and ``queue`` are strings or functions of the service's settings (e.g. an executor's own
    subject); ``publishes`` names channels (keys of ``shared.channels.CHANNELS``) and Kafka topics. With
    ``fair_by`` (a message's tenant), the backlog waits in a ``shared.fair_input.FairInput``, not one FIFO.
    """

    channel: str
    subject: SubjectOf
    queue: SubjectOf | None = None
    publishes: tuple[str, ...] = ()
    kind: str = RAW
    span: str | None = None
    fair_by: Callable[[Msg], str] | None = None

    def resolve(self, settings: Any) -> tuple[str, str | None]:
        """The concrete subject and queue group under ``settings``."""
        subject = self.subject(settings) if callable(self.subject) else self.subject
        queue = self.queue(settings) if callable(self.queue) else self.queue
        return subject, queue


def _declare(spec: Endpoint) -> Callable:
    def mark(method: Callable) -> Callable:
        method.__din_endpoint__ = spec
        return method

    return mark


def endpoint(channel: str, subject: SubjectOf, *, queue: SubjectOf | None = None,
             publishes: tuple[str, ...] = (), fair_by: Callable[[Msg], str] | None = None) -> Callable:
    """Declare ``async def on_<channel>(self, msg: Msg)``: a request-path handler of raw messages (its
    backlog shared fairly between tenants with ``fair_by``)."""
    return _declare(Endpoint(channel, subject, queue, tuple(publishes), RAW, fair_by=fair_by))


def job_endpoint(channel: str, subject: SubjectOf, *, queue: SubjectOf | None = None,
                 publishes: tuple[str, ...] = (), span: str | None = None,
                 fair_by: Callable[[Msg], str] | None = None) -> Callable:
    """Declare ``async def on_<channel>(self, job: JobV1, msg: Msg)``: the job header is decoded first (a
    message without a valid one is dead-lettered) and, with ``span``, the call is one hop of the job's trace;
    with ``fair_by``, its backlog is shared fairly between tenants."""
    return _declare(Endpoint(channel, subject, queue, tuple(publishes), JOB, span, fair_by))


def control(channel: str, subject: SubjectOf, *, queue: SubjectOf | None = None,
            publishes: tuple[str, ...] = ()) -> Callable:
    """Declare a typed FastStream subscriber (its argument a contract model, its return the reply)."""
    return _declare(Endpoint(channel, subject, queue, tuple(publishes), CONTROL))


def _echoed_request_id(headers: dict[str, str] | None) -> str | None:
    """The request id a failed raw request named, when it is one (the client can match the error), else None."""
    raw = (headers or {}).get(RequestHeaders.REQUEST_ID)
    try:
        return None if raw is None else parse_request_id(raw)
    except DinError:
        return None


class ServiceRuntime:
    """Broker, app, event log and health subject of one service instance."""

    def __init__(self, name: str, settings: ServiceSettings, *, instance: str | None = None,
                 description: str = "") -> None:
        self.name = name
        self.settings = settings
        self.instance = instance or name
        self.log = logging.getLogger(f"din.{name}")
        self.micro = MicroDiscovery(name, self.instance, settings.site, description or f"DIN {name}")
        """This instance's NATS micro identity and its subscriptions' counters (``$SRV.PING|INFO|STATS``)."""
        self.broker = NatsBroker(
            nats_servers(settings.nats_url),
            name=f"din-{name}-{self.instance}",
            logger=None,
            max_reconnect_attempts=-1,
            error_cb=self._on_bus_error,
            middlewares=[self._counting_middleware()],
            **broker_options(settings),
        )
        self.app = FastStream(
            self.broker,
            logger=self.log,
            specification=AsyncAPI(title=f"din-{name}", version=__version__),
        )
        self.events = EventLog(
            settings.kafka_bootstrap, client_id=f"din-{name}-{self.instance}", topic_scope=settings.topic_scope,
            client_kwargs=kafka_client_kwargs(settings),
        )
        self.tracing = Tracing(
            name,
            self.instance,
            settings.site,
            sample_ratio=settings.trace_sample_ratio,
            emit=lambda span: self.events.emit(Topics.SPANS, span, key=span.trace_id),
            otlp_endpoint=settings.otlp_endpoint,
        )
        self.ready = False
        self.readiness: Callable[[], bool] = lambda: True
        """Whether the service can serve right now, asked at each health answer once started (the key manager:
        False while its bucket is damaged)."""
        self.handler_errors = 0
        self.error_signer: Callable[[bytes, dict[str, str], str], dict[str, str]] | None = None
        """Signs an error answer for its reply subject (``PayloadSecurity.sign_error``): set by a service holding
        its site's keys; None answers errors unsigned."""
        self.job_facts: Any = None
        """Tags the job headers this service hands on and verifies the ones it takes (``JobFacts``, set by
        ``bind_jobs`` when security is on); None trusts job headers as they come."""
        self.dead_lettered = 0
        self.detail: Callable[[], dict[str, str]] = dict
        self._hot: list[tuple[str, str | None, Handler, Callable[[Msg], str] | None, EndpointCounter]] = []
        self._fair: list[FairInput] = []
        self.fair_weights: dict[str, float] = {}
        """Tenants' weights in the fair inputs (the topology's ``TenantSpec.weight``; set by the service)."""
        self._subscriptions = []
        self._start_hooks: list[Callable[[], Awaitable[None]]] = []
        self._stop_hooks: list[Callable[[], Awaitable[None]]] = []
        self._background: list[asyncio.Task] = []
        self._drain_hooks: list[Callable[[], Awaitable[None]]] = []
        self._undelivered: dict[str, _HandedOn] = {}
        self._undelivered_prefix = ""
        self.undeliverable = 0
        self.untaken = 0
        self.left_to_sender = 0
        self.permission_denials = 0
        self._sequence = 0

        self.health_subjects = [Subjects.health(name)]
        if instance is not None:
            self.health_subjects.append(Subjects.health(name, instance))
        for subject in self.health_subjects:
            self.broker.subscriber(subject, include_in_schema=False)(self._health)
            self.micro.add("health", subject, None, HEALTH)

        self.app.on_startup(self._start)
        self.app.after_startup(self._open)
        self.app.on_shutdown(self._close)

    def _counting_middleware(self) -> type[BaseMiddleware]:
        """A FastStream middleware counting each control and health message on its subscription's counter."""
        micro = self.micro

        class Counting(BaseMiddleware):
            async def consume_scope(self, call_next, msg):
                counter = micro.counter_for(msg.raw_message.subject, (CONTROL, HEALTH))
                if counter is None:
                    return await call_next(msg)
                result = None

                async def handle(_: Msg) -> None:
                    nonlocal result
                    result = await call_next(msg)

                await counter.counted(handle)(msg.raw_message)
                return result

        return Counting

    def control_endpoint(self, channel: str, subject: str, queue: str | None, handler: Callable) -> None:
        """Subscribe ``handler`` (a typed FastStream subscriber) to ``subject``, counted as endpoint ``channel``."""
        self.broker.subscriber(subject, queue=queue or "", include_in_schema=False)(handler)
        self.micro.add(channel, subject, queue, CONTROL)

    async def _on_bus_error(self, error: Exception) -> None:
        """The server refused something this instance did (a permission it lacks) or the connection failed:
        counted and logged, never fatal."""
        if "permissions violation" in str(error).lower():
            self.permission_denials += 1
            self.log.warning("NATS refused: %s", error)
        else:
            self.log.warning("NATS connection error: %s", error)

    @property
    def nc(self) -> NatsClient:
        """The underlying nats-py connection (valid once the app has started)."""
        return self.broker.connection

    def pending_on(self, subjects: set[str]) -> int:
        """Messages received on ``subjects`` (any subscription of this connection, FastStream's too) and not yet
        taken by their handler. nats-py lists its subscriptions only in a private table."""
        return (sum(sub.pending_msgs for sub in self.nc._subs.values() if sub.subject in subjects)
                + sum(len(fair) for fair in self._fair if fair.subject in subjects))

    def job_handler(self, handler: Callable[[JobV1, Msg], Awaitable[None]], span: str | None) -> Handler:
        """``handler`` behind job decoding (dead-letter when the header is missing or invalid) and a trace hop;
        the sender is told the job was taken once the handler has run (``hand_on``): its publications go out
        in the same write as the acknowledgement. A job that arrives at or past its deadline from a sender
        awaiting the acknowledgement is neither handled nor acknowledged (``lifecycle.left_to_sender``). A
        handler that fails answers the job's client ``internal`` (the sender, acknowledged, no longer owns the
        answer)."""

        async def on_message(msg: Msg) -> None:
            if not self.authentic_job(msg):
                return
            try:
                job = JobV1.from_headers(msg.headers)
            except ValueError:
                self.dead_letter(msg, "missing or invalid job header")
                await self.acknowledge(msg, self.nc)
                return
            if msg.reply and lifecycle.left_to_sender(job, time.time() * 1000.0):
                self.left_to_sender += 1
                return
            try:
                if span is None:
                    await handler(job, msg)
                    return
                with self.tracing.hop(span, job.traceparent, **{"din.request_id": job.request_id}) as (
                        _, job.traceparent):
                    await handler(job, msg)
            except Exception:
                self.handler_errors += 1
                self.log.exception("unhandled error on %s for request %s", msg.subject, job.request_id)
                await self.answer_error(job.reply_to, DinError(ErrorCode.INTERNAL, "internal error"), job.request_id)
            finally:
                await self.acknowledge(msg, self.nc)

        return on_message

    def hot_path(self, subject: str, queue: str | None = None, fair_by: Callable[[Msg], str] | None = None, *,
                 channel: str = "hot", kind: str = RAW) -> Callable[[Handler], Handler]:
        """Register ``handler`` as a plain nats-py subscription opened after start-up (its backlog in a
        ``FairInput`` by ``fair_by``'s tenant, when given), counted as micro endpoint ``channel``."""

        def register(handler: Handler) -> Handler:
            self._hot.append((subject, queue, handler, fair_by, self.micro.add(channel, subject, queue, kind)))
            return handler

        return register

    def on_start(self, hook: Callable[[], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
        """Run ``hook`` once the broker is connected, before the service reports ready."""
        self._start_hooks.append(hook)
        return hook

    def spawn(self, coro: Awaitable[None], name: str) -> asyncio.Task:
        """Run a background loop for the life of the service; a crash is logged, and shutdown cancels it."""
        task = asyncio.create_task(coro, name=name)
        self._background.append(task)
        task.add_done_callback(self._report_crash)
        return task

    def _report_crash(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.log.error("background task %s crashed", task.get_name(), exc_info=task.exception())

    async def stop_background(self) -> None:
        """Cancel every ``spawn``ed task and wait for them to end."""
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        self._background.clear()

    def on_stop_accepting(self, hook: Callable[[], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
        """Run ``hook`` at shutdown while subscriptions are still open, e.g. to tell routers to stop sending."""
        self._stop_hooks.append(hook)
        return hook

    def on_drain(self, hook: Callable[[], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
        """Run ``hook`` at shutdown, after new work stopped arriving: finish in-flight work there."""
        self._drain_hooks.append(hook)
        return hook

    async def _health(self) -> HealthV1:
        detail = {k: str(v) for k, v in self.detail().items()}
        detail.update(
            events_sent=str(self.events.sent),
            events_dropped=str(self.events.dropped),
            dead_lettered=str(self.dead_lettered),
            undeliverable=str(self.undeliverable),
            untaken=str(self.untaken),
            fair_dropped=str(sum(fair.dropped for fair in self._fair)),
            left_to_sender=str(self.left_to_sender),
            permission_denials=str(self.permission_denials),
        )
        if self.job_facts is not None:
            detail.update(self.job_facts.detail())
        return HealthV1(
            service=self.name,
            instance=self.instance,
            version=__version__,
            site=self.settings.site,
            ready=self.ready and self.readiness(),
            detail=detail,
        )

    async def _start(self) -> None:
        await self.events.start()

    async def _open(self) -> None:
        self._undelivered_prefix = self.nc.new_inbox()
        self._subscriptions.append(await self.nc.subscribe(f"{self._undelivered_prefix}.*", cb=self._on_undelivered))
        self.spawn(self._answer_untaken(), name="answer_untaken")
        for hook in self._start_hooks:
            await hook()
        self._subscriptions += await self.micro.open(self.nc)
        for subject, queue, handler, fair_by, counter in self._hot:
            callback = self._guard(counter.counted(handler))
            if fair_by is not None:
                fair = FairInput(subject, callback, fair_by, self.fair_weights)
                self._fair.append(fair)
                self.spawn(fair.run(), name=f"fair input {subject}")
                callback = fair.put
            sub = await self.nc.subscribe(subject, queue=queue or "", cb=callback, pending_msgs_limit=200_000)
            self._subscriptions.append(sub)
        self.ready = True
        self.log.info("%s %s ready at site %s", self.name, self.instance, self.settings.site)

    async def _close(self) -> None:
        self.ready = False
        for hook in self._stop_hooks:
            await hook()
        for sub in self._subscriptions:
            try:
                await sub.drain()
            except Exception as exc:  # a closed connection must not stop the rest of shutdown
                self.log.warning("drain of %s failed: %s", sub.subject, exc)
        for fair in self._fair:
            if not await fair.drained(FAIR_DRAIN_S):
                self.log.warning("%d messages of %s not handled at shutdown", len(fair), fair.subject)
        for hook in self._drain_hooks:
            await hook()
        await self.stop_background()
        self.tracing.shutdown()
        await self.events.stop()

    def _guard(self, handler: Handler) -> Handler:
        """``handler`` answering ``internal`` when it fails, and yielding to the event loop once it has run for
        ``HOT_PATH_SLICE_S``: nats-py hands a subscription's backlog to its callback without suspending, so an
        endpoint behind on its input would otherwise starve every other subscription (heartbeats, completions,
        pressure, health) and timer of its service, which then looks dead or idle to the rest of the network.
        Yielding after every message instead would make nats-py write each answer to the socket on its own;
        a slice's answers leave in one write."""
        since = time.monotonic()

        async def guarded(msg: Msg) -> None:
            nonlocal since
            try:
                await handler(msg)
                if time.monotonic() - since >= HOT_PATH_SLICE_S:
                    await asyncio.sleep(0)
                    since = time.monotonic()
            except Exception:
                self.handler_errors += 1
                self.log.exception("unhandled error on %s", msg.subject)
                if msg.reply:
                    await self.answer_error(msg.reply, DinError(ErrorCode.INTERNAL, "internal error"),
                                            _echoed_request_id(msg.headers))

        return guarded

    def dead_letter(self, msg: Msg, reason: str) -> None:
        """Keep ``msg`` on the dead-letter topic: it could not be processed and has no one to answer."""
        self.dead_lettered += 1
        self.log.warning("dead-lettered a message on %s: %s", msg.subject, reason)
        self.events.emit(
            Topics.DEAD_LETTER,
            DeadLetterV1(
                service=self.name,
                subject=msg.subject,
                reason=reason,
                headers=dict(msg.headers or {}),
                body_b64=base64.b64encode(msg.data[:65536]).decode(),
                at_ms=time.time() * 1000.0,
            ),
            key=self.name,
        )

    async def hand_on(self, subject: str, body: bytes, headers: dict[str, str], job: JobV1, missing: str, *,
                      to_site: str, owns_answer: bool = True) -> None:
        """Publish ``job`` to the next service on its path, which acknowledges taking it (``job_endpoint``s do,
        once their handler has run); until then this service still owns the job's answer. When nobody
        subscribes there (NATS answers a publish with a reply subject and no interest with a 503 status) the
        client is answered ``unavailable`` at once; when nobody acknowledges it by its deadline (the next service
        died holding it), ``deadline_exceeded``. ``missing`` names the next service, for the client's message.
        ``owns_answer`` False: the receiver owns the answer even untaken (a scheduler's watchdog holds every job
        handed back to it), so only the 503 is answered here. The job header is tagged for ``to_site``, the
        receiver's site (``tag_job``)."""
        self.tag_job(headers, to_site)
        self._sequence += 1
        handle = f"{self._undelivered_prefix}.{self._sequence}"
        self._undelivered[handle] = _HandedOn(job.reply_to, job.request_id, missing,
                                              lifecycle.untaken_answer_at_ms(float(job.deadline_ms)), owns_answer)
        await self.nc.publish(subject, body, reply=handle, headers=headers)

    async def _on_undelivered(self, msg: Msg) -> None:
        waiting = self._undelivered.pop(msg.subject, None)
        if waiting is None or (msg.headers or {}).get("Status") != NO_RESPONDERS_STATUS:
            return
        self.undeliverable += 1
        self.log.warning("no %s to hand request %s to: answered unavailable", waiting.missing, waiting.request_id)
        await self.answer_error(waiting.reply_to, DinError(ErrorCode.UNAVAILABLE,
                                                           f"no {waiting.missing} is running: retry shortly",
                                                           retry_after_ms=UNAVAILABLE_RETRY_MS), waiting.request_id)

    async def _answer_untaken(self) -> None:
        """Answer every handed-on job nobody acknowledged by ``lifecycle.untaken_answer_at_ms``, once the
        acknowledgements that reached this service were read."""
        while True:
            await asyncio.sleep(UNTAKEN_CHECK_S)
            if self.pending_on({f"{self._undelivered_prefix}.*"}):
                continue
            now = time.time() * 1000.0
            for handle in [h for h, waiting in self._undelivered.items() if waiting.due_ms <= now]:
                waiting = self._undelivered.pop(handle)
                if not waiting.owns_answer:
                    continue
                self.untaken += 1
                self.log.warning("no %s took request %s before its deadline", waiting.missing, waiting.request_id)
                await self.answer_error(waiting.reply_to, DinError(
                    ErrorCode.DEADLINE_EXCEEDED, f"the {waiting.missing} did not take the job before its deadline"),
                    waiting.request_id)

    @staticmethod
    async def acknowledge(msg: Msg, nc: NatsClient) -> None:
        """Tell the sender of a handed-on job that it was taken (see ``hand_on``)."""
        if msg.reply:
            await nc.publish(msg.reply, b"")

    def bind_jobs(self, job_facts: Any) -> None:
        """Tag every job header this service hands on and refuse every job it takes whose tag does not verify
        (``shared.security.JobFacts``)."""
        self.job_facts = job_facts

    def authentic_job(self, msg: Msg) -> bool:
        """Whether ``msg``'s job header is vouched for (always, without ``bind_jobs``); a job that is not is
        dead-lettered, neither answered nor acknowledged (its reply subject is not to be trusted; a genuine
        sender answers its client when nobody takes the job)."""
        if self.job_facts is None:
            return True
        try:
            self.job_facts.verify(msg.headers)
        except DinError as refused:
            reason = getattr(refused, "reason", refused.code)
            self.dead_letter(msg, f"unauthenticated job header ({reason.value})")
            return False
        return True

    def tag_job(self, headers: dict[str, str], to_site: str) -> dict[str, str]:
        """``headers`` with their job header tagged for ``to_site`` (unchanged without ``bind_jobs``)."""
        if self.job_facts is not None:
            self.job_facts.tag(headers, to_site)
        return headers

    def sign_with(self, security: Any) -> None:
        """Sign every error this service answers and every record it writes to Kafka with ``security``'s site
        identity (when security is on)."""
        if security.enabled:
            self.error_signer = security.sign_error
            self.events.signer = RecordSigner(security.agent.keys.identity)

    def error_answer(self, reply_to: str, error: DinError, request_id: str | None) -> tuple[bytes, dict[str, str]]:
        """``error`` as the body and headers of the answer on ``reply_to``, signed by this service's site when it
        holds keys (``error_signer``), so a client tells it from a forgery."""
        body, headers = error_reply(error, request_id)
        if self.error_signer is not None:
            self.error_signer(body, headers, reply_to)
        return body, headers

    async def answer_error(self, reply_to: str, error: DinError, request_id: str | None) -> None:
        """Send ``error`` as the single answer to ``reply_to`` (signed: ``error_answer``)."""
        if not reply_to:
            return
        body, headers = self.error_answer(reply_to, error, request_id)
        await self.nc.publish(reply_to, body, headers=headers)


def _summary(cls: type) -> str:
    """The first paragraph of ``cls``'s docstring, on one line."""
    return " ".join((inspect.getdoc(cls) or "").split("\n\n")[0].split())


class Service:
    """A service instance: its settings, its runtime, and the endpoints its class declares.

    Subclasses set ``name`` (and ``publishes``, the channels and topics it sends to outside any handler, e.g.
    heartbeats or decision records; ``consumes``, what it reads outside any handler, e.g. a JetStream pull
    consumer or a Kafka consumer), declare handlers with ``endpoint``/``job_endpoint``/``control`` and
    override ``detail`` for their health answer.
    """

    name: ClassVar[str]
    publishes: ClassVar[tuple[str, ...]] = ()
    consumes: ClassVar[tuple[str, ...]] = ()

    def __init__(self, settings: ServiceSettings, *, instance: str | None = None) -> None:
        self.settings = settings
        self.runtime = ServiceRuntime(self.name, settings, instance=instance or settings.instance,
                                      description=_summary(type(self)))
        self.runtime.detail = self.detail
        for attribute, spec in self.endpoints().items():
            method = getattr(self, attribute)
            declared, queue = spec.resolve(settings)
            handler = self.runtime.job_handler(method, spec.span) if spec.kind == JOB else method
            for subject in Subjects.per_site(declared, self._sites()):
                if spec.kind == CONTROL:
                    self.runtime.control_endpoint(spec.channel, subject, queue, method)
                else:
                    self.runtime.hot_path(subject, queue, spec.fair_by, channel=spec.channel, kind=spec.kind)(handler)

    @classmethod
    def endpoints(cls) -> dict[str, Endpoint]:
        """The declared endpoints by handler name, in the order the class defines them."""
        found: dict[str, Endpoint] = {}
        for klass in reversed(cls.__mro__):
            for attribute, value in vars(klass).items():
                spec = getattr(value, "__din_endpoint__", None)
                if spec is not None:
                    found[attribute] = spec
        return found

    def subscriptions(self) -> list[tuple[str, str | None]]:
        """Every (subject, queue group) this instance subscribes to, health and NATS micro discovery included."""
        health = [(subject, None) for subject in self.runtime.health_subjects + self.runtime.micro.subjects()]
        declared = [spec.resolve(self.settings) for spec in self.endpoints().values()]
        return health + [(subject, queue) for pattern, queue in declared
                         for subject in Subjects.per_site(pattern, self._sites())]

    def _sites(self) -> list[str]:
        return [site for site in (self.settings.bus_sites or "").split(",") if site]

    def detail(self) -> dict[str, Any]:
        """Service-specific fields of the health answer."""
        return {}

    @property
    def app(self) -> FastStream:
        return self.runtime.app

    @property
    def nc(self) -> NatsClient:
        return self.runtime.nc

    @property
    def log(self) -> logging.Logger:
        return self.runtime.log


def run_service(service: Service | ServiceRuntime) -> None:
    """Run a service on uvloop until SIGINT or SIGTERM, then drain and exit.

    Once the service has drained (subscriptions, event log, traces) the process ends at once: the interpreter's
    own teardown (a full garbage collection of every module) would only burn CPU, for seconds when a whole
    stack stops together on two cores."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    runtime = service.runtime if isinstance(service, Service) else service
    uvloop.run(runtime.app.run())
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
