"""A mixed demo workload: several tenants, SLA classes and sites, on held-out digits, with a summary.

Used by ``din demo`` and by the integration tests, which check that every
request got exactly one answer.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from din.client import DinClient, DinRequestError, NoAnswerError
from din.shared.contracts.inference import SlaClass


@dataclass(frozen=True)
class RequestPlan:
    """One request of the workload."""

    tenant: str
    model: str
    sla: SlaClass
    sample: int
    labels: tuple[str, ...] = ()
    allow_degrade: bool = False
    binary: bool = False
    timeout_ms: int | None = None


@dataclass
class Outcome:
    """What came back for one planned request."""

    plan: RequestPlan
    latency_ms: float
    ok: bool
    code: str = "ok"
    site: str = ""
    model: str = ""
    degraded: bool = False
    correct: bool | None = None


@dataclass
class WorkloadReport:
    """All outcomes, with per-group summaries."""

    outcomes: list[Outcome] = field(default_factory=list)
    wall_s: float = 0.0

    def rows(self) -> list[dict[str, object]]:
        groups: dict[tuple[str, str], list[Outcome]] = defaultdict(list)
        for outcome in self.outcomes:
            groups[(outcome.plan.tenant, outcome.plan.sla.value)].append(outcome)
        rows = []
        for (tenant, sla), items in sorted(groups.items()):
            ok = [o for o in items if o.ok]
            latencies = np.array([o.latency_ms for o in ok]) if ok else np.array([0.0])
            graded = [o.correct for o in ok if o.correct is not None]
            rows.append(
                {
                    "tenant": tenant,
                    "sla": sla,
                    "sent": len(items),
                    "ok": len(ok),
                    "errors": dict(Counter(o.code for o in items if not o.ok)),
                    "p50_ms": float(np.percentile(latencies, 50)),
                    "p99_ms": float(np.percentile(latencies, 99)),
                    "accuracy": (sum(graded) / len(graded)) if graded else None,
                    "sites": dict(Counter(o.site for o in ok)),
                    "degraded": sum(o.degraded for o in ok),
                }
            )
        return rows

    def table(self) -> str:
        header = "| tenant | SLA | sent | ok | p50 ms | p99 ms | accuracy | degraded | served at | errors |"
        lines = [header, "|" + "---|" * 10]
        for row in self.rows():
            accuracy = f"{row['accuracy']:.3f}" if row["accuracy"] is not None else "-"
            sites = ", ".join(f"{k}:{v}" for k, v in sorted(row["sites"].items())) or "-"
            errors = ", ".join(f"{k}:{v}" for k, v in sorted(row["errors"].items())) or "-"
            lines.append(
                f"| {row['tenant']} | {row['sla']} | {row['sent']} | {row['ok']} | {row['p50_ms']:.2f} | "
                f"{row['p99_ms']:.2f} | {accuracy} | {row['degraded']} | {sites} | {errors} |"
            )
        total = len(self.outcomes)
        answered = sum(1 for o in self.outcomes if o.code != "no_answer")
        lines.append("")
        lines.append(
            f"{total} requests, {answered} answered, in {self.wall_s:.1f}s "
            f"({total / max(self.wall_s, 1e-9):.0f} req/s)"
        )
        return "\n".join(lines)


def load_digits_test(model_repo: Path) -> tuple[np.ndarray, np.ndarray]:
    """The held-out digits the model zoo saved at build time."""
    data = np.load(Path(model_repo) / "_data" / "digits_test.npz")
    return data["X"].astype(np.float32), data["y"].astype(np.int64)


def mixed_plan(tenants: list[str], count: int, samples: int, seed: int = 7) -> list[RequestPlan]:
    """A reproducible mix: realtime small-model traffic, interactive large-model with degradation, batch floods,
    and sensitive requests that must stay at the tenant's allowed sites."""
    rng = random.Random(seed)
    plan = []
    for i in range(count):
        tenant = tenants[i % len(tenants)]
        kind = rng.random()
        sample = rng.randrange(samples)
        if kind < 0.35:
            plan.append(RequestPlan(tenant, "digits-small", SlaClass.REALTIME, sample, binary=i % 2 == 0))
        elif kind < 0.65:
            plan.append(RequestPlan(tenant, "digits-large", SlaClass.INTERACTIVE, sample, allow_degrade=True))
        elif kind < 0.85:
            plan.append(RequestPlan(tenant, "digits-large", SlaClass.BATCH, sample))
        else:
            plan.append(RequestPlan(tenant, "digits-small", SlaClass.INTERACTIVE, sample, labels=("pii",)))
    return plan


async def run_workload(
    clients: dict[str, DinClient],
    plan: list[RequestPlan],
    x: np.ndarray,
    y: np.ndarray,
    *,
    concurrency: int = 32,
    progress: bool = False,
) -> WorkloadReport:
    """Send every planned request with at most ``concurrency`` in flight; collect one outcome each."""
    report = WorkloadReport()
    semaphore = asyncio.Semaphore(concurrency)
    done = 0

    async def one(item: RequestPlan) -> None:
        nonlocal done
        async with semaphore:
            started = time.perf_counter()
            try:
                result = await clients[item.tenant].infer(
                    item.model,
                    {"input": x[item.sample : item.sample + 1]},
                    sla=item.sla,
                    labels=list(item.labels),
                    allow_degrade=item.allow_degrade,
                    binary=item.binary,
                    timeout_ms=item.timeout_ms,
                )
                served = result.served_by
                label = result.outputs.get("label")
                outcome = Outcome(
                    item, (time.perf_counter() - started) * 1000.0, True, site=served.site, model=served.model,
                    degraded=served.degraded,
                    correct=bool(label is not None and int(label.reshape(-1)[0]) == int(y[item.sample])),
                )
            except DinRequestError as exc:
                outcome = Outcome(item, (time.perf_counter() - started) * 1000.0, False, code=exc.error.code.value)
            except NoAnswerError:
                outcome = Outcome(item, (time.perf_counter() - started) * 1000.0, False, code="no_answer")
            report.outcomes.append(outcome)
            done += 1
            if progress and (done % max(1, len(plan) // 50) == 0 or done == len(plan)):
                filled = int(40 * done / len(plan))
                sys.stderr.write(f"\r  [{'#' * filled}{'.' * (40 - filled)}] {done}/{len(plan)}")
                sys.stderr.flush()

    started = time.perf_counter()
    await asyncio.gather(*(one(item) for item in plan))
    report.wall_s = time.perf_counter() - started
    if progress:
        sys.stderr.write("\n")
    return report
