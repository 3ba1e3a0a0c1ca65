"""``din bench-multistage``: multi-stage inference measured offline on the held-out data, in one run.

* Cascade: digits-small answers, uncertain answers escalate to digits-large.
  Fixed confidence thresholds are scored on the whole held-out split (they
  are not fitted to it); target-rate policies are calibrated on one half and
  scored on the other, both ways (2-fold), so no answer is scored by a
  threshold fitted on it. Beside them: each model alone.
* Split inference: digits-large cut at each split point, the intermediate
  under each protection: task accuracy, bytes on the wire, and what a
  model-inversion attacker recovers (``bench.privacy``). Then the
  split-point choice (``services.scheduler.split_point``) on measured part
  latencies for a few site/link scenarios.
* charlm: losses from its config, the held-out loss recomputed through ONNX
  Runtime, a greedy sample, per-step latency, and a prefill/decode handoff
  between two sessions checked against one session.

No broker is involved; everything runs in-process on one thread.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from din.bench.cascade_policy import (
    CascadeEvaluation,
    CascadePolicy,
    Confidence,
    cross_fit,
    evaluate_cascade,
)
from din.bench.privacy import RAW_POINT, LeakageRow, latest_model_path, measure_leakage, model_config, onnx_session
from din.services.scheduler.split_point import (
    LinkEstimate,
    SplitCandidate,
    SplitContext,
    choose_split_point,
)
from din.shared.errors import DinError

SMALL = "digits-small"
LARGE = "digits-large"
TEXT = "charlm"
GOAL_GAP_PP = 0.5
GOAL_ESCALATION = 0.3
MAX_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
MARGIN_THRESHOLDS = (0.2, 0.4, 0.6, 0.8, 0.9)
TARGET_RATES = (0.05, 0.1, 0.2, 0.3)
TIMING_RUNS = 300
EDGE_SLOWDOWN = 4.0
MAX_LEAKAGE = 0.5
PROMPTS = ("The ", "def ", "If the ")
SAMPLE_CHARS = 80
SAMPLE_TEMPERATURE = 0.7


@dataclass
class MultistageReport:
    """Every table of the run and the environment it ran in."""

    environment: dict[str, Any] = field(default_factory=dict)
    cascade: list[dict[str, Any]] = field(default_factory=list)
    split: list[dict[str, Any]] = field(default_factory=list)
    part_latency_ms: dict[str, float] = field(default_factory=dict)
    split_choice: list[dict[str, Any]] = field(default_factory=list)
    charlm: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        """Headline figures: the cheapest cascade meeting the goal, and charlm's losses."""
        calibrated = [row for row in self.cascade if row["kind"] == "target"]
        meeting = [row for row in calibrated if row["meets_goal"]]
        best = min(meeting, key=lambda row: row["escalation_rate"]) if meeting else None
        large = next(row for row in self.cascade if row["kind"] == "large alone")
        small = next(row for row in self.cascade if row["kind"] == "small alone")
        return {
            "large_accuracy": large["accuracy"],
            "small_accuracy": small["accuracy"],
            "goal": f"within {GOAL_GAP_PP} pp of {LARGE} escalating at most {GOAL_ESCALATION:.0%}",
            "cheapest_calibrated_policy_meeting_goal": best,
            "charlm_heldout_loss": self.charlm.get("heldout_loss"),
            "charlm_uniform_loss": self.charlm.get("uniform_loss"),
        }

    def to_json(self) -> str:
        """The whole report as JSON."""
        return json.dumps(
            {
                "environment": self.environment,
                "seconds": self.seconds,
                "summary": self.summary(),
                "cascade": self.cascade,
                "split": self.split,
                "part_latency_ms": self.part_latency_ms,
                "split_choice": self.split_choice,
                "charlm": self.charlm,
            },
            indent=2,
        )

    def to_markdown(self) -> str:
        """The tables as markdown, with one line per headline."""
        lines = ["# Multi-stage inference (offline, held-out digits)", ""]
        summary = self.summary()
        best = summary["cheapest_calibrated_policy_meeting_goal"]
        lines.append(
            f"- {LARGE} alone: **{summary['large_accuracy']:.4f}**; {SMALL} alone: {summary['small_accuracy']:.4f}; "
            f"goal: {summary['goal']}."
        )
        if best:
            lines.append(
                f"- Cheapest calibrated cascade meeting the goal: **{best['policy']}** — accuracy "
                f"{best['accuracy']:.4f} ({best['gap_pp']:.2f} pp below large alone), escalating "
                f"**{best['escalation_rate']:.1%}**."
            )
        else:
            lines.append("- No calibrated cascade met the goal on this data.")
        lines.append(
            f"- charlm held-out loss **{self.charlm['heldout_loss']:.3f}** nats/char "
            f"(train {self.charlm['train_loss']:.3f}, uniform {self.charlm['uniform_loss']:.3f})."
        )
        lines += ["", "## Cascade", "", f"{self.cascade[0]['items']} held-out items.", ""]
        lines += [
            "| policy | kind | accuracy | escalated | gap to large (pp) | meets goal |",
            "|---|---|---:|---:|---:|:---:|",
        ]
        for row in self.cascade:
            lines.append(
                f"| {row['policy']} | {row['kind']} | {row['accuracy']:.4f} | {row['escalation_rate']:.1%} | "
                f"{row['gap_pp']:+.2f} | {'yes' if row['meets_goal'] else 'no'} |"
            )
        lines += ["", "## Split inference and the intermediate's protection", ""]
        lines += [
            "Attacker: ridge decoder intermediate -> input fitted on the train split with the same protection; "
            "attack accuracy = digits-small labels the reconstruction correctly "
            f"(digits-small on the real inputs: {self.split[0]['reference_accuracy']:.4f}); "
            f"baseline MSE (mean image) {self.split[0]['baseline_mse']:.4f}.",
            "",
            "| point | protection | task accuracy | bytes/item | inversion MSE | recovered variance "
            "| attack accuracy |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for row in self.split:
            protection = row["protection"]
            if protection != "none":
                protection += f" {row['strength']:g}"
            lines.append(
                f"| {row['point']} | {protection} | {row['task_accuracy']:.4f} | {row['bytes_per_item']} | "
                f"{row['inversion_mse']:.5f} | {row['recovered_variance']:.3f} | {row['attack_accuracy']:.4f} |"
            )
        lines += ["", "Measured per-item latency at batch 1 (ms): "]
        lines.append(", ".join(f"{name} {ms:.4f}" for name, ms in self.part_latency_ms.items()) + ".")
        lines += ["", "## Split-point choice", "", f"Edge compute assumed {EDGE_SLOWDOWN:g}x slower than measured.", ""]
        lines += ["| scenario | chosen | predicted ms | why |", "|---|---|---:|---|"]
        for row in self.split_choice:
            predicted = "-" if row["predicted_ms"] is None else f"{row['predicted_ms']:.3f}"
            lines.append(f"| {row['scenario']} | {row['chosen']} | {predicted} | {row['reason']} |")
        c = self.charlm
        lines += [
            "",
            "## charlm (prefill/decode with explicit state)",
            "",
            f"- vocab {c['vocab_size']} characters, hidden {c['hidden']}, {c['parameter_count']} parameters; "
            f"state {c['state_bytes']} B per sequence.",
            f"- loss (nats/char): train {c['train_loss']:.4f}, held-out {c['heldout_loss']:.4f} "
            f"(ONNX Runtime recomputed: {c['heldout_loss_onnx']:.4f}), uniform {c['uniform_loss']:.4f}; "
            f"held-out top-1 {c['heldout_accuracy']:.4f}.",
            f"- one step at batch 1: {c['step_ms']:.4f} ms; prefill of {c['prompt_chars']} chars "
            f"{c['prefill_ms']:.3f} ms; handoff after prefill (state moved between two sessions) gives the same "
            f"text as one session: **{c['handoff_identical']}**.",
            "",
            "Samples (prompt → continuation):",
            "",
        ]
        lines += [
            f"- {sample['mode']}: `{sample['prompt']}` → `{_inline(sample['continuation'])}`"
            for sample in c["samples"]
        ]
        lines += ["", f"Run took {self.seconds:.1f} s."]
        return "\n".join(lines)


def _inline(text: str) -> str:
    return text.replace("\n", "⏎").replace("`", "'")


def _cascade_row(evaluation: CascadeEvaluation, kind: str) -> dict[str, Any]:
    row = evaluation.to_dict()
    row["kind"] = kind
    row["meets_goal"] = evaluation.meets(GOAL_GAP_PP, GOAL_ESCALATION)
    return row


def cascade_table(repo: Path) -> list[dict[str, Any]]:
    """Each model alone, fixed-threshold sweeps and 2-fold calibrated target-rate policies."""
    from din.zoo.build import load_test_split

    x_test, y_test = load_test_split(repo)
    (small,) = onnx_session(latest_model_path(repo, SMALL)).run(["probabilities"], {"input": x_test})
    (large,) = onnx_session(latest_model_path(repo, LARGE)).run(["probabilities"], {"input": x_test})
    rows = [
        _cascade_row(evaluate_cascade(CascadePolicy(-np.inf), small, large, y_test), "small alone"),
        _cascade_row(evaluate_cascade(CascadePolicy(np.inf), small, large, y_test), "large alone"),
    ]
    rows[0]["policy"], rows[1]["policy"] = f"{SMALL} only", f"{LARGE} only"
    for measure, thresholds in ((Confidence.MAX, MAX_THRESHOLDS), (Confidence.MARGIN, MARGIN_THRESHOLDS)):
        for threshold in thresholds:
            evaluation = evaluate_cascade(CascadePolicy(threshold, measure), small, large, y_test)
            rows.append(_cascade_row(evaluation, "fixed"))
    for measure in Confidence:
        for rate in TARGET_RATES:
            rows.append(_cascade_row(cross_fit(small, large, y_test, rate, measure, folds=2, seed=0), "target"))
    return rows


def _per_item_ms(session, feeds: dict[str, np.ndarray], runs: int = TIMING_RUNS) -> float:
    for _ in range(20):
        session.run(None, feeds)
    samples = []
    for _ in range(runs):
        begun = time.perf_counter()
        session.run(None, feeds)
        samples.append(time.perf_counter() - begun)
    return float(np.median(samples) * 1000.0)


def part_latencies(repo: Path, points: list[str]) -> dict[str, float]:
    """Median per-item latency (ms, batch 1) of the whole model and of each head and tail."""
    from din.zoo.build import load_test_split, split_model_name

    x_test, _ = load_test_split(repo)
    row = x_test[:1]
    latencies = {LARGE: _per_item_ms(onnx_session(latest_model_path(repo, LARGE)), {"input": row})}
    for point in points:
        head = onnx_session(latest_model_path(repo, split_model_name(LARGE, "head", point)))
        (hidden,) = head.run([point], {"input": row})
        latencies[f"head@{point}"] = _per_item_ms(head, {"input": row})
        tail = onnx_session(latest_model_path(repo, split_model_name(LARGE, "tail", point)))
        latencies[f"tail@{point}"] = _per_item_ms(tail, {point: hidden})
    return latencies


def _leak(rows: list[LeakageRow], point: str, protection: str, strength: float) -> LeakageRow:
    return next(r for r in rows if r.point == point and r.protection == protection and r.strength == strength)


def split_choices(rows: list[LeakageRow], latencies: dict[str, float], points: list[str]) -> list[dict[str, Any]]:
    """The split-point choice for data at an edge site and the tail in the cloud, across a few scenarios."""
    full = latencies[LARGE]
    input_bytes = _leak(rows, RAW_POINT, "none", 0.0).bytes_per_item

    def candidates(protection: str, strength: float) -> list[SplitCandidate]:
        result = []
        for point in points:
            leak = _leak(rows, point, protection, strength)
            label = point if protection == "none" else f"{point}+{protection}{strength:g}"
            result.append(
                SplitCandidate(
                    point=label,
                    intermediate_bytes=leak.bytes_per_item,
                    head_ms=latencies[f"head@{point}"] * EDGE_SLOWDOWN,
                    tail_ms=latencies[f"tail@{point}"],
                    leakage=leak.recovered_variance,
                )
            )
        return result

    wan = LinkEstimate(rtt_ms=20.0, bandwidth_mbps=10.0)
    lan = LinkEstimate(rtt_ms=0.5, bandwidth_mbps=1000.0)
    base = dict(data_site="factory", tail_site="cloud", input_bytes=input_bytes, output_bytes=48, full_ms_at_tail=full)
    scenarios = [
        (
            "edge serves the whole model, WAN",
            "none",
            0.0,
            SplitContext(link=wan, full_ms_at_data=full * EDGE_SLOWDOWN, **base),
        ),
        ("edge holds heads only, WAN, no constraint", "none", 0.0, SplitContext(link=wan, **base)),
        ("edge holds heads only, LAN, no constraint", "none", 0.0, SplitContext(link=lan, **base)),
        (
            "heads only, WAN, raw input must stay at factory",
            "none",
            0.0,
            SplitContext(link=wan, allowed_sites={"factory"}, **base),
        ),
        (
            "same, intermediate quantised to 4 bits",
            "quantize",
            4,
            SplitContext(link=wan, allowed_sites={"factory"}, **base),
        ),
        (
            f"same, noise 2.0, recovered variance must be <= {MAX_LEAKAGE}",
            "noise",
            2.0,
            SplitContext(link=wan, allowed_sites={"factory"}, max_leakage=MAX_LEAKAGE, **base),
        ),
        (
            f"same, no protection, recovered variance must be <= {MAX_LEAKAGE}",
            "none",
            0.0,
            SplitContext(link=wan, allowed_sites={"factory"}, max_leakage=MAX_LEAKAGE, **base),
        ),
    ]
    table = []
    for name, protection, strength, context in scenarios:
        try:
            decision = choose_split_point(candidates(protection, strength), context)
        except DinError as refusal:
            table.append({"scenario": name, "chosen": "refused", "predicted_ms": None, "reason": refusal.message})
            continue
        table.append(
            {
                "scenario": name,
                "chosen": decision.point,
                "predicted_ms": round(decision.predicted_ms, 4),
                "reason": decision.reason,
                "alternatives": [
                    {
                        "point": a.point,
                        "predicted_ms": None if a.predicted_ms is None else round(a.predicted_ms, 4),
                        "excluded_by": a.excluded_by,
                    }
                    for a in decision.alternatives
                ],
            }
        )
    return table


def charlm_stats(repo: Path) -> dict[str, Any]:
    """charlm's figures: config losses, ONNX-recomputed held-out loss, samples, step latency, handoff check."""
    from din.zoo.text import decode, evaluate, generate, load_corpus, onnx_stepper, prefill

    config = model_config(repo, TEXT)
    path = latest_model_path(repo, TEXT)
    hidden, vocab = config.hidden, config.vocab
    loss = config.model_extra["loss"]
    stepper = onnx_stepper(onnx_session(path))
    corpus = load_corpus()
    heldout_onnx, _ = evaluate(stepper, corpus.heldout, hidden)
    samples = [
        {"prompt": p, "mode": "greedy", "continuation": generate(stepper, vocab, p, SAMPLE_CHARS, hidden)}
        for p in PROMPTS
    ]
    rng = np.random.default_rng(0)
    for p in PROMPTS:
        logits, state = prefill(stepper, corpus.encode(p), hidden)
        produced, _, _ = decode(stepper, logits, state, SAMPLE_CHARS, temperature=SAMPLE_TEMPERATURE, rng=rng)
        mode = f"sampled, temperature {SAMPLE_TEMPERATURE:g}, seed 0"
        samples.append({"prompt": p, "mode": mode, "continuation": corpus.decode(produced)})
    prompt = "The value of the expression "
    tokens = corpus.encode(prompt)
    begun = time.perf_counter()
    logits, state = prefill(stepper, tokens, hidden)
    prefill_ms = (time.perf_counter() - begun) * 1000.0
    other = onnx_stepper(onnx_session(path))
    handed_off, _, _ = decode(other, logits.copy(), state.copy(), SAMPLE_CHARS)
    single, _, _ = decode(stepper, logits, state, SAMPLE_CHARS)
    step_ms = _per_item_ms(
        onnx_session(path), {"token": np.array([1], np.int64), "state": np.zeros((1, hidden), np.float32)}
    )
    return {
        "vocab_size": len(vocab),
        "hidden": hidden,
        "parameter_count": config.parameter_count,
        "state_bytes": config.state_bytes_per_item,
        "train_loss": loss["train"],
        "heldout_loss": loss["heldout"],
        "heldout_loss_onnx": round(heldout_onnx, 4),
        "uniform_loss": loss["uniform"],
        "heldout_accuracy": config.accuracy[config.versions[-1]],
        "corpus": config.model_extra["corpus"],
        "training": config.model_extra["training"],
        "step_ms": round(step_ms, 5),
        "prompt_chars": len(tokens),
        "prefill_ms": round(prefill_ms, 4),
        "handoff_identical": handed_off == single,
        "samples": samples,
    }


def run_multistage(repo: Path) -> MultistageReport:
    """Build the zoo in ``repo`` if it is not current, then measure every table."""
    from threadpoolctl import threadpool_limits

    from din.zoo.build import build_zoo

    begun = time.perf_counter()
    repo = Path(repo)
    with threadpool_limits(limits=1):
        build_zoo(repo)
        points = model_config(repo, LARGE).split_points
        report = MultistageReport(
            environment={
                "python": platform.python_version(),
                "machine": platform.machine(),
                "cpus": str(os.cpu_count()),
                "threads": "1",
            }
        )
        report.cascade = cascade_table(repo)
        leakage = measure_leakage(repo, LARGE, points)
        report.split = [row.to_dict() for row in leakage]
        report.part_latency_ms = {k: round(v, 5) for k, v in part_latencies(repo, points).items()}
        report.split_choice = split_choices(leakage, report.part_latency_ms, points)
        report.charlm = charlm_stats(repo)
    report.seconds = round(time.perf_counter() - begun, 2)
    return report
