"""A stand-in for a DIN service in launcher tests: it answers its health subject like a real one.

Usage: ``python fake_service.py <service> [--crash] [--not-ready] [--dump-env DIR] [--spawn-child]``.
It reads the same environment ``din up`` gives the real services.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import ssl
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import nats  # noqa: E402

from din.shared.contracts.events import HealthV1  # noqa: E402
from din.shared.naming import Subjects  # noqa: E402

FLEET_IN_VIEW = 1_000_000
"""The executors a fake scheduler says it counts: it stands for one that has heard its whole fleet."""


def login(env) -> dict:
    """The service's own NATS user, as the real one logs in (none on an --insecure stack). Built here rather
    than with ``shared.bus.connect``, whose imports would slow the fake's start-up past short ready timeouts;
    the fake only answers, so it needs no inbox prefix."""
    options: dict = {}
    if env.get("DIN_NATS_CREDS"):
        options["user_credentials"] = env["DIN_NATS_CREDS"]
    if env.get("DIN_BUS_CA_FILE") and env["DIN_NATS_URL"].startswith("tls://"):
        options["tls"] = ssl.create_default_context(cafile=env["DIN_BUS_CA_FILE"])
    return options


async def serve(args: argparse.Namespace) -> None:
    env = os.environ
    instance = env.get("DIN_EXECUTOR_ID") if args.service == "executor" else env.get("DIN_INSTANCE")
    name = f"{args.service}-{instance or args.service}"
    if args.dump_env:
        din_env = {k: v for k, v in env.items() if k.startswith("DIN_")}
        Path(args.dump_env, f"{name}.json").write_text(json.dumps(din_env))
    if args.spawn_child:
        child = subprocess.Popen(["sleep", "300"])
        print(f"child pid {child.pid}", flush=True)
        if args.dump_env:
            Path(args.dump_env, f"{name}.child").write_text(str(child.pid))
    nc = await nats.connect(env["DIN_NATS_URL"], **login(env))
    health = HealthV1(
        service=args.service,
        instance=instance or args.service,
        version="0.0.0-fake",
        site=env["DIN_SITE"],
        ready=not args.not_ready,
        detail={"executors": str(FLEET_IN_VIEW)} if args.service == "scheduler" else {},
    )

    async def on_health(msg) -> None:
        await msg.respond(health.model_dump_json().encode())

    await nc.subscribe(Subjects.health(args.service, instance), cb=on_health)
    print(f"{name} answering {Subjects.health(args.service, instance)} at {env['DIN_NATS_URL']}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await nc.drain()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("service")
    parser.add_argument("--crash", action="store_true", help="fail at start-up like a broken service")
    parser.add_argument("--not-ready", action="store_true", help="answer health with ready=false")
    parser.add_argument("--dump-env", help="write the DIN_* environment to DIR/<name>.json")
    parser.add_argument("--spawn-child", action="store_true", help="start a child process, to test group stop")
    args = parser.parse_args()
    if args.crash:
        print(f"{args.service}: boom, cannot load model repository", file=sys.stderr, flush=True)
        sys.exit(3)
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
