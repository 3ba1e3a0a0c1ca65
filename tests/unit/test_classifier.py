import json

from din.services.classifier.policy import WorkloadPolicy, size_class
from din.shared.catalog import ModelCatalog, ModelEntry
from din.shared.contracts.inference import SlaClass
from din.shared.topology import TenantSpec, Topology
from tests.support import make_job

SIG = json.dumps([["input", "FP32", [64]]])
CATALOG = ModelCatalog(
    [
        ModelEntry("digits-large", "image-classification", ("1",), 0.98, SIG),
        ModelEntry("digits-small", "image-classification", ("1",), 0.95, SIG),
        ModelEntry("digits-tiny", "image-classification", ("1",), 0.80, SIG),
        ModelEntry("other", "text", ("1",), 0.99, "[]"),
    ]
)
TENANTS = [
    TenantSpec(name="acme", sensitive_sites=["factory"]),
    TenantSpec(name="initech", sensitive_sites=["branch"], always_sensitive=True),
    TenantSpec(name="globex"),
]
SITES = [{"name": "cloud", "role": "hub"}, {"name": "factory", "role": "edge"}, {"name": "branch", "role": "edge"}]


def topology(tenants: list[TenantSpec], sites: list[dict] = SITES) -> Topology:
    return Topology(name="classifier-tests", sites=sites, tenants=tenants)


POLICY = WorkloadPolicy(topology(TENANTS), CATALOG, ["pii", "sensitive"])


def job(tenant="acme", model="digits-large", labels=(), allow_degrade=False, min_accuracy=None, version=None):
    return make_job(tenant=tenant, model=model, model_version=version, sla_class=SlaClass.BATCH, labels=list(labels),
                    allow_degrade=allow_degrade, min_accuracy=min_accuracy)


def test_sensitive_labels_confine_data_to_the_tenants_sites():
    plain = POLICY.classify(job(), 100)
    assert (plain.sensitive, plain.allowed_sites) == (False, None)
    marked = POLICY.classify(job(labels=["PII"]), 100)
    assert (marked.sensitive, marked.allowed_sites) == (True, ["factory"])
    assert POLICY.classify(job("initech"), 100).allowed_sites == ["branch"]
    assert POLICY.classify(job("globex", labels=["pii"]), 100).allowed_sites is None


def test_candidates_follow_degradation_permission_and_accuracy_floor():
    assert POLICY.classify(job(), 10).candidates == ["digits-large"]
    assert POLICY.classify(job(allow_degrade=True), 10).candidates == ["digits-large", "digits-small", "digits-tiny"]
    assert POLICY.classify(job(allow_degrade=True, min_accuracy=0.9), 10).candidates == ["digits-large", "digits-small"]
    assert POLICY.classify(job(allow_degrade=True, version="1"), 10).candidates == ["digits-large"]


def test_task_and_size_class():
    workload = POLICY.classify(job(), 20_000)
    assert (workload.task, workload.size_class, workload.sla_class) == (
        "image-classification", "medium", SlaClass.BATCH)
    assert [size_class(n) for n in (0, 16383, 16384, 262144)] == ["small", "small", "medium", "large"]


def test_a_cascade_runs_the_least_accurate_variant_first_and_escalates_to_the_most_accurate():
    for asked in ("digits-large", "digits-small", "digits-tiny"):
        cascade = job(model=asked).model_copy(update={"cascade_threshold": 0.8})
        assert POLICY.cascade_stages(cascade) == ("digits-tiny", "digits-large")
        assert POLICY.classify(cascade, 10).candidates == ["digits-tiny"]
    assert POLICY.cascade_stages(job()) is None
    assert POLICY.cascade_stages(job(model="other").model_copy(update={"cascade_threshold": 0.8})) is None


def test_a_tenant_limited_to_some_models_is_never_degraded_or_cascaded_to_others():
    only_some = topology([TenantSpec(name="acme", models=["digits-large", "digits-tiny"])])
    limited = WorkloadPolicy(only_some, CATALOG, ["pii"])
    degraded = limited.classify(job(allow_degrade=True), 10)
    assert degraded.candidates == ["digits-large", "digits-tiny"]
    cascade = make_job(tenant="acme", model="digits-large", sla_class=SlaClass.BATCH, cascade_threshold=0.8)
    assert limited.cascade_stages(cascade) == ("digits-tiny", "digits-large")


def test_sensitive_data_never_bursts_and_a_tenant_that_may_not_burst_stays_on_prem():
    rented = [*SITES, {"name": "rented", "role": "edge", "burst": {}, "pools": [{"name": "small", "models": ["x"],
                                                                              "min": 0, "max": 2}]}]
    tenants = [TenantSpec(name="acme", sensitive_sites=["factory"]), TenantSpec(name="globex"),
               TenantSpec(name="hooli", may_burst=False)]
    policy = WorkloadPolicy(topology(tenants, rented), CATALOG, ["pii"])
    assert policy.classify(job(tenant="globex"), 10).allowed_sites is None
    assert policy.classify(job(tenant="globex", labels=["pii"]), 10).allowed_sites == ["cloud", "factory", "branch"]
    assert policy.classify(job(tenant="hooli"), 10).allowed_sites == ["cloud", "factory", "branch"]
    assert policy.classify(job(tenant="acme", labels=["pii"]), 10).allowed_sites == ["factory"]
