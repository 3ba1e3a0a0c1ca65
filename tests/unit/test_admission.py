import json

import pytest

from services.admission.gate import AdmissionGate
from services.admission.intake import DEFAULT_TIMEOUT_MS, peek_request_id, read_intake
from services.admission.quota import QuotaLedger
from shared.catalog import ModelCatalog, ModelEntry
from shared.contracts.events import PressureV1
from shared.contracts.inference import RequestHeaders, SlaClass
from shared.credentials import TenantVerifier, issue_token
from shared.errors import DinError, ErrorCode

NOW = 1_700_000_000.0
SECRET = "ab" * 32
GOOD_BODY = json.dumps({"inputs": [{"name": "input", "shape": [1, 2], "datatype": "FP32", "data": [0.1, 0.2]}]}).encode()


class FakeClock:
    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


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
        QuotaLedger({"acme": (rate, burst)}, clock=clock or FakeClock()),
        catalog(),
        max_payload=4096,
        wall_clock=lambda: NOW,
    )


def headers(**extra) -> dict[str, str]:
    return {RequestHeaders.TOKEN: issue_token("acme", SECRET, now=NOW), **extra}


def refused(code: ErrorCode, call) -> DinError:
    with pytest.raises(DinError) as caught:
        call()
    assert caught.value.code == code, caught.value.message
    return caught.value


def test_defaults_and_header_metadata():
    intake = read_intake({RequestHeaders.SLA_CLASS: "realtime", RequestHeaders.LABELS: "pii, x"}, GOOD_BODY,
                         NOW * 1000, 4096)
    assert intake.sla_class is SlaClass.REALTIME
    assert intake.deadline_ms == int(NOW * 1000) + DEFAULT_TIMEOUT_MS[SlaClass.REALTIME]
    assert intake.labels == ["pii", "x"]


def test_parameters_stand_in_for_headers_and_headers_win():
    body = json.loads(GOOD_BODY)
    body["parameters"] = {"sla_class": "batch", "timeout_ms": 250, "allow_degrade": True, "token": "t"}
    intake = read_intake({}, json.dumps(body).encode(), NOW * 1000, 4096)
    assert (intake.sla_class, intake.allow_degrade, intake.token) == (SlaClass.BATCH, True, "t")
    assert intake.deadline_ms == int(NOW * 1000) + 250
    intake = read_intake({RequestHeaders.SLA_CLASS: "realtime"}, json.dumps(body).encode(), NOW * 1000, 4096)
    assert intake.sla_class is SlaClass.REALTIME


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
    assert intake.model_version == "2"


def test_gate_refuses_unknown_tenant_model_version_and_bad_credentials():
    g = gate()
    refused(ErrorCode.UNKNOWN_TENANT, lambda: g.admit("nobody", "digits-small", headers(), GOOD_BODY))
    refused(ErrorCode.UNKNOWN_MODEL, lambda: g.admit("acme", "resnet", headers(), GOOD_BODY))
    refused(ErrorCode.UNKNOWN_MODEL,
            lambda: g.admit("acme", "digits-large", headers(**{RequestHeaders.MODEL_VERSION: "9"}), GOOD_BODY))
    refused(ErrorCode.UNAUTHENTICATED, lambda: g.admit("acme", "digits-small", {}, GOOD_BODY))
    forged = {RequestHeaders.TOKEN: issue_token("acme", "cd" * 32, now=NOW)}
    refused(ErrorCode.UNAUTHENTICATED, lambda: g.admit("acme", "digits-small", forged, GOOD_BODY))


def test_token_bucket_limits_and_refills():
    clock = FakeClock()
    g = gate(rate=10.0, burst=2, clock=clock)
    g.admit("acme", "digits-small", headers(), GOOD_BODY)
    g.admit("acme", "digits-small", headers(), GOOD_BODY)
    error = refused(ErrorCode.RATE_LIMITED, lambda: g.admit("acme", "digits-small", headers(), GOOD_BODY))
    assert error.retriable and error.retry_after_ms == 100
    clock.t += 0.1
    g.admit("acme", "digits-small", headers(), GOOD_BODY)


def test_shedding_and_hopeless_deadlines_use_the_schedulers_pressure():
    g = gate(burst=100)
    g.pressure = PressureV1(inflight=10, capacity=10, fastest_ms=2.0, executors=2, at_ms=NOW * 1000)
    error = refused(ErrorCode.OVERLOADED, lambda: g.admit("acme", "digits-small", headers(), GOOD_BODY))
    assert error.retriable and error.retry_after_ms >= 5
    g.pressure = PressureV1(inflight=0, capacity=10, fastest_ms=50.0, executors=2, at_ms=NOW * 1000)
    refused(ErrorCode.DEADLINE_EXCEEDED,
            lambda: g.admit("acme", "digits-small", headers(**{RequestHeaders.TIMEOUT_MS: "20"}), GOOD_BODY))
    g.pressure = PressureV1(inflight=99, capacity=1, fastest_ms=1.0, executors=1, at_ms=NOW * 1000 - 10_000)
    g.admit("acme", "digits-small", headers(), GOOD_BODY)


def test_request_id_is_recovered_for_errors_when_possible():
    assert peek_request_id({RequestHeaders.REQUEST_ID: "r1"}, b"") == "r1"
    assert peek_request_id({}, b'{"id": "r2"}') == "r2"
    assert peek_request_id({}, b"\xff\xfe") is None


def test_cascade_threshold_comes_from_header_or_parameters():
    intake = read_intake({RequestHeaders.CASCADE: " 0.8"}, GOOD_BODY, NOW * 1000, 4096)
    assert intake.cascade_threshold == 0.8
    body = json.loads(GOOD_BODY) | {"parameters": {"cascade": 0.5}}
    assert read_intake({}, json.dumps(body).encode(), NOW * 1000, 4096).cascade_threshold == 0.5
    assert read_intake({}, GOOD_BODY, NOW * 1000, 4096).cascade_threshold is None


@pytest.mark.parametrize("raw", ["high", "-0.1", "nan", "inf", ""])
def test_invalid_cascade_thresholds_are_bad_requests(raw):
    error = refused(ErrorCode.BAD_REQUEST, lambda: read_intake({RequestHeaders.CASCADE: raw}, GOOD_BODY, NOW * 1000,
                                                                4096))
    assert "cascade" in error.message


def test_a_cascade_needs_another_variant_and_no_pinned_version():
    assert gate().admit("acme", "digits-large", headers(**{RequestHeaders.CASCADE: "0.9"}),
                        GOOD_BODY).cascade_threshold == 0.9
    refused(ErrorCode.BAD_REQUEST, lambda: gate().admit(
        "acme", "digits-small", headers(**{RequestHeaders.CASCADE: "0.9", RequestHeaders.MODEL_VERSION: "2"}),
        GOOD_BODY))
    lonely = AdmissionGate(TenantVerifier({"acme": SECRET}), QuotaLedger({"acme": (100.0, 2)}, clock=FakeClock()),
                           ModelCatalog([catalog().get("digits-large")]), max_payload=4096, wall_clock=lambda: NOW)
    error = refused(ErrorCode.BAD_REQUEST,
                    lambda: lonely.admit("acme", "digits-large", headers(**{RequestHeaders.CASCADE: "0.9"}), GOOD_BODY))
    assert "no other variant" in error.message
