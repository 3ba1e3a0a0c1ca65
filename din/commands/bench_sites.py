"""``din bench-sites``: edge-local latency, a partition and control-plane kills over real WAN links."""

from __future__ import annotations

import argparse
from pathlib import Path

from din.bench import RESULTS_DIR, write_results
from din.stack.launcher import DEFAULT_DIN_DIR, DEFAULT_MODEL_REPO


def register(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser(
        "bench-sites",
        help="measure a control plane per site against one at the hub over WAN links, a partition and "
        "control-plane kills (JSON + markdown results)",
        description="Starts the same three-site topology three times (per-site control planes over Toxiproxy "
        "WAN links, one hub control plane over the same links, per-site on loopback only), sends edge-local "
        "requests from the factory, cuts the factory's link, and kills each factory control-plane process "
        "under load. Writes sites.json and sites.md.",
    )
    bench.add_argument("--requests", type=int, default=300, help="edge-local requests per arrangement")
    bench.add_argument("--partition-s", type=float, default=30.0, help="how long the factory's link is cut")
    bench.add_argument("--kill-requests", type=int, default=200, help="requests sent around each kill")
    bench.add_argument("--out", type=Path, default=RESULTS_DIR)
    bench.set_defaults(handler=cmd_bench_sites)


def cmd_bench_sites(args: argparse.Namespace) -> int:
    from din.bench.sites import run_sites_bench

    report = run_sites_bench(DEFAULT_MODEL_REPO, DEFAULT_DIN_DIR / "bench-sites", requests=args.requests,
                             partition_s=args.partition_s, kill_requests=args.kill_requests)
    write_results(args.out, "sites", report.to_json(), report.to_markdown())
    return 0
