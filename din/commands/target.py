"""Which stack an operator command talks to: the one ``din up`` runs, or one named by its URLs and key folder.

By default a command reads the running stack's ``stack.json`` (``--din-dir``). A stack ``din up`` did not start
on this machine — a ``docker compose`` one — is named with ``--nats-url`` (the NATS server to connect to: the
hub's, or ``--site``'s) and ``--keys-dir`` (its key folder, laid out as ``din up`` lays out a run and as the
compose init writes it: ``<run>/keys`` holding the key files and ``bus/``, ``<run>/credentials.json`` and
``<run>/topology.yaml`` beside it; without ``topology.yaml`` the default topology). Commands reading Kafka take
``--kafka``. The three options default to ``DIN_STACK_NATS_URL``, ``DIN_STACK_KEYS_DIR`` and ``DIN_STACK_KAFKA``,
which compose's ``cli`` service sets, so ``docker compose run --rm cli infer --tenant acme`` needs no option.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from din.shared.bus.permissions import OPERATOR_USER
from din.shared.bus.tls import CA_CERT
from din.shared.topology import load_topology
from din.stack.launcher import DEFAULT_DIN_DIR, DEFAULT_TOPOLOGY, STATE_FILE_NAME, read_state, state_nats
from din.stack.processes import StackError

NATS_URL_ENV = "DIN_STACK_NATS_URL"
KEYS_DIR_ENV = "DIN_STACK_KEYS_DIR"
KAFKA_ENV = "DIN_STACK_KAFKA"
CREDENTIALS_FILE = "credentials.json"
TOPOLOGY_FILE = "topology.yaml"


def env_nats_url() -> str | None:
    return os.environ.get(NATS_URL_ENV) or None


def env_kafka() -> str | None:
    return os.environ.get(KAFKA_ENV) or None


def env_keys_dir() -> Path | None:
    value = os.environ.get(KEYS_DIR_ENV)
    return Path(value) if value else None


def add_stack_arguments(parser: argparse.ArgumentParser, *, nats: bool = True, keys_dir: bool = True) -> None:
    """``--nats-url``, ``--keys-dir`` and ``--din-dir``."""
    if nats:
        parser.add_argument("--nats-url", default=env_nats_url(),
                            help="NATS URL of a stack `din up` did not start here, e.g. tls://127.0.0.1:4222 for "
                                 f"docker compose (the hub's, or --site's; needs --keys-dir; default ${NATS_URL_ENV})")
    if keys_dir:
        add_keys_dir_argument(parser)
    parser.add_argument("--din-dir", type=Path, default=DEFAULT_DIN_DIR,
                        help="folder holding stack.json of the stack `din up` runs (default: %(default)s)")


def add_keys_dir_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--keys-dir", type=Path, default=env_keys_dir(),
                        help="key folder of that stack (key files and bus/; credentials.json and topology.yaml "
                             f"beside it), e.g. a copy of compose's /run/din/keys (default ${KEYS_DIR_ENV}, else the "
                             "running stack's)")


def given_state(keys_dir: Path, *, nats_url: str | None = None, site: str | None = None,
                kafka: str | None = None, topology: Path | None = None) -> dict:
    """A ``stack.json``-shaped state for the stack whose key folder is ``keys_dir``, reached at ``nats_url``
    (the server of ``site``, default the hub) and ``kafka``."""
    keys = Path(keys_dir)
    if not keys.is_dir():
        raise StackError(f"key folder {keys} not found (for compose, copy it out of the keys-init container: "
                         "see ops/compose/README.md)")
    run = keys.parent
    if topology is None:
        topology = run / TOPOLOGY_FILE if (run / TOPOLOGY_FILE).exists() else DEFAULT_TOPOLOGY
    nats_urls = {}
    if nats_url:
        nats_urls[site or load_topology(topology).hub.name] = nats_url
    bus = keys / "bus"
    bus_dir = str(bus) if (bus / CA_CERT).exists() else None
    return {
        "run_dir": str(run),
        "keys_dir": str(keys),
        "credentials": str(run / CREDENTIALS_FILE),
        "topology": str(topology),
        "urls": {"nats": nats_urls, "kafka": kafka},
        "bus_dir": bus_dir,
        "kafka_bus_dir": bus_dir,
    }


def stack_state(args: argparse.Namespace, site: str | None = None) -> dict:
    """The state of the stack ``args`` name: ``--keys-dir`` (with ``--nats-url``, ``--kafka``) or the running one."""
    keys_dir = getattr(args, "keys_dir", None)
    nats_url = getattr(args, "nats_url", None)
    if keys_dir is not None:
        return given_state(keys_dir, nats_url=nats_url, site=site, kafka=getattr(args, "kafka", None))
    if nats_url:
        raise StackError("--nats-url needs --keys-dir: the key folder of that stack (its credentials and keys)")
    din_dir = Path(getattr(args, "din_dir", DEFAULT_DIN_DIR))
    state = read_state(din_dir / STATE_FILE_NAME)
    if state is None:
        raise StackError(f"no stack is running from {din_dir}: start one with `din up --detach`, or name another "
                         "(e.g. docker compose) with --nats-url and --keys-dir")
    return state


def keys_dir_of(state: dict) -> Path:
    """The key folder of a state."""
    return Path(state.get("keys_dir") or Path(state["run_dir"]) / "keys")


def credentials_of(state: dict) -> Path:
    """The tenants' credentials file of a state."""
    return Path(state.get("credentials") or Path(state["run_dir"]) / CREDENTIALS_FILE)


def nats_of(state: dict, site: str | None = None, user: str = OPERATOR_USER) -> tuple[str, dict]:
    """``state_nats``, with a plain error when the state has no NATS URL (``--keys-dir`` without ``--nats-url``)."""
    if not state["urls"].get("nats"):
        raise StackError(f"no NATS URL: pass --nats-url (or set {NATS_URL_ENV})")
    return state_nats(state, site, user)
