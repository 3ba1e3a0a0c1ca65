"""``din replay``: re-drive recorded requests against the running stack and compare; ``--what-if`` runs offline."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import nats

from din.client import DinClient
from din.replay.compare import Comparison, recorded_outcomes
from din.replay.driver import ReplayDriver
from din.replay.endpoints import add_source_arguments, record_range, resolve_endpoints
from din.replay.outcomes import replay_request_id
from din.replay.reader import ReplayError, quiet_kafka_client
from din.replay.recorded import load_window
from din.replay.whatif import POLICIES, what_if
from din.shared.bus.connect import nats_servers
from din.shared.bus.permissions import OPERATOR_USER, tenant_user
from din.shared.catalog import ModelCatalog
from din.shared.credentials import issue_token, read_credentials
from din.shared.naming import Topics
from din.shared.recording import load_replay_keys
from din.shared.security import PrincipalKeys, key_file, tenant_principal
from din.stack.launcher import DEFAULT_MODEL_REPO

EXIT_ERROR = 2
KAFKA_USER = "replay"
REPLAY_TOPICS = (Topics.ADMISSION_DECISIONS, Topics.SCHEDULING_DECISIONS, Topics.COMPLETIONS)
WHAT_IF_TOPICS = (Topics.CLASSIFICATIONS, Topics.SCHEDULING_DECISIONS, Topics.HEARTBEATS, Topics.COMPLETIONS)
"""What the what-if rebuilds the live scheduler's facts from: the workload classes, its decisions (the link round
trips it priced, who decided, the mode), the executors' heartbeats and the completions it heard."""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``replay``."""
    replay = subparsers.add_parser(
        "replay",
        help="re-drive recorded requests against the running stack and compare with the recording",
        description="Reads a time or offset range of recorded requests from Kafka, sends them again at the "
        "recorded pace times --speed, then compares request counts and tenant mix, latency, errors, and where "
        "and by which model each was served. Sealed payloads need --key-file; without it the replay uses the "
        "metadata only (zero inputs of the recorded shape) and says so. With --what-if POLICY nothing is sent: "
        "the scheduler's logic runs offline on the recorded traffic and telemetry instead: each request placed by the "
        "scheduler that placed it live, with the link round trips and load it decided on, so the live policy "
        "reproduces the live placement (the report says how many of them) and another policy shows what changes.",
    )
    add_source_arguments(replay)
    replay.add_argument("--speed", type=float, default=1.0,
                        help="pace factor: 2 replays twice as fast as recorded, 0.5 half as fast, 0 as fast as "
                             "possible (default %(default)s)")
    replay.add_argument("--concurrency", type=int, default=256, help="most requests in flight at once")
    replay.add_argument("--limit", type=int, help="replay at most this many requests (the first ones)")
    replay.add_argument("--key-file", type=Path, help="SRE key file to decrypt sealed recorded payloads")
    replay.add_argument("--nats", help="NATS URL of the stack to replay against (default: the running stack's hub)")
    replay.add_argument("--credentials", type=Path, help="tenants' credentials file (default: the running stack's)")
    replay.add_argument("--model-repo", type=Path, default=DEFAULT_MODEL_REPO,
                        help="model repository, for input shapes of metadata-only replays and the parts of "
                             "multi-stage jobs a what-if plans (default: %(default)s)")
    replay.add_argument("--what-if", choices=POLICIES, metavar="POLICY",
                        help=f"run the scheduler offline under POLICY instead of replaying ({', '.join(POLICIES)})")
    replay.add_argument("--topology", type=Path, help="the recorded topology (default: the running stack's)")
    replay.add_argument("--what-if-topology", type=Path, help="a different topology for --what-if")
    replay.add_argument("--json", type=Path, help="also write the comparison as JSON to this file")
    replay.add_argument("--no-progress", action="store_true", help="no progress bar")
    replay.set_defaults(handler=cmd_replay)


def cmd_replay(args: argparse.Namespace) -> int:
    quiet_kafka_client()
    try:
        return asyncio.run(run_replay(args))
    except ReplayError as exc:
        print(f"din: error: {exc}", file=sys.stderr)
        return EXIT_ERROR


async def tenant_clients(url: str, keys_dir: Path, tokens: dict[str, str],
                         options: Callable[[str], dict] = lambda user: {}) -> dict[str, DinClient]:
    """Clients that seal like the tenants themselves, for every tenant whose key file the stack holds.

    Tenants without one are replayed as plain NATS requests, which admission accepts only for tenants
    the topology lets send in clear.
    """
    clients = {}
    for tenant, token in tokens.items():
        path = key_file(keys_dir, tenant_principal(tenant))
        if path.exists():
            clients[tenant] = await DinClient.connect(url, tenant, token, PrincipalKeys.load(path),
                                                      options=options(tenant_user(tenant)))
    return clients


async def run_replay(args: argparse.Namespace) -> int:
    if args.what_if is None and args.what_if_topology is not None:
        raise ReplayError("--what-if-topology needs --what-if POLICY")
    endpoints = resolve_endpoints(args)
    rng = record_range(args)
    keyring = None
    if args.key_file is not None:
        try:
            keyring = load_replay_keys(args.key_file)
        except ValueError as exc:
            raise ReplayError(str(exc)) from None
    began = time.perf_counter()
    bases = WHAT_IF_TOPICS if args.what_if else REPLAY_TOPICS
    window = await load_window(endpoints.kafka, rng, scope=args.topic_scope, keyring=keyring, limit=args.limit,
                               bases=bases, client_kwargs=endpoints.kafka_kwargs(KAFKA_USER),
                               verifier=endpoints.record_verifier())
    read_s = time.perf_counter() - began
    records = sum(s.records for s in window.stats)
    print(f"read {len(window.requests)} recorded requests ({rng.describe()}) and {records - len(window.requests)} "
          f"events in {read_s:.2f}s ({window.read_rate():,.0f} records/s decoded)", flush=True)
    for line in window.skipped_summary():
        print(f"  {line}", flush=True)

    if args.what_if is not None:
        recorded = endpoints.load_topology()
        alternative = endpoints.load_topology(args.what_if_topology) if args.what_if_topology else None
        catalog = ModelCatalog.from_repository(args.model_repo) if args.model_repo.is_dir() else None
        report = what_if(window, recorded, args.what_if, alternative, catalog=catalog)
        print(f"\nwhat-if {args.what_if} on {report.topology_name} (offline; the live stack was not touched)\n")
        print(report.text())
        _write_json(args.json, report.as_dict())
        return 0

    sealed_left = sum(r.sealed for r in window.requests)
    notes = list(window.skipped_summary())
    if sealed_left:
        why = "no --key-file was given" if keyring is None else "the key did not open them"
        note = (f"{sealed_left} recorded payloads are sealed and {why}: replaying METADATA ONLY for them "
                "(zero inputs of the recorded shape); load and routing are reproduced, results are not")
        print(f"  {note}", flush=True)
        notes.append(note)
    if endpoints.nats is None:
        raise ReplayError("no NATS address: start the stack (`din up`) or pass --nats URL")
    if endpoints.credentials is None:
        raise ReplayError("no tenant credentials: pass --credentials (the running stack's are used by default)")
    try:
        secrets = read_credentials(endpoints.credentials)
    except ValueError as exc:
        raise ReplayError(str(exc)) from None
    span_s = (window.requests[-1].meta.received_ms - window.requests[0].meta.received_ms) / 1000.0
    ttl = max(3600.0, span_s / max(args.speed, 1e-3) + 600.0) if args.speed > 0 else 3600.0
    tokens = {tenant: issue_token(tenant, secret, ttl_s=ttl) for tenant, secret in secrets.items()}
    try:
        nc = await nats.connect(nats_servers(endpoints.nats), connect_timeout=3, max_reconnect_attempts=3,
                                allow_reconnect=True, name="din-replay", **endpoints.nats_options(OPERATOR_USER))
    except Exception as exc:  # noqa: BLE001 - every connection failure is one line
        raise ReplayError(
            f"cannot reach NATS at {endpoints.nats} ({exc.__class__.__name__}): is the stack running?"
        ) from None
    clients = await tenant_clients(endpoints.nats, endpoints.credentials.parent / "keys", tokens,
                                   endpoints.nats_options)
    try:
        driver = ReplayDriver(nc, tokens, speed=args.speed, concurrency=args.concurrency, model_repo=args.model_repo,
                              progress=not args.no_progress, clients=clients)
        await driver.preflight()
        pace = "as fast as possible" if args.speed == 0 else f"{args.speed:g}x the recorded pace"
        print(f"replaying {len(window.requests)} requests ({span_s:.1f}s recorded) at {pace} "
              f"to {endpoints.nats} as run {driver.run_id} ...", flush=True)
        result = await driver.run(window.requests)
    finally:
        await nc.drain()
        for client in clients.values():
            await client.close()
    if result.late:
        notes.append(f"{result.late} request(s) left more than 50 ms behind their recorded time "
                     f"(raise --concurrency or lower --speed)")
    for rid, why in list(result.unsendable.items())[:5]:
        notes.append(f"not sent: {rid}: {why}")
    if len(result.unsendable) > 5:
        notes.append(f"... and {len(result.unsendable) - 5} more not sent")
    comparison = Comparison(recorded_outcomes(window), result.outcomes, notes)
    print(f"\nreplayed {len(result.outcomes)} requests in {result.wall_s:.1f}s ({result.rate:,.0f} req/s); "
          f"replay ids start with {replay_request_id(result.run_id, '')}\n")
    print(comparison.text())
    _write_json(args.json, {"run_id": result.run_id, **comparison.as_dict()})
    return 0


def _write_json(path: Path | None, data: dict) -> None:
    if path is not None:
        path.write_text(json.dumps(data, indent=2, default=str) + "\n")
        print(f"\nwrote {path}")
