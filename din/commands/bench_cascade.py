"""``din bench-cascade``: accuracy, escalation and latency of a large-small cascade against each model alone."""

from __future__ import annotations

import argparse
from pathlib import Path

from din.bench import RESULTS_DIR, number_list, write_results
from din.stack.launcher import DEFAULT_DIN_DIR, DEFAULT_MODEL_REPO


def register(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser(
        "bench-cascade",
        help="measure a digits-small -> digits-large cascade against each model alone (JSON + markdown results)",
        description="Sends every held-out digit through a one-site stack as digits-small alone, digits-large "
        "alone and a cascade (Din-Cascade) at each threshold; writes cascade.json and cascade.md.",
    )
    bench.add_argument("--thresholds", type=number_list(float), default="0.8,0.9,0.95",
                       help="comma-separated confidence thresholds")
    bench.add_argument("--warm-up", type=int, default=100, help="requests per model before measuring")
    bench.add_argument("--out", type=Path, default=RESULTS_DIR)
    bench.set_defaults(handler=cmd_bench_cascade)


def cmd_bench_cascade(args: argparse.Namespace) -> int:
    from din.bench.cascade import run_cascade_bench

    report = run_cascade_bench(DEFAULT_MODEL_REPO, DEFAULT_DIN_DIR, thresholds=list(args.thresholds),
                               warm_up=args.warm_up)
    write_results(args.out, "cascade", report.to_json(), report.to_markdown())
    return 0
