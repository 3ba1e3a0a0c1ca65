"""The tensor codec: JSON and binary forms, and validation against a model's inputs."""

import json

import numpy as np
import pytest

from din.shared.contracts.inference import Datatype, InferResponseV1, ServedByV1, TensorV1
from din.shared.errors import DinError, ErrorCode
from din.shared.tensors import (
    CONTENT_TYPE_HEADER,
    CONTENT_TYPE_JSON,
    CONTENT_TYPE_TENSOR,
    TENSOR_DATATYPE_HEADER,
    TENSOR_NAME_HEADER,
    TENSOR_SHAPE_HEADER,
    TensorSpec,
    array_to_tensor,
    decode_binary,
    decode_request,
    decode_response,
    encode_binary,
    encode_outputs,
    encode_request_json,
    tensor_to_array,
    validate_inputs,
)

DIGITS_INPUT = [TensorSpec("input", Datatype.FP32, (-1, 64))]

SAMPLES = {
    Datatype.FP32: np.array([[0.5, -1.25], [3.0, 1e-3]], dtype=np.float32),
    Datatype.FP64: np.array([[0.1, 2.0, -7.5]], dtype=np.float64),
    Datatype.INT64: np.array([[2**40, -3], [0, 9]], dtype=np.int64),
    Datatype.INT32: np.array([-(2**31), 2**31 - 1, 5], dtype=np.int32),
    Datatype.UINT8: np.array([[0, 255, 17]], dtype=np.uint8),
    Datatype.BOOL: np.array([[True, False, True]], dtype=bool),
}


def _code(excinfo: pytest.ExceptionInfo) -> ErrorCode:
    return excinfo.value.code


def _json_body(tensor: dict) -> bytes:
    return json.dumps({"inputs": [tensor]}).encode()


@pytest.mark.parametrize("datatype", list(SAMPLES))
def test_json_round_trip_keeps_values_dtype_and_shape(datatype):
    array = SAMPLES[datatype]
    decoded = decode_request(encode_request_json({"t": array}))
    assert decoded.inputs["t"].dtype == array.dtype
    assert decoded.inputs["t"].shape == array.shape
    np.testing.assert_array_equal(decoded.inputs["t"], array)


@pytest.mark.parametrize("datatype", list(SAMPLES))
def test_binary_round_trip_is_raw_little_endian(datatype):
    array = SAMPLES[datatype]
    body, headers = encode_binary("t", array)
    assert body == array.astype(array.dtype.newbyteorder("<")).tobytes()
    assert headers[TENSOR_DATATYPE_HEADER] == datatype.value
    assert headers[TENSOR_SHAPE_HEADER] == ",".join(str(d) for d in array.shape)
    assert headers[CONTENT_TYPE_HEADER] == CONTENT_TYPE_TENSOR
    name, decoded = decode_binary(body, headers)
    assert name == "t"
    np.testing.assert_array_equal(decoded, array)
    assert decoded.dtype == array.dtype


def test_json_request_carries_id_outputs_and_parameters():
    body = encode_request_json(
        {"input": np.zeros((2, 64), np.float32)},
        request_id="r-1",
        outputs=["label"],
        parameters={"sla_class": "realtime"},
    )
    decoded = decode_request(body, {CONTENT_TYPE_HEADER: CONTENT_TYPE_JSON})
    assert decoded.request_id == "r-1"
    assert decoded.requested_outputs == ["label"]
    assert decoded.parameters == {"sla_class": "realtime"}
    assert decoded.inputs["input"].shape == (2, 64)


def test_binary_request_is_recognised_from_headers():
    array = np.arange(128, dtype=np.float32).reshape(2, 64)
    body, headers = encode_binary("input", array)
    del headers[CONTENT_TYPE_HEADER]
    decoded = decode_request(body, headers)
    assert decoded.request_id is None
    np.testing.assert_array_equal(decoded.inputs["input"], array)


def test_binary_headers_are_matched_case_insensitively():
    body, headers = encode_binary("x", np.ones((1, 2), np.float32))
    lowered = {key.lower(): value for key, value in headers.items()}
    assert decode_request(body, lowered).inputs["x"].shape == (1, 2)


def test_nested_json_data_is_accepted_in_row_major_order():
    tensor = TensorV1(name="x", shape=[2, 2], datatype=Datatype.FP32, data=[[1, 2], [3, 4]])
    np.testing.assert_array_equal(tensor_to_array(tensor), np.array([[1, 2], [3, 4]], np.float32))


def test_large_tensor_round_trips_in_both_forms():
    array = np.random.default_rng(0).random((4096, 64), dtype=np.float32)
    body, headers = encode_binary("input", array)
    np.testing.assert_array_equal(decode_request(body, headers).inputs["input"], array)
    np.testing.assert_array_equal(decode_request(encode_request_json({"input": array})).inputs["input"], array)


@pytest.mark.parametrize(
    "tensor",
    [
        {"name": "x", "shape": [2, 3], "datatype": "FP32", "data": [1, 2, 3, 4, 5]},
        {"name": "x", "shape": [2], "datatype": "FP32", "data": ["a", "b"]},
        {"name": "x", "shape": [2], "datatype": "FP32", "data": [1.0, None]},
        {"name": "x", "shape": [2], "datatype": "INT64", "data": [1.5, 2]},
        {"name": "x", "shape": [2], "datatype": "UINT8", "data": [1, 256]},
        {"name": "x", "shape": [2], "datatype": "BOOL", "data": [1, 0]},
        {"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [[1, 2], [3]]},
        {"name": "x", "shape": [-2, 1], "datatype": "FP32", "data": [1, 2]},
        {"name": "x", "shape": [1], "datatype": "BF16", "data": [1]},
    ],
    ids=["count", "strings", "null", "fraction-int", "uint8-range", "int-as-bool", "ragged", "neg-dim", "dtype"],
)
def test_malformed_json_tensors_are_bad_tensor(tensor):
    with pytest.raises(DinError) as excinfo:
        decode_request(_json_body(tensor))
    assert _code(excinfo) is ErrorCode.BAD_TENSOR
    assert "x" in excinfo.value.message or "FP16" in excinfo.value.message


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"{}",
        b'{"inputs": []}',
        b'{"inputs": [{"name": "x"}]}',
        b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}], "extra": 1}',
    ],
    ids=["syntax", "empty", "no-inputs", "incomplete", "extra-field"],
)
def test_contract_violations_are_schema_violation(body):
    with pytest.raises(DinError) as excinfo:
        decode_request(body)
    assert _code(excinfo) is ErrorCode.SCHEMA_VIOLATION


def test_repeated_input_name_is_a_schema_violation():
    tensor = {"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}
    with pytest.raises(DinError) as excinfo:
        decode_request(json.dumps({"inputs": [tensor, tensor]}).encode())
    assert _code(excinfo) is ErrorCode.SCHEMA_VIOLATION


def test_unknown_content_type_is_refused():
    with pytest.raises(DinError) as excinfo:
        decode_request(b"x", {CONTENT_TYPE_HEADER: "text/csv"})
    assert _code(excinfo) is ErrorCode.SCHEMA_VIOLATION


@pytest.mark.parametrize(
    "change",
    [
        {TENSOR_DATATYPE_HEADER: "FP16"},
        {TENSOR_SHAPE_HEADER: "2,64"},
        {TENSOR_SHAPE_HEADER: "1,x"},
        {TENSOR_SHAPE_HEADER: "-1,64"},
        {TENSOR_NAME_HEADER: ""},
    ],
    ids=["dtype", "length", "shape-text", "negative", "no-name"],
)
def test_malformed_binary_tensors_are_bad_tensor(change):
    body, headers = encode_binary("input", np.ones((1, 64), np.float32))
    headers.update(change)
    with pytest.raises(DinError) as excinfo:
        decode_binary(body, headers)
    assert _code(excinfo) is ErrorCode.BAD_TENSOR


def test_binary_bool_bytes_other_than_zero_and_one_are_refused():
    headers = {TENSOR_NAME_HEADER: "b", TENSOR_SHAPE_HEADER: "2", TENSOR_DATATYPE_HEADER: "BOOL"}
    with pytest.raises(DinError) as excinfo:
        decode_binary(b"\x01\x07", headers)
    assert _code(excinfo) is ErrorCode.BAD_TENSOR


def test_validate_accepts_a_fitting_batch_and_returns_its_size():
    assert validate_inputs({"input": np.zeros((5, 64), np.float32)}, DIGITS_INPUT, max_batch_size=64) == 5


@pytest.mark.parametrize(
    ("inputs", "fragment"),
    [
        ({"image": np.zeros((1, 64), np.float32)}, "unknown input"),
        ({}, "missing input"),
        ({"input": np.zeros((1, 64), np.float64)}, "FP64"),
        ({"input": np.zeros((1, 63), np.float32)}, "shape"),
        ({"input": np.zeros((64,), np.float32)}, "shape"),
        ({"input": np.zeros((0, 64), np.float32)}, "empty"),
        ({"input": np.zeros((65, 64), np.float32)}, "max_batch_size"),
        ({"input": np.float32(1.0)}, "batch dimension"),
    ],
    ids=["name", "missing", "dtype", "width", "rank", "empty", "too-big", "scalar"],
)
def test_validate_rejects_inputs_that_do_not_fit(inputs, fragment):
    with pytest.raises(DinError) as excinfo:
        validate_inputs(inputs, DIGITS_INPUT, max_batch_size=64)
    assert _code(excinfo) is ErrorCode.BAD_TENSOR
    assert fragment in excinfo.value.message


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_validate_rejects_non_finite_floats(bad):
    array = np.zeros((3, 64), np.float32)
    array[2, 17] = bad
    with pytest.raises(DinError) as excinfo:
        validate_inputs({"input": array}, DIGITS_INPUT)
    assert _code(excinfo) is ErrorCode.BAD_TENSOR
    assert "NaN" in excinfo.value.message


def test_json_nan_literals_decode_and_then_fail_validation():
    body = b'{"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [NaN' + b", 0" * 63 + b"]}]}"
    inputs = decode_request(body).inputs
    with pytest.raises(DinError) as excinfo:
        validate_inputs(inputs, DIGITS_INPUT)
    assert _code(excinfo) is ErrorCode.BAD_TENSOR


def test_validate_requires_inputs_to_agree_on_the_batch_size():
    specs = [TensorSpec("a", Datatype.FP32, (-1, 2)), TensorSpec("b", Datatype.INT64, (-1,))]
    inputs = {"a": np.zeros((3, 2), np.float32), "b": np.zeros((2,), np.int64)}
    with pytest.raises(DinError) as excinfo:
        validate_inputs(inputs, specs)
    assert "batch size" in excinfo.value.message


def test_fixed_dimensions_are_enforced_and_dynamic_ones_are_not():
    specs = [TensorSpec("seq", Datatype.INT64, (-1, -1, 4))]
    assert validate_inputs({"seq": np.zeros((2, 9, 4), np.int64)}, specs) == 2
    with pytest.raises(DinError):
        validate_inputs({"seq": np.zeros((2, 9, 5), np.int64)}, specs)


def test_spec_round_trips_through_config():
    entry = {"name": "input", "datatype": "FP32", "shape": [-1, 64]}
    assert TensorSpec.from_config(entry).to_config() == entry


def test_encode_outputs_selects_requested_outputs_in_order():
    outputs = {"probabilities": np.full((2, 10), 0.1, np.float32), "label": np.array([3, 4], np.int64)}
    tensors = encode_outputs(outputs, ["label"])
    assert [t.name for t in tensors] == ["label"]
    assert tensors[0].datatype == Datatype.INT64 and tensors[0].data == [3, 4]
    assert [t.name for t in encode_outputs(outputs)] == ["probabilities", "label"]
    with pytest.raises(DinError) as excinfo:
        encode_outputs(outputs, ["logits"])
    assert _code(excinfo) is ErrorCode.BAD_REQUEST


def test_json_response_decodes_back_to_arrays():
    outputs = {"probabilities": np.eye(2, 10, dtype=np.float32), "label": np.array([0, 1], np.int64)}
    response = InferResponseV1(
        model_name="digits-small",
        model_version="1",
        id="r-1",
        outputs=encode_outputs(outputs),
        served_by=ServedByV1(
            site="a", executor="e1", model="digits-small", model_version="1", degraded=False, batch_size=2
        ),
    )
    arrays, parsed = decode_response(response.model_dump_json().encode())
    assert parsed is not None and parsed.id == "r-1"
    np.testing.assert_array_equal(arrays["probabilities"], outputs["probabilities"])
    assert arrays["label"].dtype == np.int64


def test_binary_response_decodes_back_to_an_array():
    label = np.array([7, 1, 0], np.int64)
    body, headers = encode_binary("label", label)
    arrays, parsed = decode_response(body, headers)
    assert parsed is None
    np.testing.assert_array_equal(arrays["label"], label)


def test_array_to_tensor_flattens_row_major():
    tensor = array_to_tensor("x", np.array([[1, 2], [3, 4]], np.int32))
    assert tensor.shape == [2, 2] and tensor.data == [1, 2, 3, 4] and tensor.datatype == Datatype.INT32


def test_unsupported_numpy_dtype_is_refused():
    with pytest.raises(DinError) as excinfo:
        encode_binary("x", np.zeros(2, np.complex64))
    assert _code(excinfo) is ErrorCode.BAD_TENSOR


def test_a_tensor_of_too_many_dimensions_is_a_bad_tensor_not_a_crash():
    tensor = TensorV1(name="input", shape=[1] * 100, datatype=Datatype.FP32, data=[0.0])
    with pytest.raises(DinError) as refused:
        tensor_to_array(tensor)
    assert refused.value.code == ErrorCode.BAD_TENSOR
