"""``din bench-elastic``: a diurnal ramp with a 5x spike against a fixed fleet, on-prem autoscaling and bursting."""

from __future__ import annotations

import argparse
from pathlib import Path

from din.bench import RESULTS_DIR, write_results
from din.stack.launcher import DEFAULT_DIN_DIR


def register(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser(
        "bench-elastic",
        help="measure SLO attainment and cost of a fixed fleet, on-prem autoscaling and bursting under a diurnal "
        "ramp with a 5x spike (JSON + markdown results)",
        description="Trains digits-wide once, measures one executor's capacity, then runs the same trace (a "
        "diurnal ramp with a 5x spike for 60 s) against three fleets, each on its own stack, counting every "
        "answer and pricing the executors it ran. Writes elastic.json and elastic.md.",
    )
    bench.add_argument("--out", type=Path, default=RESULTS_DIR)
    bench.set_defaults(handler=cmd_bench_elastic)


def cmd_bench_elastic(args: argparse.Namespace) -> int:
    from din.bench.elastic import run_elastic_bench

    base = DEFAULT_DIN_DIR / "bench-elastic"
    report = run_elastic_bench(base / "models", base)
    write_results(args.out, "elastic", report.to_json(), report.to_markdown())
    return 0
