"""Every NATS subject and Kafka topic DIN uses, built from validated parts.

Handlers never spell a subject or topic as a literal: they ask this module.
A token (tenant, site, model, executor id, service name) must match
``TOKEN_PATTERN``: it may not contain ``.``, ``*``, ``>`` or whitespace, which
would change the meaning of a subject, nor characters Kafka refuses in topic
names.
"""

from __future__ import annotations

import re

API_VERSION = "v1"
PREFIX = f"din.{API_VERSION}"
TOKEN_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
WILDCARD = "*"

SERVICES = ("admission", "classifier", "scheduler", "executor", "telemetry", "keymanager", "gateway", "autoscaler")


class InvalidNameError(ValueError):
    """A subject or topic token that would break routing."""


def token(value: str, *, what: str = "token") -> str:
    """Return ``value`` if it is a safe single subject token, else raise."""
    if not isinstance(value, str) or not TOKEN_PATTERN.match(value):
        raise InvalidNameError(
            f"invalid {what} {value!r}: use 1-64 of A-Z a-z 0-9 _ - (no '.', '*', '>' or spaces)"
        )
    return value


def _join(*parts: str) -> str:
    return ".".join((PREFIX, *parts))


def _tenant_and_model(subject: str, kind: str, what: str, *, site: bool = False) -> tuple[str, str]:
    """``(tenant, model)``, the last two tokens of ``din.v1.<kind>[.<site>].<tenant>.<model>``, or raise."""
    parts = subject.split(".")
    if len(parts) != 5 + site or ".".join(parts[:3]) != _join(kind):
        raise InvalidNameError(f"not {what}: {subject!r}")
    if site:
        token(parts[3], what="site")
    return token(parts[-2], what="tenant"), token(parts[-1], what="model")


class Subjects:
    """NATS subjects. Each method validates its tokens."""

    @staticmethod
    def infer(tenant: str, model: str) -> str:
        """Where a client publishes an inference request for ``model`` as ``tenant``."""
        return _join("infer", token(tenant, what="tenant"), token(model, what="model"))

    INFER_ALL = _join("infer", WILDCARD, WILDCARD)

    @staticmethod
    def parse_infer(subject: str) -> tuple[str, str]:
        """Return ``(tenant, model)`` from a request subject, or raise."""
        return _tenant_and_model(subject, "infer", "an inference subject")

    ALERTS = _join("alerts")

    @staticmethod
    def admit(site: str, tenant: str, model: str) -> str:
        """A request handed, still sealed, to the admission of ``site``: one of the sites allowed to open it."""
        return _join("admit", token(site, what="site"), token(tenant, what="tenant"), token(model, what="model"))

    @staticmethod
    def admit_all(site: str) -> str:
        """Every request handed to the admission of ``site``."""
        return _join("admit", token(site, what="site"), WILDCARD, WILDCARD)

    @staticmethod
    def parse_admit(subject: str) -> tuple[str, str]:
        """Return ``(tenant, model)`` from a hand-over subject, or raise."""
        return _tenant_and_model(subject, "admit", "a hand-over subject", site=True)

    @staticmethod
    def classify(site: str) -> str:
        """Admitted requests on their way to the classifier of ``site``'s control plane."""
        return _join("classify", token(site, what="site"))

    @staticmethod
    def schedule(site: str) -> str:
        """Jobs for the scheduler of ``site``'s control plane: classified ones, hand-backs, jobs forwarded from
        another site."""
        return _join("schedule", token(site, what="site"))

    @staticmethod
    def pressure(site: str) -> str:
        """The load report of ``site``'s scheduler, for the admission of the same site."""
        return _join("pressure", token(site, what="site"))

    @staticmethod
    def roll_call(site: str) -> str:
        """A starting scheduler asks ``site``'s executors to send a heartbeat now."""
        return _join("rollcall", token(site, what="site"))

    @staticmethod
    def summary(site: str) -> str:
        """A site scheduler's compact summary of its capacity and links, for the other sites' schedulers."""
        return _join("summary", token(site, what="site"))

    SUMMARY_ALL = _join("summary", WILDCARD)

    @staticmethod
    def roster(site: str) -> str:
        """A site scheduler's sample of its executors (a few per model) and lost executors, for the hub's
        scheduler."""
        return _join("roster", token(site, what="site"))

    ROSTER_ALL = _join("roster", WILDCARD)

    @staticmethod
    def execute(site: str, executor_id: str) -> str:
        """Direct assignment of a job to one executor (centralized scheduling)."""
        return _join("exec", token(site, what="site"), token(executor_id, what="executor id"))

    @staticmethod
    def work(site: str, model: str) -> str:
        """A site's work queue for ``model`` (distributed scheduling, JetStream)."""
        return _join("work", token(site, what="site"), token(model, what="model"))

    @staticmethod
    def work_all(site: str) -> str:
        """Every work subject of one site: the subject filter of its stream."""
        return _join("work", token(site, what="site"), ">")

    @staticmethod
    def heartbeat(site: str, executor_id: str) -> str:
        """Where an executor announces itself and its load."""
        return _join("heartbeat", token(site, what="site"), token(executor_id, what="executor id"))

    HEARTBEAT_ALL = _join("heartbeat", WILDCARD, WILDCARD)

    @staticmethod
    def heartbeat_site(site: str) -> str:
        """Every heartbeat of ``site``'s executors: what a site's own scheduler listens to."""
        return _join("heartbeat", token(site, what="site"), WILDCARD)

    @staticmethod
    def probe(site: str) -> str:
        """Echo subject answered at ``site``, used to measure inter-site links."""
        return _join("probe", token(site, what="site"))

    @staticmethod
    def completed(site: str) -> str:
        """Completion events of jobs finished at ``site``."""
        return _join("events", "completed", token(site, what="site"))

    COMPLETED_ALL = _join("events", "completed", WILDCARD)

    @staticmethod
    def per_site(subject: str, sites: list[str] | tuple[str, ...]) -> list[str]:
        """``subject`` once per site when its site token is a wildcard (every site's heartbeats, completions,
        summaries), else ``[subject]``. A closed bus lets each site's leaf carry only its own site's subjects,
        and NATS forwards a leaf's messages only to interest its permissions cover, so a subscriber of every
        site subscribes site by site."""
        parts = subject.split(".")
        for family, index in _SITE_TOKEN.items():
            if subject.startswith(family + ".") and len(parts) > index and parts[index] == WILDCARD and sites:
                return [".".join([*parts[:index], token(site, what="site"), *parts[index + 1:]]) for site in sites]
        return [subject]

    @staticmethod
    def control(service: str, instance: str) -> str:
        """Operator commands to one instance, e.g. loading a new model version on an executor."""
        return _join("control", token(service, what="service"), token(instance, what="instance"))

    @staticmethod
    def health(service: str, instance: str | None = None) -> str:
        """Health subject of a service, or of one instance of it."""
        parts = ["health", token(service, what="service")]
        if instance is not None:
            parts.append(token(instance, what="instance"))
        return _join(*parts)


    @staticmethod
    def micro(verb: str, service: str | None = None, instance_id: str | None = None) -> str:
        """The NATS micro protocol's discovery subject (``$SRV.<verb>[.din-<service>[.<id>]]``, outside DIN's own
        ``din.v1`` prefix, where every micro client looks): every service, one kind, or one instance."""
        if verb not in MICRO_VERBS:
            raise InvalidNameError(f"invalid micro verb {verb!r}: one of {', '.join(MICRO_VERBS)}")
        parts = [MICRO_PREFIX, verb]
        if service is not None:
            parts.append(micro_name(service))
        if instance_id is not None:
            parts.append(token(instance_id, what="instance id"))
        return ".".join(parts)


MICRO_PREFIX = "$SRV"
MICRO_VERBS = ("PING", "INFO", "STATS")


def micro_name(service: str) -> str:
    """The NATS micro service name of DIN service ``service`` (``din-admission``, ...)."""
    return f"din-{token(service, what='service')}"


_SITE_TOKEN = {_join("heartbeat"): 3, _join("events", "completed"): 4, _join("summary"): 3, _join("roster"): 3}
"""Subject families whose site token a subscriber of every site expands (``Subjects.per_site``)."""


def work_stream(site: str) -> str:
    """JetStream stream name holding a site's work queue."""
    return f"DIN_WORK_{token(site, what='site').upper().replace('-', '_')}"


def completions_stream(site: str) -> str:
    """JetStream stream name capturing a site's completion events in its own domain (telemetry relays it)."""
    return f"DIN_COMPLETIONS_{token(site, what='site').upper().replace('-', '_')}"


class Topics:
    """Kafka topics, named ``din.v1.<area>.<kind>`` like Seldon's ``TopicNamer``."""

    REQUESTS = _join("admission", "requests")
    ADMISSION_DECISIONS = _join("admission", "decisions")
    CLASSIFICATIONS = _join("classifier", "classifications")
    SCHEDULING_DECISIONS = _join("scheduler", "decisions")
    COMPLETIONS = _join("executor", "completions")
    HEARTBEATS = _join("executor", "heartbeats")
    DEAD_LETTER = _join("deadletter")
    ALERTS = _join("telemetry", "alerts")
    SPANS = _join("telemetry", "spans")
    SCALING_DECISIONS = _join("autoscaler", "decisions")
    SMOKE = _join("smoke")

    ALL = (
        REQUESTS,
        ADMISSION_DECISIONS,
        CLASSIFICATIONS,
        SCHEDULING_DECISIONS,
        COMPLETIONS,
        HEARTBEATS,
        DEAD_LETTER,
        ALERTS,
        SPANS,
        SCALING_DECISIONS,
    )

    @staticmethod
    def scoped(base: str, scope: str) -> str:
        """A private copy of topic ``base`` for one test or run: ``base.<scope>``."""
        if base not in Topics.ALL and base != Topics.SMOKE:
            raise InvalidNameError(f"unknown topic {base!r}")
        return f"{base}.{token(scope, what='scope')}"
