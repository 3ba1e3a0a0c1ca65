"""``din report``: a recorded window as one self-contained HTML file with plots, viewable offline."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from din.replay.endpoints import add_source_arguments, record_range, resolve_endpoints
from din.replay.reader import ReplayError, quiet_kafka_client
from din.replay.recorded import load_window
from din.replay.report import render_report, window_traffic
from din.shared.naming import Topics

EXIT_ERROR = 2
KAFKA_USER = "report"
REPORT_TOPICS = (Topics.ADMISSION_DECISIONS, Topics.SCHEDULING_DECISIONS, Topics.COMPLETIONS, Topics.ALERTS,
                 Topics.SCALING_DECISIONS)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``report``."""
    report = subparsers.add_parser(
        "report",
        help="turn a recorded window into a self-contained HTML report with plots",
        description="Reads the decisions, completions, SLA alerts and autoscaler decisions recorded in a time "
        "range (or the window of an offset range of recorded requests) and writes one HTML file: latency CDF per "
        "SLA class, throughput per site, rejects and SLA violations over time, model mix and degradation rates, "
        "and (when the autoscaler recorded any) elastic capacity: each pool's desired executors over time, its "
        "decisions and cold starts. Every figure counts requests, each once by its final outcome (the stages of "
        "a multi-stage or cascade job that handed it on are counted apart, as stage hand-offs; a job the "
        "scheduler held while a pool scaled from zero counts by how it ended), and covers live traffic: what din "
        "replay sent is shown per replay run. It loads nothing from the network when opened.",
    )
    add_source_arguments(report)
    report.add_argument("--out", type=Path, default=Path("din-report.html"), help="HTML file to write "
                                                                                  "(default: %(default)s)")
    report.add_argument("--title", default="DIN recorded window", help="report title")
    report.add_argument("--json", type=Path, help="also write the request counts (live, per replay run, stage "
                                                  "hand-offs) and the elastic capacity as JSON to this file")
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
                               bases=REPORT_TOPICS, client_kwargs=endpoints.kafka_kwargs(KAFKA_USER),
                               verifier=endpoints.record_verifier())
    traffic = window_traffic(window)
    page = render_report(window, title=args.title, source=endpoints.kafka, scope=args.topic_scope, traffic=traffic)
    args.out.write_text(page)
    live = traffic.live
    print(f"wrote {args.out} ({len(page) / 1024:.0f} KiB): {live.requests} live requests ({len(live.answered)} "
          f"answered), {traffic.replayed_requests} replayed in {len(traffic.replayed)} run(s), shown apart; "
          f"{traffic.hand_offs()} stage hand-offs of {len(window.completions)} completion records, not counted as "
          f"completions; {len(window.alerts)} alerts"
          + (f"; {len(window.scalings)} scaling decisions over {len(traffic.elastic.pools)} pool(s)"
             if traffic.elastic is not None else ""))
    if args.json is not None:
        args.json.write_text(json.dumps(traffic.summary(), indent=2) + "\n")
        print(f"wrote {args.json}")
    for line in window.skipped_summary():
        print(f"  {line}")
    return 0
