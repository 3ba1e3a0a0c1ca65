"""``din bench-placement``: placement and heartbeat cost at growing fleet sizes, indexed against a full scan."""

from __future__ import annotations

import argparse
from pathlib import Path

from din.bench import RESULTS_DIR, number_list, write_results


def register(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser(
        "bench-placement",
        help="measure placement and heartbeat cost at 100 to 100,000 executors, in-process (JSON + markdown)",
        description="Builds fleets of executors over several sites (3 models), places a mix of jobs with the "
        "indexed scheduler and with a full scan of every executor, and times heartbeat processing. Writes "
        "placement.json and placement.md.",
    )
    bench.add_argument("--sizes", type=number_list(int), default="100,1000,10000,100000",
                       help="fleet sizes (executors), comma-separated")
    bench.add_argument("--sites", type=int, default=10, help="sites the executors are spread over")
    bench.add_argument("--jobs", type=int, default=2000, help="jobs placed per fleet size")
    bench.add_argument("--out", type=Path, default=RESULTS_DIR)
    bench.set_defaults(handler=cmd_bench_placement)


def cmd_bench_placement(args: argparse.Namespace) -> int:
    from din.bench.placement import run_placement_bench

    report = run_placement_bench(args.sizes, sites=args.sites, jobs=args.jobs)
    write_results(args.out, "placement", report.to_json(), report.to_markdown())
    return 0
