"""``din compose``: regenerate docker-compose.yml and its configs from the default topology, or check them; and
the two one-shot steps the compose file runs in containers (``init``, ``prepare-kafka``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from din.compose import (
    CONTAINER_BUS,
    CONTAINER_RUN,
    INIT_DIR,
    drifted,
    init_compose,
    prepare_compose_kafka,
    write_compose,
)
from din.generated import check_or_write
from din.stack.launcher import DEFAULT_TOPOLOGY


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``compose``."""
    parser = subparsers.add_parser(
        "compose",
        help="generate docker-compose.yml and its NATS configs from the default topology",
        description="Write docker-compose.yml, ops/compose/nats/<site>.conf and ops/compose/kafka/start.sh from "
        "ops/topology/default.yaml and the environment `din up` gives each service. With --check, write "
        "nothing and exit 1 when a committed file differs from a fresh render. `din compose init` and "
        "`din compose prepare-kafka` are the compose file's keys-init and kafka-init steps.",
    )
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 and name drifted files")
    parser.set_defaults(handler=cmd_compose)
    steps = parser.add_subparsers(dest="compose_step", metavar="STEP")

    init = steps.add_parser(
        "init", help="(in the keys-init container) make every key, certificate, user and password, once",
        description="Write the keys `din keys init` writes, the bus (CA, certificates for the compose host names, "
        "NATS and Kafka users), the tenants' credentials, each NATS server's and Kafka's own files and "
        "Grafana's admin password; existing ones are kept. Run as root: each volume is handed to the user "
        "its container runs as.")
    init.add_argument("--topology", type=Path, default=DEFAULT_TOPOLOGY)
    init.add_argument("--run-dir", type=Path, default=Path(CONTAINER_RUN), help="the din-keys volume")
    init.add_argument("--init-dir", type=Path, default=Path(INIT_DIR), help="where the other volumes are mounted")
    init.add_argument("--no-chown", action="store_true", help="leave the files' owners alone (outside a container)")
    init.set_defaults(handler=cmd_init)

    kafka = steps.add_parser(
        "prepare-kafka", help="(in the kafka-init container) apply DIN's ACLs and create the recorded topics")
    kafka.add_argument("--topology", type=Path, default=DEFAULT_TOPOLOGY)
    kafka.add_argument("--bus-dir", type=Path, default=Path(CONTAINER_BUS))
    kafka.add_argument("--kafka", help="bootstrap servers (default: the compose broker)")
    kafka.add_argument("--timeout", type=float, default=120.0)
    kafka.set_defaults(handler=cmd_prepare_kafka)


def cmd_compose(args: argparse.Namespace) -> int:
    """Write the compose files, or with ``--check`` report the ones that drifted."""
    return check_or_write(args.check, "compose file(s)", drifted, write_compose,
                          current="docker-compose.yml and its configs are up to date",
                          command="compose")


def cmd_init(args: argparse.Namespace) -> int:
    for line in init_compose(args.topology, run_dir=args.run_dir, init_dir=args.init_dir, chown=not args.no_chown):
        print(f"din compose init: {line}")
    return 0


def cmd_prepare_kafka(args: argparse.Namespace) -> int:
    prepare_compose_kafka(args.topology, bus_dir=args.bus_dir, bootstrap=args.kafka, timeout_s=args.timeout)
    print("din compose prepare-kafka: ACLs applied, recorded topics created")
    return 0
