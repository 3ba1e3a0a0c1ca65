"""``din bench-recording``: can Kafka recording keep up with the inference path, and how fast replay reads."""

from __future__ import annotations

import argparse
from pathlib import Path

from din.bench import RESULTS_DIR


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``din bench-recording``."""
    bench = subparsers.add_parser(
        "bench-recording",
        help="measure what recording requests to Kafka costs and how fast replay reads (JSON + markdown results)",
        description="Measures admission's per-request recording cost, the inference path's peak rate on a whole "
        "stack alone and while a separate process records at that rate, the sustained recording rate through "
        "the event log, and replay's read-and-decode rate. Writes recording.json and recording.md; exits 1 when "
        "recording has less headroom than the inference path's peak or replay reads under 5,000 records/s.",
    )
    bench.add_argument("--seconds", type=float, default=6.0, help="length of each measured run")
    bench.add_argument("--concurrency", type=int, default=64, help="requests in flight in the inference runs")
    bench.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory (default %(default)s)")
    bench.set_defaults(handler=cmd_bench_recording)


def cmd_bench_recording(args: argparse.Namespace) -> int:
    """Run the recording benchmark; returns its exit code."""
    from din.bench.recording import run_recording_bench

    return run_recording_bench(seconds=args.seconds, concurrency=args.concurrency, out=args.out)
