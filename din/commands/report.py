"""``din report``: a recorded window as one self-contained HTML file with plots, viewable offline."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from din.replay.endpoints import add_source_arguments, record_range, resolve_endpoints
from din.replay.reader import ReplayError, quiet_kafka_client
from din.replay.recorded import load_window
from din.replay.report import render_report
from shared.naming import Topics

EXIT_ERROR = 2
KAFKA_USER = "report"
REPORT_TOPICS = (Topics.ADMISSION_DECISIONS, Topics.SCHEDULING_DECISIONS, Topics.COMPLETIONS, Topics.ALERTS)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``report``."""
    report = subparsers.add_parser(
        "report",
        help="turn a recorded window into a self-contained HTML report with plots",
        description="Reads the decisions, completions and SLA alerts recorded in a time range (or the window of "
        "an offset range of recorded requests) and writes one HTML file: latency CDF per SLA class, throughput "
        "per site, rejects and SLA violations over time, model mix and degradation rates. It loads nothing "
        "from the network when opened.",
    )
    add_source_arguments(report)
    report.add_argument("--out", type=Path, default=Path("din-report.html"), help="HTML file to write "
                                                                                  "(default: %(default)s)")
    report.add_argument("--title", default="DIN recorded window", help="report title")
    report.set_defaults(handler=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    quiet_kafka_client()
    try:
        return asyncio.run(run_report(args))
    except ReplayError as exc:
        print(f"din: error: {exc}", file=sys.stderr)
        return EXIT_ERROR


async def run_report(args: argparse.Namespace) -> int:
    endpoints = resolve_endpoints(args)
    rng = record_range(args)
    window = await load_window(endpoints.kafka, rng, scope=args.topic_scope, requests=bool(rng.offsets),
                               bases=REPORT_TOPICS, client_kwargs=endpoints.kafka_kwargs(KAFKA_USER))
    page = render_report(window, title=args.title, source=endpoints.kafka, scope=args.topic_scope)
    args.out.write_text(page)
    print(f"wrote {args.out} ({len(page) / 1024:.0f} KiB): {len(window.completions)} completions, "
          f"{sum(d.count for d in window.admissions)} admission and {len(window.schedulings)} scheduling decisions, "
          f"{len(window.alerts)} alerts")
    for line in window.skipped_summary():
        print(f"  {line}")
    return 0
