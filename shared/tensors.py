"""Tensor codec: Open Inference Protocol JSON and DIN's compact binary form, to and from numpy.

Two wire forms carry tensors:

* JSON (``application/json``): an ``InferRequestV1`` or ``InferResponseV1``
  whose tensors list their elements flattened in row-major order.
* Binary (``application/vnd.din.tensor``): one tensor as raw little-endian
  bytes in the body, its name, shape and datatype in the ``Din-Tensor-*``
  headers. It skips JSON number parsing, which dominates for large inputs.

Every failure raises ``DinError``: ``BAD_TENSOR`` when a tensor is malformed or
does not fit the model, ``SCHEMA_VIOLATION`` when a JSON body breaks the contract.
Conversions go through numpy in bulk; nothing loops over elements in Python.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import ValidationError

from din.shared.contracts.inference import Datatype, InferRequestV1, InferResponseV1, TensorV1
from din.shared.errors import DinError, ErrorCode

CONTENT_TYPE_JSON = "application/json"
CONTENT_TYPE_TENSOR = "application/vnd.din.tensor"
CONTENT_TYPE_HEADER = "Content-Type"
TENSOR_NAME_HEADER = "Din-Tensor-Name"
TENSOR_SHAPE_HEADER = "Din-Tensor-Shape"
TENSOR_DATATYPE_HEADER = "Din-Tensor-Datatype"

DYNAMIC_DIM = -1
MAX_RANK = 32
"""Most dimensions a tensor may have (numpy's own limit is 64; no served model comes close)."""

WIRE_DTYPES: dict[Datatype, np.dtype] = {
    Datatype.FP32: np.dtype("<f4"),
    Datatype.FP64: np.dtype("<f8"),
    Datatype.FP16: np.dtype("<f2"),
    Datatype.INT64: np.dtype("<i8"),
    Datatype.INT32: np.dtype("<i4"),
    Datatype.INT16: np.dtype("<i2"),
    Datatype.INT8: np.dtype("i1"),
    Datatype.UINT64: np.dtype("<u8"),
    Datatype.UINT32: np.dtype("<u4"),
    Datatype.UINT16: np.dtype("<u2"),
    Datatype.UINT8: np.dtype("u1"),
    Datatype.BOOL: np.dtype("?"),
}

_FLOAT_TYPES = {Datatype.FP32, Datatype.FP64, Datatype.FP16}
_INT_TYPES = {Datatype.INT64, Datatype.INT32, Datatype.INT16, Datatype.INT8, Datatype.UINT64, Datatype.UINT32,
              Datatype.UINT16, Datatype.UINT8}
_JSON_KINDS_ACCEPTED: dict[Datatype, str] = {
    **{datatype: "iuf" for datatype in _FLOAT_TYPES},
    **{datatype: "iu" for datatype in _INT_TYPES},
    Datatype.BOOL: "b",
}


def _bad_tensor(message: str) -> DinError:
    return DinError(ErrorCode.BAD_TENSOR, message)


def parse_datatype(value: str) -> Datatype:
    """The ``Datatype`` named ``value``; ``BAD_TENSOR`` when DIN does not serve it."""
    try:
        return Datatype(value)
    except ValueError:
        supported = ", ".join(d.value for d in Datatype)
        raise _bad_tensor(f"unknown datatype {value!r}; supported: {supported}") from None


def datatype_of(array: np.ndarray) -> Datatype:
    """The Open Inference Protocol datatype of a numpy array."""
    for datatype, dtype in WIRE_DTYPES.items():
        if array.dtype.kind == dtype.kind and array.dtype.itemsize == dtype.itemsize:
            return datatype
    raise _bad_tensor(f"numpy dtype {array.dtype} has no Open Inference Protocol datatype")


def _check_shape(shape: Sequence[int], name: str) -> tuple[int, ...]:
    if len(shape) > MAX_RANK:
        raise _bad_tensor(f"tensor {name!r}: shape has {len(shape)} dimensions, at most {MAX_RANK} are supported")
    if any(dim < 0 for dim in shape):
        raise _bad_tensor(f"tensor {name!r}: shape {list(shape)} has a negative dimension")
    return tuple(shape)


def tensor_to_array(tensor: TensorV1) -> np.ndarray:
    """Decode one JSON tensor into a numpy array of its declared datatype and shape.

    ``data`` may be flattened or nested, as long as it is row-major and holds
    exactly as many elements as ``shape`` asks for.
    """
    datatype = Datatype(tensor.datatype)
    shape = _check_shape(tensor.shape, tensor.name)
    dtype = WIRE_DTYPES[datatype].newbyteorder("=")
    expected = math.prod(shape)
    if not tensor.data:
        if expected != 0:
            raise _bad_tensor(f"tensor {tensor.name!r}: no data for shape {list(shape)}")
        return np.empty(shape, dtype=dtype)
    try:
        raw = np.asarray(tensor.data)
    except (ValueError, TypeError, OverflowError):
        raise _bad_tensor(f"tensor {tensor.name!r}: data is ragged or not numeric") from None
    if raw.dtype.kind not in _JSON_KINDS_ACCEPTED[datatype]:
        raise _bad_tensor(f"tensor {tensor.name!r}: data elements are not valid {datatype.value} values")
    if raw.size != expected:
        raise _bad_tensor(
            f"tensor {tensor.name!r}: {raw.size} elements do not fill shape {list(shape)} ({expected})"
        )
    if datatype in _INT_TYPES and raw.size:
        limits = np.iinfo(dtype)
        if raw.min() < limits.min or raw.max() > limits.max:
            raise _bad_tensor(f"tensor {tensor.name!r}: values out of range for {datatype.value}")
    return raw.astype(dtype, copy=False).reshape(shape)


def array_to_tensor(name: str, array: np.ndarray) -> TensorV1:
    """Encode a numpy array as one JSON tensor, flattened in row-major order."""
    array = np.asarray(array)
    return TensorV1.model_construct(
        name=name,
        shape=list(array.shape),
        datatype=datatype_of(array),
        data=array.reshape(-1).tolist(),
    )


def tensors_to_arrays(tensors: Iterable[TensorV1]) -> dict[str, np.ndarray]:
    """Decode JSON tensors by name; a repeated name is a contract violation."""
    arrays: dict[str, np.ndarray] = {}
    for tensor in tensors:
        if tensor.name in arrays:
            raise DinError(ErrorCode.SCHEMA_VIOLATION, f"tensor {tensor.name!r} appears more than once")
        arrays[tensor.name] = tensor_to_array(tensor)
    return arrays


def encode_outputs(
    outputs: Mapping[str, np.ndarray], requested: Sequence[str] | None = None
) -> list[TensorV1]:
    """JSON tensors for a model's outputs, only those ``requested`` (in that order) when given."""
    names = list(outputs) if requested is None else list(requested)
    unknown = [name for name in names if name not in outputs]
    if unknown:
        raise DinError(
            ErrorCode.BAD_REQUEST, f"unknown output(s) {unknown}; the model has {sorted(outputs)}"
        )
    return [array_to_tensor(name, outputs[name]) for name in names]


def _header(headers: Mapping[str, str] | None, name: str) -> str | None:
    if not headers:
        return None
    value = headers.get(name)
    if value is not None:
        return value
    lowered = name.lower()
    for key, candidate in headers.items():
        if key.lower() == lowered:
            return candidate
    return None


def content_type_of(headers: Mapping[str, str] | None) -> str:
    """The body's content type from ``headers``: binary when tensor headers are present, else JSON."""
    declared = _header(headers, CONTENT_TYPE_HEADER)
    if declared:
        return declared.split(";", 1)[0].strip().lower()
    if _header(headers, TENSOR_NAME_HEADER) is not None:
        return CONTENT_TYPE_TENSOR
    return CONTENT_TYPE_JSON


def encode_binary(name: str, array: np.ndarray) -> tuple[bytes, dict[str, str]]:
    """One tensor as a binary body (raw little-endian bytes, row-major) and its headers."""
    array = np.asarray(array)
    datatype = datatype_of(array)
    wire = np.ascontiguousarray(array, dtype=WIRE_DTYPES[datatype])
    headers = {
        CONTENT_TYPE_HEADER: CONTENT_TYPE_TENSOR,
        TENSOR_NAME_HEADER: name,
        TENSOR_SHAPE_HEADER: ",".join(str(dim) for dim in array.shape),
        TENSOR_DATATYPE_HEADER: datatype.value,
    }
    return wire.tobytes(), headers


def _parse_shape(text: str) -> tuple[int, ...]:
    text = text.strip()
    if not text:
        return ()
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise _bad_tensor(f"{TENSOR_SHAPE_HEADER} {text!r} is not comma-separated integers") from None


def decode_binary(body: bytes, headers: Mapping[str, str] | None) -> tuple[str, np.ndarray]:
    """The name and array of a binary tensor body. The array is a read-only view of ``body``."""
    name = _header(headers, TENSOR_NAME_HEADER)
    shape_text = _header(headers, TENSOR_SHAPE_HEADER)
    datatype_text = _header(headers, TENSOR_DATATYPE_HEADER)
    missing = [
        header
        for header, present in (
            (TENSOR_NAME_HEADER, bool(name)),
            (TENSOR_SHAPE_HEADER, shape_text is not None),
            (TENSOR_DATATYPE_HEADER, bool(datatype_text)),
        )
        if not present
    ]
    if missing:
        raise _bad_tensor(f"binary tensor body needs header(s) {', '.join(missing)}")
    datatype = parse_datatype(datatype_text.strip().upper())
    shape = _check_shape(_parse_shape(shape_text), name)
    dtype = WIRE_DTYPES[datatype]
    expected = math.prod(shape) * dtype.itemsize
    if len(body) != expected:
        raise _bad_tensor(
            f"tensor {name!r}: body has {len(body)} bytes, shape {list(shape)} of "
            f"{datatype.value} needs {expected}"
        )
    if datatype is Datatype.BOOL and body and max(body) > 1:
        raise _bad_tensor(f"tensor {name!r}: BOOL bytes must be 0 or 1")
    array = np.frombuffer(body, dtype=dtype).reshape(shape)
    return name, array.astype(dtype.newbyteorder("="), copy=False)


@dataclass
class DecodedRequest:
    """An inference request body decoded into arrays, with what the JSON form carries besides."""

    inputs: dict[str, np.ndarray]
    request_id: str | None = None
    requested_outputs: list[str] | None = None
    parameters: dict[str, Any] = field(default_factory=dict)


def parse_request_json(body: bytes | str) -> InferRequestV1:
    """Validate a JSON request body against ``InferRequestV1``; ``SCHEMA_VIOLATION`` if it does not fit."""
    try:
        return InferRequestV1.model_validate_json(body)
    except ValidationError as exc:
        for error in exc.errors(include_url=False):
            if error["loc"][-1:] == ("datatype",) and error["type"] == "enum":
                parse_datatype(str(error["input"]))
        raise DinError(ErrorCode.SCHEMA_VIOLATION, _summarize(exc)) from None


def _summarize(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors(include_url=False, include_input=False)[:3]:
        where = ".".join(str(part) for part in error["loc"]) or "body"
        parts.append(f"{where}: {error['msg']}")
    more = exc.error_count() - len(parts)
    suffix = f" (and {more} more)" if more > 0 else ""
    return "request does not fit the InferRequestV1 contract: " + "; ".join(parts) + suffix


def decode_request(
    body: bytes, headers: Mapping[str, str] | None = None, content_type: str | None = None
) -> DecodedRequest:
    """Decode a request body in either form; ``content_type`` overrides what ``headers`` say."""
    kind = (content_type or content_type_of(headers)).split(";", 1)[0].strip().lower()
    if kind == CONTENT_TYPE_TENSOR:
        name, array = decode_binary(body, headers)
        return DecodedRequest(inputs={name: array})
    if kind != CONTENT_TYPE_JSON:
        raise DinError(
            ErrorCode.SCHEMA_VIOLATION,
            f"content type {kind!r} not served; use {CONTENT_TYPE_JSON} or {CONTENT_TYPE_TENSOR}",
        )
    request = parse_request_json(body)
    return DecodedRequest(
        inputs=tensors_to_arrays(request.inputs),
        request_id=request.id,
        requested_outputs=[output.name for output in request.outputs] if request.outputs else None,
        parameters=dict(request.parameters or {}),
    )


def encode_request_json(
    inputs: Mapping[str, np.ndarray],
    *,
    request_id: str | None = None,
    outputs: Sequence[str] | None = None,
    parameters: Mapping[str, Any] | None = None,
) -> bytes:
    """A JSON ``InferRequestV1`` body for ``inputs``."""
    request = InferRequestV1(
        id=request_id,
        inputs=[array_to_tensor(name, array) for name, array in inputs.items()],
        outputs=[{"name": name} for name in outputs] if outputs is not None else None,
        parameters=dict(parameters) if parameters is not None else None,
    )
    return request.model_dump_json(exclude_none=True).encode()


def decode_response(
    body: bytes, headers: Mapping[str, str] | None = None
) -> tuple[dict[str, np.ndarray], InferResponseV1 | None]:
    """Output arrays of a successful answer, and the JSON response when the answer was JSON."""
    if content_type_of(headers) == CONTENT_TYPE_TENSOR:
        name, array = decode_binary(body, headers)
        return {name: array}, None
    try:
        response = InferResponseV1.model_validate_json(body)
    except ValidationError as exc:
        raise DinError(
            ErrorCode.SCHEMA_VIOLATION, f"answer does not fit InferResponseV1: {exc.error_count()} error(s)"
        ) from None
    return tensors_to_arrays(response.outputs), response


@dataclass(frozen=True)
class TensorSpec:
    """A tensor a model declares: name, datatype and shape, ``-1`` marking a dynamic dimension."""

    name: str
    datatype: Datatype
    shape: tuple[int, ...]

    @classmethod
    def from_config(cls, entry: Mapping[str, Any]) -> TensorSpec:
        """Build from a ``config.json`` entry ``{"name", "datatype", "shape"}``."""
        return cls(name=entry["name"], datatype=Datatype(entry["datatype"]), shape=tuple(entry["shape"]))

    def to_config(self) -> dict[str, Any]:
        """The ``config.json`` entry for this spec."""
        return {"name": self.name, "datatype": self.datatype.value, "shape": list(self.shape)}


def validate_inputs(
    inputs: Mapping[str, np.ndarray],
    specs: Sequence[TensorSpec],
    max_batch_size: int | None = None,
) -> int:
    """Check ``inputs`` against a model's declared inputs and return the batch size.

    The first dimension of every input is the batch dimension; all inputs must
    agree on it, and it must not exceed ``max_batch_size``. Float inputs must
    be finite.
    """
    declared = {spec.name: spec for spec in specs}
    unknown = sorted(set(inputs) - set(declared))
    if unknown:
        raise _bad_tensor(f"unknown input(s) {unknown}; the model takes {sorted(declared)}")
    missing = sorted(set(declared) - set(inputs))
    if missing:
        raise _bad_tensor(f"missing input(s) {missing}")
    batch_size: int | None = None
    for spec in specs:
        array = inputs[spec.name]
        actual = datatype_of(array)
        if actual is not spec.datatype:
            raise _bad_tensor(
                f"input {spec.name!r} is {actual.value}, the model takes {spec.datatype.value}"
            )
        if array.ndim == 0:
            raise _bad_tensor(f"input {spec.name!r} needs a batch dimension")
        if array.ndim != len(spec.shape) or any(
            want != DYNAMIC_DIM and want != got for want, got in zip(spec.shape, array.shape)
        ):
            raise _bad_tensor(
                f"input {spec.name!r} has shape {list(array.shape)}, the model takes {list(spec.shape)} "
                "(-1 is any size)"
            )
        rows = array.shape[0]
        if batch_size is None:
            batch_size = rows
        elif rows != batch_size:
            raise _bad_tensor(f"inputs disagree on the batch size: {batch_size} and {rows}")
        if spec.datatype in _FLOAT_TYPES and not np.isfinite(array).all():
            raise _bad_tensor(f"input {spec.name!r} contains NaN or infinity")
    if not batch_size:
        raise _bad_tensor("the batch is empty")
    if max_batch_size is not None and batch_size > max_batch_size:
        raise _bad_tensor(f"batch of {batch_size} exceeds the model's max_batch_size {max_batch_size}")
    return batch_size
