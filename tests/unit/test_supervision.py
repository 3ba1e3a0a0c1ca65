"""The supervisor's decisions, without processes: backoff, the reset after a stable run, giving up."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from din.stack.supervision import RestartPolicy, Supervisor
from tests.support import ManualClock


def test_backoff_doubles_and_is_capped():
    policy = RestartPolicy(first_delay_s=0.5, max_delay_s=3.0, max_quick_failures=10)
    assert [policy.delay_s(n) for n in range(1, 7)] == [0.5, 1.0, 2.0, 3.0, 3.0, 3.0]


def test_a_stable_run_starts_the_count_again():
    policy = RestartPolicy(stable_after_s=10.0)
    assert policy.quick_failures(ran_for_s=1.0, before=3) == 4
    assert policy.quick_failures(ran_for_s=60.0, before=3) == 1


def test_gives_up_after_the_last_quick_failure_allowed():
    policy = RestartPolicy(max_quick_failures=3)
    assert policy.delay_s(3) is not None
    assert policy.delay_s(4) is None


@dataclass
class FakePopen:
    returncode: int | None = None

    def poll(self):
        return self.returncode


@dataclass
class FakeProcess:
    name: str
    popen: FakePopen = field(default_factory=FakePopen)
    starts: int = 1

    @property
    def pid(self) -> int:
        return 1000 + self.starts

    def alive(self) -> bool:
        return self.popen.returncode is None

    def crash(self, code: int = 1) -> None:
        self.popen.returncode = code

    def log_tail(self) -> str:
        return f"  last lines of {self.name}.log"


@dataclass
class FakeStack:
    processes: list[FakeProcess]
    restarted: list[str] = field(default_factory=list)
    given_up: list[str] = field(default_factory=list)

    def restart(self, proc: FakeProcess) -> None:
        proc.popen = FakePopen()
        proc.starts += 1
        self.restarted.append(proc.name)

    def mark_given_up(self, proc: FakeProcess) -> None:
        self.given_up.append(proc.name)


@pytest.fixture
def clock():
    return ManualClock(0.0)


def supervised(clock, policy: RestartPolicy, *names: str) -> tuple[Supervisor, FakeStack, list[str]]:
    stack = FakeStack([FakeProcess(name) for name in names])
    reports: list[str] = []
    return Supervisor(stack, policy=policy, report=reports.append, clock=clock), stack, reports


def test_an_exited_process_is_restarted_after_its_backoff_and_only_it(clock):
    sup, stack, reports = supervised(clock, RestartPolicy(first_delay_s=1.0), "scheduler", "classifier")
    scheduler = stack.processes[0]
    clock.advance(30)
    scheduler.crash(-9)
    sup.check()
    assert stack.restarted == [] and reports == ["scheduler exited with code -9 after 30.0s; restarting in 1s"]
    clock.advance(0.5)
    sup.check()
    assert stack.restarted == []
    clock.advance(0.5)
    sup.check()
    assert stack.restarted == ["scheduler"] and scheduler.alive()
    assert reports[-1] == "restarted scheduler (pid 1002)"


def test_a_process_that_keeps_crashing_right_after_start_is_given_up_with_its_log(clock):
    policy = RestartPolicy(first_delay_s=1.0, max_delay_s=4.0, stable_after_s=10.0, max_quick_failures=3)
    sup, stack, reports = supervised(clock, policy, "admission", "telemetry")
    admission, telemetry = stack.processes
    waits = []
    for _ in range(4):
        clock.advance(2)
        admission.crash(3)
        sup.check()
        if stack.given_up:
            break
        waits.append(float(reports[-1].rsplit("in ", 1)[1].rstrip("s")))
        clock.advance(waits[-1])
        sup.check()
    assert waits == [1.0, 2.0, 4.0]
    assert stack.restarted == ["admission"] * 3 and stack.given_up == ["admission"]
    assert "admission exited (last code 3) 4 times in a row within 10s" in reports[-1]
    assert "last lines of admission.log" in reports[-1]

    clock.advance(100)
    sup.check()
    assert stack.restarted == ["admission"] * 3, "a process given up on stays down"
    telemetry.crash(0)
    sup.check()
    clock.advance(1)
    sup.check()
    assert stack.restarted[-1] == "telemetry", "the rest is still supervised"
