"""Who may publish and subscribe to what on NATS: least privilege per party, generated from the topology.

One function per kind of party returns its ``Permissions``; ``network_users``
lists every user a topology needs. ``docs/security.md``'s access table is
generated from ``access_table``; ``tests/unit/test_bus_permissions.py`` checks
that every subject a service declares (``din.service_operations``) is allowed
to it, and that nothing a party must not touch is.

Inboxes carry their owner so that permissions can confine them: a tenant's
client uses the inbox prefix ``_INBOX.<tenant>.<site>`` (``tenant_inbox``), a
service instance ``_DIN_INBOX.<site>.<user>`` (``service_inbox``). A tenant may
subscribe only under its own prefix; a site's leaf connection only receives
replies for its own site's inboxes. Replies to a message a party received
(acknowledgements, health and control answers) go through NATS's response
permission (``resp``), not a standing grant.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from din.shared.naming import MICRO_PREFIX, Subjects, completions_stream, micro_name, token, work_stream
from din.shared.security.bucket import KeysMirror, keys_stream
from din.shared.security.keyfiles import KEYS_BUCKET
from din.shared.topology import Topology

ANY = "*"
REST = ">"
_PLACEHOLDER = "ANYTOKEN"
TENANT_INBOX_ROOT = "_INBOX"
SERVICE_INBOX_ROOT = "_DIN_INBOX"
OPERATOR_USER = "operator"
TENANT_USER_PREFIX = "tenant-"


@dataclass(frozen=True)
class Permissions:
    """Subjects a NATS user may publish to and subscribe to (allow lists) and how many replies it may send to each
    message it receives (0: none)."""

    publish: tuple[str, ...] = ()
    subscribe: tuple[str, ...] = ()
    responses: int = 0
    inbox_prefix: str | None = None

    def claims(self) -> dict:
        """The permission part of a user JWT's ``nats`` claims."""
        out: dict = {"pub": {"allow": list(self.publish)}, "sub": {"allow": list(self.subscribe)}}
        if self.responses:
            out["resp"] = {"max": self.responses, "ttl": 0}
        return out

    def __add__(self, other: Permissions) -> Permissions:
        return Permissions(_unique(self.publish + other.publish), _unique(self.subscribe + other.subscribe),
                           max(self.responses, other.responses), self.inbox_prefix or other.inbox_prefix)


@dataclass(frozen=True)
class BusUser:
    """One NATS user of a network: its name (the credentials file's), what it is and its permissions."""

    name: str
    kind: str
    site: str | None
    permissions: Permissions = field(default_factory=Permissions)


def _unique(items: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


def pattern(build: Callable[..., str], *parts: str) -> str:
    """The subject ``build`` makes, with ``ANY`` parts as ``*`` (e.g. ``pattern(Subjects.execute, site, ANY)``)."""
    subject = build(*(_PLACEHOLDER if part == ANY else part for part in parts))
    return ".".join(ANY if t == _PLACEHOLDER else t for t in subject.split("."))


def tenant_inbox(tenant: str, site: str) -> str:
    """The inbox prefix of ``tenant``'s clients connected at ``site``."""
    return f"{TENANT_INBOX_ROOT}.{token(tenant, what='tenant')}.{token(site, what='site')}"


def service_inbox(site: str, user: str) -> str:
    """The inbox prefix of service user ``user`` at ``site``."""
    return f"{SERVICE_INBOX_ROOT}.{token(site, what='site')}.{token(user, what='user')}"


GATEWAY_INBOX_TOKEN = "gateway"


def gateway_reply(tenant_name: str, site: str, request: str) -> str:
    """The reply subject of one request the gateway at ``site`` sends for ``tenant_name``: inside that tenant's
    own inboxes (so admission answers it, ``is_tenant_reply``, and no other tenant's request can name it), under
    a token no nats-py inbox uses (a client's inbox ends in a 22-character id)."""
    return f"{tenant_inbox(tenant_name, site)}.{GATEWAY_INBOX_TOKEN}.{token(request, what='request')}"


def gateway_replies(site: str) -> str:
    """Every reply subject of the gateway at ``site``, of any tenant."""
    return f"{TENANT_INBOX_ROOT}.{ANY}.{token(site, what='site')}.{GATEWAY_INBOX_TOKEN}.{ANY}"


def inbox_for(user: str, site: str) -> str:
    """The inbox prefix NATS user ``user`` connects with at ``site``: its tenant's (``tenant-<name>``) or its own."""
    if user.startswith(TENANT_USER_PREFIX):
        return tenant_inbox(user.removeprefix(TENANT_USER_PREFIX), site)
    return service_inbox(site, user)


def is_tenant_reply(tenant_name: str, reply: str) -> bool:
    """Whether ``reply`` lies in ``tenant_name``'s own inboxes (or the operator's, whose raw requests test and
    debug the network): on a closed bus a request whose reply subject is anyone else's (another tenant's inbox,
    a service's acknowledgement handle) is not answered there."""
    if reply.startswith(f"{TENANT_INBOX_ROOT}.{tenant_name}."):
        return True
    parts = reply.split(".")
    return len(parts) > 3 and parts[0] == SERVICE_INBOX_ROOT and parts[2] == OPERATOR_USER


def tenant_user(tenant_name: str) -> str:
    """The NATS user of ``tenant_name``'s clients."""
    return f"{TENANT_USER_PREFIX}{token(tenant_name, what='tenant')}"


ANY_TENANT_INBOX = f"{TENANT_INBOX_ROOT}.{REST}"
ANY_SERVICE_INBOX = f"{SERVICE_INBOX_ROOT}.{REST}"
# The operator's inboxes at any site: raw requests of `din` commands and test harnesses are answered there
# (``is_tenant_reply``), so whoever answers a client may publish into them.
OPERATOR_INBOXES = f"{SERVICE_INBOX_ROOT}.{ANY}.{OPERATOR_USER}.{REST}"


def _js_api(domain: str | None, *suffixes: str) -> tuple[str, ...]:
    prefix = f"$JS.{domain}.API" if domain else "$JS.API"
    return tuple(f"{prefix}.{suffix}" for suffix in suffixes)


def _stream_reader(stream: str) -> tuple[str, ...]:
    return ("INFO", f"STREAM.INFO.{stream}", f"CONSUMER.CREATE.{stream}", f"CONSUMER.CREATE.{stream}.{REST}",
            f"CONSUMER.DELETE.{stream}.{REST}", f"CONSUMER.INFO.{stream}.{REST}", f"DIRECT.GET.{stream}",
            f"DIRECT.GET.{stream}.{REST}", f"STREAM.MSG.GET.{stream}")


def _stream_owner(stream: str) -> tuple[str, ...]:
    return (*_stream_reader(stream), f"STREAM.CREATE.{stream}", f"STREAM.UPDATE.{stream}",
            f"CONSUMER.DURABLE.CREATE.{stream}.{REST}",
            f"CONSUMER.MSG.NEXT.{stream}.{REST}")


def key_bucket_reader(topology: Topology) -> Permissions:
    """Watching the ``DIN_KEYS`` bucket (every secured service's key agent): read-only, addressed to the JetStream
    of the server the agent is connected to (its site's mirror of the bucket, or the bucket itself at the hub), or
    to the hub's domain while its site has no mirror yet. No consumer deletes: a watch never deletes its own (it
    lapses), and the durable consumers feeding the site mirrors are the key manager's."""
    stream = keys_stream(KEYS_BUCKET)
    calls = tuple(call for call in _stream_reader(stream) if not call.startswith("CONSUMER.DELETE."))
    return Permissions(_js_api(topology.hub.name, *calls) + _js_api(None, *calls) + (f"$JS.FC.{stream}.{REST}",))


def key_mirror_feed(topology: Topology, site: str) -> Permissions:
    """What ``site``'s server needs across its leaf to keep its mirror of the ``DIN_KEYS`` bucket: out, resetting
    and acknowledging (flow control) the hub's durable consumer kept for that site; in, the answer
    (``$JSC.R.<id>``, the server's own reply subject) and that consumer's messages, on the site's own subject."""
    stream = keys_stream(KEYS_BUCKET)
    consumer = KeysMirror.consumer(site)
    return Permissions(
        publish=(*_js_api(topology.hub.name, f"CONSUMER.RESET.{stream}.{consumer}"),
                 f"$JS.FC.{stream}.{consumer}.{REST}"),
        subscribe=(f"$JSC.R.{REST}", KeysMirror.deliver_subject(site, stream)))


def micro_discovery(service: str) -> tuple[str, ...]:
    """The NATS micro discovery subjects an instance of ``service`` answers (``shared.micro``): each verb for every
    service, for its kind and for one instance of it. Only the operator may ask (``$SRV`` is not a tenant's)."""
    return (f"{MICRO_PREFIX}.{ANY}", f"{MICRO_PREFIX}.{ANY}.{micro_name(service)}",
            f"{MICRO_PREFIX}.{ANY}.{micro_name(service)}.{ANY}")


def _service(user: str, site: str, service: str, instance: str | None) -> Permissions:
    subscribe = [Subjects.health(service), *micro_discovery(service), f"{service_inbox(site, user)}.{REST}"]
    if instance is not None:
        subscribe.append(Subjects.health(service, instance))
    return Permissions(subscribe=tuple(subscribe), responses=1, inbox_prefix=service_inbox(site, user))


def admission(topology: Topology, site: str, user: str, instance: str | None) -> Permissions:
    """A site's admission: hears its site's requests and hand-overs, hands on to its classifier or another
    site's admission, claims nonces in its site's bucket, answers clients with errors."""
    nonces = f"KV_DIN_NONCES_{site.upper().replace('-', '_')}"
    return _service(user, site, "admission", instance) + key_bucket_reader(topology) + Permissions(
        publish=(pattern(Subjects.admit, ANY, ANY, ANY), Subjects.classify(site), ANY_TENANT_INBOX, OPERATOR_INBOXES,
                 *_js_api(site, *_stream_owner(nonces)), *_js_api(None, *_stream_owner(nonces)),
                 f"$KV.{nonces[3:]}.{REST}"),
        subscribe=(Subjects.INFER_ALL, Subjects.admit_all(site), Subjects.pressure(site)),
    )


def classifier(topology: Topology, site: str, user: str, instance: str | None) -> Permissions:
    """A site's classifier: its site's admitted requests in, its site's scheduler out; watches the keys bucket
    for its site's data key, which tags the jobs it hands on."""
    return _service(user, site, "classifier", instance) + key_bucket_reader(topology) + Permissions(
        publish=(Subjects.schedule(site), ANY_TENANT_INBOX, OPERATOR_INBOXES), subscribe=(Subjects.classify(site),))


def scheduler(topology: Topology, site: str, user: str, instance: str | None) -> Permissions:
    """A site's scheduler: the executors, completions and work queues of the sites it places on (every site for
    the hub's), every site's summaries; forwards to any site's scheduler. With a control plane per site the hub's
    hears only its own site's heartbeats and every other site's roster; a site's sends its roster."""
    placed = topology.scheduled_sites(site)
    every = len(placed) > 1 and set(placed) == {s.name for s in topology.sites}
    rosters = topology.hears_rosters(site)
    publish = [pattern(Subjects.schedule, ANY), Subjects.pressure(site), Subjects.summary(site),
               Subjects.roster(site), pattern(Subjects.probe, ANY), ANY_TENANT_INBOX, OPERATOR_INBOXES]
    subscribe = [Subjects.schedule(site), Subjects.SUMMARY_ALL,
                 Subjects.ROSTER_ALL if rosters else Subjects.roster(site)]
    for other in [ANY] if every else placed:
        publish += [pattern(Subjects.execute, other, ANY), pattern(Subjects.work, other, ANY),
                    pattern(Subjects.roll_call, other)]
        subscribe += [pattern(Subjects.completed, other)]
        if not rosters:
            subscribe += [pattern(Subjects.heartbeat, other, ANY)]
    if rosters:
        subscribe += [pattern(Subjects.heartbeat, site, ANY)]
    for other in placed:
        stream = work_stream(other)
        calls = ("INFO", f"STREAM.INFO.{stream}", f"STREAM.CREATE.{stream}", f"STREAM.UPDATE.{stream}")
        # A server checks a call addressed to its own domain as the plain API (its own site's stream).
        publish += _js_api(other, *calls) + (_js_api(None, *calls) if other == site else ())
    return _service(user, site, "scheduler", instance) + key_bucket_reader(topology) + Permissions(
        tuple(publish), tuple(subscribe))


def executor(topology: Topology, site: str, executor_id: str) -> Permissions:
    """One executor: its own job subject, control and heartbeat; its site's work queue, probes and roll calls;
    hands a job's next stage to any executor or work queue and a job back to any scheduler."""
    user = f"executor-{executor_id}"
    stream = work_stream(site)
    return _service(user, site, "executor", executor_id) + key_bucket_reader(topology) + Permissions(
        publish=(Subjects.heartbeat(site, executor_id), Subjects.completed(site), pattern(Subjects.execute, ANY, ANY),
                 pattern(Subjects.work, ANY, ANY), pattern(Subjects.schedule, ANY), ANY_TENANT_INBOX,
                 OPERATOR_INBOXES,
                 *_js_api(None, *_stream_owner(stream)), f"$JS.ACK.{stream}.{REST}"),
        subscribe=(Subjects.execute(site, executor_id), Subjects.control("executor", executor_id),
                   Subjects.probe(site), Subjects.roll_call(site)),
    )


def completion_relay(topology: Topology, site: str) -> tuple[str, ...]:
    """What relaying every site's completion stream takes, from ``site``: keeping the stream and its relay
    consumers in that site's JetStream domain (the plain API too for ``site``'s own), pulling and acknowledging."""
    calls: list[str] = []
    for other in topology.sites:
        stream = completions_stream(other.name)
        owner = _stream_owner(stream)
        calls += [*_js_api(other.name, *owner), *(_js_api(None, *owner) if other.name == site else ()),
                  f"$JS.ACK.{stream}.{REST}"]
    return tuple(calls)


def telemetry(topology: Topology, site: str, user: str, instance: str | None) -> Permissions:
    """Telemetry: relays every site's completion stream (``completion_relay``), hears every site's summary and
    the heartbeats of its own site's executors with a control plane per site (of every site's with one control
    plane), raises alerts; reads the key bucket for the public identities that check those messages'
    signatures."""
    heartbeats = pattern(Subjects.heartbeat, site, ANY) if topology.hears_rosters(site) else Subjects.HEARTBEAT_ALL
    return _service(user, site, "telemetry", instance) + key_bucket_reader(topology) + Permissions(
        publish=(Subjects.ALERTS, *completion_relay(topology, site)), subscribe=(heartbeats, Subjects.SUMMARY_ALL))


def keymanager(topology: Topology, site: str, user: str, instance: str | None) -> Permissions:
    """The key manager: the only writer of the ``DIN_KEYS`` bucket and the keeper of every other site's mirror of
    it (looks at, creates and replaces that one stream in each site's domain); hears the operator's key commands."""
    stream = keys_stream(KEYS_BUCKET)
    mirrors = [call for other in topology.sites if other.name != topology.hub.name
               for call in _js_api(other.name, f"STREAM.INFO.{stream}", f"STREAM.CREATE.{stream}",
                                   f"STREAM.DELETE.{stream}")]
    return _service(user, site, "keymanager", instance) + Permissions(
        publish=(*_js_api(None, *_stream_owner(stream)), *_js_api(site, *_stream_owner(stream)),
                 f"$KV.{KEYS_BUCKET}.{REST}", f"$JS.FC.{stream}.{REST}", *mirrors),
        subscribe=(Subjects.control("keymanager", instance or "keymanager"), Subjects.control("keymanager", site)),
    )


def gateway(topology: Topology, site: str, user: str, instance: str | None) -> Permissions:
    """A site's HTTP gateway: publishes requests as any tenant (admission checks each one's token) and hears
    only its own replies, in each tenant's inbox at its site (``gateway_reply``); nothing else."""
    return _service(user, site, "gateway", instance) + Permissions(
        publish=(pattern(Subjects.infer, ANY, ANY),), subscribe=(gateway_replies(site),))


def autoscaler(topology: Topology, site: str, user: str, instance: str | None) -> Permissions:
    """The autoscaler: asks the executors it starts whether they are ready (their health subjects, at any site);
    reads the key bucket for the identities that sign the Kafka records it sizes pools from."""
    return _service(user, site, "autoscaler", instance) + key_bucket_reader(topology) + Permissions(
        publish=(pattern(Subjects.health, "executor", ANY),))


def tenant(topology: Topology, name: str) -> Permissions:
    """A tenant's clients: publish its own requests, hear its own inboxes, read the key bucket (public identities
    and data keys wrapped to their holders); nothing else."""
    return key_bucket_reader(topology) + Permissions(
        publish=(pattern(Subjects.infer, name, ANY),),
        subscribe=(f"{TENANT_INBOX_ROOT}.{token(name, what='tenant')}.{REST}",))


def operator() -> Permissions:
    """The operator (``din`` commands, tests' harness): everything, in its own account's terms."""
    return Permissions(publish=(REST,), subscribe=(REST,), responses=1)


def leaf(topology: Topology, site: str) -> Permissions:
    """``site``'s leaf connection to the hub: ``publish`` is what may leave the site for the rest of the network,
    ``subscribe`` what the network may deliver into the site (NATS applies a leaf user's permissions so). A
    site's leaf cannot speak for another site (heartbeats, summaries, completions of its own site only) nor
    receive what is addressed to another site (jobs, work, hand-overs, replies to other sites' inboxes)."""
    # Heartbeats as ``heartbeat.<site>.>``, not ``.*``: the hub's interest in ``heartbeat.*.*`` (schedulers,
    # telemetry) crosses the leaf only if it reverse-matches an allowed subject, and nats-server's reverse match
    # does not match a ``*`` against a ``*`` (it does against ``>``); the heartbeats of other sites stay out.
    out = [f"{Subjects.heartbeat_site(site).removesuffix(ANY)}{REST}", Subjects.completed(site), Subjects.summary(site),
           Subjects.roster(site),
           pattern(Subjects.schedule, ANY), pattern(Subjects.admit, ANY, ANY, ANY), pattern(Subjects.probe, ANY),
           pattern(Subjects.execute, ANY, ANY), pattern(Subjects.work, ANY, ANY), ANY_TENANT_INBOX,
           # Requests leave every site: a site without a control plane is served by the hub's, and a site whose
           # admissions are all down is served by another site's (the queue group spans the leaves).
           Subjects.INFER_ALL,
           ANY_SERVICE_INBOX, *key_bucket_reader(topology).publish]
    into = [pattern(Subjects.execute, site, ANY), pattern(Subjects.work, site, ANY), Subjects.schedule(site),
            Subjects.admit_all(site), Subjects.SUMMARY_ALL, Subjects.probe(site), Subjects.roll_call(site),
            pattern(Subjects.control, "executor", ANY), pattern(Subjects.health, ANY),
            pattern(Subjects.health, ANY, ANY), f"{MICRO_PREFIX}.{REST}",
            f"{TENANT_INBOX_ROOT}.{ANY}.{site}.{REST}", f"{SERVICE_INBOX_ROOT}.{site}.{REST}", f"$JS.{site}.API.{REST}",
            f"$JS.ACK.{completions_stream(site)}.{REST}"]
    if site not in topology.control_sites():
        into += [Subjects.pressure(site)]
    return Permissions(tuple(out), tuple(into)) + key_mirror_feed(topology, site)


SERVICE_RULES = {
    "admission": admission,
    "classifier": classifier,
    "scheduler": scheduler,
    "telemetry": telemetry,
    "keymanager": keymanager,
    "gateway": gateway,
    "autoscaler": autoscaler,
}
