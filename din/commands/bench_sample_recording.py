"""``din bench-sample-recording``: record a window of mixed traffic on a local stack and render its report."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``din bench-sample-recording``."""
    sample = subparsers.add_parser(
        "bench-sample-recording",
        help="drive steady, burst, steady traffic through a local stack and write its `din report` (HTML, PNG)",
        description="Starts the default topology on free ports, drives three phases of mixed traffic (a burst "
        "overloads realtime and floods the rate-limited tenant), then renders the recorded window as `din report` "
        "does; with --screenshot also a PNG taken with headless Chromium (the README's screenshot).",
    )
    sample.add_argument("--out", type=Path, default=Path("din-report.html"), help="report file (default %(default)s)")
    sample.add_argument("--screenshot", type=Path, help="also write a PNG of the report (needs chromium)")
    sample.set_defaults(handler=cmd_bench_sample_recording)


def cmd_bench_sample_recording(args: argparse.Namespace) -> int:
    """Record the sample window and write the report; returns the exit code."""
    from din.bench.sample_recording import record_sample

    return record_sample(args.out, args.screenshot)
