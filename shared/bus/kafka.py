"""Kafka's own security, configured by DIN: SCRAM users, the ACL table, and the client settings that use them.

Every client authenticates with SCRAM-SHA-512 over TLS (the broker's certificate
is checked against DIN's CA). There is one user per service role, one per
operator reader (``replay``, ``report``), an ``operator`` who alone creates,
alters and deletes topics, and the broker's own super user (inter-broker and
controller traffic, and applying the ACLs). Passwords are generated once into
``<bus_dir>/kafka/<user>.password`` (0600) and kept on every later run; beside
each, ``<user>.properties`` is the same login for Kafka's own Java tools
(``--consumer.config``, ``--command-config``).

The broker runs KRaft's ``StandardAuthorizer`` with
``allow.everyone.if.no.acl.found=false``: what ``acl_table`` does not grant is
refused. A service may write only the topics it produces (``WRITES``, checked
against the services' declarations by ``tests/unit/test_kafka_acls.py``) and
read only what it consumes (``READS``). Every grant is a PREFIXED pattern on
the base topic name, so it covers the run and test scopes ``<base>.<scope>``
(no base topic is a prefix of another).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any

from din.shared.bus.files import write_secret
from din.shared.bus.tls import CA_CERT, client_context
from din.shared.naming import SERVICES, Topics

MECHANISM = "SCRAM-SHA-512"
KAFKA_DIR = "kafka"
BROKER_USER = "din-broker"
OPERATOR = "operator"
READERS = ("replay", "report")
USERS = (*SERVICES, *READERS, OPERATOR)
"""Every Kafka user a DIN process connects as (the broker's own super user aside)."""
TOPIC_PREFIX = "din."
"""The topics the operator administers: every DIN topic."""


class Resource(IntEnum):
    """Kafka's ``ResourceType`` codes."""

    TOPIC = 2
    GROUP = 3
    CLUSTER = 4


class Operation(IntEnum):
    """Kafka's ``AclOperation`` codes (the ones DIN grants)."""

    READ = 3
    WRITE = 4
    CREATE = 5
    DELETE = 6
    ALTER = 7
    DESCRIBE = 8
    DESCRIBE_CONFIGS = 10
    ALTER_CONFIGS = 11


class Pattern(IntEnum):
    """Kafka's ``PatternType`` codes."""

    LITERAL = 3
    PREFIXED = 4


ALLOW = 3
ANY_HOST = "*"

IMPLIES = {
    Operation.DESCRIBE: {Operation.READ, Operation.WRITE, Operation.DELETE, Operation.ALTER},
    Operation.DESCRIBE_CONFIGS: {Operation.ALTER_CONFIGS},
}
"""Kafka's implied operations: a grant of any operation on the right also allows the one on the left."""

WRITES: dict[str, tuple[str, ...]] = {
    "admission": (Topics.REQUESTS, Topics.ADMISSION_DECISIONS, Topics.SPANS),
    "classifier": (Topics.CLASSIFICATIONS, Topics.DEAD_LETTER, Topics.SPANS),
    "scheduler": (Topics.SCHEDULING_DECISIONS, Topics.DEAD_LETTER, Topics.SPANS),
    "executor": (Topics.DEAD_LETTER, Topics.SPANS),
    "telemetry": (Topics.COMPLETIONS, Topics.HEARTBEATS, Topics.ALERTS, Topics.DEAD_LETTER, Topics.SPANS),
    "keymanager": (Topics.DEAD_LETTER, Topics.SPANS),
    "gateway": (Topics.SPANS,),
    "autoscaler": (Topics.SCALING_DECISIONS, Topics.SPANS),
    OPERATOR: (Topics.SMOKE,),
}
"""The base topics each user produces to: what each service's declarations say it sends (trace spans from every
service, dead letters from those with job or control endpoints that may dead-letter); the operator writes only the
smoke-test topic."""

READS: dict[str, tuple[str, ...]] = {
    "telemetry": (Topics.ADMISSION_DECISIONS, Topics.SCHEDULING_DECISIONS, Topics.SCALING_DECISIONS),
    "autoscaler": (Topics.COMPLETIONS, Topics.ADMISSION_DECISIONS, Topics.SCHEDULING_DECISIONS),
    "replay": (Topics.REQUESTS, Topics.ADMISSION_DECISIONS, Topics.CLASSIFICATIONS, Topics.SCHEDULING_DECISIONS,
               Topics.COMPLETIONS, Topics.HEARTBEATS),
    "report": (Topics.REQUESTS, Topics.ADMISSION_DECISIONS, Topics.SCHEDULING_DECISIONS, Topics.COMPLETIONS,
               Topics.ALERTS, Topics.SCALING_DECISIONS),
}
"""The base topics each user consumes: telemetry its decision feed, ``din replay`` (and ``--what-if``) and
``din report`` what they read. The operator reads every DIN topic (``OPERATOR_OPERATIONS``)."""

GROUPS: dict[str, str] = {"telemetry": "din-telemetry", "autoscaler": "din-autoscaler", OPERATOR: "console-consumer-"}
"""Consumer-group prefixes per user: telemetry's ``din-telemetry[-<scope>]``, and the groups Kafka's console
consumer makes up for the operator; ``din replay`` and ``din report`` assign partitions and need none."""

OPERATOR_OPERATIONS = (Operation.CREATE, Operation.DELETE, Operation.ALTER, Operation.ALTER_CONFIGS,
                       Operation.DESCRIBE_CONFIGS, Operation.READ)
"""What the operator may do to every DIN topic (``TOPIC_PREFIX``); nobody else has any of the first four."""


@dataclass(frozen=True, order=True)
class Acl:
    """One ALLOW binding: ``user`` may do ``operation`` on ``resource`` named (or prefixed) ``name``."""

    user: str
    operation: Operation
    resource: Resource
    name: str
    pattern: Pattern = Pattern.PREFIXED

    @property
    def principal(self) -> str:
        return f"User:{self.user}"

    def covers(self, resource: Resource, name: str) -> bool:
        """Whether this binding's pattern matches resource ``name``."""
        if resource != self.resource:
            return False
        return name.startswith(self.name) if self.pattern == Pattern.PREFIXED else name == self.name


def acl_table() -> list[Acl]:
    """Every ACL DIN grants, derived from ``WRITES``, ``READS``, ``GROUPS`` and the operator's rights."""
    acls = [Acl(user, Operation.WRITE, Resource.TOPIC, base) for user, bases in WRITES.items() for base in bases]
    acls += [Acl(user, Operation.READ, Resource.TOPIC, base) for user, bases in READS.items() for base in bases]
    acls += [Acl(user, Operation.READ, Resource.GROUP, prefix) for user, prefix in GROUPS.items()]
    acls += [Acl(OPERATOR, op, Resource.TOPIC, TOPIC_PREFIX) for op in OPERATOR_OPERATIONS]
    return sorted(set(acls))


def may(user: str, operation: Operation, topic: str, acls: Iterable[Acl] | None = None,
        resource: Resource = Resource.TOPIC) -> bool:
    """Whether ``acls`` (default ``acl_table()``) let ``user`` do ``operation`` on ``topic``, as Kafka decides it."""
    allowed = {operation, *IMPLIES.get(operation, ())}
    return any(a.user == user and a.operation in allowed and a.covers(resource, topic)
               for a in (acl_table() if acls is None else acls))


@dataclass(frozen=True)
class KafkaUsers:
    """The SCRAM users' password files in ``root`` (``<bus_dir>/kafka``)."""

    root: Path

    def password_file(self, user: str) -> Path:
        return self.root / f"{user}.password"

    def properties_file(self, user: str) -> Path:
        """``user``'s login as Kafka Java client properties (``--consumer.config``, ``--command-config``)."""
        return self.root / f"{user}.properties"

    def password(self, user: str) -> str:
        return self.password_file(user).read_text().strip()

    def scram_arguments(self) -> list[str]:
        """``kafka-storage format`` arguments creating every user's SCRAM credential in the new cluster."""
        args: list[str] = []
        for user in (BROKER_USER, *USERS):
            args += ["--add-scram", f"{MECHANISM}=[name={user},password={self.password(user)}]"]
        return args


def ensure_kafka_users(bus_dir: Path) -> KafkaUsers:
    """Every user's password file under ``bus_dir/kafka``, generated on first use (0600) and kept afterwards, and
    its Java client properties."""
    users = KafkaUsers(Path(bus_dir) / KAFKA_DIR)
    for user in (BROKER_USER, *USERS):
        path = users.password_file(user)
        if not path.exists():
            write_secret(path, secrets.token_urlsafe(32) + "\n")
        login = KafkaLogin(user, path, Path(bus_dir) / CA_CERT)
        write_secret(users.properties_file(user), login.java_properties())
    return users


@dataclass(frozen=True)
class KafkaLogin:
    """One user's way into Kafka: its name, its password file, and the CA the broker's certificate must chain to."""

    user: str
    password_file: Path
    ca_file: Path

    def client_kwargs(self) -> dict[str, Any]:
        """aiokafka keyword arguments (producer, consumer, admin client) for SCRAM over TLS."""
        return {
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": MECHANISM,
            "sasl_plain_username": self.user,
            "sasl_plain_password": Path(self.password_file).read_text().strip(),
            "ssl_context": client_context(self.ca_file),
        }

    def java_properties(self) -> str:
        """The same login as Kafka Java client properties (secret: it holds the password)."""
        password = Path(self.password_file).read_text().strip()
        return "\n".join([
            "security.protocol=SASL_SSL",
            f"sasl.mechanism={MECHANISM}",
            f'sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required '
            f'username="{self.user}" password="{password}";',
            "ssl.truststore.type=PEM",
            f"ssl.truststore.location={self.ca_file}",
            "",
        ])

    def environment(self) -> dict[str, str]:
        """The settings variables a DIN process reads this login from."""
        return {"DIN_KAFKA_USER": self.user, "DIN_KAFKA_PASSWORD_FILE": str(self.password_file),
                "DIN_BUS_CA_FILE": str(self.ca_file)}


def kafka_client_kwargs(source: Any) -> dict[str, Any]:
    """aiokafka keyword arguments for ``source``: a ``KafkaLogin``, settings carrying ``kafka_user``,
    ``kafka_password_file`` and ``bus_ca_file`` (``ServiceSettings``), or None. ``{}`` (plaintext, no
    authentication) when there is no user: only an ``--insecure`` stack accepts that."""
    if source is None:
        return {}
    if not isinstance(source, KafkaLogin):
        if not getattr(source, "kafka_user", None):
            return {}
        missing = [name for name in ("kafka_password_file", "bus_ca_file") if not getattr(source, name, None)]
        if missing:
            raise ValueError(f"Kafka user {source.kafka_user!r} set without {' and '.join(missing)}")
        source = KafkaLogin(source.kafka_user, Path(source.kafka_password_file), Path(source.bus_ca_file))
    return source.client_kwargs()


@dataclass(frozen=True)
class KafkaAccess:
    """A Kafka cluster and how DIN reaches it: its bootstrap servers and, when it is secure, the bus folder holding
    DIN's CA (``ca.pem``) and the users' passwords (``kafka/``). ``bus_dir`` None: an insecure broker."""

    bootstrap: str
    bus_dir: Path | None = None

    @property
    def secure(self) -> bool:
        return self.bus_dir is not None

    def login(self, user: str) -> KafkaLogin | None:
        """How ``user`` logs in (None on an insecure broker)."""
        if self.bus_dir is None:
            return None
        return KafkaLogin(user, KafkaUsers(Path(self.bus_dir) / KAFKA_DIR).password_file(user),
                          Path(self.bus_dir) / CA_CERT)

    def client_kwargs(self, user: str) -> dict[str, Any]:
        """aiokafka keyword arguments connecting as ``user``."""
        return kafka_client_kwargs(self.login(user))

    def environment(self, user: str) -> dict[str, str]:
        """``DIN_KAFKA_BOOTSTRAP`` and, when secure, ``user``'s login variables."""
        login = self.login(user)
        return {"DIN_KAFKA_BOOTSTRAP": self.bootstrap, **(login.environment() if login else {})}

    def settings(self, user: str) -> dict[str, str]:
        """The same as ``ServiceSettings`` fields (``kafka_bootstrap``, ``kafka_user``, ...): in-process services."""
        login = self.login(user)
        fields = {"kafka_bootstrap": self.bootstrap}
        if login is not None:
            fields |= {"kafka_user": login.user, "kafka_password_file": str(login.password_file),
                       "bus_ca_file": str(login.ca_file)}
        return fields


class AclError(RuntimeError):
    """The broker refused to create an ACL."""


def _create_acls_request(bindings: list[Acl]):
    """One CreateAcls request carrying every binding (aiokafka's own ``CreateAclsRequest`` builds one per request)."""
    from aiokafka.protocol.admin import CreateAclsRequest

    class CreateAclsBatch(CreateAclsRequest):
        def __init__(self) -> None:
            pass

        def build(self, request_struct_class):
            if request_struct_class.API_VERSION < 1:
                raise AclError("the broker does not take prefixed ACLs (CreateAcls v1, Kafka 2.0+)")
            return request_struct_class([(a.resource, a.name, a.pattern, a.principal, ANY_HOST, a.operation, ALLOW)
                                         for a in bindings])

    return CreateAclsBatch()


async def apply_acls(bootstrap: str, bus_dir: Path, acls: Iterable[Acl] | None = None,
                     *, request_timeout_ms: int = 10_000) -> int:
    """Create ``acls`` (default ``acl_table()``) on the broker as its super user; return how many.

    aiokafka 0.14's ``AIOKafkaAdminClient`` has no ``create_acls``, but its protocol module carries Kafka's
    CreateAcls request (v1 has prefixed patterns), which the plain ``AIOKafkaClient`` sends; all bindings go in
    one request. Creating a binding that exists is a no-op, so this may run on every start.
    """
    from aiokafka.client import AIOKafkaClient

    bindings = acl_table() if acls is None else list(acls)
    users = KafkaUsers(Path(bus_dir) / KAFKA_DIR)
    login = KafkaLogin(BROKER_USER, users.password_file(BROKER_USER), Path(bus_dir) / CA_CERT)
    client = AIOKafkaClient(bootstrap_servers=bootstrap, request_timeout_ms=request_timeout_ms,
                            **login.client_kwargs())
    try:
        await client.bootstrap()
        response = await client.send(client.get_random_node(), _create_acls_request(bindings))
    finally:
        await client.close()
    for acl, (code, message) in zip(bindings, response.creation_responses):
        if code:
            raise AclError(f"Kafka refused ACL {acl}: error {code} {message or ''}".strip())
    return len(bindings)


def access_rows(acls: Iterable[Acl] | None = None) -> Mapping[str, dict[str, list[str]]]:
    """Per user, the operations it holds and on what (``TOPIC din.v1.x*``, ``GROUP din-telemetry*``): the access
    table of the docs."""
    rows: dict[str, dict[str, list[str]]] = {}
    for acl in acl_table() if acls is None else acls:
        star = "*" if acl.pattern == Pattern.PREFIXED else ""
        rows.setdefault(acl.user, {}).setdefault(acl.operation.name, []).append(
            f"{acl.resource.name} {acl.name}{star}")
    return rows
