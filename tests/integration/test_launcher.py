"""The launcher over real brokers, with a fake service standing in for each real one.

Every test checks that nothing it started is left running, by pid and process group.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import nats
import pytest
import yaml
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from din.cli import main
from din.shared.contracts.events import HealthV1
from din.shared.credentials import read_credentials
from din.shared.topology import load_topology
from din.stack.launcher import PortPlan, Stack, port_roles, read_state
from din.stack.processes import StackError, pid_alive, port_is_free
from din.stack.supervision import RestartPolicy, Supervisor
from tests.support import wait_for, wait_for_sync

pytestmark = pytest.mark.integration

FAKE_SERVICE = Path(__file__).with_name("fake_service.py")
REPO = Path(__file__).resolve().parents[2]


def fake(*flags: str, only: str | None = None, dump_env: Path | None = None, spawn_child: str | None = None):
    """A service command running the fake; ``flags`` apply to every service, or only to process ``only``."""

    def command(instance):
        argv = [sys.executable, str(FAKE_SERVICE), instance.service]
        if only is None or instance.name == only:
            argv += list(flags)
        if dump_env is not None:
            argv += ["--dump-env", str(dump_env)]
        if spawn_child == instance.name:
            argv.append("--spawn-child")
        return argv

    return command


def group_members(pgid: int) -> list[int]:
    """Running (not zombie) processes of process group ``pgid``."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(stat.parent.name))
    return members


def assert_nothing_left(pids: list[int]) -> None:
    def left() -> list[int]:
        return [p for p in pids if pid_alive(p) or group_members(p)]

    wait_for_sync(lambda: not left(), 5, lambda: f"no process left behind (left: {left()})")


def stop_din_up(up: subprocess.Popen) -> None:
    """Stop a foreground ``din up`` the way Ctrl-C would, so a failed test leaves no stack behind; kill it last."""
    if up.poll() is None:
        up.send_signal(signal.SIGTERM)
        try:
            up.wait(timeout=60)
        except subprocess.TimeoutExpired:
            up.kill()
            up.wait(timeout=10)


def free_offset(topology) -> int:
    """An offset that moves every default port of ``topology``'s stack onto free ports."""
    for _ in range(200):
        offset = random.randrange(20000, 40000)
        if all(port_is_free(port) for port, _ in port_roles(topology, PortPlan().offset(offset), wan=True)):
            return offset
    raise RuntimeError("no free port offset found")


@pytest.fixture
def topology_file(tmp_path, test_topology) -> Path:
    path = tmp_path / "topology.yaml"
    path.write_text(yaml.safe_dump(test_topology.model_dump(mode="json"), sort_keys=False))
    return path


def test_full_stack_with_fake_services_starts_reports_and_stops(test_topology, tmp_path, capsys):
    envs_dir = tmp_path / "envs"
    envs_dir.mkdir()
    stack = Stack(
        test_topology,
        ports=PortPlan.free(edge_sites=2),
        din_dir=tmp_path / "din",
        mode="distributed",
        service_command=fake(dump_env=envs_dir, spawn_child="executor-factory-1"),
        ready_timeout_s=30,
    )
    stack.start()
    try:
        names = [p.name for p in stack.processes]
        assert names[:4] == ["kafka", "nats-hub-cloud", "nats-leaf-factory", "nats-leaf-branch"]
        assert names[4:] == [
            "keymanager", "telemetry", "executor-cloud-1", "executor-factory-1", "executor-branch-1",
            "scheduler", "scheduler-factory", "scheduler-branch", "classifier", "classifier-factory",
            "classifier-branch", "admission", "admission-factory", "admission-branch", "gateway", "gateway-factory",
            "gateway-branch",
        ]
        assert all(p.alive() for p in stack.processes)

        # Each service saw exactly the environment service_environments() planned for it.
        planned = stack.environments()
        for inst in stack.instances:
            seen = json.loads((envs_dir / f"{inst.service}-{inst.instance or inst.service}.json").read_text())
            assert seen == planned[inst.name], inst.name
        assert planned["executor-factory-1"]["DIN_NATS_URL"] == stack.nats_urls["factory"]
        assert planned["executor-cloud-1"]["DIN_NATS_URL"] == stack.hub_url
        assert planned["admission"]["DIN_NATS_URL"] == stack.hub_url
        assert planned["scheduler"]["DIN_SCHEDULER_MODE"] == "distributed"
        assert set(read_credentials(Path(planned["admission"]["DIN_ADMISSION_CREDENTIALS_FILE"]))) == {"acme", "globex"}
        assert load_topology(Path(planned["telemetry"]["DIN_TOPOLOGY"])) == test_topology
        assert (stack.run_dir / "logs" / "executor-branch-1.log").read_text().startswith("executor-branch-1 answering")

        state = read_state(stack.din_dir / "stack.json")
        assert state["run_dir"] == str(stack.run_dir)
        assert [p["pid"] for p in state["processes"]] == [p.pid for p in stack.processes]
        assert state["urls"]["nats"] == stack.nats_urls

        assert main(["status", "--din-dir", str(stack.din_dir)]) == 0
        out = capsys.readouterr().out
        assert "executor-factory-1" in out and "STOPPED" not in out
        grandchild = int((envs_dir / "executor-factory-1.child").read_text())
    finally:
        pids = [p.pid for p in stack.processes]
        stack.stop()
    assert_nothing_left([*pids, grandchild])
    assert not (stack.din_dir / "stack.json").exists()
    assert main(["status", "--din-dir", str(stack.din_dir)]) == 3


def test_crashing_service_fails_start_with_its_log_and_stops_everything(test_topology, tmp_path):
    stack = Stack(
        test_topology,
        ports=PortPlan.free(edge_sites=2),
        din_dir=tmp_path,
        services=["keymanager", "executor", "scheduler"],
        kafka=False,
        service_command=fake("--crash", only="scheduler"),
        ready_timeout_s=20,
    )
    with pytest.raises(StackError) as err:
        stack.start()
    message = str(err.value)
    assert message.splitlines()[0] == "scheduler exited with code 3 during start-up"
    assert "boom, cannot load model repository" in message
    assert str(stack.run_dir / "logs" / "scheduler.log") in message
    assert len(stack.processes) == 3 + 7  # NATS, key manager, three executors, a scheduler per site
    assert_nothing_left([p.pid for p in stack.processes])
    assert not (tmp_path / "stack.json").exists()


def test_service_that_never_becomes_ready_times_out(test_topology, tmp_path):
    stack = Stack(
        test_topology,
        ports=PortPlan.free(edge_sites=2),
        din_dir=tmp_path,
        services=["classifier"],
        kafka=False,
        service_command=fake("--not-ready"),
        ready_timeout_s=8,
    )
    not_ready = r"^classifier(-factory|-branch)? not ready within 8s \(answered ready=false\)"
    with pytest.raises(StackError, match=not_ready):
        stack.start()
    assert_nothing_left([p.pid for p in stack.processes])


def test_taken_port_is_named_before_anything_starts(test_topology, tmp_path):
    plan = PortPlan.free(edge_sites=2)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", plan.leaf_clients[0]))
        holder.listen()
        stack = Stack(test_topology, ports=plan, din_dir=tmp_path, services=[], kafka=False)
        with pytest.raises(StackError) as err:
            stack.start()
    message = str(err.value)
    assert "\n" not in message
    assert f"port {plan.leaf_clients[0]} (NATS client port of leaf site factory) is already in use" in message
    assert "--port-offset" in message
    assert stack.processes == [] and stack.run_dir is None


def test_missing_java_is_one_clear_line(test_topology, tmp_path, monkeypatch):
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None if name == "java" else real_which(name, *a, **k))
    stack = Stack(test_topology, ports=PortPlan.free(edge_sites=2), din_dir=tmp_path, services=[])
    with pytest.raises(StackError, match=r"^Java not found: install a JDK 17 \(apt-get install openjdk-17"):
        stack.start()
    assert stack.processes == []


def test_second_stack_refused_while_one_runs(test_topology, tmp_path):
    (tmp_path / "stack.json").write_text(
        json.dumps({"run_dir": "/elsewhere", "processes": [{"name": "x", "site": "cloud", "pid": os.getpid()}]})
    )
    stack = Stack(test_topology, ports=PortPlan.free(edge_sites=2), din_dir=tmp_path, services=[], kafka=False)
    with pytest.raises(StackError, match="already running from /elsewhere: run `din down` first"):
        stack.start()


def test_cli_errors_are_one_line_and_exit_2(tmp_path, topology_file, test_topology, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sites: [")
    assert main(["up", "--topology", str(bad), "--din-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("din: error: topology file") and "Traceback" not in err

    offset = free_offset(test_topology)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 7422 + offset))
        holder.listen()
        code = main(["up", "--topology", str(topology_file), "--din-dir", str(tmp_path), "--port-offset", str(offset)])
    err = capsys.readouterr().err
    assert code == 2
    assert err == (
        f"din: error: port {7422 + offset} (NATS leafnode port of hub site cloud) is already in use: stop what "
        f"holds it (`din down` for an old stack) or pass --port-offset N to move every port\n"
    )


def test_cli_foreground_up_then_status_and_down_from_another_shell(tmp_path, topology_file, test_topology, capsys):
    offset = free_offset(test_topology)
    din_dir = tmp_path / "din"
    up = subprocess.Popen(
        [sys.executable, "-m", "din.cli", "up", "--services", "none", "--topology", str(topology_file),
         "--din-dir", str(din_dir), "--port-offset", str(offset)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    lines = []
    try:
        for line in up.stdout:
            lines.append(line)
            if "press Ctrl-C to stop" in line or up.poll() is not None:
                break
        output = "".join(lines)
        assert "press Ctrl-C to stop" in output, output
        assert f"nats://127.0.0.1:{4222 + offset}" in output and f"127.0.0.1:{9092 + offset}" in output

        state = read_state(din_dir / "stack.json")
        assert state["supervisor"]["pid"] == up.pid
        pids = [p["pid"] for p in state["processes"]]
        assert [p["name"] for p in state["processes"]] == [
            "kafka", "toxiproxy", "nats-hub-cloud", "nats-leaf-factory", "nats-leaf-branch"
        ]

        assert main(["status", "--din-dir", str(din_dir)]) == 0
        assert f"supervised by pid {up.pid}" in capsys.readouterr().out

        assert main(["down", "--din-dir", str(din_dir)]) == 0
        assert up.wait(timeout=30) == 0
        rest = up.stdout.read()
        assert "stopped" in rest
    finally:
        stop_din_up(up)
    assert_nothing_left(pids)
    assert not (din_dir / "stack.json").exists()


def test_cli_detached_up_is_supervised_restarts_a_killed_broker_and_down_stops_all(
    tmp_path, topology_file, test_topology, capsys
):
    offset = free_offset(test_topology)
    din_dir = tmp_path / "din"
    args = ["--din-dir", str(din_dir)]
    assert main(["up", "--detach", "--services", "none", "--topology", str(topology_file),
                 "--port-offset", str(offset), *args]) == 0
    assert "detached" in capsys.readouterr().out
    state = read_state(din_dir / "stack.json")
    pids = [p["pid"] for p in state["processes"]]
    supervisor = state["supervisor"]["pid"]
    try:
        assert supervisor != os.getpid() and pid_alive(supervisor), "a background supervisor outlives `din up`"
        assert all(pid_alive(p) for p in pids)
        assert main(["status", *args]) == 0
        assert f"supervised by pid {supervisor}" in capsys.readouterr().out
        assert main(["up", "--detach", "--services", "none", "--topology", str(topology_file),
                     "--port-offset", str(offset), *args]) == 2, "a second `din up` is refused"
        assert "already running" in capsys.readouterr().err
        assert read_state(din_dir / "stack.json") == state and all(pid_alive(p) for p in pids)

        leaf = next(p for p in state["processes"] if p["name"] == "nats-leaf-factory")
        os.kill(leaf["pid"], signal.SIGKILL)

        def restarted() -> dict | None:
            entry = next(p for p in read_state(din_dir / "stack.json")["processes"] if p["name"] == leaf["name"])
            return entry if entry["restarts"] == 1 and pid_alive(entry["pid"]) else None

        again = wait_for_sync(restarted, 30, "the killed leaf server restarted by the background supervisor")
        pids.append(again["pid"])
        wait_for_sync(lambda: main(["status", *args]) == 0, 30, "din status: every process running again")
        out = capsys.readouterr().out
        row = next(line for line in out.splitlines() if " nats-leaf-factory " in f" {line} ")
        assert row.split()[2:5] == [str(again["pid"]), "running", "1"], row
    finally:
        assert main(["down", *args]) == 0
    assert_nothing_left([*pids, supervisor])
    assert main(["down", *args]) == 0
    assert "no stack running" in capsys.readouterr().out


async def test_supervisor_restarts_a_killed_service_which_answers_health_again(test_topology, tmp_path, capsys):
    stack = Stack(
        test_topology,
        ports=PortPlan.free(edge_sites=2),
        din_dir=tmp_path,
        services=["scheduler", "classifier"],
        kafka=False,
        service_command=fake(),
        ready_timeout_s=30,
    )
    stack.start()
    stop = threading.Event()
    supervisor = Supervisor(stack, RestartPolicy(first_delay_s=0.2), report=lambda line: None)
    watcher = threading.Thread(target=supervisor.run, kwargs={"poll_s": 0.05, "until": stop})
    watcher.start()
    pids = [p.pid for p in stack.processes]
    nc = await nats.connect(stack.hub_url, **stack.nats_options())
    try:
        scheduler = next(p for p in stack.processes if p.name == "scheduler")
        health = next(i for i in stack.instances if i.name == "scheduler").health_subject
        killed = scheduler.pid
        os.kill(killed, signal.SIGKILL)
        await wait_for(lambda: scheduler.pid != killed and scheduler.alive(), 15, "the scheduler restarted")
        pids.append(scheduler.pid)

        async def answers() -> bool:
            reply = await nc.request(health, b"{}", timeout=0.5)
            return HealthV1.model_validate_json(reply.data).ready

        await wait_for(answers, 15, "the restarted scheduler answering health", retry_on=(NoRespondersError,
                                                                                           NatsTimeout))
        assert main(["status", "--din-dir", str(tmp_path)]) == 0
        out = capsys.readouterr().out
        row = next(line for line in out.splitlines() if line.split()[1:2] == ["scheduler"])
        assert row.split()[2:5] == [str(scheduler.pid), "running", "1"], row
        classifier = next(line for line in out.splitlines() if line.split()[1:2] == ["classifier"])
        assert classifier.split()[4] == "0"
    finally:
        await nc.close()
        stop.set()
        watcher.join(timeout=10)
        stack.stop()
    assert_nothing_left(pids)


def test_din_up_with_the_real_services_then_ctrl_c_leaves_nothing(tmp_path, topology_file, test_topology):
    """The seven real services and every executor answer health; one SIGINT stops brokers and services alike."""
    offset = free_offset(test_topology)
    din_dir = tmp_path / "din"
    up = subprocess.Popen(
        [sys.executable, "-m", "din.cli", "up", "--topology", str(topology_file), "--din-dir", str(din_dir),
         "--port-offset", str(offset)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    lines = []
    try:
        for line in up.stdout:
            lines.append(line)
            if "press Ctrl-C to stop" in line or up.poll() is not None:
                break
        output = "".join(lines)
        assert "press Ctrl-C to stop" in output, output
        state = read_state(din_dir / "stack.json")
        names = {p["name"] for p in state["processes"]}
        executors = {f"executor-{e.id}" for s in test_topology.sites for e in s.executors}
        control = {f"{service}{suffix}" for service in ("admission", "classifier", "scheduler", "gateway")
                   for suffix in ("", "-factory", "-branch")}
        assert names == {"kafka", "toxiproxy", "nats-hub-cloud", "nats-leaf-factory", "nats-leaf-branch", "telemetry",
                         "keymanager"} | control | executors
        pids = [p["pid"] for p in state["processes"]]
        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=60) == 0
    finally:
        stop_din_up(up)
    assert_nothing_left(pids)
    assert not (din_dir / "stack.json").exists()
