"""An operator's tools against a running network: the ``nats`` CLI, and bringing one's own model.

Every service instance answers ``$SRV.PING|INFO|STATS`` (``shared.micro``), so ``nats micro ls|info|stats``
list them with their subscriptions and counts; the system account's user (``users/system.creds``) runs
``nats server list|report`` at any site's server. The CLI is natscli (built by ``ops/setup.sh``), which checks
every micro answer against NATS's own JSON schemas, so a malformed answer would be left out of its output.

``din models add`` puts an ONNX graph trained here (scikit-learn's breast-cancer data, a package's own) into the
network's model repository (a copy of the zoo, this module's own) and the running network serves it without a
restart; a corrupt graph, a config that does not describe its graph and a config without a name are each refused
or left out with one clear line, and the network goes on serving.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import nats
import numpy as np
import pytest

from din.client import DinRequestError
from din.commands.nats_env import nats_cli, nats_env
from din.shared.bus.permissions import tenant_user
from din.shared.naming import Subjects, micro_name
from din.stack.launcher import service_instances
from tests.integration.network import running_network
from tests.support import wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def repo(zoo_dir, tmp_path_factory):
    """This module's model repository: a copy of the zoo, so the models added here stay here."""
    copy = tmp_path_factory.mktemp("models") / "repo"
    shutil.copytree(zoo_dir, copy)
    return copy


@pytest.fixture(scope="module")
def stack(kafka_access, repo, tmp_path_factory):
    with running_network(kafka_access, repo, tmp_path_factory.mktemp("din"), "centralized", gateway=True) as net:
        yield net


@pytest.fixture
async def network(stack):
    await stack.restore()
    return stack


def run_nats(network, *args: str, site: str | None = None, system: bool = False) -> subprocess.CompletedProcess:
    """``nats ARGS`` with the environment ``din nats-env`` prints for this network."""
    env = {**os.environ, **nats_env(network.stack.state(), site, system=system), "NO_COLOR": "1"}
    return subprocess.run([nats_cli(), *args], env=env, capture_output=True, text=True, timeout=60)


def nats_json(network, *args: str, **kwargs) -> list | dict:
    done = run_nats(network, *args, "--json", **kwargs)
    assert done.returncode == 0, f"nats {' '.join(args)} failed: {done.stderr or done.stdout}"
    return json.loads(done.stdout)


async def test_nats_micro_ls_lists_every_service_instance_at_every_site(network):
    listed = nats_json(network, "micro", "ls")
    expected = sorted((micro_name(inst.service), inst.site) for inst in service_instances(network.topology))
    assert sorted((info["name"], info["metadata"]["site"]) for info in listed) == expected
    assert len({info["id"] for info in listed}) == len(listed)
    assert all(info["description"] and info["version"] for info in listed)


async def test_nats_micro_info_shows_an_instances_subscriptions(network):
    (scheduler,) = [info for info in nats_json(network, "micro", "ls", "din-scheduler")
                    if info["metadata"]["site"] == network.topology.hub.name]
    info = nats_json(network, "micro", "info", "din-scheduler", scheduler["id"])["info"]
    endpoints = {(e["name"], e["subject"], e.get("queue_group", "")) for e in info["endpoints"]}
    hub = network.topology.hub.name
    assert ("schedule", Subjects.schedule(hub), "scheduler") in endpoints
    assert ("health", Subjects.health("scheduler"), "") in endpoints
    assert {e["metadata"]["kind"] for e in info["endpoints"]} >= {"job", "control", "health"}


async def test_nats_micro_stats_count_requests_and_the_errors_answered(network, digits):
    x, _ = digits

    def infer_stats() -> list[dict]:
        return [e for s in nats_json(network, "micro", "stats", "din-admission") for e in s["endpoints"]
                if e["name"] == "infer"]

    before = sum(e["num_requests"] for e in infer_stats())
    errors_before = sum(e["num_errors"] for e in infer_stats())
    async with network.client("acme") as client:
        for i in range(5):
            await client.infer("digits-small", {"input": x[i : i + 1]})
    nc = await nats.connect(network.hub_url, **network.stack.nats_options())
    try:
        reply = await nc.request(Subjects.infer("acme", "digits-small"), b"not json", timeout=10)
        assert b"unauthenticated" in reply.data or b"bad_request" in reply.data
    finally:
        await nc.close()

    await wait_for(lambda: sum(e["num_requests"] for e in infer_stats()) >= before + 6, 15,
                   "admission's infer endpoint to count 6 more requests")
    failing = [e for e in infer_stats() if e["num_errors"]]
    assert sum(e["num_errors"] for e in failing) >= errors_before + 1
    assert any(e["last_error"].startswith(("unauthenticated:", "bad_request:")) for e in failing)
    assert all(e["processing_time"] >= e["average_processing_time"] >= 0 for e in infer_stats())


async def test_nats_server_report_works_with_the_system_account_at_each_site(network):
    for site in (network.topology.hub.name, *[s.name for s in network.topology.sites if s.role == "edge"]):
        report = nats_json(network, "server", "report", "connections", site=site, system=True)
        names = {connection.get("name", "") for connection in report}
        assert f"din-admission-{site}" in names, f"the report at {site} lists no admission: {sorted(names)}"


async def test_a_tenant_cannot_discover_or_impersonate_services(network):
    refusals: list[str] = []

    async def error_cb(error: Exception) -> None:
        refusals.append(str(error))

    nc = await nats.connect(network.hub_url, error_cb=error_cb, allow_reconnect=False,
                            **network.stack.nats_options(user=tenant_user("acme")))
    try:
        await nc.publish(Subjects.micro("PING"), b"")
        await nc.subscribe(Subjects.micro("INFO", "admission"))
        await nc.flush()
        await wait_for(lambda: sum("permissions violation" in r.lower() for r in refusals) >= 2, 10,
                       lambda: f"two permission refusals (got {refusals})")
    finally:
        await nc.close()


@pytest.fixture(scope="module")
def breast_cancer(tmp_path_factory):
    """A gradient-boosted classifier of scikit-learn's breast-cancer data as ONNX, its held-out split, and its
    accuracy there as ONNX Runtime scores it locally."""
    import onnxruntime
    from skl2onnx import to_onnx
    from sklearn.datasets import load_breast_cancer
    from sklearn.ensemble import GradientBoostingClassifier
    from sklearn.model_selection import train_test_split

    x, y = load_breast_cancer(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x.astype(np.float32), y, test_size=0.25, random_state=0)
    model = GradientBoostingClassifier(random_state=0).fit(x_train, y_train)
    path = tmp_path_factory.mktemp("graphs") / "breast-cancer.onnx"
    path.write_bytes(to_onnx(model, x_train[:1], options={"zipmap": False}).SerializeToString())
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    local = session.run(["label"], {"X": x_test})[0]
    return path, x_test, y_test, float(np.mean(local == y_test))


def din(network, *args: str, stack: bool = True) -> subprocess.CompletedProcess:
    """``din ARGS`` as the operator runs it, against this network with ``stack`` (its state written where
    ``--din-dir`` looks)."""
    din_dir = network.stack.run_dir / "operator"
    din_dir.mkdir(exist_ok=True)
    (din_dir / "stack.json").write_text(json.dumps(network.stack.state()))
    where = ["--din-dir", str(din_dir)] if stack else []
    return subprocess.run([sys.executable, "-m", "din.cli", *args, *where], capture_output=True, text=True,
                          timeout=120)


async def test_a_model_added_with_din_models_add_is_served_without_a_restart(network, repo, breast_cancer):
    graph, x_test, y_test, local_accuracy = breast_cancer
    done = din(network, "models", "add", str(graph), "--name", "breast-cancer", "--task", "tabular-classification",
               "--accuracy", f"{local_accuracy:.3f}", "--repo", str(repo), "--serve-on", "cloud-2")
    assert done.returncode == 0, done.stderr
    assert "inputs X FP32[-1, 30]" in done.stdout and "cloud-2 now serves breast-cancer version 1" in done.stdout

    async with network.client("acme") as client:
        async def answered():
            try:
                return await client.infer("breast-cancer", {"X": x_test[:1]})
            except DinRequestError as error:
                if error.error.code.value in ("unknown_model", "no_eligible_executor"):
                    return None
                raise

        await wait_for(answered, 20, "the network to serve the added model", interval=0.5)
        labels = [int((await client.infer("breast-cancer", {"X": x_test[i : i + 1]})).outputs["label"][0])
                  for i in range(len(x_test))]
    assert np.mean(np.array(labels) == y_test) == pytest.approx(local_accuracy)


async def test_a_corrupt_graph_or_a_wrong_config_is_refused_in_one_line(network, repo, tmp_path):
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07 this is no ONNX graph")
    done = din(network, "models", "add", str(corrupt), "--name", "corrupt", "--repo", str(repo))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert str(corrupt) in done.stderr and "not an ONNX graph" in done.stderr
    assert not (repo / "corrupt").exists()

    (repo / "digits-small" / "9").mkdir()
    (repo / "digits-small" / "9" / "model.onnx").write_bytes(b"garbage")
    config = json.loads((repo / "digits-small" / "config.json").read_text())
    wrong = {**config, "name": "digits-wrong", "versions": ["1"],
             "inputs": [{**config["inputs"][0], "shape": [-1, 32]}]}
    (repo / "digits-wrong" / "1").mkdir(parents=True)
    shutil.copyfile(repo / "digits-small" / "1" / "model.onnx", repo / "digits-wrong" / "1" / "model.onnx")
    (repo / "digits-wrong" / "config.json").write_text(json.dumps(wrong))
    with_nine = {**config, "versions": [*config["versions"], "9"]}
    try:
        (repo / "digits-small" / "config.json").write_text(json.dumps(with_nine))
        corrupt_load = din(network, "models", "load", "--executor", "cloud-2", "--model", "digits-small",
                           "--version", "9")
        wrong_load = din(network, "models", "load", "--executor", "cloud-2", "--model", "digits-wrong")
    finally:
        (repo / "digits-small" / "config.json").write_text(json.dumps(config))
        shutil.rmtree(repo / "digits-small" / "9")
        shutil.rmtree(repo / "digits-wrong")
    assert corrupt_load.returncode == 2 and "Traceback" not in corrupt_load.stderr
    assert "not an ONNX graph" in corrupt_load.stderr and "digits-small" in corrupt_load.stderr
    assert wrong_load.returncode == 2 and "[-1, 32] in the config, [-1, 64] in the graph" in wrong_load.stderr
    await _still_serves(network)


async def test_a_config_without_a_name_is_left_out_and_the_network_goes_on(network, repo):
    (repo / "nameless").mkdir()
    (repo / "nameless" / "config.json").write_text(json.dumps({"versions": ["1"], "inputs": [], "outputs": []}))
    try:
        listed = din(network, "models", "list", "--repo", str(repo), stack=False)
        await _still_serves(network)
    finally:
        shutil.rmtree(repo / "nameless")
    assert listed.returncode == 0, listed.stderr
    assert "left out:" in listed.stdout and str(repo / "nameless" / "config.json") in listed.stdout
    assert "digits-small" in listed.stdout


async def _still_serves(network) -> None:
    x = np.zeros((1, 64), dtype=np.float32)
    async with network.client("globex") as client:
        assert (await client.infer("digits-small", {"input": x})).outputs["label"].shape == (1,)
