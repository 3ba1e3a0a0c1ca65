"""OS processes the stack owns: start with a log file, wait until ready, stop cleanly."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path


class StackError(RuntimeError):
    """A stack that could not start or stop; the message says what to do."""


LOCAL_BIN = Path(__file__).resolve().parents[2] / ".din" / "bin"
"""Where ``ops/setup.sh`` puts the tools it builds (Toxiproxy, the nats CLI)."""


def local_tool(name: str, how: str) -> str:
    """Path of tool ``name``: ``LOCAL_BIN`` first, then ``PATH``; else ``StackError`` saying ``how`` to get it."""
    if (LOCAL_BIN / name).exists():
        return str(LOCAL_BIN / name)
    found = shutil.which(name)
    if found:
        return found
    raise StackError(f"{name} not found in {LOCAL_BIN}: {how}")


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout_s: float, proc: ManagedProcess | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise StackError(f"{proc.name} exited before listening on port {port}\n{proc.log_tail()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    who = proc.name if proc else "server"
    tail = f"\n{proc.log_tail()}" if proc else ""
    raise StackError(f"{who} did not listen on port {port} within {timeout_s:.0f}s{tail}")


@dataclass
class ManagedProcess:
    """One child process with its own session, so stopping it stops its children too."""

    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    popen: subprocess.Popen | None = None

    def start(self) -> ManagedProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        try:
            self.popen = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **self.env},
                cwd=self.cwd,
                start_new_session=True,
            )
        except FileNotFoundError:
            raise StackError(f"cannot start {self.name}: {self.argv[0]} not found") from None
        finally:
            log.close()
        return self

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return f"  (no log at {self.log_path})"
        tail = "\n".join(f"  | {line}" for line in text[-lines:])
        return f"  last lines of {self.log_path}:\n{tail}"

    def stop(self, timeout_s: float = 10.0) -> None:
        if not self.alive():
            return
        terminate_group(self.popen.pid, timeout_s)
        self.popen.wait(timeout=1)


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (exited, not yet reaped by its parent) counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"


def start_time(pid: int) -> str | None:
    """Kernel start time of ``pid`` (Linux), to tell a pid from a later process reusing it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def same_process(pid: int, started: str | None) -> bool:
    """True when ``pid`` still runs and is the process recorded with start time ``started``."""
    if not pid_alive(pid):
        return False
    return started is None or start_time(pid) in (None, started)


def _wait_gone(pid: int, timeout_s: float) -> bool:
    """Wait up to ``timeout_s`` for ``pid`` to exit, reaping it when it is our child."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            finished, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            finished = 0
        if finished == pid or not pid_alive(pid):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def stop_all(procs: list[ManagedProcess], timeout_s: float = 10.0) -> None:
    """Stop ``procs`` together: SIGTERM every process group at once, wait up to ``timeout_s`` in all for them to
    exit (each drains its own work meanwhile), then SIGKILL what is left."""
    running = [p for p in procs if p.alive()]
    for proc in running:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.popen.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for proc in running:
        _wait_gone(proc.popen.pid, max(0.0, deadline - time.monotonic()))
    for proc in running:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.popen.pid, signal.SIGKILL)
        _wait_gone(proc.popen.pid, 2.0)
        with contextlib.suppress(Exception):
            proc.popen.wait(timeout=1)


def terminate_group(pid: int, timeout_s: float = 10.0) -> None:
    """SIGTERM the process group led by ``pid``; once the leader exits or ``timeout_s`` passes, SIGKILL what is left."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    _wait_gone(pid, timeout_s)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    _wait_gone(pid, 2.0)
