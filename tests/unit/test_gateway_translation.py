"""The gateway's translation between HTTP (OIP v2, binary extension, OpenAI completions) and DIN's request path."""

from __future__ import annotations

import json

import numpy as np
import pytest

from din.services.gateway.completions import read_completion, stream_event, whole_completion
from din.services.gateway.oip import (
    HEADER_LENGTH,
    http_error,
    http_response,
    nats_request,
    read_infer_body,
    request_options,
)
from din.shared.bus.permissions import gateway_replies, gateway_reply, is_tenant_reply
from din.shared.contracts.inference import InferResponseV1, ServedByV1, SlaClass, StreamChunkV1
from din.shared.contracts.options import DEFAULT_TIMEOUT_MS
from din.shared.errors import DinError, ErrorCode
from din.shared.tensors import TENSOR_NAME_HEADER, array_to_tensor, decode_request, tensors_to_arrays

TOKEN = "din1.acme.9999999999.abc"
NOW_MS = 1_000_000.0


def _binary_body(arrays: dict[str, tuple[str, np.ndarray]], **extra) -> tuple[bytes, str]:
    head = {"inputs": [{"name": name, "datatype": datatype, "shape": list(a.shape),
                        "parameters": {"binary_data_size": a.nbytes}} for name, (datatype, a) in arrays.items()],
            **extra}
    text = json.dumps(head).encode()
    return text + b"".join(a.tobytes() for _, a in arrays.values()), str(len(text))


@pytest.mark.parametrize("datatype, dtype", [("FP32", np.float32), ("FP16", np.float16), ("INT8", np.int8),
                                             ("UINT16", np.uint16), ("BOOL", np.bool_)])
def test_binary_inputs_decode_to_their_arrays(datatype, dtype):
    a = np.arange(6).reshape(2, 3).astype(dtype)
    b = np.ones((2, 1), np.int64)
    body, length = _binary_body({"a": (datatype, a), "b": ("INT64", b)})
    oip = read_infer_body(body, length, "m")
    np.testing.assert_array_equal(oip.inputs["a"], a)
    np.testing.assert_array_equal(oip.inputs["b"], b)
    assert oip.inputs["a"].dtype == dtype


def test_binary_and_json_inputs_mix():
    a = np.zeros((1, 2), np.float32)
    body, length = _binary_body({"a": ("FP32", a)})
    head = json.loads(body[:int(length)])
    head["inputs"].append({"name": "j", "datatype": "INT32", "shape": [1], "data": [7]})
    text = json.dumps(head).encode()
    oip = read_infer_body(text + a.tobytes(), str(len(text)), "m")
    assert oip.inputs["j"].tolist() == [7] and oip.inputs["a"].shape == (1, 2)


@pytest.mark.parametrize("mutate, code", [
    (lambda body, n: (body + b"x", n), ErrorCode.BAD_TENSOR),
    (lambda body, n: (body[:-1], n), ErrorCode.BAD_TENSOR),
    (lambda body, n: (body, "abc"), ErrorCode.BAD_REQUEST),
    (lambda body, n: (body, str(len(body) + 1)), ErrorCode.BAD_REQUEST),
    (lambda body, n: (body, None), ErrorCode.BAD_REQUEST),
])
def test_malformed_binary_bodies_are_refused(mutate, code):
    body, length = _binary_body({"a": ("FP32", np.zeros(4, np.float32))})
    with pytest.raises(DinError) as excinfo:
        read_infer_body(*mutate(body, length), "m")
    assert excinfo.value.code is code


def test_a_body_for_another_model_is_refused():
    body = json.dumps({"model_name": "other", "inputs": [{"name": "x", "datatype": "FP32", "shape": [1],
                                                         "data": [1]}]}).encode()
    with pytest.raises(DinError, match="names model 'other'"):
        read_infer_body(body, None, "m")
    assert read_infer_body(body, None, "other").inputs["x"].tolist() == [1.0]


def test_options_take_the_bearer_token_and_always_set_id_and_deadline():
    tenant, options = request_options({"Authorization": f"Bearer {TOKEN}", "Din-Sla-Class": "realtime"}, {},
                                      NOW_MS, "given")
    assert tenant == "acme" and options.token == TOKEN and options.request_id == "given"
    assert options.deadline_ms == NOW_MS + DEFAULT_TIMEOUT_MS[SlaClass.REALTIME]
    _, options = request_options({"Din-Token": TOKEN}, {"timeout_ms": 300}, NOW_MS)
    assert options.deadline_ms == NOW_MS + 300 and options.request_id
    for headers in ({}, {"Authorization": "Bearer nonsense"}, {"Authorization": "Basic " + TOKEN}):
        with pytest.raises(DinError) as excinfo:
            request_options(headers, {}, NOW_MS)
        assert excinfo.value.code is ErrorCode.UNAUTHENTICATED


def test_one_input_travels_binary_and_several_as_json():
    _, options = request_options({"Authorization": f"Bearer {TOKEN}"}, {}, NOW_MS, "r1")
    body, length = _binary_body({"a": ("FP32", np.ones((1, 3), np.float32))})
    data, headers = nats_request(read_infer_body(body, length, "m"), options)
    assert headers[TENSOR_NAME_HEADER] == "a" and headers["Din-Token"] == TOKEN
    assert headers["Din-Request-Id"] == "r1" and "Din-Deadline-Ms" in headers
    np.testing.assert_array_equal(decode_request(data, headers).inputs["a"], np.ones((1, 3), np.float32))
    body, length = _binary_body({"a": ("FP32", np.ones(1, np.float32)), "b": ("INT8", np.ones(1, np.int8))},
                                outputs=[{"name": "y"}])
    data, headers = nats_request(read_infer_body(body, length, "m"), options)
    decoded = decode_request(data, headers)
    assert sorted(decoded.inputs) == ["a", "b"] and decoded.requested_outputs == ["y"]


def _response() -> InferResponseV1:
    served = ServedByV1(site="s", executor="e", model="m", model_version="1", degraded=False, batch_size=1)
    return InferResponseV1(model_name="m", model_version="1", id="r", served_by=served, outputs=[
        array_to_tensor("p", np.array([[0.25, 0.75]], np.float32)), array_to_tensor("l", np.array([1], np.int64))])


def test_binary_outputs_follow_the_json():
    response = _response()
    arrays = tensors_to_arrays(response.outputs)
    body, headers = http_response(response, arrays, {"p"})
    length = int(headers[HEADER_LENGTH])
    head = json.loads(body[:length])
    assert head["outputs"][0]["parameters"]["binary_data_size"] == 8 and "data" not in head["outputs"][0]
    assert head["outputs"][1]["data"] == [1]
    np.testing.assert_array_equal(np.frombuffer(body[length:], np.float32), [0.25, 0.75])
    body, headers = http_response(response, arrays, set())
    assert HEADER_LENGTH not in headers and json.loads(body)["outputs"][0]["data"] == [0.25, 0.75]


def test_errors_keep_their_status_code_and_retry_hint():
    status, body, headers = http_error(DinError(ErrorCode.RATE_LIMITED, "slow down", retry_after_ms=1500), "r")
    document = json.loads(body)
    assert status == 429 and headers["Retry-After"] == "2"
    assert document == {"error": "rate_limited: slow down", "code": "rate_limited", "retriable": True,
                        "request_id": "r", "retry_after_ms": 1500}
    assert http_error(DinError(ErrorCode.DEADLINE_EXCEEDED, "late"))[0] == 504


def test_gateway_replies_are_the_tenants_own_inboxes():
    reply = gateway_reply("acme", "cloud", "abc")
    assert is_tenant_reply("acme", reply) and not is_tenant_reply("globex", reply)
    pattern = gateway_replies("cloud").split(".")
    assert len(pattern) == len(reply.split(".")) and all(p in ("*", r) for p, r in zip(pattern, reply.split(".")))


def test_completions_refuse_what_they_cannot_serve_and_join_the_stream():
    assert read_completion(b'{"model": "charlm", "prompt": ["hi"], "temperature": 0.5}').max_tokens == 16
    for body, code in ((b'{"model": "charlm", "prompt": "x", "n": 2}', ErrorCode.BAD_REQUEST),
                       (b'{"model": "charlm", "prompt": ["a", "b"]}', ErrorCode.BAD_REQUEST),
                       (b'{"prompt": "x"}', ErrorCode.SCHEMA_VIOLATION), (b"{", ErrorCode.BAD_REQUEST)):
        with pytest.raises(DinError) as excinfo:
            read_completion(body)
        assert excinfo.value.code is code
    chunks = [StreamChunkV1(id="r", seq=0, text="a"), StreamChunkV1(id="r", seq=1, text="b"),
              StreamChunkV1(id="r", seq=2, text="", done=True, finish_reason="length", prompt_tokens=3,
                            completion_tokens=2)]
    whole = whole_completion(chunks, "charlm", 1)
    assert whole.choices[0].text == "ab" and whole.usage.total_tokens == 5
    last = json.loads(stream_event(chunks[-1], "charlm", 1).removeprefix(b"data: "))
    assert last["choices"][0]["finish_reason"] == "length" and last["usage"]["completion_tokens"] == 2
    assert "usage" not in json.loads(stream_event(chunks[0], "charlm", 1).removeprefix(b"data: "))


def test_grpc_requests_decode_from_raw_or_typed_contents_and_answer_raw():
    from tritonclient.grpc import service_pb2 as pb

    from din.services.gateway.grpc_api import decode_infer, encode_infer

    raw = pb.ModelInferRequest(model_name="m", id="g")
    raw.inputs.add(name="a", datatype="FP16", shape=[1, 2])
    raw.raw_input_contents.append(np.array([[1.5, 2.0]], np.float16).tobytes())
    raw.parameters["sla_class"].string_param = "realtime"
    oip = decode_infer(raw)
    assert oip.inputs["a"].dtype == np.float16 and oip.request.parameters == {"sla_class": "realtime"}
    typed = pb.ModelInferRequest(model_name="m")
    typed.inputs.add(name="b", datatype="INT32", shape=[3]).contents.int_contents.extend([1, 2, 3])
    typed.outputs.add(name="l")
    oip = decode_infer(typed)
    assert oip.inputs["b"].tolist() == [1, 2, 3] and [o.name for o in oip.request.outputs] == ["l"]
    short = pb.ModelInferRequest(model_name="m")
    short.inputs.add(name="c", datatype="FP32", shape=[2]).contents.fp32_contents.extend([1.0])
    with pytest.raises(DinError) as excinfo:
        decode_infer(short)
    assert excinfo.value.code is ErrorCode.BAD_TENSOR
    response = _response()
    answer = encode_infer(response, tensors_to_arrays(response.outputs))
    assert [o.name for o in answer.outputs] == ["p", "l"]
    np.testing.assert_array_equal(np.frombuffer(answer.raw_output_contents[1], np.int64), [1])
