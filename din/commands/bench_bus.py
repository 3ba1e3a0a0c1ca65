"""``din bench-bus``: what the closed bus costs, open against closed in the same run."""

from __future__ import annotations

import argparse
from pathlib import Path

from din.bench import RESULTS_DIR


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``din bench-bus``."""
    bench = subparsers.add_parser(
        "bench-bus",
        help="measure the closed bus (auth, leaf TLS, client TLS) against an open one (JSON + markdown results)",
        description="Request-reply across a leaf link on an open, a closed and a closed+client-TLS network started "
        "side by side, in alternating rounds, plus connection set-up time; with --din the full DIN path on a "
        "closed and an --insecure stack. Writes bus.json and bus.md.",
    )
    bench.add_argument("--seconds", type=float, default=2.0, help="seconds of load per mode and round")
    bench.add_argument("--concurrency", type=int, default=16, help="requests in flight under load")
    bench.add_argument("--rounds", type=int, default=3, help="rounds, in alternating mode order")
    bench.add_argument("--din", action="store_true", help="also the full DIN path, closed vs open")
    bench.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory (default %(default)s)")
    bench.set_defaults(handler=cmd_bench_bus)


def cmd_bench_bus(args: argparse.Namespace) -> int:
    """Run the bus benchmark; returns the exit code."""
    from din.bench.bus import run_bus_bench

    return run_bus_bench(seconds=args.seconds, concurrency=args.concurrency, rounds=args.rounds, din=args.din,
                         out=args.out)
