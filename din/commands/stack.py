"""``din up``, ``din status``, ``din down`` and ``din setup``: the local stack's lifecycle."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from din.commands.links import links_table
from din.commands.models import build_models
from din.shared.bus.connect import nats_servers
from din.shared.contracts.events import HealthV1
from din.shared.naming import Subjects
from din.shared.topology import load_topology
from din.stack.brokers import (
    DEFAULT_KAFKA_LIBS,
    REPO_ROOT,
    KafkaStore,
    nats_server_binary,
    require_java,
    resolve_kafka_jars,
)
from din.stack.launcher import (
    AUTOSCALER,
    DEFAULT_DIN_DIR,
    DEFAULT_MODEL_REPO,
    DEFAULT_TOPOLOGY,
    SCHEDULER_MODES,
    SERVICE_KINDS,
    STATE_FILE_NAME,
    PortPlan,
    Stack,
    forget_data,
    format_table,
    kept_data_dir,
    read_state,
    shown_path,
    state_nats,
    state_processes_alive,
    stop_from_state,
)
from din.stack.processes import StackError, pid_alive
from din.stack.supervision import Supervisor
from din.stack.wan import ToxiproxyClient, toxiproxy_binary

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
EXIT_NOT_RUNNING = 3
EXIT_DEGRADED = 1
SUPERVISING = "supervising"
"""``din up`` prints a line starting with this once the stack is ready and supervised."""
UP_LOG = "up.log"
HEALTH_TIMEOUT_S = 2.0
"""How long ``din status`` waits for the autoscaler's health answer."""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``up``, ``status``, ``down`` and ``setup``."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--din-dir",
        type=Path,
        default=DEFAULT_DIN_DIR,
        help="folder holding runs/ and stack.json (default: %(default)s)",
    )

    up = subparsers.add_parser(
        "up",
        parents=[common],
        help="start the whole network on this machine",
        description="Start NATS (hub and one leaf per edge site, each leaf reaching the hub over a WAN link "
        "through Toxiproxy), Kafka and every service, each its own process; wait until all answer their health "
        "subject, then supervise them: a process that exits is restarted with backoff. In the foreground, Ctrl-C "
        "stops everything; with --detach a background supervisor keeps running until `din down`.",
    )
    up.add_argument("--topology", type=Path, default=DEFAULT_TOPOLOGY, help="topology file (default: %(default)s)")
    up.add_argument("--mode", choices=SCHEDULER_MODES, default="centralized", help="scheduling mode")
    up.add_argument("--port-offset", type=int, default=0, help="add N to every port (run beside another stack)")
    up.add_argument("--detach", action="store_true", help="return once ready; stop later with `din down`")
    up.add_argument("--no-wan", action="store_true", help="plain loopback links to the hub (no Toxiproxy)")
    up.add_argument("--background", action="store_true", help=argparse.SUPPRESS)
    up.add_argument(
        "--services",
        default="all",
        help=f"comma-separated service kinds to run ({', '.join(SERVICE_KINDS)}), 'all', or 'none' for brokers only",
    )
    up.add_argument("--ready-timeout", type=float, default=60.0, help="seconds each service has to become ready")
    up.add_argument("--fresh", action="store_true",
                    help="delete the Kafka data kept from earlier runs (<din-dir>/data) and start empty")
    up.add_argument("--insecure", action="store_true",
                    help="debugging only: brokers without authentication or TLS (anyone who reaches a port may "
                    "read and write everything)")
    up.set_defaults(handler=cmd_up)

    status = subparsers.add_parser(
        "status", parents=[common], help="show what the running stack runs where, restarts and links",
        description="Exit code: 0 all processes running, 1 some stopped, 3 no stack.",
    )
    status.set_defaults(handler=cmd_status)

    down = subparsers.add_parser("down", parents=[common], help="stop the running stack")
    down.set_defaults(handler=cmd_down)

    setup = subparsers.add_parser(
        "setup", help="fetch Kafka's jars and build the model zoo (idempotent)",
        description="Check nats-server, toxiproxy-server and Java, resolve Kafka's jars from Maven Central into "
        ".din/kafka/libs, and build the model zoo into .din/models.",
    )
    setup.set_defaults(handler=cmd_setup)


def parse_services(value: str) -> list[str] | None:
    """``all`` → None (every service), ``none`` → [] (brokers only), else the listed kinds."""
    value = value.strip()
    if value == "all":
        return None
    if value == "none":
        return []
    kinds = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [k for k in kinds if k not in SERVICE_KINDS]
    if unknown:
        raise StackError(f"unknown service {unknown[0]!r} in --services: choose from {', '.join(SERVICE_KINDS)}")
    return kinds


@contextlib.contextmanager
def stop_signals_interrupt():
    """Turn the first SIGINT/SIGTERM/SIGHUP into KeyboardInterrupt and ignore later ones, so clean-up finishes."""

    def interrupt(signum, frame):
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, interrupt) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def cmd_up(args: argparse.Namespace) -> int:
    topology = load_topology(args.topology)
    if args.detach:
        return _up_detached(args)
    if args.fresh and (forgotten := forget_data(args.din_dir)) is not None:
        print(f"deleted the data kept in {shown_path(forgotten)}", flush=True)
    stack = Stack(
        topology,
        topology_file=args.topology,
        ports=PortPlan().offset(args.port_offset),
        din_dir=args.din_dir,
        mode=args.mode,
        services=parse_services(args.services),
        ready_timeout_s=args.ready_timeout,
        wan=not args.no_wan,
        insecure=args.insecure,
        data_dir=kept_data_dir(args.din_dir),
    )
    stack.supervisor_pid = os.getpid()
    begun = time.monotonic()
    links = "WAN links" if stack.wan else "loopback links"
    with stop_signals_interrupt():
        print(f"starting DIN ({topology.name}, {args.mode}, {links}) ...", flush=True)
        started = False
        try:
            stack.start()
            started = True
            print(stack.describe())
            print(f"ready in {time.monotonic() - begun:.1f}s; run folder {shown_path(stack.run_dir)}", flush=True)
            if args.background:
                print(f"{SUPERVISING} in the background (pid {os.getpid()}): `din status` shows it, "
                      "`din down` stops it", flush=True)
            else:
                print(f"{SUPERVISING}: a process that exits is restarted; press Ctrl-C to stop", flush=True)
            Supervisor(stack, report=lambda line: print(line, file=sys.stderr, flush=True)).run()
        except KeyboardInterrupt:
            if not started:
                raise
            print("\nstopping ...", flush=True)
            return 0
        finally:
            # Also after a failed or interrupted start: stop() is idempotent and leaves nothing behind.
            _stop_quietly(stack)
            if started:
                print("stopped", flush=True)


def _background_argv(args: argparse.Namespace) -> list[str]:
    """The ``din up`` that runs and supervises the stack for ``din up --detach``."""
    argv = [
        sys.executable, "-m", "din.cli", "up", "--background",
        "--topology", str(Path(args.topology).resolve()),
        "--din-dir", str(Path(args.din_dir).resolve()),
        "--mode", args.mode,
        "--port-offset", str(args.port_offset),
        "--services", args.services,
        "--ready-timeout", str(args.ready_timeout),
    ]
    flags = [flag for flag, on in (("--no-wan", args.no_wan), ("--insecure", args.insecure), ("--fresh", args.fresh))
             if on]
    return [*argv, *flags]


def _up_detached(args: argparse.Namespace) -> int:
    """Start a background ``din up`` in its own session, echo its output until it supervises the ready stack.

    Its output goes on into ``<din-dir>/up.log``. If it fails to start, its error
    is shown and nothing is left running.
    """
    state = read_state(args.din_dir / STATE_FILE_NAME)
    if state is not None and state_processes_alive(state):
        raise StackError(f"a stack is already running from {state.get('run_dir')}: run `din down` first")
    args.din_dir.mkdir(parents=True, exist_ok=True)
    log_path = args.din_dir / UP_LOG
    position = log_path.stat().st_size if log_path.exists() else 0
    with open(log_path, "ab") as log:
        child = subprocess.Popen(
            _background_argv(args), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO_ROOT,
            start_new_session=True,
        )
    pending = ""
    with stop_signals_interrupt():
        try:
            while True:
                exited = child.poll() is not None
                with open(log_path, "rb") as log:
                    log.seek(position)
                    chunk = log.read().decode(errors="replace")
                position += len(chunk.encode())
                pending += chunk
                *lines, pending = pending.split("\n")
                for line in lines:
                    print(line, file=sys.stderr if line.startswith("din: error") else sys.stdout, flush=True)
                    if line.startswith(SUPERVISING):
                        print(f"detached: output goes on in {shown_path(log_path)}", flush=True)
                        return 0
                if exited:
                    if pending:
                        print(pending, file=sys.stderr, flush=True)
                    return child.returncode or 2
                time.sleep(0.1)
        except KeyboardInterrupt:
            child.send_signal(signal.SIGTERM)
            child.wait(timeout=60)
            raise


def _stop_quietly(stack: Stack) -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    stack.stop()


def _process_state(entry: dict, alive_pids: set[int]) -> str:
    if entry["pid"] in alive_pids:
        return "running"
    return "GAVE UP" if entry.get("given_up") else "STOPPED"


def cmd_status(args: argparse.Namespace) -> int:
    state_file = args.din_dir / STATE_FILE_NAME
    state = read_state(state_file)
    if state is None:
        print(f"no stack running (no {shown_path(state_file)})")
        return EXIT_NOT_RUNNING
    alive_pids = {p["pid"] for p in state_processes_alive(state)}
    sup = state.get("supervisor")
    how = f"supervised by pid {sup['pid']}" if sup else "unsupervised"
    print(f"run {shown_path(state['run_dir'])} ({state.get('mode')}, {how}), started {state.get('started_at')}")
    rows = [
        [p["site"], p["name"], str(p["pid"]), _process_state(p, alive_pids), str(p.get("restarts", 0)),
         p["address"], shown_path(p["log"])]
        for p in state.get("processes", [])
    ]
    print(format_table(["SITE", "PROCESS", "PID", "STATE", "RESTARTS", "ADDRESS", "LOG"], rows))
    scaler = next((p for p in state.get("processes", []) if p["name"] == AUTOSCALER), None)
    if scaler is not None and scaler["pid"] in alive_pids:
        print("\n".join(autoscaler_lines(ask_autoscaler(state, scaler["site"]))))
    url = (state.get("urls") or {}).get("toxiproxy")
    if url:
        try:
            print(links_table(state, ToxiproxyClient(url, timeout_s=2.0)))
        except StackError as exc:
            print(f"links: {exc}")
    else:
        print("links: plain loopback (started with --no-wan)")
    if state.get("kafka_data"):
        print(kept_data_line(Path(state["kafka_data"])))
    stopped = [r[1] for r in rows if r[3] != "running"]
    if sup and not pid_alive(sup["pid"]):
        stopped.append("supervisor")
    if stopped:
        print(f"{len(stopped)} stopped ({', '.join(stopped)}): `din down` cleans up, then `din up`")
        return EXIT_DEGRADED
    return 0


def pool_rows(pools: str) -> list[list[str]]:
    """``[site, pool, ready, wanted]`` rows of the autoscaler's ``pools`` health detail
    (``cloud/small:1/2,rented/small:0/0``); entries that do not parse are shown whole."""
    rows = []
    for entry in filter(None, pools.split(",")):
        name, _, sizes = entry.rpartition(":")
        site, _, pool = name.partition("/")
        ready, _, wanted = sizes.partition("/")
        rows.append([site, pool, ready, wanted] if site and pool and ready and wanted else [entry, "?", "?", "?"])
    return rows


def autoscaler_lines(health: HealthV1 | str) -> list[str]:
    """What ``din status`` says of the autoscaler: each pool's ready and wanted executors, the network's executor
    cost per hour, decisions and failed starts, from its health answer (or why there is none)."""
    if isinstance(health, str):
        return [f"autoscaler: {health}"]
    detail = health.detail
    state = "ready" if health.ready else "NOT READY"
    lines = [f"autoscaler ({detail.get('provider', '?')} provider, {state}): executors cost "
             f"{detail.get('cost_per_hour', '?')}/h; {detail.get('decisions', '?')} decisions, "
             f"{detail.get('starts_failed', '?')} failed starts"]
    rows = pool_rows(detail.get("pools", ""))
    if rows:
        lines += ["  " + line for line in format_table(["SITE", "POOL", "READY", "WANTED"], rows).splitlines()]
    else:
        lines.append("  no pools")
    return lines


def ask_autoscaler(state: dict, site: str, timeout_s: float = HEALTH_TIMEOUT_S) -> HealthV1 | str:
    """The running stack's autoscaler's health answer (asked as the operator at ``site``), or why there is none."""
    import nats

    async def ask() -> HealthV1:
        url, options = state_nats(state, site)
        nc = await nats.connect(nats_servers(url), connect_timeout=timeout_s, allow_reconnect=False,
                                max_reconnect_attempts=0, **options)
        try:
            reply = await nc.request(Subjects.health(AUTOSCALER), b"{}", timeout=timeout_s)
        finally:
            await nc.close()
        return HealthV1.model_validate_json(reply.data)

    try:
        return asyncio.run(ask())
    except (StackError, ValueError) as exc:
        return f"no health answer ({str(exc).splitlines()[0]})"
    except Exception as exc:  # noqa: BLE001 - no responders, timeout, refused connection: said, not raised
        why = f"{exc.__class__.__name__}: {exc}" if str(exc) else exc.__class__.__name__
        return f"no health answer ({why})"


def cmd_down(args: argparse.Namespace) -> int:
    state_file = args.din_dir / STATE_FILE_NAME
    state = read_state(state_file)
    if state is None:
        print("no stack running")
        return 0
    with stop_signals_interrupt():
        stopped = stop_from_state(state_file)
    left = state_processes_alive(state)
    if left:
        raise StackError(f"could not stop {', '.join(p['name'] for p in left)} (pids {[p['pid'] for p in left]})")
    print(f"stopped {len(stopped)} processes of run {shown_path(state['run_dir'])}")
    if state.get("kafka_data"):
        print(f"{kept_data_line(Path(state['kafka_data']))}; the next `din up` starts with it")
    return 0


def kept_data_line(root: Path) -> str:
    """What ``din status`` and ``din down`` say of the Kafka data kept across runs."""
    size = KafkaStore(root).size_bytes()
    return f"kafka data: kept in {shown_path(root)} ({size / 1e6:.1f} MB; `din up --fresh` starts empty)"


def cmd_setup(args: argparse.Namespace) -> int:
    print(f"nats-server: {nats_server_binary()}")
    print(f"toxiproxy-server: {toxiproxy_binary()}")
    print(f"java: {require_java()}")
    if not shutil.which("mvn") and not (DEFAULT_KAFKA_LIBS / ".complete").exists():
        raise StackError("Maven not found: install it (apt-get install maven) so set-up can fetch Kafka's jars")
    begun = time.monotonic()
    libs = resolve_kafka_jars(DEFAULT_KAFKA_LIBS)
    print(f"kafka jars: {shown_path(libs)} ({time.monotonic() - begun:.1f}s)")
    print(build_models(DEFAULT_MODEL_REPO))
    return 0
