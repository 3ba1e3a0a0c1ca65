"""DIN's benchmarks: each compares alternatives side by side in one run and writes JSON plus a markdown table.

Every benchmark is a module here run by a ``din bench...`` command (``din/commands/bench*.py``):

* ``inference_path`` (``din bench``): DIN's path against a direct ONNX Runtime call and raw NATS;
* ``cascade`` (``din bench-cascade``): a large-small cascade against each model alone, over a stack;
* ``stages`` (``din bench-stages``): cascade, split inference and prefill/decode over a three-site stack;
* ``multistage`` (``din bench-multistage``): the same figures offline, with ``privacy`` (inversion leakage
  under each protection) and ``cascade_policy`` (threshold calibration and cross-fitted evaluation);
* ``recording`` (``din bench-recording``): what recording to Kafka costs, and how fast replay reads;
* ``security`` (``din bench-security``): payload security on against off;
* ``control_signatures``, ``job_facts``, ``token_proofs``, ``record_signatures``, ``per_hop_sealing``
  (``python -m din.bench.<name>``): in process, what signing control messages, tagging job headers, request-bound
  token proofs, signing Kafka records and sealing each hop for its one reader cost;
* ``placement`` (``din bench-placement``): placement and heartbeat cost at 100 to 100,000 executors, in process;
* ``sites`` (``din bench-sites``): a control plane per site against one at the hub over WAN links, a partition
  and control-plane kills;
* ``overload`` (``din bench-overload``): goodput from 0.5x to 4x capacity, and a light tenant's latency while
  another floods;
* ``gateway`` (``din bench-gateway``): the HTTP gateway (OIP v2 JSON and binary) against the raw NATS path;
* ``sample_recording`` (``din bench-sample-recording``): a recorded window of mixed traffic, rendered by
  ``din report`` (the README's screenshot).

Results go to ``bench/results/`` unless a command is given ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def write_results(out: Path, stem: str, json_text: str, markdown: str) -> None:
    """Write ``<out>/<stem>.json`` and ``<out>/<stem>.md``, print the table and where it went."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json_text.rstrip("\n") + "\n")
    (out / f"{stem}.md").write_text(markdown.rstrip("\n") + "\n")
    print(markdown)
    print(f"\nwrote {out / (stem + '.json')} and {stem}.md")


def per_call_us(run: Callable[[int], object], calls: int, rounds: int = 5) -> float:
    """Median over ``rounds`` rounds of microseconds per call of ``run(i)`` (``i`` counts the calls of a round)."""
    figures = []
    for _ in range(rounds):
        started = time.perf_counter()
        for i in range(calls):
            run(i)
        figures.append((time.perf_counter() - started) / calls * 1e6)
    return statistics.median(figures)


def machine_facts() -> dict[str, object]:
    """Where an in-process benchmark ran: Python, machine, CPUs and the load at the time."""
    return {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "load_1m": round(os.getloadavg()[0], 1)}


def where_measured(report: dict) -> str:
    """The sentence every in-process table opens with after its call count: rounds, machine and load."""
    return (f"median of {report['rounds']} rounds (Python {report['python']}, {report['machine']}, {report['cpus']} "
            f"CPUs at load {report['load_1m']}: absolute figures rise with the load, ratios less)")


def in_process_main(argv: list[str] | None, doc: str, stem: str, measure: Callable[[int], dict],
                    markdown: Callable[[dict], str], *, count: str = "--messages", default: int = 5000) -> int:
    """The command line of an in-process benchmark: ``count`` calls per round, ``--out``; writes ``stem``."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument(count, type=int, default=default, dest="count")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    report = measure(args.count)
    write_results(args.out, stem, json.dumps(report, indent=2), markdown(report))
    return 0


def number_list(kind: type[int] | type[float]):
    """An argparse ``type`` that reads comma-separated numbers of ``kind`` into a tuple (blanks are skipped)."""

    def parse(text: str) -> tuple:
        return tuple(kind(part) for part in text.split(",") if part.strip())

    return parse
