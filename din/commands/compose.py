"""``din compose``: regenerate docker-compose.yml and its configs from the default topology, or check them."""

from __future__ import annotations

import argparse
import sys

from din.compose import drifted, write_compose


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``compose``."""
    parser = subparsers.add_parser(
        "compose",
        help="generate docker-compose.yml and its NATS configs from the default topology",
        description="Write docker-compose.yml, ops/compose/nats/<site>.conf and ops/compose/credentials.example.json "
        "from ops/topology/default.yaml and the environment `din up` gives each service. With --check, write "
        "nothing and exit 1 when a committed file differs from a fresh render.",
    )
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 and name drifted files")
    parser.set_defaults(handler=cmd_compose)


def cmd_compose(args: argparse.Namespace) -> int:
    """Write the compose files, or with ``--check`` report the ones that drifted."""
    if args.check:
        stale = drifted()
        if stale:
            print(f"din: {len(stale)} compose file(s) out of date: {', '.join(stale)}", file=sys.stderr)
            print("run `din compose` and commit the result", file=sys.stderr)
            return 1
        print("docker-compose.yml and its configs are up to date")
        return 0
    written = write_compose()
    print(f"wrote {len(written)} files: {', '.join(p.name for p in written)}")
    return 0
