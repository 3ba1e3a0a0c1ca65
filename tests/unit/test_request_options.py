"""The request contract: every option of ``RequestOptionsV1`` reaches the job, the recording and replay, and the
client and ``din infer`` can ask for each one (so a new option is a change in one model, or these tests fail)."""

from __future__ import annotations

import inspect
import json
import time
from types import SimpleNamespace

import pytest

from din.cli import build_parser
from din.client import BUILD_OPTIONS, DinClient
from din.commands.infer import OPTIONS_NOT_OFFERED, request_options
from din.replay.driver import replay_headers
from din.services.admission.intake import Intake, admitted_job, read_intake
from din.shared.contracts.inference import JSON_CONTENT_TYPE, RequestHeaders, SlaClass
from din.shared.contracts.job import JobV1
from din.shared.contracts.options import (
    RequestOptionsV1,
    ServingOptionsV1,
    option_headers,
    request_header_docs,
    request_header_names,
    wire_options,
)
from din.shared.errors import DinError, ErrorCode
from din.shared.recording import parse_request_record, request_record

NOW_MS = 1_700_000_000_000.0
BODY = json.dumps({"inputs": [{"name": "input", "shape": [1, 2], "datatype": "FP32", "data": [0.1, 0.2]}]}).encode()
TRACE = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"

KINDS = {
    "single": dict(sla_class=SlaClass.REALTIME, labels=["pii", "x"], allow_degrade=True, min_accuracy=0.9,
                   model_version="2", token="t0", timeout_ms=1500, request_id="r-single", traceparent=TRACE),
    "cascade by threshold": dict(cascade_threshold=0.8, sla_class=SlaClass.BATCH, request_id="r-threshold"),
    "cascade by rate": dict(cascade_target_rate=0.25, deadline_ms=int(NOW_MS) + 7000),
    "split with protection": dict(split="hidden_1", split_protection="quantize:4", labels=["pii"]),
    "streamed generation": dict(max_tokens=7, timeout_ms=9000),
}
"""The five kinds of request, each with non-default options; together they set every option."""

SERVING = tuple(ServingOptionsV1.model_fields)


def test_the_kinds_set_every_option():
    assert set().union(*KINDS.values()) == set(RequestOptionsV1.model_fields)


def intake_of(headers: dict[str, str], body: bytes = BODY) -> Intake:
    return read_intake(headers, body, NOW_MS, 1 << 20)


def assert_asked(options: RequestOptionsV1 | ServingOptionsV1, kind: dict, fields=None) -> None:
    for name in fields or type(options).model_fields:
        if name not in RequestOptionsV1.model_fields:
            continue
        default = RequestOptionsV1.model_fields[name].get_default(call_default_factory=True)
        assert getattr(options, name) == kind.get(name, default), name


@pytest.mark.parametrize("kind", KINDS.values(), ids=KINDS.keys())
def test_every_option_is_read_from_its_header(kind):
    intake = intake_of(option_headers(RequestOptionsV1(**kind)))
    assert_asked(intake.options, kind, fields=[f for f in RequestOptionsV1.model_fields
                                               if f not in ("deadline_ms", "request_id")])
    if "deadline_ms" in kind:
        assert intake.deadline_ms == kind["deadline_ms"]
    if "request_id" in kind:
        assert intake.request_id == kind["request_id"]


@pytest.mark.parametrize("kind", KINDS.values(), ids=KINDS.keys())
def test_every_option_with_a_parameter_key_is_read_from_the_oip_parameters(kind):
    headers = option_headers(RequestOptionsV1(**kind))
    parameters = {wire.parameter: headers[wire.header] for _, wire in wire_options()
                  if wire.parameter is not None and wire.header in headers}
    body = json.dumps(json.loads(BODY) | {"parameters": parameters}).encode()
    header_only = {wire.header: headers[wire.header] for _, wire in wire_options()
                   if wire.parameter is None and wire.header in headers}
    intake = intake_of(header_only, body)
    assert_asked(intake.options, kind, fields=[f for f in SERVING + ("token", "timeout_ms", "traceparent")])


def job_of(intake: Intake) -> JobV1:
    return admitted_job(intake, tenant="acme", model="digits-large", reply_to="_INBOX.x",
                        traceparent=intake.options.traceparent, received_ms=NOW_MS, admitted_ms=NOW_MS)


@pytest.mark.parametrize("kind", KINDS.values(), ids=KINDS.keys())
def test_every_serving_option_reaches_the_job_the_recording_and_replay(kind):
    intake = intake_of(option_headers(RequestOptionsV1(**kind)))
    job = JobV1.from_headers(job_of(intake).to_headers())
    assert_asked(job, kind, fields=SERVING)
    key, value, headers = request_record(job, BODY, {RequestHeaders.CONTENT_TYPE: JSON_CONTENT_TYPE})
    recorded = parse_request_record(SimpleNamespace(key=key, value=value, headers=headers))
    assert_asked(recorded.meta, kind, fields=SERVING)
    assert recorded.meta.timeout_ms == intake.deadline_ms - NOW_MS

    replayed = intake_of(replay_headers(recorded, "t-replay", "replay-1"), recorded.body)
    assert_asked(replayed.options, kind, fields=SERVING)
    assert replayed.options.token == "t-replay" and replayed.request_id == "replay-1"
    assert replayed.options.timeout_ms == recorded.meta.timeout_ms


def offline_client() -> DinClient:
    return DinClient(SimpleNamespace(new_inbox=lambda: "_INBOX.test"), "acme", "t-client")


def intake_now(headers: dict[str, str]) -> Intake:
    """The intake of a request the client built just now (its deadline is on the wall clock)."""
    return read_intake(headers, BODY, time.time() * 1000.0, 1 << 20)


def test_the_client_builder_covers_every_option_but_the_token():
    keywords = set(inspect.signature(DinClient.build).parameters) - {"self", "inputs", "binary"}
    assert keywords == set(BUILD_OPTIONS)
    assert set(BUILD_OPTIONS.values()) | {"token"} == set(RequestOptionsV1.model_fields)


@pytest.mark.parametrize("kind", KINDS.values(), ids=KINDS.keys())
def test_the_client_asks_for_exactly_the_options_given(kind):
    field_to_keyword = {field: keyword for keyword, field in BUILD_OPTIONS.items()}
    keywords = {field_to_keyword[name]: value for name, value in kind.items() if name != "token"}
    _, headers = offline_client().build({"input": [[0.1, 0.2]]}, **keywords)
    intake = intake_of(headers) if "deadline_ms" in kind else intake_now(headers)
    assert_asked(intake.options, kind | {"token": "t-client"},
                 fields=[f for f in RequestOptionsV1.model_fields if f not in ("deadline_ms", "request_id")])


FLAG_SAMPLES = {
    "sla_class": (["--sla", "batch"], SlaClass.BATCH),
    "timeout_ms": (["--timeout-ms", "800"], 800),
    "labels": (["--labels", "pii,x"], ["pii", "x"]),
    "allow_degrade": (["--allow-degrade"], True),
    "min_accuracy": (["--min-accuracy", "0.9"], 0.9),
    "model_version": (["--version", "2"], "2"),
    "cascade_threshold": (["--cascade", "0.7"], 0.7),
    "cascade_target_rate": (["--cascade-rate", "0.2"], 0.2),
    "split": (["--split", "hidden_2"], "hidden_2"),
    "split_protection": (["--split", "auto", "--split-protection", "noise:0.1"], "noise:0.1"),
    "max_tokens": (["--prompt", "def ", "--max-tokens", "5"], 5),
}


def test_din_infer_has_a_flag_for_every_option_it_does_not_explain_away():
    assert set(FLAG_SAMPLES) | set(OPTIONS_NOT_OFFERED) == set(RequestOptionsV1.model_fields)
    assert not set(FLAG_SAMPLES) & set(OPTIONS_NOT_OFFERED)


@pytest.mark.parametrize("field", FLAG_SAMPLES)
def test_each_din_infer_flag_sets_its_option(field):
    argv, expected = FLAG_SAMPLES[field]
    args = build_parser().parse_args(["infer", "--tenant", "acme", *argv])
    options = request_options(args) | ({"max_tokens": args.max_tokens} if args.prompt is not None else {})
    options.pop("binary")
    _, headers = offline_client().build({"input": [[0.1, 0.2]]}, **options)
    assert getattr(intake_now(headers).options, field) == expected


def test_every_request_header_is_an_option_or_documented_transport():
    option_headers_declared = {wire.header for _, wire in wire_options()}
    names = request_header_names()
    assert {getattr(RequestHeaders, name) for name in names} - option_headers_declared == {RequestHeaders.CONTENT_TYPE}
    assert option_headers_declared <= {getattr(RequestHeaders, name) for name in names}
    docs = request_header_docs()
    assert set(docs) == set(names) and all(docs.values())
    assert "rate:" in docs["CASCADE"]


def test_every_option_has_a_description():
    assert all(info.description for info in RequestOptionsV1.model_fields.values())


def test_the_old_job_name_of_split_protection_is_still_accepted_and_readable():
    common = dict(request_id="r", tenant="acme", model="m", deadline_ms=1, reply_to="", content_type="x",
                  received_ms=0.0)
    job = JobV1(**common, split="auto", protection="quantize:4")
    assert job.split_protection == job.protection == "quantize:4"
    decoded = JobV1.model_validate_json(json.dumps(common | {"split": "auto", "protection": "noise:0.1"}))
    assert decoded.split_protection == "noise:0.1"
    assert "protection" not in json.loads(job.to_headers()["Din-Job-V1"])
    assert JobV1.model_json_schema()["properties"]["protection"]["deprecated"] is True


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({RequestHeaders.DEADLINE_MS: str(int(NOW_MS) + 600_001)}, "deadline_ms must be at most"),
        ({RequestHeaders.DEADLINE_MS: "1" + "0" * 30}, "deadline_ms must be at most"),
        ({RequestHeaders.LABELS: "pii,\u0007"}, "printable"),
        ({RequestHeaders.LABELS: ",".join(f"l{i}" for i in range(17))}, "at most 16 labels"),
        ({RequestHeaders.LABELS: "x" * 65}, "at most 64 printable"),
    ],
)
def test_absurd_deadlines_and_labels_are_bad_requests(headers, message):
    with pytest.raises(DinError) as refused:
        intake_of(headers)
    assert refused.value.code == ErrorCode.BAD_REQUEST and message in refused.value.message


def test_labels_from_json_parameters_must_be_strings():
    body = json.dumps({**json.loads(BODY), "parameters": {"labels": [5]}}).encode()
    with pytest.raises(DinError) as refused:
        intake_of({}, body)
    assert refused.value.code == ErrorCode.BAD_REQUEST


def test_the_client_sends_an_absolute_deadline_and_the_earlier_of_deadline_and_timeout_counts():
    before = time.time() * 1000.0
    _, headers = offline_client().build({"input": [[0.1, 0.2]]}, timeout_ms=800)
    sent = int(headers[RequestHeaders.DEADLINE_MS])
    assert int(before) + 800 <= sent <= time.time() * 1000.0 + 800
    queued = read_intake(headers, BODY, sent - 300, 1 << 20)
    assert queued.deadline_ms == sent, "time spent before admission counts against the request"
    ahead = read_intake({RequestHeaders.TIMEOUT_MS: "800", RequestHeaders.DEADLINE_MS: str(int(NOW_MS) + 5000)},
                        BODY, NOW_MS, 1 << 20)
    assert ahead.deadline_ms == int(NOW_MS) + 800, "a client clock running ahead gains nothing"
