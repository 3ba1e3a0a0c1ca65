"""Exactly one answer (issue 14 item 4) over the real stack, counted per request: ok, each error code, unanswered,
duplicated.

An executor paused (SIGSTOP) for longer than its scheduler's loss timeout holds jobs the scheduler then dispatches
again to the other executor; resumed, it reads those jobs and would answer them a second time. It fences them
instead (its event loop stalled past its lease) and counts them. Long deadlines, so that time is no excuse.

A scheduler paused while executors answer its jobs finds, resumed, their completions in its buffers and its
watchdog long overdue: it catches up on its input before the watchdog may answer, so it answers none of them.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from din.bench.tally import Load
from din.shared.security import CryptoPolicy
from tests.integration.network import running_network
from tests.support import three_site_topology, wait_for

ONE_ANSWER_TOPOLOGY = three_site_topology(
    "one-answer-tests",
    {"cloud": [{"id": "one-1", "models": ["digits-small"]}, {"id": "one-2", "models": ["digits-small"]}]},
    [{"name": "globex", "rate_per_s": 5000, "burst": 5000}],
)


@pytest.fixture(scope="module")
def network(kafka_access, zoo_dir, tmp_path_factory):
    with running_network(kafka_access, zoo_dir, tmp_path_factory.mktemp("din"), "centralized",
                         security_policy=CryptoPolicy(plaintext_ingress=["globex"]),
                         topology_spec=ONE_ANSWER_TOPOLOGY) as net:
        yield net


async def fenced(network, executor: str) -> int:
    return int((await network.health("executor", executor)).detail["answers_fenced"])


async def test_an_executor_paused_past_its_loss_timeout_answers_none_of_the_jobs_dispatched_again(network):
    await network.wait_live_executors(2)
    victim = network.process("executor-one-2")
    load = Load(network.hub_url, {"globex": network.token("globex")}, network.stack.nats_options())
    try:
        async with load:
            os.kill(victim.pid, signal.SIGSTOP)
            try:
                await load.send("globex", "digits-small", 40, every_s=0.0, timeout_ms=30000)
                await network.wait_live_executors(1)
            finally:
                os.kill(victim.pid, signal.SIGCONT)
            await network.wait_live_executors(2)
            await load.settle()
            await load.send("globex", "digits-small", 20, every_s=0.01, timeout_ms=30000)
            outcome = await load.settle()
        assert outcome == {"ok": 60, "unanswered": 0, "duplicated": 0}
        assert await fenced(network, "one-2") > 0, "the paused executor held none of the jobs"
        assert await fenced(network, "one-1") == 0
    finally:
        await network.restore()


async def test_a_scheduler_behind_on_its_completions_leaves_answered_jobs_to_them_not_to_its_watchdog(network,
                                                                                                      monkeypatch):
    """Jobs held by a briefly frozen executor (its heartbeats 2 s apart, so the freeze is well within its lease)
    are answered while their scheduler is frozen; the scheduler resumes after their deadline and its watchdog
    time, their completions still unread: each request still gets exactly one answer, the executor's ``ok``."""
    monkeypatch.setenv("DIN_EXECUTOR_HEARTBEAT_INTERVAL_S", "2.0")
    network.start_executor("one-slow", "cloud", like="one-1")
    await network.wait_ready("executor", "one-slow", timeout_s=60.0)
    await network.wait_live_executors(3)
    executor, scheduler = network.process("executor-one-slow"), network.process("scheduler")
    before = int((await network.health("scheduler")).detail["scheduled"])
    load = Load(network.hub_url, {"globex": network.token("globex")}, network.stack.nats_options())
    try:
        async with load:
            os.kill(executor.pid, signal.SIGSTOP)
            try:
                sent = time.monotonic()
                await load.send("globex", "digits-small", 30, every_s=0.0, timeout_ms=1500)

                async def placed() -> bool:
                    return int((await network.health("scheduler")).detail["scheduled"]) - before >= 30

                await wait_for(placed, 5, "the scheduler placed the 30 jobs")
                os.kill(scheduler.pid, signal.SIGSTOP)
            finally:
                os.kill(executor.pid, signal.SIGCONT)
            try:
                await wait_for(lambda: load.tally.settled(), 5, "every job answered by its executor")
                await asyncio.sleep(max(0.0, sent + 2.5 - time.monotonic()))
            finally:
                os.kill(scheduler.pid, signal.SIGCONT)
            await load.send("globex", "digits-small", 20, every_s=0.01, timeout_ms=3000)
            outcome = await load.settle()
        assert outcome == {"ok": 50, "unanswered": 0, "duplicated": 0}
        assert int((await network.health("executor", "one-slow")).detail["completed"]) > 0, "it held no job"
    finally:
        await network.restore()
