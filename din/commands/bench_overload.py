"""``din bench-overload``: goodput from 0.5x to 4x capacity and isolation between tenants, in one run."""

from __future__ import annotations

import argparse
from pathlib import Path

from din.bench import RESULTS_DIR, write_results
from din.stack.launcher import DEFAULT_DIN_DIR, DEFAULT_MODEL_REPO


def register(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser(
        "bench-overload",
        help="measure goodput under overload (0.5x to 4x capacity) and one tenant's latency while another "
        "floods (JSON + markdown results)",
        description="Starts one stack, measures its capacity with a closed loop, offers open-loop load from half "
        "to four times that capacity and counts every answer (ok within the deadline, each error, unanswered, "
        "duplicated), then measures a light tenant's latency alone and while another floods at its quota. "
        "Writes overload.json and overload.md.",
    )
    bench.add_argument("--seconds", type=float, default=15.0, help="how long each load level lasts")
    bench.add_argument("--out", type=Path, default=RESULTS_DIR)
    bench.set_defaults(handler=cmd_bench_overload)


def cmd_bench_overload(args: argparse.Namespace) -> int:
    from din.bench.overload import run_overload_bench

    report = run_overload_bench(DEFAULT_MODEL_REPO, DEFAULT_DIN_DIR / "bench-overload", seconds=args.seconds)
    write_results(args.out, "overload", report.to_json(), report.to_markdown())
    return 0
