"""Providers: who starts and stops the executors the autoscaler asks for, behind one small interface.

* ``LocalProcesses`` runs each executor as a process on this machine, exactly as ``din up`` runs a fixed one (the
  launcher hands it every pool executor's environment). It keeps each one's pid in its state folder, so an
  autoscaler that crashed and restarts adopts the executors still running instead of starting others; a stop
  asks an executor to drain (SIGTERM: it announces draining, finishes its queue and exits).
* ``KedaScaled`` is Kubernetes: KEDA's Prometheus scaler sets each pool StatefulSet's replicas from the
  ``din_pool_desired_executors`` gauge the decisions feed (``ops/kubernetes``), so the provider itself starts
  nothing and reports nothing; the autoscaler tells ready from the executors' own health answers.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from enum import StrEnum
from pathlib import Path
from typing import Protocol

from din.stack.processes import pid_alive, same_process, start_time


class ProviderError(RuntimeError):
    """A provider could not do what it was asked (the start is counted as failed)."""


class Liveness(StrEnum):
    """What a provider knows of one executor's process."""

    RUNNING = "running"
    EXITED = "exited"
    UNKNOWN = "unknown"
    """The provider cannot tell (Kubernetes): judge by the executor's health answers."""


class Provider(Protocol):
    """Starts and stops pool executors by id."""

    name: str

    def start(self, executor_id: str) -> None:
        """Ask for executor ``executor_id`` (returns at once; readiness shows on its health subject)."""

    def stop(self, executor_id: str) -> None:
        """Ask ``executor_id`` to drain and exit."""

    def kill(self, executor_id: str) -> None:
        """End ``executor_id`` now (a start that failed, a drain that took too long)."""

    def liveness(self, executor_id: str) -> Liveness:
        """Whether its process runs."""

    def adopted(self) -> list[str]:
        """Executors still running from before this provider started."""

    def stop_all(self) -> None:
        """Ask every executor it runs to drain and exit (the autoscaler is stopping)."""


class KedaScaled:
    """Kubernetes with KEDA: the decisions are the interface; nothing to do here."""

    name = "kubernetes"

    def start(self, executor_id: str) -> None:
        return None

    def stop(self, executor_id: str) -> None:
        return None

    def kill(self, executor_id: str) -> None:
        return None

    def liveness(self, executor_id: str) -> Liveness:
        return Liveness.UNKNOWN

    def adopted(self) -> list[str]:
        return []

    def stop_all(self) -> None:
        return None


PID_RECORD = ".pid.json"
"""Each started executor's record in the state folder: ``<executor id>.pid.json``, its pid and start time."""


def recorded_executors(state_dir: Path, *, forget: bool = False) -> dict[str, int]:
    """The executors recorded in ``state_dir`` that still run, by id, with their pids; the records of gone ones
    are removed (all of them with ``forget``)."""
    running = {}
    for record in sorted(Path(state_dir).glob(f"*{PID_RECORD}")):
        with contextlib.suppress(ValueError, KeyError, OSError):
            held = json.loads(record.read_text())
            if same_process(held["pid"], held.get("start_time")):
                running[record.name.removesuffix(PID_RECORD)] = held["pid"]
                if not forget:
                    continue
        record.unlink(missing_ok=True)
    return running


class LocalProcesses:
    """Executors as processes of this machine (``python -m din.services.executor``), one session each."""

    name = "local"

    def __init__(self, environments: dict[str, dict[str, str]], state_dir: Path, log_dir: Path | None = None,
                 cwd: Path | None = None) -> None:
        self.environments = environments
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir = Path(log_dir) if log_dir is not None else self.state_dir
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.cwd = cwd
        self._children: dict[str, subprocess.Popen] = {}
        self._adopted: dict[str, int] = recorded_executors(self.state_dir)

    @classmethod
    def from_file(cls, environments: Path, state_dir: Path, log_dir: Path | None = None) -> LocalProcesses:
        """The environments the launcher wrote (executor id to environment)."""
        return cls(json.loads(Path(environments).read_text()), state_dir, log_dir)

    def _pid(self, executor_id: str) -> int | None:
        child = self._children.get(executor_id)
        return child.pid if child is not None else self._adopted.get(executor_id)

    def start(self, executor_id: str) -> None:
        if executor_id not in self.environments:
            raise ProviderError(f"no environment for executor {executor_id!r}: is it a pool executor of the "
                                "topology the stack runs?")
        if self.liveness(executor_id) is Liveness.RUNNING:
            return
        log = open(self.log_dir / f"executor-{executor_id}.log", "ab")
        try:
            child = subprocess.Popen([sys.executable, "-m", "din.services.executor"], stdout=log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.cwd,
                                     env={**os.environ, **self.environments[executor_id], "PYTHONUNBUFFERED": "1"},
                                     start_new_session=True)
        except OSError as exc:
            raise ProviderError(f"cannot start executor {executor_id}: {exc}") from None
        finally:
            log.close()
        self._children[executor_id] = child
        self._adopted.pop(executor_id, None)
        record = {"pid": child.pid, "start_time": start_time(child.pid)}
        (self.state_dir / f"{executor_id}{PID_RECORD}").write_text(json.dumps(record))

    def _signal(self, executor_id: str, sig: signal.Signals) -> None:
        pid = self._pid(executor_id)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, sig)

    def stop(self, executor_id: str) -> None:
        self._signal(executor_id, signal.SIGTERM)

    def kill(self, executor_id: str) -> None:
        self._signal(executor_id, signal.SIGKILL)
        self._reap(executor_id)

    def liveness(self, executor_id: str) -> Liveness:
        child = self._children.get(executor_id)
        if child is not None:
            if child.poll() is None:
                return Liveness.RUNNING
            self._reap(executor_id)
            return Liveness.EXITED
        pid = self._adopted.get(executor_id)
        if pid is not None and pid_alive(pid):
            return Liveness.RUNNING
        self._reap(executor_id)
        return Liveness.EXITED

    def _reap(self, executor_id: str) -> None:
        child = self._children.pop(executor_id, None)
        if child is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=0.5)
        self._adopted.pop(executor_id, None)
        (self.state_dir / f"{executor_id}{PID_RECORD}").unlink(missing_ok=True)

    def adopted(self) -> list[str]:
        return sorted(self._adopted)

    def running(self) -> list[str]:
        """Every executor it runs now."""
        return sorted(e for e in {*self._children, *self._adopted} if self.liveness(e) is Liveness.RUNNING)

    def stop_all(self) -> None:
        for executor_id in self.running():
            self.stop(executor_id)
