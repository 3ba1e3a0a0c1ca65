"""``din bench-gateway``: the HTTP gateway's added latency against the raw NATS path, in one run."""

from __future__ import annotations

import argparse
from pathlib import Path

from din.bench import RESULTS_DIR


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``din bench-gateway``."""
    bench = subparsers.add_parser(
        "bench-gateway",
        help="measure the HTTP gateway against the raw NATS path (JSON + markdown results)",
        description="One-row digits-small requests one at a time on a one-site stack, over NATS, over the gateway "
        "with a JSON body and with the binary tensor extension, in alternating rounds. Writes gateway.json and "
        "gateway.md.",
    )
    bench.add_argument("--requests", type=int, default=300, help="requests per way")
    bench.add_argument("--rounds", type=int, default=3, help="rounds, in alternating order")
    bench.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory (default %(default)s)")
    bench.set_defaults(handler=cmd_bench_gateway)


def cmd_bench_gateway(args: argparse.Namespace) -> int:
    """Run the gateway benchmark; returns the exit code."""
    from din.bench.gateway import run_gateway_bench

    return run_gateway_bench(requests=args.requests, rounds=args.rounds, out=args.out)
