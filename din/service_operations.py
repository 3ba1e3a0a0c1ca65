"""Who sends and receives on each channel, derived from what the services declare (for the AsyncAPI document).

A service's operations come from its class (``shared.runtime.Service``):

* each declared endpoint (``Service.endpoints()``) receives on its channel, with its queue group, and sends
  on the channels its ``publishes`` names; the class attribute ``publishes`` adds what the service sends
  outside handlers (heartbeats, decision records), and an optional class attribute ``consumes`` what it
  reads outside handlers (a JetStream pull consumer, Kafka consumers: the class's ``consumes``);
* the runtime adds what every service does without declaring it (``runtime_operations``): it answers its
  health subject (and its instance's, for ``INSTANCE_HEALTH`` services) and NATS micro discovery, emits
  trace spans, dead-letters a message on a job endpoint that carries no valid job, and sends a control
  endpoint's return value as the reply;
* whoever sends on a request channel (``Channel.reply``) receives the reply.

The parties that are not services (client, operator) come from ``shared.channels.PARTIES``. Every
declaration is checked: a channel key must exist, an endpoint's subject must fit its channel's address, and
a channel's per-party message narrowing (``sends_only``/``receives_only``) must name a party that does send
or receive there, so a stale catalog entry fails the render instead of documenting something untrue.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterable
from dataclasses import dataclass

from din.shared.channels import INSTANCE_HEALTH, PARTIES, Channel, all_channels, channel
from din.shared.naming import SERVICES, Topics
from din.shared.runtime import CONTROL, JOB, Endpoint, Service

SEND, RECEIVE = "send", "receive"

SERVICE_CLASSES = {
    "admission": "din.services.admission.main:Admission",
    "classifier": "din.services.classifier.main:Classifier",
    "scheduler": "din.services.scheduler.main:Scheduler",
    "executor": "din.services.executor.main:Executor",
    "keymanager": "din.services.keymanager.main:KeyManager",
    "telemetry": "din.services.telemetry.main:Telemetry",
    "gateway": "din.services.gateway.main:Gateway",
    "autoscaler": "din.services.autoscaler.main:Autoscaler",
}
"""Where each service's class lives, by service name (``shared.naming.SERVICES``)."""


_PLACEHOLDER = re.compile(r"__(\w+?)__")


class MissingServiceClass(LookupError):
    """A service has no ``Service`` subclass where ``SERVICE_CLASSES`` says, so its operations are unknown."""


class InvalidDeclaration(ValueError):
    """A declaration that names an unknown channel, a subject off its channel, or a stale catalog narrowing."""


@dataclass(frozen=True)
class Operation:
    """``party`` sends or receives ``messages`` on ``channel``; ``queue``: its NATS queue group; ``reply``: the
    channel the answer to a request comes back on."""

    party: str
    action: str
    channel: Channel
    messages: tuple[str, ...]
    queue: str | None = None
    reply: Channel | None = None

    @property
    def key(self) -> str:
        """The AsyncAPI operation id: ``<party>_<action>_<channel key>``."""
        return f"{self.party}_{self.action}_{self.channel.key}"


def service_class(service: str) -> type[Service]:
    """The ``Service`` subclass of ``service``; raises ``MissingServiceClass`` naming it when there is none."""
    where = SERVICE_CLASSES.get(service)
    if where is None:
        raise MissingServiceClass(f"service {service!r} has no entry in din.service_operations.SERVICE_CLASSES")
    module_name, class_name = where.split(":")
    found = getattr(importlib.import_module(module_name), class_name, None)
    if not (isinstance(found, type) and issubclass(found, Service)):
        raise MissingServiceClass(f"service {service!r}: {module_name} defines no Service subclass {class_name}, "
                                  "so its endpoints cannot be documented")
    if found.name != service:
        raise MissingServiceClass(f"{where} is named {found.name!r}, not {service!r}")
    return found


def service_classes() -> list[type[Service]]:
    """Every service's class, in ``SERVICES`` order."""
    return [service_class(service) for service in SERVICES]


class _PlaceholderSettings:
    """Stands in for a service's settings: every attribute is the placeholder token ``__<attribute>__``."""

    def __getattr__(self, name: str) -> str:
        return f"__{name}__"


def _pattern(value: str | None) -> str | None:
    if value is None:
        return None
    return _PLACEHOLDER.sub(lambda m: "{" + m.group(1) + "}", value)


def _resolved_pattern(spec: Endpoint, where: str) -> tuple[str, str | None]:
    try:
        subject, queue = spec.resolve(_PlaceholderSettings())
    except Exception as exc:
        raise InvalidDeclaration(f"{where}: its subject or queue cannot be rendered from placeholder settings "
                                 f"({exc.__class__.__name__}: {exc})") from exc
    return _pattern(subject), _pattern(queue or None)


def _fits(subject: str, address: str) -> bool:
    """Whether ``subject`` (``*``/``>`` wildcards and ``{param}`` tokens allowed) lies within ``address``."""
    mine, theirs = subject.split("."), address.split(".")
    for i, token in enumerate(mine):
        if token == ">":
            return len(theirs) > i
        if i >= len(theirs):
            return False
        parameter = theirs[i].startswith("{")
        if token == "*" or token.startswith("{"):
            if not parameter:
                return False
        elif token != theirs[i] and not parameter:
            return False
    return len(mine) == len(theirs)


def _lookup(name: str, where: str) -> Channel:
    try:
        return channel(name)
    except KeyError as exc:
        raise InvalidDeclaration(f"{where}: {exc.args[0]}") from None


def runtime_operations(service: type[Service]) -> tuple[list[str], list[str]]:
    """What every runtime does for ``service`` without a declaration: (channels received on, channels sent to)."""
    receives = ["health", *(["healthInstance"] if service.name in INSTANCE_HEALTH else []),
                "microAll", "microKind", "microInstance"]
    sends = ["healthReply", "microReply", Topics.SPANS]
    for spec in service.endpoints().values():
        if spec.kind == JOB:
            sends.append(Topics.DEAD_LETTER)
        reply = channel(spec.channel).reply if spec.kind == CONTROL else None
        if reply is not None:
            sends.append(reply)
    return receives, sends


def _consumes(service: type[Service]) -> tuple[str, ...]:
    return tuple(service.consumes)


def _service_operations(service: type[Service]) -> list[Operation]:
    received: dict[str, str | None] = {}
    sent: list[str] = [*service.publishes]
    for attribute, spec in service.endpoints().items():
        where = f"{service.__name__}.{attribute}"
        target = _lookup(spec.channel, where)
        subject, queue = _resolved_pattern(spec, where)
        if target.address is None or not _fits(subject, target.address):
            raise InvalidDeclaration(f"{where} subscribes {subject}, which is not on channel {spec.channel} "
                                     f"({target.address})")
        if spec.channel in received and received[spec.channel] != queue:
            raise InvalidDeclaration(f"{where}: a second endpoint on {spec.channel} with another queue group")
        received[spec.channel] = queue
        sent.extend(spec.publishes)
    implied_receives, implied_sends = runtime_operations(service)
    for name in implied_receives:
        received.setdefault(name, None)
    sent.extend(implied_sends)
    consumes = _consumes(service)
    where = f"{service.__name__}.publishes"
    return [
        *(Operation(service.name, RECEIVE, _lookup(name, where), (), queue) for name, queue in received.items()),
        *(Operation(service.name, RECEIVE, _lookup(name, f"{service.__name__}.consumes"), ()) for name in consumes),
        *(Operation(service.name, SEND, _lookup(name, where), ()) for name in dict.fromkeys(sent)),
    ]


def _party_operations() -> list[Operation]:
    return [
        *(Operation(p.name, SEND, _lookup(name, f"party {p.name}"), ()) for p in PARTIES for name in p.sends),
        *(Operation(p.name, RECEIVE, _lookup(name, f"party {p.name}"), ()) for p in PARTIES for name in p.receives),
    ]


def _completed(operations: Iterable[Operation]) -> list[Operation]:
    """Add the replies requesters receive, the reply channel of each request, and each operation's messages."""
    operations = list(operations)
    for op in list(operations):
        if op.action == SEND and op.channel.reply is not None:
            operations.append(Operation(op.party, RECEIVE, channel(op.channel.reply), ()))
    unique: dict[str, Operation] = {}
    for op in operations:
        messages = op.channel.sent_by(op.party) if op.action == SEND else op.channel.received_by(op.party)
        reply = channel(op.channel.reply) if op.action == SEND and op.channel.reply else None
        unique.setdefault(op.key, Operation(op.party, op.action, op.channel, messages, op.queue, reply))
    return list(unique.values())


def _check_narrowing(operations: list[Operation], parties: set[str]) -> None:
    acting = {(op.party, op.action, op.channel.key) for op in operations}
    for ch in all_channels():
        for action, narrowed in ((SEND, ch.sends_only), (RECEIVE, ch.receives_only)):
            for party, messages in narrowed.items():
                if party in parties and (party, action, ch.key) not in acting:
                    raise InvalidDeclaration(f"din.shared.channels: {ch.key} narrows what {party} {action}s, but "
                                             f"{party} does not {action} on {ch.key}")
                unknown = set(messages) - set(ch.messages)
                if unknown:
                    raise InvalidDeclaration(f"din.shared.channels: {ch.key} narrows {party} to messages "
                                             f"{sorted(unknown)} it does not carry")


def operations(
    services: Iterable[type[Service]] | None = None, *, check_catalog: bool | None = None
) -> list[Operation]:
    """Every operation: each service's (derived from its class; default every service's) and the client's and
    operator's. ``check_catalog`` (default: when documenting every service) also refuses a catalog narrowing
    of a party that does not act on that channel; a partial set of services would trip it by design."""
    classes = service_classes() if services is None else list(services)
    found = _completed([*(op for cls in classes for op in _service_operations(cls)), *_party_operations()])
    if check_catalog if check_catalog is not None else services is None:
        _check_narrowing(found, {cls.name for cls in classes} | {party.name for party in PARTIES})
    return found
