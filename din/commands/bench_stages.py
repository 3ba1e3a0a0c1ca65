"""``din bench-stages``: the cascade, split inference and co-located vs disaggregated prefill/decode, through the real stack."""

from __future__ import annotations

import argparse
from pathlib import Path

from din.bench.stages import run_stages_bench
from din.stack.launcher import DEFAULT_DIN_DIR, DEFAULT_MODEL_REPO, REPO_ROOT

DEFAULT_OUT = REPO_ROOT / "bench" / "results"


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
    bench.add_argument("--thresholds", default="0.8", help="cascade confidence thresholds, comma-separated")
    bench.add_argument("--target-rates", default="0.1,0.25", help="cascade target escalation rates, comma-separated")
    bench.add_argument("--requests", type=int, default=240, help="generation requests per arrangement")
    bench.add_argument("--rates", default="30,60", help="generation loads, arrivals per second (Poisson), comma-separated")
    bench.add_argument("--long-fraction", type=float, default=0.3)
    bench.add_argument("--long-chars", type=int, default=2000)
    bench.add_argument("--short-chars", type=int, default=16)
    bench.add_argument("--max-tokens", type=int, default=32)
    bench.add_argument("--slo-ttft-ms", type=float, default=50.0, help="time-to-first-token objective")
    bench.add_argument("--slo-tpot-ms", type=float, default=1.0, help="time-per-output-token objective")
    bench.add_argument("--mode", choices=["centralized", "distributed"], default="centralized")
    bench.add_argument("--out", type=Path, default=DEFAULT_OUT)
    bench.set_defaults(handler=cmd_bench_stages)


def cmd_bench_stages(args: argparse.Namespace) -> int:
    report = run_stages_bench(
        DEFAULT_MODEL_REPO, DEFAULT_DIN_DIR, items=args.items, requests=args.requests, rates_per_s=tuple(float(r) for r in args.rates.split(",") if r.strip()),
        long_fraction=args.long_fraction, long_chars=args.long_chars, short_chars=args.short_chars,
        max_tokens=args.max_tokens, thresholds=tuple(float(t) for t in args.thresholds.split(",") if t.strip()),
        target_rates=tuple(float(r) for r in args.target_rates.split(",") if r.strip()),
        slo_ttft_ms=args.slo_ttft_ms, slo_tpot_ms=args.slo_tpot_ms, mode=args.mode,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "stages.json").write_text(report.to_json() + "\n")
    (args.out / "stages.md").write_text(report.to_markdown() + "\n")
    print(report.to_markdown())
    print(f"\nwrote {args.out / 'stages.json'} and stages.md")
    return 0
