"""``din up``, ``din status``, ``din down`` and ``din setup``: the local stack's lifecycle."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import sys
import time
from pathlib import Path

from din.commands.models import build_models
from din.stack.brokers import DEFAULT_KAFKA_LIBS, nats_server_binary, require_java, resolve_kafka_jars
from din.stack.launcher import (
    DEFAULT_DIN_DIR,
    DEFAULT_MODEL_REPO,
    DEFAULT_TOPOLOGY,
    SCHEDULER_MODES,
    SERVICE_KINDS,
    STATE_FILE_NAME,
    PortPlan,
    Stack,
    format_table,
    read_state,
    shown_path,
    state_processes_alive,
    stop_from_state,
)
from din.stack.processes import StackError, pid_alive
from shared.topology import load_topology

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
EXIT_NOT_RUNNING = 3
EXIT_DEGRADED = 1


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
        description="Start NATS (hub and one leaf per edge site), Kafka and every service, each its own "
        "process; wait until all answer their health subject. In the foreground, Ctrl-C stops everything.",
    )
    up.add_argument("--topology", type=Path, default=DEFAULT_TOPOLOGY, help="topology file (default: %(default)s)")
    up.add_argument("--mode", choices=SCHEDULER_MODES, default="centralized", help="scheduling mode")
    up.add_argument("--port-offset", type=int, default=0, help="add N to every port (run beside another stack)")
    up.add_argument("--detach", action="store_true", help="return once ready; stop later with `din down`")
    up.add_argument(
        "--services",
        default="all",
        help=f"comma-separated service kinds to run ({', '.join(SERVICE_KINDS)}), 'all', or 'none' for brokers only",
    )
    up.add_argument("--ready-timeout", type=float, default=60.0, help="seconds each service has to become ready")
    up.set_defaults(handler=cmd_up)

    status = subparsers.add_parser(
        "status", parents=[common], help="show what the running stack runs where",
        description="Exit code: 0 all processes running, 1 some stopped, 3 no stack.",
    )
    status.set_defaults(handler=cmd_status)

    down = subparsers.add_parser("down", parents=[common], help="stop the running stack")
    down.set_defaults(handler=cmd_down)

    setup = subparsers.add_parser(
        "setup", help="fetch Kafka's jars and build the model zoo (idempotent)",
        description="Check nats-server and Java, resolve Kafka's jars from Maven Central into .din/kafka/libs, "
        "and build the model zoo into .din/models.",
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
    stack = Stack(
        topology,
        topology_file=args.topology,
        ports=PortPlan().offset(args.port_offset),
        din_dir=args.din_dir,
        mode=args.mode,
        services=parse_services(args.services),
        ready_timeout_s=args.ready_timeout,
    )
    if not args.detach:
        stack.supervisor_pid = os.getpid()
    begun = time.monotonic()
    with stop_signals_interrupt():
        print(f"starting DIN ({topology.name}, {args.mode}) ...", flush=True)
        detached = started = False
        try:
            stack.start()
            started = True
            print(stack.describe())
            print(f"ready in {time.monotonic() - begun:.1f}s; run folder {shown_path(stack.run_dir)}", flush=True)
            if args.detach:
                print("detached: `din status` shows it, `din down` stops it", flush=True)
                detached = True
                return 0
            print("press Ctrl-C to stop", flush=True)
            dead = stack.watch()
            code = dead.popen.returncode if dead.popen else None
            print(
                f"din: error: {dead.name} exited with code {code}; stopping the stack\n{dead.log_tail()}",
                file=sys.stderr,
            )
            return 2
        except KeyboardInterrupt:
            if not started:
                raise
            print("\nstopping ...", flush=True)
            return 0
        finally:
            # Also after a failed or interrupted start: stop() is idempotent and leaves nothing behind.
            if not detached:
                _stop_quietly(stack)
                if started:
                    print("stopped", flush=True)


def _stop_quietly(stack: Stack) -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    stack.stop()


def cmd_status(args: argparse.Namespace) -> int:
    state_file = args.din_dir / STATE_FILE_NAME
    state = read_state(state_file)
    if state is None:
        print(f"no stack running (no {shown_path(state_file)})")
        return EXIT_NOT_RUNNING
    alive_pids = {p["pid"] for p in state_processes_alive(state)}
    sup = state.get("supervisor")
    how = f"foreground, supervised by pid {sup['pid']}" if sup else "detached"
    print(f"run {shown_path(state['run_dir'])} ({state.get('mode')}, {how}), started {state.get('started_at')}")
    rows = [
        [p["site"], p["name"], str(p["pid"]), "running" if p["pid"] in alive_pids else "STOPPED", p["address"],
         shown_path(p["log"])]
        for p in state.get("processes", [])
    ]
    print(format_table(["SITE", "PROCESS", "PID", "STATE", "ADDRESS", "LOG"], rows))
    stopped = [r[1] for r in rows if r[3] != "running"]
    if sup and not pid_alive(sup["pid"]):
        stopped.append("supervisor")
    if stopped:
        print(f"{len(stopped)} stopped ({', '.join(stopped)}): `din down` cleans up, then `din up`")
        return EXIT_DEGRADED
    return 0


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
    return 0


def cmd_setup(args: argparse.Namespace) -> int:
    print(f"nats-server: {nats_server_binary()}")
    print(f"java: {require_java()}")
    if not shutil.which("mvn") and not (DEFAULT_KAFKA_LIBS / ".complete").exists():
        raise StackError("Maven not found: install it (apt-get install maven) so set-up can fetch Kafka's jars")
    begun = time.monotonic()
    libs = resolve_kafka_jars(DEFAULT_KAFKA_LIBS)
    print(f"kafka jars: {shown_path(libs)} ({time.monotonic() - begun:.1f}s)")
    print(build_models(DEFAULT_MODEL_REPO))
    return 0
