"""``din bench``: the inference path's cost against a direct ONNX Runtime call and raw NATS request-reply."""

from __future__ import annotations

import argparse
from pathlib import Path

from din.bench import RESULTS_DIR, number_list, write_results
from din.stack.launcher import DEFAULT_DIN_DIR, DEFAULT_MODEL_REPO


def register(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser(
        "bench",
        help="measure DIN's path against direct ONNX Runtime and raw NATS (JSON + markdown results)",
        description="Runs (a) a direct in-process ONNX Runtime call, (b) raw nats-py request-reply to one "
        "ONNX Runtime responder and (c) the full DIN path, side by side in one run, at light load and under "
        "closed-loop load; writes inference_path.json and inference_path.md.",
    )
    bench.add_argument("--concurrency", type=number_list(int), default="8,32,64",
                       help="closed-loop levels beyond the sequential one, comma-separated")
    bench.add_argument("--seconds", type=float, default=3.0, help="seconds per load level")
    bench.add_argument("--light-requests", type=int, default=2000, help="sequential requests for p50/p99")
    bench.add_argument("--mode", choices=("centralized", "distributed"), default="centralized")
    bench.add_argument("--out", type=Path, default=RESULTS_DIR)
    bench.set_defaults(handler=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from din.bench.inference_path import run_bench

    report = run_bench(DEFAULT_MODEL_REPO, DEFAULT_DIN_DIR, levels=list(args.concurrency), seconds=args.seconds,
                       light_count=args.light_requests, mode=args.mode)
    stem = "inference_path" if args.mode == "centralized" else f"inference_path_{args.mode}"
    write_results(args.out, stem, report.to_json(), report.to_markdown())
    return 0
