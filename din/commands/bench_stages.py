"""``din bench-stages``: cascade, split inference and co-located vs disaggregated prefill/decode over a stack."""

from __future__ import annotations

import argparse
from pathlib import Path

from din.bench import RESULTS_DIR, number_list, write_results
from din.stack.launcher import DEFAULT_DIN_DIR, DEFAULT_MODEL_REPO


def register(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser(
        "bench-stages",
        help="measure the large-small cascade, split inference and co-located vs disaggregated prefill/decode "
        "over the bus (JSON + markdown results)",
        description="Starts a three-site stack; sends held-out digits to each model alone and through a cascade; "
        "sends them whole, split at each point, auto-split and "
        "with a protected intermediate; then runs the same mixed long/short-prompt charlm workload against "
        "co-located and disaggregated prefill/decode. Writes stages.json and stages.md.",
    )
    bench.add_argument("--items", type=int, default=300, help="held-out digits per cascade and split path")
    bench.add_argument("--thresholds", type=number_list(float), default="0.8",
                       help="cascade confidence thresholds, comma-separated")
    bench.add_argument("--target-rates", type=number_list(float), default="0.1,0.25",
                       help="cascade target escalation rates, comma-separated")
    bench.add_argument("--requests", type=int, default=240, help="generation requests per arrangement")
    bench.add_argument("--rates", type=number_list(float), default="30,60",
                       help="generation loads, arrivals per second (Poisson), comma-separated")
    bench.add_argument("--long-fraction", type=float, default=0.3)
    bench.add_argument("--long-chars", type=int, default=2000)
    bench.add_argument("--short-chars", type=int, default=16)
    bench.add_argument("--max-tokens", type=int, default=32)
    bench.add_argument("--slo-ttft-ms", type=float, default=50.0, help="time-to-first-token objective")
    bench.add_argument("--slo-tpot-ms", type=float, default=1.0, help="time-per-output-token objective")
    bench.add_argument("--mode", choices=["centralized", "distributed"], default="centralized")
    bench.add_argument("--out", type=Path, default=RESULTS_DIR)
    bench.set_defaults(handler=cmd_bench_stages)


def cmd_bench_stages(args: argparse.Namespace) -> int:
    from din.bench.stages import run_stages_bench

    report = run_stages_bench(
        DEFAULT_MODEL_REPO, DEFAULT_DIN_DIR, items=args.items, requests=args.requests, rates_per_s=args.rates,
        long_fraction=args.long_fraction, long_chars=args.long_chars, short_chars=args.short_chars,
        max_tokens=args.max_tokens, thresholds=args.thresholds, target_rates=args.target_rates,
        slo_ttft_ms=args.slo_ttft_ms, slo_tpot_ms=args.slo_tpot_ms, mode=args.mode,
    )
    write_results(args.out, "stages", report.to_json(), report.to_markdown())
    return 0
