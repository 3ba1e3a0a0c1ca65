"""The Kubernetes manifests (ops/kubernetes) are what `din up` runs, valid for the API server and for KEDA: every core
object against the Kubernetes schemas (kubernetes-validate, strict), every ScaledObject against KEDA's own CRD;
one StatefulSet and one ScaledObject per pool, a workload per service instance, no secret in the files."""

from __future__ import annotations

import re
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from din.cli import build_parser
from din.kubernetes import (
    DRAIN_GRACE_S,
    KEDA_SCALEDOBJECT_CRD,
    KEYS_SECRET,
    MANIFEST_DIR,
    MANIFESTS,
    POD_INDEX_LABEL,
    POOL_GAUGE,
    drifted,
    kubernetes_objects,
    mounted_key_files,
    pool_name,
    render_manifests,
    secret_key,
    secret_objects,
    write_manifests,
)
from din.shared.topology import load_topology
from din.stack.brokers import REPO_ROOT
from din.stack.launcher import AUTOSCALER, EXECUTOR, pool_instances, service_environments, service_instances

KUBERNETES_VERSION = "1.33.0"
"""The oldest release the manifests target: StatefulSet ``ordinals`` and the pod-index label are GA there."""


def documents(manifest: str) -> list[dict]:
    return list(yaml.safe_load_all((REPO_ROOT / MANIFEST_DIR / manifest).read_text()))


def by_kind(objects: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def closed(schema: dict) -> dict:
    """``schema`` with every object that lists its properties closed to others: the API server prunes a field a
    CRD does not declare without a word, so a misspelt one would be lost silently rather than refused."""
    if isinstance(schema, dict):
        schema = {k: closed(v) for k, v in schema.items()}
        if schema.get("type") == "object" and "properties" in schema and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [closed(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def scaledobject_schema() -> dict:
    crd = yaml.safe_load((REPO_ROOT / KEDA_SCALEDOBJECT_CRD).read_text())
    assert crd["spec"]["names"]["kind"] == "ScaledObject"
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    return closed(version["schema"]["openAPIV3Schema"])


def test_committed_manifests_match_a_fresh_render():
    assert drifted() == [], "run `din manifests` and commit ops/kubernetes"


def test_drift_check_sees_a_changed_missing_and_stale_manifest(tmp_path: Path):
    write_manifests(tmp_path)
    assert drifted(tmp_path) == []
    first, second = sorted(MANIFESTS)
    (tmp_path / MANIFEST_DIR / first).write_text("# edited\n")
    (tmp_path / MANIFEST_DIR / second).unlink()
    (tmp_path / MANIFEST_DIR / "old.yaml").write_text("{}\n")
    assert drifted(tmp_path) == sorted(f"{MANIFEST_DIR}/{n}" for n in (first, second, "old.yaml"))


def test_cli_check_fails_on_drift(monkeypatch, capsys):
    args = build_parser().parse_args(["manifests", "--check"])
    monkeypatch.setattr("din.commands.manifests.drifted", lambda: [f"{MANIFEST_DIR}/din.yaml"])
    assert args.handler(args) == 1
    assert "din.yaml" in capsys.readouterr().err


@pytest.mark.parametrize("manifest", sorted(MANIFESTS))
def test_every_core_object_is_valid_for_kubernetes(manifest):
    objects = documents(manifest)
    core = [o for o in objects if not o["apiVersion"].startswith("keda.sh/")]
    assert {o["kind"] for o in core} >= {"Namespace", "ConfigMap", "Service", "StatefulSet", "Deployment", "Job"}
    for obj in core:
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{obj['kind']} {obj['metadata']['name']}: {exc.message} at {list(exc.path)}")
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == "din"


@pytest.mark.parametrize("manifest", sorted(MANIFESTS))
def test_every_scaledobject_is_valid_for_keda(manifest, scaledobject_schema):
    for obj in by_kind(documents(manifest), "ScaledObject").values():
        assert obj["apiVersion"] == "keda.sh/v1alpha1"
        jsonschema.validate({"spec": obj["spec"]}, scaledobject_schema)
        # The CRD's CEL rule, which jsonschema does not read.
        assert obj["spec"]["minReplicaCount"] <= obj["spec"]["maxReplicaCount"]


def test_the_schema_check_refuses_a_broken_scaledobject(scaledobject_schema):
    (obj, *_) = by_kind(documents("elastic.yaml"), "ScaledObject").values()
    for broken in ({**obj["spec"], "maxReplicas": 3}, {**obj["spec"], "triggers": []},
                   {**obj["spec"], "minReplicaCount": -1}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({"spec": broken}, scaledobject_schema)


def test_one_statefulset_and_scaledobject_per_pool_sized_by_the_autoscaler():
    topology = load_topology(MANIFESTS["elastic.yaml"])
    objects = documents("elastic.yaml")
    statefulsets, scaled = by_kind(objects, "StatefulSet"), by_kind(objects, "ScaledObject")
    pools = {pool_name(site.name, pool): (site, pool) for site in topology.sites for pool in site.pools}
    assert len(pools) == 3
    assert set(scaled) == set(pools)
    assert {n for n in statefulsets if n.startswith(f"{EXECUTOR}-")} == set(pools)
    for name, (site, pool) in pools.items():
        spec = scaled[name]["spec"]
        assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": name}
        assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (pool.min, pool.max)
        (trigger,) = spec["triggers"]
        assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
        assert trigger["metadata"]["threshold"] == "1"
        assert trigger["metadata"]["query"] == f'max({POOL_GAUGE}{{site="{site.name}",pool="{pool.name}"}})'
        sts = statefulsets[name]["spec"]
        assert sts["ordinals"] == {"start": 1}
        assert "replicas" not in sts, "the HPA owns the count: applying again must not reset it"
        pod = sts["template"]["spec"]
        assert pod["terminationGracePeriodSeconds"] == DRAIN_GRACE_S
        env = {e["name"]: e for e in pod["containers"][0]["env"]}
        assert env["POD_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"] == f"metadata.labels['{POD_INDEX_LABEL}']"
        # Pod n (named `<statefulset>-<n>`) is executor `<site>-<pool>-<n>`, process `executor-<site>-<pool>-<n>`.
        assert env["DIN_EXECUTOR_ID"]["value"] == f"{site.name}-{pool.name}-$(POD_INDEX)"
        assert env["DIN_NATS_CREDS"]["value"].endswith(f"/{name}-$(POD_INDEX).creds")
        assert all(pool.executor_id(site.name, n) == f"{name}-{n}".removeprefix(f"{EXECUTOR}-")
                   for n in range(1, pool.max + 1))
        items = {i["path"] for v in pod["volumes"] if "secret" in v for i in v["secret"]["items"]}
        assert {f"keys/bus/nats/users/executor-{i}.creds" for i in pool.executor_ids(site.name)} <= items


def test_pool_slots_get_the_environment_din_up_gives_them():
    topology = load_topology(MANIFESTS["elastic.yaml"])
    args = dict(nats_urls={s.name: f"nats://{s.name}:4222" for s in topology.sites}, kafka_bootstrap="kafka:9092",
                topology_path="/t.yaml", credentials_path="/run/credentials.json", bus_dir="/bus",
                kafka_bus_dir="/bus")
    pools = service_environments(topology, pools=True, **args)
    assert set(pools) == {i.name for i in pool_instances(topology)}
    for site in topology.sites:
        for pool in site.pools:
            for executor_id in pool.executor_ids(site.name):
                env = pools[f"executor-{executor_id}"]
                assert env["DIN_EXECUTOR_ID"] == executor_id and env["DIN_SITE"] == site.name
                assert env["DIN_EXECUTOR_MODELS"] == ",".join(pool.models)
                assert env["DIN_EXECUTOR_CAPACITY"] == str(pool.capacity)
                assert env["DIN_NATS_CREDS"] == f"/bus/nats/users/executor-{executor_id}.creds"


def test_no_scaledobject_without_pools():
    objects = documents("din.yaml")
    assert by_kind(objects, "ScaledObject") == {}
    assert not any(o["kind"] == "StatefulSet" and o["metadata"]["name"].startswith(f"{EXECUTOR}-") for o in objects)


@pytest.mark.parametrize("manifest", sorted(MANIFESTS))
def test_every_service_instance_has_its_workload_with_its_environment(manifest):
    topology = load_topology(MANIFESTS[manifest])
    objects = documents(manifest)
    deployments, statefulsets = by_kind(objects, "Deployment"), by_kind(objects, "StatefulSet")
    for inst in service_instances(topology):
        found = topology.pool_of(inst.instance) if inst.service == EXECUTOR else None
        if found is not None:
            assert pool_name(found[0].name, found[1]) in statefulsets
            continue
        assert inst.name in deployments, f"no Deployment for {inst.name}"
        (container,) = deployments[inst.name]["spec"]["template"]["spec"]["containers"]
        assert container["command"] == ["python", "-m", f"din.services.{inst.service}"]
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env["DIN_SITE"] == inst.site
        assert env["DIN_TOPOLOGY"] == f"/app/{MANIFESTS[manifest].relative_to(REPO_ROOT).as_posix()}"
        if inst.service == AUTOSCALER:
            assert env["DIN_AUTOSCALER_PROVIDER"] == "kubernetes"
        if inst.service == EXECUTOR:
            assert deployments[inst.name]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= 60
    assert (AUTOSCALER in deployments) == topology.elastic


def test_prometheus_scrapes_telemetry_and_keda_reads_that_prometheus():
    objects = documents("elastic.yaml")
    config = yaml.safe_load(by_kind(objects, "ConfigMap")["prometheus"]["data"]["prometheus.yml"])
    targets = [t for job in config["scrape_configs"] for c in job["static_configs"] for t in c["targets"]]
    telemetry = by_kind(objects, "Service")["telemetry"]["spec"]["ports"][0]["port"]
    assert f"telemetry:{telemetry}" in targets
    for obj in by_kind(objects, "ScaledObject").values():
        assert obj["spec"]["triggers"][0]["metadata"]["serverAddress"] == "http://prometheus.din.svc:9090"


SECRET_MATERIAL = re.compile(r"-----BEGIN|PRIVATE KEY|NKEY USER SEED|SU[A-Z2-7]{20,}|password\s*[=:]\s*\S",
                             re.IGNORECASE)


@pytest.mark.parametrize("manifest", sorted(MANIFESTS))
def test_no_secret_material_in_the_manifests(manifest):
    text = (REPO_ROOT / MANIFEST_DIR / manifest).read_text()
    assert not SECRET_MATERIAL.search(text), SECRET_MATERIAL.search(text)
    objects = documents(manifest)
    assert by_kind(objects, "Secret") == {}
    # Key files are named, never inlined: every DIN pod reads them from the Secret it mounts.
    for obj in objects:
        for container in obj.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            for env in container.get("env", []):
                assert "value" not in env or not re.search(r"(KEY|PASSWORD|CREDS)$", env["name"]) \
                    or env["value"].startswith("/run/din/"), env


def test_the_secret_pattern_sees_what_din_compose_init_writes():
    for sample in ("-----BEGIN PRIVATE KEY-----", "-----BEGIN NATS USER JWT-----",
                   "SUAKJ3ZQ7CFWKLNRPVHQ5YFM2X4WQ3JD", "sasl.jaas.config password=s3cret"):
        assert SECRET_MATERIAL.search(sample), sample


def test_the_kubernetes_schema_check_refuses_a_misspelt_field():
    sts = by_kind(documents("elastic.yaml"), "StatefulSet")["executor-cloud-small"]
    sts["spec"]["ordinal"] = sts["spec"].pop("ordinals")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(sts, KUBERNETES_VERSION, strict=True)


def test_secret_objects_hold_only_what_pods_mount(tmp_path: Path):
    topology_path = MANIFESTS["din.yaml"]
    topology = load_topology(topology_path)
    objects = kubernetes_objects(topology, topology_path)
    needed = mounted_key_files(objects)
    assert "keys/master.key" in needed and "credentials.json" in needed
    run, init = tmp_path / "run", tmp_path / "init"
    for rel in [*needed, "keys/bus/ca-key.pem"]:
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        (run / rel).write_text(f"secret of {rel}\n")
    for site in topology.sites:
        (init / f"nats-{site.name}-bus").mkdir(parents=True)
        (init / f"nats-{site.name}-bus" / "server.pem").write_text("cert\n")
    (init / "kafka-bus").mkdir()
    (init / "kafka-bus" / "cluster.id").write_text("id\n")
    secrets = {s["metadata"]["name"]: s for s in secret_objects(topology, topology_path, run, init)}
    assert set(secrets[KEYS_SECRET]["data"]) == {secret_key(rel) for rel in needed}
    assert secret_key("keys/bus/ca-key.pem") not in secrets[KEYS_SECRET]["data"]
    for obj in secrets.values():
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    # Every Secret a pod references is one of them.
    referenced = {v["secret"]["secretName"] for o in objects if o["kind"] in ("Deployment", "StatefulSet", "Job")
                  for v in o["spec"]["template"]["spec"].get("volumes", []) if "secret" in v}
    assert referenced <= set(secrets)
    (run / needed[0]).unlink()
    with pytest.raises(ValueError, match=needed[0]):
        secret_objects(topology, topology_path, run, init)


def test_render_names_both_topologies_and_reads_back_as_the_objects():
    files = render_manifests()
    assert set(files) == {f"{MANIFEST_DIR}/{name}" for name in MANIFESTS}
    for name, path in MANIFESTS.items():
        text = files[f"{MANIFEST_DIR}/{name}"]
        assert list(yaml.safe_load_all(text)) == kubernetes_objects(load_topology(path), path)
