import itertools
import json

import pytest

from din.services.admission.gate import AdmissionGate, Replayed
from din.services.admission.intake import DEFAULT_TIMEOUT_MS, peek_request_id, read_intake
from din.services.admission.quota import QuotaLedger, daily_budgets, quota_shares
from din.shared.catalog import ModelCatalog, ModelEntry
from din.shared.contracts.events import PressureV1
from din.shared.contracts.inference import RequestHeaders, SlaClass
from din.shared.credentials import TenantVerifier, issue_token, request_proof
from din.shared.errors import DinError, ErrorCode
from din.shared.topology import Topology
from tests.support import ManualClock, three_site_topology

NOW = 1_700_000_000.0
SECRET = "ab" * 32
GOOD_BODY = json.dumps(
    {"inputs": [{"name": "input", "shape": [1, 2], "datatype": "FP32", "data": [0.1, 0.2]}]}
).encode()


def catalog() -> ModelCatalog:
    sig = json.dumps([["input", "FP32", [64]]])
    return ModelCatalog(
        [
            ModelEntry("digits-large", "image-classification", ("1",), 0.98, sig),
            ModelEntry("digits-small", "image-classification", ("1", "2"), 0.95, sig),
        ]
    )


def gate(rate=100.0, burst=2, clock=None) -> AdmissionGate:
    return AdmissionGate(
        TenantVerifier({"acme": SECRET}),
        QuotaLedger({"acme": (rate, burst)}, clock=clock or ManualClock(0.0)),
        catalog(),
        max_payload=4096,
        wall_clock=lambda: NOW,
    )


_ids = itertools.count()


def headers(model: str = "digits-small", **extra) -> dict[str, str]:
    """A request's headers with a fresh id and the token's proof for it (any reply subject)."""
    request_id = f"r{next(_ids)}"
    proof = request_proof(issue_token("acme", SECRET, now=NOW), model, request_id, now=NOW)
    return {RequestHeaders.TOKEN: proof, RequestHeaders.REQUEST_ID: request_id, **extra}


def refused(code: ErrorCode, call) -> DinError:
    with pytest.raises(DinError) as caught:
        call()
    assert caught.value.code == code, caught.value.message
    return caught.value


def test_defaults_and_header_metadata():
    intake = read_intake({RequestHeaders.SLA_CLASS: "realtime", RequestHeaders.LABELS: "pii, x"}, GOOD_BODY,
                         NOW * 1000, 4096)
    assert intake.options.sla_class is SlaClass.REALTIME
    assert intake.deadline_ms == int(NOW * 1000) + DEFAULT_TIMEOUT_MS[SlaClass.REALTIME]
    assert intake.options.labels == ["pii", "x"]


def test_parameters_stand_in_for_headers_and_headers_win():
    body = json.loads(GOOD_BODY)
    body["parameters"] = {"sla_class": "batch", "timeout_ms": 250, "allow_degrade": True, "token": "t"}
    intake = read_intake({}, json.dumps(body).encode(), NOW * 1000, 4096)
    assert (intake.options.sla_class, intake.options.allow_degrade, intake.options.token) == (SlaClass.BATCH, True, "t")
    assert intake.deadline_ms == int(NOW * 1000) + 250
    intake = read_intake({RequestHeaders.SLA_CLASS: "realtime"}, json.dumps(body).encode(), NOW * 1000, 4096)
    assert intake.options.sla_class is SlaClass.REALTIME


@pytest.mark.parametrize(
    ("hdrs", "body", "code"),
    [
        ({}, b"{not json", ErrorCode.BAD_REQUEST),
        ({}, b'{"inputs": []}', ErrorCode.SCHEMA_VIOLATION),
        ({}, b'{"inputs": [{"name": "x"}]}', ErrorCode.SCHEMA_VIOLATION),
        ({}, b'{"inputs": [], "surprise": 1}', ErrorCode.SCHEMA_VIOLATION),
        ({RequestHeaders.SLA_CLASS: "gold"}, GOOD_BODY, ErrorCode.BAD_REQUEST),
        ({RequestHeaders.TIMEOUT_MS: "soon"}, GOOD_BODY, ErrorCode.BAD_REQUEST),
        ({RequestHeaders.TIMEOUT_MS: "0"}, GOOD_BODY, ErrorCode.BAD_REQUEST),
        ({RequestHeaders.DEADLINE_MS: str(int(NOW * 1000) - 1)}, GOOD_BODY, ErrorCode.DEADLINE_EXCEEDED),
        ({RequestHeaders.CONTENT_TYPE: "text/plain"}, GOOD_BODY, ErrorCode.BAD_REQUEST),
        ({}, b"x" * 5000, ErrorCode.PAYLOAD_TOO_LARGE),
    ],
)
def test_bad_requests_are_refused_with_a_code(hdrs, body, code):
    refused(code, lambda: read_intake(hdrs, body, NOW * 1000, 4096))


def test_gate_admits_a_good_request():
    intake = gate().admit("acme", "digits-small", headers(**{RequestHeaders.MODEL_VERSION: "2"}), GOOD_BODY)
    assert intake.options.model_version == "2"


def test_gate_refuses_unknown_tenant_model_version_and_bad_credentials():
    g = gate()
    refused(ErrorCode.UNKNOWN_TENANT, lambda: g.admit("nobody", "digits-small", headers(), GOOD_BODY))
    refused(ErrorCode.UNKNOWN_MODEL, lambda: g.admit("acme", "resnet", headers("resnet"), GOOD_BODY))
    refused(ErrorCode.UNKNOWN_MODEL,
            lambda: g.admit("acme", "digits-large", headers("digits-large", **{RequestHeaders.MODEL_VERSION: "9"}),
                            GOOD_BODY))
    refused(ErrorCode.UNAUTHENTICATED, lambda: g.admit("acme", "digits-small", {}, GOOD_BODY))
    forged = {RequestHeaders.TOKEN: issue_token("acme", "cd" * 32, now=NOW)}
    refused(ErrorCode.UNAUTHENTICATED, lambda: g.admit("acme", "digits-small", forged, GOOD_BODY))


def test_token_bucket_limits_and_refills():
    clock = ManualClock(0.0)
    g = gate(rate=10.0, burst=2, clock=clock)
    g.admit("acme", "digits-small", headers(), GOOD_BODY)
    g.admit("acme", "digits-small", headers(), GOOD_BODY)
    error = refused(ErrorCode.RATE_LIMITED, lambda: g.admit("acme", "digits-small", headers(), GOOD_BODY))
    assert error.retriable and error.retry_after_ms == 100
    clock.advance(0.1)
    g.admit("acme", "digits-small", headers(), GOOD_BODY)


def test_shedding_and_hopeless_deadlines_use_the_schedulers_pressure():
    g = gate(burst=100)
    g.shedder.pressure = PressureV1(inflight=10, capacity=10, fastest_ms=2.0, executors=2, at_ms=NOW * 1000)
    error = refused(ErrorCode.OVERLOADED, lambda: g.admit("acme", "digits-small", headers(), GOOD_BODY))
    assert error.retriable and error.retry_after_ms >= 5
    g.shedder.pressure = PressureV1(inflight=0, capacity=10, fastest_ms=50.0, executors=2, at_ms=NOW * 1000)
    refused(ErrorCode.DEADLINE_EXCEEDED,
            lambda: g.admit("acme", "digits-small", headers(**{RequestHeaders.TIMEOUT_MS: "20"}), GOOD_BODY))
    g.shedder.pressure = PressureV1(inflight=99, capacity=1, fastest_ms=1.0, executors=1, at_ms=NOW * 1000 - 10_000)
    g.admit("acme", "digits-small", headers(), GOOD_BODY)


def test_request_id_is_recovered_for_errors_when_possible():
    assert peek_request_id({RequestHeaders.REQUEST_ID: "r1"}, b"") == "r1"
    assert peek_request_id({}, b'{"id": "r2"}') == "r2"
    assert peek_request_id({}, b"\xff\xfe") is None


def test_cascade_threshold_comes_from_header_or_parameters():
    intake = read_intake({RequestHeaders.CASCADE: " 0.8"}, GOOD_BODY, NOW * 1000, 4096)
    assert intake.options.cascade_threshold == 0.8
    body = json.loads(GOOD_BODY) | {"parameters": {"cascade": 0.5}}
    assert read_intake({}, json.dumps(body).encode(), NOW * 1000, 4096).options.cascade_threshold == 0.5
    assert read_intake({}, GOOD_BODY, NOW * 1000, 4096).options.cascade_threshold is None


def test_a_cascade_may_ask_for_a_target_escalation_rate_instead():
    intake = read_intake({RequestHeaders.CASCADE: "rate:0.2"}, GOOD_BODY, NOW * 1000, 4096)
    assert (intake.options.cascade_threshold, intake.options.cascade_target_rate) == (None, 0.2)
    pinned = {RequestHeaders.CASCADE: "rate:0.2", RequestHeaders.MODEL_VERSION: "1"}
    refused(ErrorCode.BAD_REQUEST, lambda: read_intake(pinned, GOOD_BODY, NOW * 1000, 4096))


@pytest.mark.parametrize("raw", ["high", "-0.1", "nan", "inf", "", "rate:", "rate:1.5", "rate:-0.1", "rate:x"])
def test_invalid_cascade_thresholds_are_bad_requests(raw):
    error = refused(ErrorCode.BAD_REQUEST, lambda: read_intake({RequestHeaders.CASCADE: raw}, GOOD_BODY, NOW * 1000,
                                                                4096))
    assert "cascade" in error.message


def test_a_cascade_needs_another_variant_and_no_pinned_version():
    assert gate().admit("acme", "digits-large", headers("digits-large", **{RequestHeaders.CASCADE: "0.9"}),
                        GOOD_BODY).options.cascade_threshold == 0.9
    refused(ErrorCode.BAD_REQUEST, lambda: gate().admit(
        "acme", "digits-small", headers(**{RequestHeaders.CASCADE: "0.9", RequestHeaders.MODEL_VERSION: "2"}),
        GOOD_BODY))
    lonely = AdmissionGate(TenantVerifier({"acme": SECRET}), QuotaLedger({"acme": (100.0, 2)}, clock=ManualClock(0.0)),
                           ModelCatalog([catalog().get("digits-large")]), max_payload=4096, wall_clock=lambda: NOW)
    error = refused(ErrorCode.BAD_REQUEST,
                    lambda: lonely.admit("acme", "digits-large",
                        headers("digits-large", **{RequestHeaders.CASCADE: "0.9"}), GOOD_BODY))
    assert "no other variant" in error.message


# --- multi-stage requests: max_tokens, split, split_protection -------------------------------------------------------


def staged_catalog(prefill_listed: bool = True) -> ModelCatalog:
    """The zoo's shape: a generator with its prefill part, a model with head/tail parts at two points, one without."""
    sig = json.dumps([["input", "FP32", [64]]])
    parts = [
        ModelEntry(f"digits-large-{role}-{point}", f"split-{role}:digits-large@{point}", ("1",), 0.98, sig,
                   role=role, split_of="digits-large", split_point=point)
        for point in ("hidden_1", "hidden_2") for role in ("head", "tail")
    ]
    text = [ModelEntry("charlm", "text-generation", ("1",), 0.65, "[]", role="autoregressive",
                       prefill_model="charlm-prefill", vocab="ab", hidden=4)]
    if prefill_listed:
        text.append(ModelEntry("charlm-prefill", "text-generation-prefill", ("1",), 0.65, "[]", role="prefill"))
    base = catalog()
    return ModelCatalog([*(base.get(name) for name in base.names()), *parts, *text])


def staged_gate(prefill_listed: bool = True) -> AdmissionGate:
    return AdmissionGate(TenantVerifier({"acme": SECRET}), QuotaLedger({"acme": (100.0, 100)}, clock=ManualClock(0.0)),
                         staged_catalog(prefill_listed), max_payload=4096, wall_clock=lambda: NOW)


def intake_of(**hdrs):
    return read_intake(hdrs, GOOD_BODY, NOW * 1000, 4096)


@pytest.mark.parametrize(("raw", "expected"), [("1", 1), ("512", 512), (" 7 ", 7)])
def test_max_tokens_within_bounds_is_accepted(raw, expected):
    assert intake_of(**{RequestHeaders.MAX_TOKENS: raw}).options.max_tokens == expected


@pytest.mark.parametrize("raw", ["0", "513", "x", "", "-1", "1.5", "1e2"])
def test_max_tokens_out_of_bounds_or_not_a_whole_number_is_refused(raw):
    error = refused(ErrorCode.BAD_REQUEST, lambda: intake_of(**{RequestHeaders.MAX_TOKENS: raw}))
    assert "max_tokens" in error.message and "512" in error.message


def test_max_tokens_split_and_protection_come_from_parameters_too():
    body = json.loads(GOOD_BODY) | {"parameters": {"max_tokens": 3}}
    assert read_intake({}, json.dumps(body).encode(), NOW * 1000, 4096).options.max_tokens == 3
    body = json.loads(GOOD_BODY) | {"parameters": {"split": "hidden_1", "split_protection": "noise:0.1"}}
    intake = read_intake({}, json.dumps(body).encode(), NOW * 1000, 4096)
    assert (intake.options.split, intake.options.split_protection) == ("hidden_1", "noise:0.1")
    refused(ErrorCode.BAD_REQUEST, lambda: read_intake(
        {}, json.dumps(json.loads(GOOD_BODY) | {"parameters": {"max_tokens": 0}}).encode(), NOW * 1000, 4096))
    plain = intake_of()
    assert (plain.options.max_tokens, plain.options.split, plain.options.split_protection) == (None, None, None)


@pytest.mark.parametrize(("raw", "expected"), [("auto", "auto"), ("none", "none"), ("hidden_1", "hidden_1"),
                                               (" hidden_2 ", "hidden_2"), ("p" * 64, "p" * 64)])
def test_split_accepts_auto_none_or_a_point_name(raw, expected):
    assert intake_of(**{RequestHeaders.SPLIT: raw}).options.split == expected


@pytest.mark.parametrize("raw", ["", "   ", "a\tb", "a\nb", "p" * 65])
def test_split_refuses_empty_unprintable_or_long_names(raw):
    assert "split" in refused(ErrorCode.BAD_REQUEST, lambda: intake_of(**{RequestHeaders.SPLIT: raw})).message


@pytest.mark.parametrize(("raw", "expected"), [("quantize:4", "quantize:4"), (" noise:0.1 ", "noise:0.1"),
                                               ("none", "none"), ("quantize:1", "quantize:1"), ("noise:0", "noise:0")])
def test_split_protection_is_accepted_with_a_split(raw, expected):
    intake = intake_of(**{RequestHeaders.SPLIT: "auto", RequestHeaders.SPLIT_PROTECTION: raw})
    assert intake.options.split_protection == expected


def test_split_protection_without_a_split_is_refused():
    error = refused(ErrorCode.BAD_REQUEST, lambda: intake_of(**{RequestHeaders.SPLIT_PROTECTION: "quantize:4"}))
    assert "set split too" in error.message


@pytest.mark.parametrize("raw", ["quantize", "quantize:0", "quantize:9", "quantize:2.5", "quantize:x", "noise",
                                 "noise:-0.1", "noise:nan", "noise:inf", "blur:1", "", "QUANTIZE:4", "quantize:4:1",
                                 "none:xyz"])
def test_bad_split_protections_are_refused(raw):
    refused(ErrorCode.BAD_REQUEST,
            lambda: intake_of(**{RequestHeaders.SPLIT: "auto", RequestHeaders.SPLIT_PROTECTION: raw}))


@pytest.mark.parametrize("combo", [
    {RequestHeaders.CASCADE: "0.9", RequestHeaders.SPLIT: "auto"},
    {RequestHeaders.CASCADE: "0.9", RequestHeaders.SPLIT: "hidden_1"},
    {RequestHeaders.CASCADE: "0.9", RequestHeaders.MAX_TOKENS: "4"},
    {RequestHeaders.MAX_TOKENS: "4", RequestHeaders.SPLIT: "auto"},
])
def test_cascade_generation_and_split_do_not_combine(combo):
    assert "cannot be combined" in refused(ErrorCode.BAD_REQUEST, lambda: intake_of(**combo)).message


def test_split_none_is_no_split_so_it_combines_with_a_cascade():
    assert intake_of(**{RequestHeaders.CASCADE: "0.9", RequestHeaders.SPLIT: "none"}).options.cascade_threshold == 0.9


def test_gate_admits_generation_only_for_a_model_with_a_prefill_part():
    g = staged_gate()
    assert g.admit("acme", "charlm",
        headers("charlm", **{RequestHeaders.MAX_TOKENS: "16"}), GOOD_BODY).options.max_tokens == 16
    error = refused(ErrorCode.BAD_REQUEST,
                    lambda: g.admit("acme", "digits-large",
                        headers("digits-large", **{RequestHeaders.MAX_TOKENS: "16"}), GOOD_BODY))
    assert "does not generate tokens" in error.message
    unlisted = staged_gate(prefill_listed=False)  # charlm names a prefill part the catalog does not hold
    refused(ErrorCode.BAD_REQUEST,
            lambda: unlisted.admit("acme", "charlm", headers("charlm", **{RequestHeaders.MAX_TOKENS: "16"}), GOOD_BODY))


def test_gate_admits_only_split_points_the_catalog_lists():
    g = staged_gate()
    for split in ("hidden_1", "hidden_2", "auto", "none"):
        admitted = g.admit("acme", "digits-large", headers("digits-large", **{RequestHeaders.SPLIT: split}), GOOD_BODY)
        assert admitted.options.split == split
    error = refused(ErrorCode.BAD_REQUEST,
                    lambda: g.admit("acme", "digits-large",
                        headers("digits-large", **{RequestHeaders.SPLIT: "hidden_3"}), GOOD_BODY))
    assert "'hidden_3'" in error.message and "hidden_1, hidden_2" in error.message
    error = refused(ErrorCode.BAD_REQUEST,
                    lambda: g.admit("acme", "digits-small", headers(**{RequestHeaders.SPLIT: "hidden_1"}), GOOD_BODY))
    assert "split points are none" in error.message
    error = refused(ErrorCode.BAD_REQUEST,
                    lambda: g.admit("acme", "digits-small", headers(**{RequestHeaders.SPLIT: "auto"}), GOOD_BODY))
    assert "no split points" in error.message
    assert g.admit("acme", "digits-small", headers(**{RequestHeaders.SPLIT: "none"}), GOOD_BODY).options.split == "none"


def test_a_sites_admissions_share_each_tenants_quota():
    spec = three_site_topology("quota", {}, [{"name": "t", "rate_per_s": 10, "burst": 5}])
    spec["sites"][1]["replicas"] = 2
    topology = Topology.model_validate(spec)
    assert quota_shares(topology, "factory") == {"t": (5.0, 2)}
    assert quota_shares(topology, "cloud") == {"t": (10.0, 5)}


def test_internal_parts_are_never_served_to_tenants():
    parted = AdmissionGate(TenantVerifier({"acme": SECRET}), QuotaLedger({"acme": (100.0, 100)},
                                                                       clock=ManualClock(0.0)),
                           staged_catalog(), max_payload=4096, wall_clock=lambda: NOW)
    for part in ("digits-large-head-hidden_1", "digits-large-tail-hidden_1", "charlm-prefill"):
        error = refused(ErrorCode.FORBIDDEN, lambda part=part: parted.admit("acme", part, headers(part), GOOD_BODY))
        assert "internal part" in error.message and error.to_model().status == 403 and not error.retriable
    parted.admit("acme", "digits-large", headers("digits-large"), GOOD_BODY)


def test_the_topology_says_which_models_a_tenant_may_call():
    limited = AdmissionGate(TenantVerifier({"acme": SECRET}), QuotaLedger({"acme": (100.0, 100)},
                                                                        clock=ManualClock(0.0)),
                            catalog(), max_payload=4096, wall_clock=lambda: NOW,
                            models={"acme": frozenset({"digits-small"})})
    limited.admit("acme", "digits-small", headers(), GOOD_BODY)
    refused(ErrorCode.FORBIDDEN, lambda: limited.admit("acme", "digits-large", headers("digits-large"), GOOD_BODY))
    refused(ErrorCode.BAD_REQUEST, lambda: limited.admit("acme", "digits-small",
                                                         headers(**{RequestHeaders.CASCADE: "0.8"}), GOOD_BODY))


def test_a_daily_query_budget_per_model_refuses_with_the_wait_until_the_next_query():
    clock = ManualClock(0.0)
    budgeted = AdmissionGate(TenantVerifier({"acme": SECRET}), QuotaLedger({"acme": (100.0, 100)}, clock=clock,
                                                                         daily={"acme": 2}),
                             catalog(), max_payload=4096, wall_clock=lambda: NOW)
    for _ in range(2):
        budgeted.admit("acme", "digits-small", headers(), GOOD_BODY)
    budgeted.admit("acme", "digits-large", headers("digits-large"), GOOD_BODY)
    error = refused(ErrorCode.RATE_LIMITED, lambda: budgeted.admit("acme", "digits-small", headers(), GOOD_BODY))
    assert error.retry_after_ms == pytest.approx(86_400_000 / 2, rel=0.01)
    clock.advance(86_400 / 2)
    budgeted.admit("acme", "digits-small", headers(), GOOD_BODY)


def test_daily_budgets_are_split_among_a_sites_admissions():
    spec = three_site_topology("budgets", {}, [{"name": "acme", "queries_per_day": 1000}, {"name": "globex"}])
    spec["sites"][1]["replicas"] = 2
    topology = Topology.model_validate(spec)
    assert daily_budgets(topology, "cloud") == {"acme": 1000}
    assert daily_budgets(topology, topology.sites[1].name) == {"acme": 500}


def test_an_unsealed_requests_proof_is_accepted_once_a_sealed_ones_by_its_envelope():
    g = gate(burst=10)
    once = headers()
    g.admit("acme", "digits-small", once, GOOD_BODY)
    with pytest.raises(Replayed):
        g.admit("acme", "digits-small", once, GOOD_BODY)
    sealed = headers()
    g.admit("acme", "digits-small", sealed, GOOD_BODY, sealed=True)
    g.admit("acme", "digits-small", sealed, GOOD_BODY, sealed=True)
    bare = {RequestHeaders.TOKEN: issue_token("acme", SECRET, now=NOW)}
    refused(ErrorCode.UNAUTHENTICATED, lambda: g.admit("acme", "digits-small", bare, GOOD_BODY))
    detail = g.credential_detail()
    assert (detail["credential_refused_replay"], detail["credential_refused_bearer"]) == (1, 1)


def test_a_proof_bound_to_a_reply_subject_is_refused_on_another():
    g = gate()
    request_id = "bound-1"
    proof = request_proof(issue_token("acme", SECRET, now=NOW), "digits-small", request_id, "_INBOX.a", now=NOW)
    bound = {RequestHeaders.TOKEN: proof, RequestHeaders.REQUEST_ID: request_id}
    refused(ErrorCode.UNAUTHENTICATED, lambda: g.admit("acme", "digits-small", bound, GOOD_BODY, reply="_INBOX.b"))
    g.admit("acme", "digits-small", bound, GOOD_BODY, reply="_INBOX.a")
    assert g.credential_detail()["credential_refused_signature"] == 1
