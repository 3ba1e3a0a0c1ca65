"""``din bench-security``: what payload security costs, encryption on against off in the same run."""

from __future__ import annotations

import argparse
from pathlib import Path

from din.bench import RESULTS_DIR


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``din bench-security``."""
    bench = subparsers.add_parser(
        "bench-security",
        help="measure payload security on vs off at 1 KB, 16 KB and 256 KB (JSON + markdown results)",
        description="Raw NATS request-reply to one responder process, plain, sealed and sealed+signed with DIN's "
        "own code, in alternating order; the in-process cost of seal, open, sign and verify; with --din the full "
        "DIN path with security on and off. Writes security.json and security.md.",
    )
    bench.add_argument("--seconds", type=float, default=2.0, help="seconds of load per mode and size")
    bench.add_argument("--concurrency", type=int, default=16, help="requests in flight under load")
    bench.add_argument("--rounds", type=int, default=2, help="rounds per size, in alternating mode order")
    bench.add_argument("--din", action="store_true", help="also the full DIN path, security on vs off")
    bench.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory (default %(default)s)")
    bench.set_defaults(handler=cmd_bench_security)


def cmd_bench_security(args: argparse.Namespace) -> int:
    """Run the security benchmark; returns the exit code."""
    from din.bench.security import run_security_bench

    return run_security_bench(seconds=args.seconds, concurrency=args.concurrency, rounds=args.rounds, din=args.din,
                              out=args.out)
