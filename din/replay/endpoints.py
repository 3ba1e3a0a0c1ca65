"""Where the recorded data and the running stack are: explicit options first, else the stack ``din up`` started.

Kafka is read with the command's own Kafka user (``replay``, ``report``), whose password and DIN's CA are in the
bus folder (``--bus-dir``, default the running stack's); a stack started ``--insecure`` has none. A stack ``din up``
did not start (docker compose) is named with ``--kafka`` and ``--keys-dir`` (``din.commands.target``): its bus
folder, credentials and topology then come from that key folder.
"""

from __future__ import annotations

import argparse
import contextlib
from dataclasses import dataclass
from pathlib import Path

from din.commands.target import add_keys_dir_argument, env_kafka, env_nats_url, given_state, keys_dir_of
from din.replay.reader import RecordRange, ReplayError, parse_offsets, parse_time
from din.shared.bus.connect import nats_options
from din.shared.bus.kafka import KafkaAccess
from din.shared.bus.nats_auth import NATS_DIR, NatsAuthority
from din.shared.bus.tls import CA_CERT
from din.shared.security.keyfiles import KEYSTORE_FILE, KeyStore
from din.shared.security.records import RecordVerifier
from din.shared.topology import Topology, TopologyError, load_topology
from din.stack.launcher import DEFAULT_DIN_DIR, STATE_FILE_NAME, read_state

DEFAULT_SINCE = "15m"


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    """Options naming the Kafka to read and the range of records, shared by replay and report."""
    parser.add_argument("--since", help=f"start of the time range: a duration ago (15m, 2h, 90s), epoch s/ms or "
                                        f"ISO-8601 (default {DEFAULT_SINCE} ago unless --offsets is given)")
    parser.add_argument("--until", help="end of the time range, exclusive, same forms as --since (default: now)")
    parser.add_argument("--offsets", help="offset range of the requests topic: START-END for every partition, or "
                                          "P:START-END[,P:START-END]; END exclusive and optional")
    parser.add_argument("--kafka", default=env_kafka(),
                        help="Kafka bootstrap servers (default $DIN_STACK_KAFKA, else the running stack's)")
    parser.add_argument("--bus-dir", type=Path, help="bus folder with DIN's CA and the Kafka users' passwords "
                                                     "(default: the running stack's; none for an --insecure stack)")
    add_keys_dir_argument(parser)
    parser.add_argument("--topic-scope", help="topic scope the stack recorded under (DIN_TOPIC_SCOPE), if any")
    parser.add_argument("--din-dir", type=Path, default=DEFAULT_DIN_DIR,
                        help="folder holding stack.json of the running stack (default: %(default)s)")


def record_range(args: argparse.Namespace) -> RecordRange:
    """The range the options ask for; ``ReplayError`` when it cannot be read."""
    offsets = parse_offsets(args.offsets) if args.offsets else None
    since_text = args.since if args.since is not None else (None if offsets else DEFAULT_SINCE)
    since = parse_time(since_text) if since_text is not None else None
    until = parse_time(args.until) if args.until is not None else None
    if since is not None and until is not None and until <= since:
        raise ReplayError("--until must be later than --since")
    return RecordRange(since_ms=since, until_ms=until, offsets=offsets)


@dataclass
class Endpoints:
    """Addresses and files of the recording and of the stack to replay against."""

    kafka: str
    nats: str | None
    credentials: Path | None
    topology: Path | None
    kafka_bus_dir: Path | None = None
    keys_dir: Path | None = None

    def record_verifier(self) -> RecordVerifier | None:
        """A verifier of the records' signatures with the sites' public identities from the key folder's key
        store and, for the records earlier runs left in Kafka, those of the runs beside it (``<din-dir>/runs/*``);
        None when there is none (an insecure stack, no key folder: the records are read unverified)."""
        if self.keys_dir is None or not (self.keys_dir / KEYSTORE_FILE).is_file():
            return None
        try:
            current = KeyStore.load(self.keys_dir / KEYSTORE_FILE).publics
        except ValueError as exc:
            raise ReplayError(str(exc)) from None
        former = []
        for store in sorted(self.keys_dir.parent.parent.glob(f"*/{self.keys_dir.name}/{KEYSTORE_FILE}")):
            if store.parent != self.keys_dir:
                with contextlib.suppress(ValueError):
                    former.append(KeyStore.load(store).publics)
        return RecordVerifier(current, former=former)

    def kafka_kwargs(self, user: str) -> dict:
        """aiokafka keyword arguments reading as ``user`` (empty against an insecure Kafka)."""
        return KafkaAccess(self.kafka, self.kafka_bus_dir).client_kwargs(user)

    def nats_options(self, user: str) -> dict:
        """nats-py connect options of NATS user ``user`` at the hub (empty against an insecure stack); the bus
        folder holds the NATS users beside the Kafka ones."""
        if self.kafka_bus_dir is None or self.nats is None:
            return {}
        hub = self.load_topology().hub.name
        return nats_options(self.nats, hub, NatsAuthority(self.kafka_bus_dir / NATS_DIR).creds_path(user),
                            self.kafka_bus_dir / CA_CERT)

    def load_topology(self, override: Path | None = None) -> Topology:
        path = override or self.topology
        if path is None:
            raise ReplayError("no topology: pass --topology (the stack's is used when one is running)")
        try:
            return load_topology(path)
        except TopologyError as exc:
            raise ReplayError(str(exc)) from None


def resolve_endpoints(args: argparse.Namespace) -> Endpoints:
    """Options, falling back to the key folder's (``--keys-dir``) or the running stack's state file."""
    keys_dir = getattr(args, "keys_dir", None)
    if keys_dir is not None:
        try:
            state = given_state(keys_dir, nats_url=getattr(args, "nats", None) or env_nats_url(),
                                kafka=getattr(args, "kafka", None))
        except Exception as exc:  # noqa: BLE001 - StackError or a bad topology: one line for the user
            raise ReplayError(str(exc)) from None
    else:
        state = read_state(Path(args.din_dir) / STATE_FILE_NAME) or {}
    urls = state.get("urls") or {}
    kafka = getattr(args, "kafka", None) or urls.get("kafka")
    if not kafka:
        raise ReplayError("no Kafka address: start the stack (`din up`) or pass --kafka HOST:PORT (and --keys-dir)")
    topology = getattr(args, "topology", None) or (Path(state["topology"]) if state.get("topology") else None)
    nats_url = getattr(args, "nats", None)
    if nats_url is None and urls.get("nats"):
        by_site = urls["nats"]
        hub = None
        if topology is not None:
            try:
                hub = load_topology(topology).hub.name
            except TopologyError:
                hub = None
        nats_url = by_site.get(hub) if hub in by_site else next(iter(by_site.values()))
    credentials = getattr(args, "credentials", None)
    if credentials is None and state.get("run_dir"):
        candidate = Path(state["run_dir"]) / "credentials.json"
        credentials = candidate if candidate.exists() else None
    bus_dir = getattr(args, "bus_dir", None)
    if bus_dir is None and (keys_dir is not None or not getattr(args, "kafka", None)) and state.get("kafka_bus_dir"):
        bus_dir = Path(state["kafka_bus_dir"])
    keys = Path(keys_dir) if keys_dir is not None else (keys_dir_of(state) if state.get("run_dir")
                                                       or state.get("keys_dir") else None)
    return Endpoints(kafka=kafka, nats=nats_url, credentials=credentials, topology=topology, kafka_bus_dir=bus_dir,
                     keys_dir=keys)
