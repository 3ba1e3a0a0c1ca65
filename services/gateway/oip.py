"""Open Inference Protocol over HTTP to DIN's request path and back, binary tensor extension included. No HTTP here.

An HTTP body is JSON (``InferRequestV1``) or, with the binary tensor extension,
``Inference-Header-Content-Length`` bytes of JSON followed by the raw bytes of
every input whose ``parameters`` give a ``binary_data_size``, in input order.
It travels on as DIN's compact binary form when it is one input and asks for
no particular outputs, else as JSON. Outputs come back as JSON, or as raw bytes
after the JSON for those asked for with ``binary_data`` (or all of them with
the request's ``binary_data_output``).
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from din.shared.catalog import ModelEntry
from din.shared.contracts.gateway import HttpErrorV1, ModelMetadataV1, TensorMetadataV1
from din.shared.contracts.inference import (
    JSON_CONTENT_TYPE,
    Datatype,
    InferRequestV1,
    InferResponseV1,
    RequestHeaders,
    TensorV1,
)
from din.shared.contracts.model_config import ModelConfigV1
from din.shared.contracts.options import (
    DEFAULT_TIMEOUT_MS,
    RequestOptionsV1,
    lookup_in,
    option_headers,
    read_options,
)
from din.shared.credentials import token_tenant
from din.shared.errors import DinError, ErrorCode
from din.shared.tensors import WIRE_DTYPES, encode_binary, encode_request_json, parse_request_json, tensor_to_array

HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY_SIZE = "binary_data_size"
BINARY_OUTPUT = "binary_data"
ALL_BINARY_OUTPUT = "binary_data_output"
OCTET_STREAM = "application/octet-stream"
PLATFORM = "onnxruntime_onnx"
TOKEN_HEADER = "Authorization"
BEARER = "bearer "


def _bad(message: str) -> DinError:
    return DinError(ErrorCode.BAD_REQUEST, message)


@dataclass
class OipRequest:
    """An HTTP inference request, decoded: the JSON part, the input arrays, and which outputs go back as bytes."""

    request: InferRequestV1
    inputs: dict[str, np.ndarray]

    def binary_outputs(self, names: list[str]) -> set[str]:
        """Of the answer's outputs ``names``, those to send as raw bytes."""
        if self.request.outputs:
            return {o.name for o in self.request.outputs if (o.parameters or {}).get(BINARY_OUTPUT) is True}
        return set(names) if (self.request.parameters or {}).get(ALL_BINARY_OUTPUT) is True else set()


def read_infer_body(body: bytes, header_length: str | None, model: str) -> OipRequest:
    """Decode an HTTP infer body for ``model``; ``DinError`` (bad_request, schema_violation, bad_tensor) if it is
    not a valid one."""
    json_part, rest = body, b""
    if header_length is not None:
        try:
            length = int(header_length)
        except ValueError:
            raise _bad(f"{HEADER_LENGTH} {header_length!r} is not a number") from None
        if not 0 <= length <= len(body):
            raise _bad(f"{HEADER_LENGTH} {length} does not fit a body of {len(body)} bytes")
        json_part, rest = body[:length], body[length:]
    try:
        json.loads(json_part)
    except (ValueError, UnicodeDecodeError):
        raise _bad("body is not valid JSON (binary tensors need the Inference-Header-Content-Length header)") from None
    request = parse_request_json(json_part)
    if request.model_name is not None and request.model_name != model:
        raise _bad(f"body names model {request.model_name!r}, the URL {model!r}")
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for tensor in request.inputs:
        if tensor.name in inputs:
            raise DinError(ErrorCode.SCHEMA_VIOLATION, f"tensor {tensor.name!r} appears more than once")
        size = (tensor.parameters or {}).get(BINARY_SIZE)
        if size is None:
            inputs[tensor.name] = tensor_to_array(tensor)
            continue
        if not isinstance(size, int) or size < 0 or offset + size > len(rest):
            raise DinError(ErrorCode.BAD_TENSOR, f"tensor {tensor.name!r}: {BINARY_SIZE} {size!r} does not fit the "
                                                 f"{len(rest)} bytes after the JSON")
        inputs[tensor.name] = binary_array(tensor, rest[offset:offset + size])
        offset += size
    if offset != len(rest):
        raise DinError(ErrorCode.BAD_TENSOR, f"{len(rest) - offset} bytes after the JSON belong to no input")
    return OipRequest(request, inputs)


def binary_array(tensor: TensorV1, raw: bytes) -> np.ndarray:
    """One input of the binary extension: ``raw`` little-endian elements of the tensor's datatype and shape."""
    dtype = WIRE_DTYPES[Datatype(tensor.datatype)]
    if any(dim < 0 for dim in tensor.shape):
        raise DinError(ErrorCode.BAD_TENSOR, f"tensor {tensor.name!r}: shape {tensor.shape} has a negative dimension")
    expected = math.prod(tensor.shape) * dtype.itemsize
    if len(raw) != expected:
        raise DinError(ErrorCode.BAD_TENSOR, f"tensor {tensor.name!r}: {len(raw)} bytes, shape {tensor.shape} of "
                                             f"{tensor.datatype} needs {expected}")
    if tensor.datatype == Datatype.BOOL and raw and max(raw) > 1:
        raise DinError(ErrorCode.BAD_TENSOR, f"tensor {tensor.name!r}: BOOL bytes must be 0 or 1")
    return np.frombuffer(raw, dtype=dtype).reshape(tensor.shape).astype(dtype.newbyteorder("="), copy=False)


def request_options(headers: Mapping[str, str], parameters: Mapping | None, now_ms: float,
                    request_id: str | None = None) -> tuple[str, RequestOptionsV1]:
    """The tenant and the request options of an HTTP request: ``Din-*`` headers, else the body's parameters; the
    token from ``Authorization: Bearer`` (else ``Din-Token``); a request id and an absolute deadline always set,
    so the gateway and admission wait for the same instant."""
    options = read_options(lookup_in(headers, parameters), RequestOptionsV1)
    authorization = headers.get(TOKEN_HEADER, "")
    if authorization[:len(BEARER)].lower() == BEARER:
        options = options.model_copy(update={"token": authorization[len(BEARER):].strip()})
    tenant = token_tenant(options.token)
    if tenant is None:
        raise DinError(ErrorCode.UNAUTHENTICATED, "credential missing, invalid or expired")
    timeout_ms = options.timeout_ms if options.timeout_ms is not None else DEFAULT_TIMEOUT_MS[options.sla_class]
    deadline_ms = int(now_ms) + timeout_ms
    if options.deadline_ms is not None:
        deadline_ms = min(deadline_ms, options.deadline_ms) if options.timeout_ms is not None else options.deadline_ms
    return tenant, options.model_copy(update={
        "request_id": options.request_id or request_id or uuid.uuid4().hex, "deadline_ms": deadline_ms})


def nats_request(oip: OipRequest, options: RequestOptionsV1) -> tuple[bytes, dict[str, str]]:
    """The body and headers of the request on ``din.v1.infer.<tenant>.<model>``."""
    headers = option_headers(options)
    if len(oip.inputs) == 1 and not oip.request.outputs:
        ((name, array),) = oip.inputs.items()
        body, tensor_headers = encode_binary(name, array)
        return body, headers | tensor_headers
    outputs = [o.name for o in oip.request.outputs] if oip.request.outputs else None
    headers[RequestHeaders.CONTENT_TYPE] = JSON_CONTENT_TYPE
    return encode_request_json(oip.inputs, request_id=options.request_id, outputs=outputs), headers


def http_response(response: InferResponseV1, arrays: Mapping[str, np.ndarray], binary: set[str]
                  ) -> tuple[bytes, dict[str, str]]:
    """The HTTP body and headers of a successful answer, the outputs in ``binary`` as raw bytes after the JSON."""
    document = response.model_dump(mode="json", exclude_none=True)
    chunks = []
    for output in document["outputs"]:
        if output["name"] in binary:
            array = np.asarray(arrays[output["name"]])
            raw = np.ascontiguousarray(array, dtype=WIRE_DTYPES[Datatype(output["datatype"])]).tobytes()
            output.pop("data", None)
            output["parameters"] = {**output.get("parameters", {}), BINARY_SIZE: len(raw)}
            chunks.append(raw)
    head = json.dumps(document, separators=(",", ":")).encode()
    if not chunks:
        return head, {"Content-Type": JSON_CONTENT_TYPE}
    return head + b"".join(chunks), {"Content-Type": OCTET_STREAM, HEADER_LENGTH: str(len(head))}


def model_metadata(entry: ModelEntry, config: ModelConfigV1) -> ModelMetadataV1:
    """A model's OIP metadata from its config."""
    def tensors(specs) -> list[TensorMetadataV1]:
        return [TensorMetadataV1(name=t.name, datatype=t.datatype, shape=list(t.shape)) for t in specs]

    return ModelMetadataV1(name=entry.name, versions=list(entry.versions), platform=PLATFORM,
                           inputs=tensors(config.inputs), outputs=tensors(config.outputs),
                           parameters={"task": config.task, "description": config.description})


def http_error(error: DinError, request_id: str | None = None) -> tuple[int, bytes, dict[str, str]]:
    """Status, body and headers of an error answer (``Retry-After`` in whole seconds when DIN gives a wait)."""
    model = error.to_model(request_id)
    body = HttpErrorV1(error=f"{model.code.value}: {model.message}", code=model.code.value,
                       retriable=model.retriable, request_id=request_id, retry_after_ms=model.retry_after_ms)
    headers = {"Content-Type": JSON_CONTENT_TYPE}
    if model.retry_after_ms is not None:
        headers["Retry-After"] = str(max(1, math.ceil(model.retry_after_ms / 1000)))
    return model.status, body.model_dump_json(exclude_none=True).encode(), headers


def wait_s(options: RequestOptionsV1, grace_ms: int, now_ms: float | None = None) -> float:
    """How long to wait for DIN's answer: until the deadline, plus ``grace_ms`` for the answer to travel."""
    now = time.time() * 1000.0 if now_ms is None else now_ms
    return max(0.0, ((options.deadline_ms or now) - now + grace_ms) / 1000.0)
