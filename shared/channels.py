"""The channel catalog: every NATS subject pattern and Kafka topic DIN uses, what travels on each, and who outside.

A service names a channel by its key here (``CHANNELS``) or, for Kafka, by its ``Topics`` constant
(``TOPIC_CHANNELS``) in its endpoint declarations (``shared.runtime.endpoint`` and friends) and in its
class attribute ``publishes``. Who sends and receives on a channel is not kept here for services: the
AsyncAPI generator (``din.schemas``) derives it from those declarations. Only the parties that are not
services, the client and the operator (and the ``din`` commands acting for them), keep their sends and
receives here (``PARTIES``).

Every address is built with the ``shared.naming`` builders from placeholder tokens (``subject_pattern``),
so no subject is spelled here. A channel with ``reply`` set is a request channel: whoever sends on it
receives the answer on that reply channel (the requester's inbox, which has no address).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from din.shared.naming import API_VERSION, MICRO_PREFIX, Subjects, Topics, work_stream
from din.shared.security import KEYS_BUCKET

CLIENT = "client"
OPERATOR = "operator"

INSTANCE_HEALTH = ("executor",)
"""Services run as several named instances (executors, one per topology entry): each instance also answers
its own health subject (``healthInstance``)."""


@dataclass(frozen=True)
class Channel:
    """A NATS subject pattern or Kafka topic and the messages on it (keys of the AsyncAPI messages).

    ``address`` is None for a reply channel (the requester's inbox). ``sends_only``/``receives_only``
    narrow, per party, which of the channel's messages it sends or receives (default: all of them).
    """

    key: str
    address: str | None
    description: str
    messages: tuple[str, ...]
    reply: str | None = None
    kafka: bool = False
    sends_only: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    receives_only: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def sent_by(self, party: str) -> tuple[str, ...]:
        """The messages ``party`` sends here."""
        return self.sends_only.get(party, self.messages)

    def received_by(self, party: str) -> tuple[str, ...]:
        """The messages ``party`` receives here."""
        return self.receives_only.get(party, self.messages)


@dataclass(frozen=True)
class Party:
    """Someone on the bus who is not a DIN service: the channels (keys or topics) it sends and receives on.

    Replies to what it sends on request channels are implied (see ``Channel.reply``)."""

    name: str
    sends: tuple[str, ...]
    receives: tuple[str, ...] = ()


def subject_pattern(build: Callable[..., str], *params: str) -> str:
    """The subject ``build`` makes from one placeholder token per parameter, each written ``{param}``."""
    placeholders = {name.upper(): name for name in params}
    subject = build(*placeholders)
    return ".".join(f"{{{placeholders[t]}}}" if t in placeholders else t for t in subject.split("."))


JOB = ("job",)
STAGE_OR_JOB = ("job", "stageJob")

_NATS = (
    Channel(
        "infer", subject_pattern(Subjects.infer, "tenant", "model"),
        "A client's inference request; sent as a NATS request whose reply subject receives the answer (one result "
        "or error, or for a generation request a stream of chunks).",
        ("inferRequest", "inferRequestTensor"), reply="inferReply",
    ),
    Channel(
        "inferReply", None,
        "The requester's reply subject: exactly one answer, a result or an error (error headers set); for a "
        "generation request (Din-Max-Tokens) instead StreamChunkV1 messages seq 0, 1, ... (Din-Stream-Seq), the "
        "last with done=true, or an error reply that ends the stream at any point. Only the executor answers "
        "with a result or chunks; every other service answers errors only.",
        ("inferResponse", "streamChunk", "errorReply"),
        sends_only={service: ("errorReply",) for service in ("admission", "classifier", "scheduler")},
    ),
    Channel(
        "admit", subject_pattern(Subjects.admit, "site", "tenant", "model"),
        "A request handed on unopened by an admission at a site that may not open it (the tenant's data may not "
        "be read there, or its labels are sensitive and the site is not among the tenant's sensitive sites) to "
        "the admission of the nearest site that may; the reply subject is still the client's.",
        ("inferRequest", "inferRequestTensor"),
    ),
    Channel(
        "classify", subject_pattern(Subjects.classify, "site"),
        "Admitted requests, on their way to the classifier of the same site's control plane.", JOB,
    ),
    Channel(
        "schedule", subject_pattern(Subjects.schedule, "site"),
        "Jobs for a site's scheduler: classified requests from its classifier, jobs another site's scheduler "
        "forwards (forwarded_from set: placed at this site only), and jobs an executor hands back to the "
        "scheduler that placed them (it was full: attempt counted and the executor avoided; or a cascade's small "
        "variant was not confident: cascade_stage 2, to be placed on the large variant), with the client's body "
        "sealed again to the tenant.",
        JOB,
    ),
    Channel(
        "execute", subject_pattern(Subjects.execute, "site", "executor"),
        "Centralized scheduling: a job assigned to one executor by the scheduler, or a multi-stage job's next "
        "stage handed on by the executor that ran the previous one (plan entry with an executor).",
        STAGE_OR_JOB, sends_only={"scheduler": JOB, "executor": ("stageJob",)},
    ),
    Channel(
        "work", subject_pattern(Subjects.work, "site", "model"),
        f"Distributed scheduling: a site's JetStream work queue for one model (stream {work_stream('SITE')} with "
        "SITE the site name in upper case); the site's executors pull from it (durable consumer work-<model>). "
        "The scheduler enqueues jobs; an executor enqueues a multi-stage job's next stage (plan entry without an "
        "executor).",
        STAGE_OR_JOB, sends_only={"scheduler": JOB, "executor": ("stageJob",)},
    ),
    Channel(
        "pressure", subject_pattern(Subjects.pressure, "site"),
        "A site scheduler's periodic view of its load; the site's admission sheds early on it.", ("pressure",),
    ),
    Channel(
        "summary", subject_pattern(Subjects.summary, "site"),
        "A site scheduler's periodic summary (per model: executors, free slots, queue, best prediction, cost; its "
        "links as measured from there), for the other sites' schedulers to decide where to forward what they "
        "cannot serve in time.", ("siteSummary",),
    ),
    Channel(
        "roster", subject_pattern(Subjects.roster, "site"),
        "A site scheduler's periodic sample of its executors (the latest heartbeats of a few with the most room per "
        "model) and the executors it lost, for the hub's scheduler, which places plans across sites without "
        "hearing every executor's heartbeat.", ("siteRoster",),
    ),
    Channel(
        "rollCall", subject_pattern(Subjects.roll_call, "site"),
        "A starting scheduler asks the executors of a site it schedules for to send a heartbeat now.",
        ("healthRequest",),
    ),
    Channel("alerts", Subjects.ALERTS, "SLA violation alerts as they start and resolve.", ("slaViolation",)),
    Channel(
        "heartbeat", subject_pattern(Subjects.heartbeat, "site", "executor"),
        "An executor's periodic announcement of itself and its load.", ("heartbeat",),
    ),
    Channel(
        "completed", subject_pattern(Subjects.completed, "site"),
        "Completion events of jobs finished at a site. The headers tell the scheduler what became of the job "
        "(see CompletionHeaders): closed (Din-Request-Id), one stage of several done and handed on "
        "(Din-Stage-Done), or still open (neither). The site's own JetStream domain keeps them in "
        "DIN_COMPLETIONS_<SITE> until telemetry has relayed them to Kafka.",
        ("completion",),
    ),
    Channel(
        "probe", subject_pattern(Subjects.probe, "site"),
        "Link probe to a site, echoed unchanged by one of its executors (queue group probe-<site>).",
        ("probe",), reply="probeReply",
    ),
    Channel("probeReply", None, "The prober's reply subject: the probe, echoed.", ("probe",)),
    Channel(
        "control", subject_pattern(Subjects.control, "service", "instance"),
        "Operator commands to one instance: serving a new model version on an executor; rotating data keys "
        "or revoking a principal at the key manager (signed by the operator principal).",
        ("loadModel", "keyCommand"), reply="controlReply",
        receives_only={"executor": ("loadModel",), "keymanager": ("keyCommand",)},
    ),
    Channel(
        "controlReply", None, "The operator's reply subject: the model now served, the keys now, or why not.",
        ("modelLoaded", "keyCommandResult", "controlError"),
        sends_only={"executor": ("modelLoaded", "controlError"), "keymanager": ("keyCommandResult", "controlError")},
    ),
    Channel(
        "health", subject_pattern(Subjects.health, "service"),
        "Health of a service, answered by each of its instances.", ("healthRequest",), reply="healthReply",
    ),
    Channel(
        "healthInstance", subject_pattern(Subjects.health, "service", "instance"),
        "Health of one instance of a service with several (executors).", ("healthRequest",), reply="healthReply",
    ),
    Channel("healthReply", None, "The asker's reply subject: the instance's health.", ("health",)),
    Channel(
        "microAll", f"{MICRO_PREFIX}.{{verb}}",
        "NATS micro discovery (verb PING, INFO or STATS), answered by every instance of every service: what "
        "`nats micro ls|info|stats` ask.", ("microRequest",), reply="microReply",
    ),
    Channel(
        "microKind", f"{MICRO_PREFIX}.{{verb}}.{{name}}",
        "NATS micro discovery of one service (name din-<service>), answered by each of its instances.",
        ("microRequest",), reply="microReply",
    ),
    Channel(
        "microInstance", f"{MICRO_PREFIX}.{{verb}}.{{name}}.{{id}}",
        "NATS micro discovery of one instance (its id, from a PING or INFO answer).",
        ("microRequest",), reply="microReply",
    ),
    Channel("microReply", None, "The asker's reply subject: the instance's micro ping, info or stats.",
            ("microPing", "microInfo", "microStats")),
    Channel(
        "keysBucket", f"$KV.{KEYS_BUCKET}.{{entry}}",
        f"The JetStream key-value bucket {KEYS_BUCKET} at the hub (its subjects): public identities "
        "(pub.<principal>), data keys wrapped to each holder (dek.<holder>.<reader>.<version>), revoked "
        "principals (revoked) and the crypto policy (policy). Only the key manager writes it; with security on, "
        "every service's key agent watches it and installs keys as they appear.",
        ("keysEntry",),
    ),
)

_TOPICS = {
    Topics.REQUESTS: ("recordedRequest", "Every admitted request, body and metadata, for replay."),
    Topics.ADMISSION_DECISIONS: ("admissionDecision", "Admission's verdict on every request."),
    Topics.CLASSIFICATIONS: ("classification", "The workload class of every admitted request."),
    Topics.SCHEDULING_DECISIONS: ("schedulingDecision", "Every placement, its reason and the alternatives considered."),
    Topics.COMPLETIONS: ("completionEvent", "Every job's completion, relayed from NATS."),
    Topics.HEARTBEATS: ("heartbeatEvent", "Executor heartbeats, relayed from NATS."),
    Topics.DEAD_LETTER: ("deadLetter", "Messages a service could not process and could not answer, kept instead of "
                                       "dropped."),
    Topics.ALERTS: ("slaViolationEvent", "SLA violation alerts."),
    Topics.SPANS: ("spanEvent", "Sampled trace spans of every hop; key: trace id."),
    Topics.SCALING_DECISIONS: ("scalingDecision", "Every change the autoscaler made to a pool (an executor asked "
                               "for, ready, failed, drained, replaced), its reason and signals; key: site."),
}


def topic_key(topic: str) -> str:
    """The AsyncAPI channel key of Kafka topic ``topic``: ``topic_<area>_<kind>``."""
    return "topic_" + topic.removeprefix(f"din.{API_VERSION}.").replace(".", "_")


def _topic_channels() -> dict[str, Channel]:
    missing = [topic for topic in Topics.ALL if topic not in _TOPICS]
    if missing:
        raise ValueError(f"topic {missing[0]} has no entry in shared.channels")
    return {
        topic: Channel(topic_key(topic), topic, f"{description} Kafka topic; with DIN_TOPIC_SCOPE set, "
                                                f"{topic}.<scope>.", (message,), kafka=True)
        for topic, (message, description) in ((t, _TOPICS[t]) for t in Topics.ALL)
    }


CHANNELS: dict[str, Channel] = {channel.key: channel for channel in _NATS}
"""NATS channels by key, in document order."""

TOPIC_CHANNELS: dict[str, Channel] = _topic_channels()
"""Kafka channels by topic name (``Topics.X``), in ``Topics.ALL`` order."""

PARTIES = (
    Party(CLIENT, sends=("infer",)),
    Party(
        OPERATOR,
        sends=("control", "health", "healthInstance", "microAll", "microKind", "microInstance"),
        receives=("alerts", Topics.REQUESTS, Topics.ADMISSION_DECISIONS, Topics.SCHEDULING_DECISIONS,
                  Topics.COMPLETIONS, Topics.ALERTS),
    ),
)
"""The parties that are not services. The operator's Kafka reads are ``din replay`` (requests) and
``din report`` (decisions, completions, alerts)."""


def channel(name: str) -> Channel:
    """The channel a declaration names: a key of ``CHANNELS`` or a Kafka topic of ``TOPIC_CHANNELS``."""
    found = CHANNELS.get(name) or TOPIC_CHANNELS.get(name)
    if found is None:
        raise KeyError(f"no channel {name!r} in shared.channels (keys: {', '.join(CHANNELS)}; or a Topics name)")
    return found


def all_channels() -> list[Channel]:
    """Every channel, NATS first, in document order."""
    return [*CHANNELS.values(), *TOPIC_CHANNELS.values()]
