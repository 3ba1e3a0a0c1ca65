"""``din bench-multistage``: cascades, split inference with protection, and the char model, measured offline."""

from __future__ import annotations

import argparse
from pathlib import Path

from din.bench import RESULTS_DIR, write_results
from din.stack.launcher import DEFAULT_MODEL_REPO


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``din bench-multistage``."""
    bench = subparsers.add_parser(
        "bench-multistage",
        help="offline multi-stage inference figures: cascade, split points x protection, charlm (JSON + markdown)",
        description="On the held-out split, in one run and without a broker: a large-small cascade (threshold "
        "sweep and calibrated target escalation rates against each model alone), split inference at each split "
        "point under each protection of the intermediate (accuracy, bytes, model-inversion leakage), the "
        "split-point choice for a few site/link scenarios, and the char model's losses and prefill/decode "
        "handoff. Builds the model zoo first when it is not current. Writes multistage.json and multistage.md.",
    )
    bench.add_argument("--repo", type=Path, default=DEFAULT_MODEL_REPO, help="model repository (default %(default)s)")
    bench.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory (default %(default)s)")
    bench.set_defaults(handler=cmd_bench_multistage)


def cmd_bench_multistage(args: argparse.Namespace) -> int:
    """Run the offline measurements and write the results; returns the exit code."""
    from din.bench.multistage import run_multistage

    report = run_multistage(args.repo)
    write_results(args.out, "multistage", report.to_json(), report.to_markdown())
    return 0
