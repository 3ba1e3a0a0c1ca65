"""``din keys``: create key files, and rotate, revoke or inspect the keys of the running stack.

``init`` writes what ``din up`` writes for each run (master key, key store, one key
file per principal). ``rotate``, ``revoke`` and ``status`` send a command signed with
the run's ``operator`` key file to its key manager. ``export-audit`` writes the
audit data keys as a replay key file, for opening payloads recorded to Kafka.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from din.commands.target import add_stack_arguments, keys_dir_of, nats_of, stack_state
from din.shared.bus.connect import nats_servers
from din.shared.bus.tls import DEFAULT_HOSTS
from din.shared.contracts.keys import KeyAction, KeyCommandResultV1
from din.shared.errors import DIN_ERROR_HEADER, ErrorReplyV1
from din.shared.naming import Subjects
from din.shared.recording import write_replay_keys
from din.shared.security import (
    AUDIT,
    KEYMANAGER,
    KEYSTORE_FILE,
    OPERATOR,
    KeyAgent,
    KeyStore,
    PrincipalKeys,
    init_keys,
    key_file,
    new_key_command,
    sign_key_command,
)
from din.shared.topology import load_topology
from din.stack.bus import BusCredentials
from din.stack.launcher import (
    DEFAULT_TOPOLOGY,
    format_table,
    service_instances,
)
from din.stack.processes import StackError

COMMAND_TIMEOUT_S = 30.0


def register(subparsers: argparse._SubParsersAction) -> None:
    keys = subparsers.add_parser("keys", help="create key files; rotate, revoke or inspect the running stack's keys")
    actions = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)

    init = actions.add_parser("init", help="write a master key, a key store and one key file per principal")
    init.add_argument("--topology", type=Path, default=DEFAULT_TOPOLOGY)
    init.add_argument("--out", type=Path, required=True, help="folder for the key files (created, mode 0600 files)")
    init.add_argument("--host", action="append", default=[],
                      help="SITE=NAME: a name or address that site's NATS certificate also covers (repeat)")
    init.set_defaults(handler=cmd_init)

    show = actions.add_parser("show", help="list the principals of a key store and their public keys")
    add_stack_arguments(show, nats=False)
    show.set_defaults(handler=cmd_show)

    for name, text in (("status", "current data key versions and revocations"),
                       ("rotate", "rotate data keys now (two-phase; old versions stay accepted for the grace)"),
                       ("revoke", "revoke a principal: refuse it and rotate every key it held")):
        action = actions.add_parser(name, help=text)
        add_stack_arguments(action)
        if name == "rotate":
            action.add_argument("--reader", help="the one reader to rotate, e.g. tenant-acme (default: all)")
            action.add_argument("--grace", type=float, help="seconds old versions stay accepted")
        if name == "revoke":
            action.add_argument("principal", help="e.g. site-branch")
        action.set_defaults(handler=cmd_command)

    export = actions.add_parser("export-audit", help="write the audit data keys as a replay key file")
    export.add_argument("--out", type=Path, required=True)
    add_stack_arguments(export)
    export.set_defaults(handler=cmd_export_audit)


def _running(args: argparse.Namespace) -> tuple[Path, str, dict]:
    """Key folder, hub NATS URL and the operator's connect options of the running stack (or of the one
    ``--nats-url`` and ``--keys-dir`` name: ``din.commands.target``)."""
    state = stack_state(args)
    hub = load_topology(Path(state["topology"])).hub.name
    url, options = nats_of(state, hub)
    return keys_dir_of(state), url, options


def cmd_init(args: argparse.Namespace) -> int:
    topology = load_topology(args.topology)
    store = init_keys(args.out, topology)
    hosts = server_hosts(topology, args.host)
    instances = [(i.service, i.site, i.name, i.instance) for i in service_instances(topology)]
    bus = BusCredentials.provision(args.out / "bus", topology, instances, hosts=hosts)
    print(f"wrote keys of {len(store.publics)} principals to {args.out}: give each service only its own key file")
    print(f"wrote the bus credentials to {bus.root}: CA, server certificates, NATS users, Kafka users")
    return 0


def server_hosts(topology, given: list[str]) -> dict[str, tuple[str, ...]]:
    """The names each site's NATS certificate covers: loopback, plus ``SITE=NAME`` for that site's server only
    (a leaf's key must not pass for the hub's)."""
    hosts = {site.name: list(DEFAULT_HOSTS) for site in topology.sites}
    for item in given:
        site, sep, name = item.partition("=")
        if not sep or site not in hosts or not name:
            raise StackError(f"--host {item!r}: use SITE=NAME with SITE one of {', '.join(hosts)}")
        hosts[site].append(name)
    return {site: tuple(names) for site, names in hosts.items()}


def cmd_show(args: argparse.Namespace) -> int:
    keys_dir = keys_dir_of(stack_state(args))
    try:
        store = KeyStore.load(keys_dir / KEYSTORE_FILE)
    except ValueError as exc:
        raise StackError(str(exc)) from None
    rows = [[name, public.to_dict()["x25519"][:16] + "...", public.to_dict()["ed25519"][:16] + "...",
             "store" if name == KEYMANAGER else str(key_file(keys_dir, name).name)]
            for name, public in sorted(store.publics.items())]
    print(format_table(["PRINCIPAL", "X25519", "ED25519", "KEY FILE"], rows))
    return 0


async def send_command(url: str, operator: PrincipalKeys, action: KeyAction, options: dict | None = None,
                       **fields) -> KeyCommandResultV1:
    """Sign and send one command to the key manager; raise ``StackError`` with its answer on failure."""
    import nats

    body, headers = sign_key_command(operator, new_key_command(action, **fields))
    nc = await nats.connect(nats_servers(url), connect_timeout=5, max_reconnect_attempts=1, **(options or {}))
    try:
        reply = await nc.request(Subjects.control("keymanager", KEYMANAGER), body, headers=headers,
                                 timeout=COMMAND_TIMEOUT_S)
    finally:
        await nc.close()
    if reply.headers and DIN_ERROR_HEADER in reply.headers:
        error = ErrorReplyV1.model_validate_json(reply.data).error
        raise StackError(f"key manager refused: {error.code.value}: {error.message}")
    return KeyCommandResultV1.model_validate_json(reply.data)


def cmd_command(args: argparse.Namespace) -> int:
    keys_dir, url, options = _running(args)
    operator = PrincipalKeys.load(key_file(keys_dir, OPERATOR))
    fields = {}
    if args.keys_command == "rotate":
        fields = {"reader": args.reader, "grace_s": args.grace}
    elif args.keys_command == "revoke":
        fields = {"principal": args.principal}
    result = asyncio.run(send_command(url, operator, KeyAction(args.keys_command), options, **fields))
    if result.message:
        print(result.message)
    print(format_table(["READER", "VERSION"], [[r, str(v)] for r, v in sorted(result.versions.items())]))
    print(f"revoked: {', '.join(result.revoked) or 'none'}; rotations since start: {result.rotations}")
    if result.bucket != "intact":
        print(f"WARNING: keys bucket damaged ({result.bucket}): a process starting now may not see the keys and "
              f"revocations above until the key manager has repaired it (repairs so far: {result.bucket_repairs})")
        return 1 if args.keys_command == "status" else 0
    print(f"keys bucket: intact (repairs so far: {result.bucket_repairs})")
    return 0


async def audit_keys(url: str, audit: PrincipalKeys, options: dict | None = None):
    """Every audit data key version the key manager distributes now."""
    import nats

    nc = await nats.connect(nats_servers(url), connect_timeout=5, max_reconnect_attempts=1, **(options or {}))
    agent = KeyAgent(audit)
    try:
        await agent.watch(nc, ready=lambda a: a.ready_for([AUDIT]), timeout_s=COMMAND_TIMEOUT_S)
    finally:
        await agent.stop()
        await nc.close()
    return [agent.keyring.get(reader, version) for reader, version in sorted(agent.deks)]


def cmd_export_audit(args: argparse.Namespace) -> int:
    keys_dir, url, options = _running(args)
    deks = asyncio.run(audit_keys(url, PrincipalKeys.load(key_file(keys_dir, AUDIT)), options))
    write_replay_keys(args.out, deks)
    print(f"wrote {len(deks)} audit data key versions to {args.out} (keep it secret: it opens recorded payloads)")
    return 0
