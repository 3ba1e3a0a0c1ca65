"""OIP v2 over gRPC (``inference.GRPCInferenceService``, the KServe proto as Triton's client ships it).

Liveness, readiness, server and model metadata, model readiness and
``ModelInfer`` (``raw_input_contents`` or typed ``contents``; outputs always as
``raw_output_contents``). The token comes in the ``authorization: Bearer``
metadata (or ``din-token``); DIN's errors map to gRPC status codes with the
message ``<code>: <message>``. The other RPCs answer ``UNIMPLEMENTED``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import grpc
import numpy as np
from multidict import CIMultiDict
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from din.services.gateway.oip import OipRequest, binary_array
from din.shared.catalog import ModelEntry
from din.shared.contracts.gateway import ModelMetadataV1, ServerMetadataV1
from din.shared.contracts.inference import Datatype, InferRequestV1, InferResponseV1, RequestedOutputV1, TensorV1
from din.shared.errors import DinError, ErrorCode
from din.shared.tensors import WIRE_DTYPES

STATUS = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
          403: grpc.StatusCode.PERMISSION_DENIED, 404: grpc.StatusCode.NOT_FOUND,
          413: grpc.StatusCode.RESOURCE_EXHAUSTED, 429: grpc.StatusCode.RESOURCE_EXHAUSTED,
          500: grpc.StatusCode.INTERNAL, 503: grpc.StatusCode.UNAVAILABLE, 504: grpc.StatusCode.DEADLINE_EXCEEDED}
CONTENTS = {Datatype.FP32: "fp32_contents", Datatype.FP64: "fp64_contents", Datatype.INT64: "int64_contents",
            Datatype.INT32: "int_contents", Datatype.INT16: "int_contents", Datatype.INT8: "int_contents",
            Datatype.UINT64: "uint64_contents", Datatype.UINT32: "uint_contents", Datatype.UINT16: "uint_contents",
            Datatype.UINT8: "uint_contents", Datatype.BOOL: "bool_contents"}
"""Where each datatype's elements sit in ``InferTensorContents`` (FP16 only as raw contents)."""


def parameter_value(parameter: pb.InferParameter) -> object:
    """The Python value of one ``InferParameter``."""
    which = parameter.WhichOneof("parameter_choice")
    return getattr(parameter, which) if which else None


def decode_infer(request: pb.ModelInferRequest) -> OipRequest:
    """A ``ModelInferRequest`` as the gateway's decoded request; ``DinError`` when it is malformed."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise DinError(ErrorCode.BAD_REQUEST, f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs")
    tensors, arrays = [], {}
    for i, tensor in enumerate(request.inputs):
        try:
            datatype = Datatype(tensor.datatype)
        except ValueError:
            raise DinError(ErrorCode.BAD_TENSOR, f"tensor {tensor.name!r}: datatype {tensor.datatype!r} is not "
                                                 "served") from None
        spec = TensorV1(name=tensor.name, shape=list(tensor.shape), datatype=datatype)
        if tensor.name in arrays:
            raise DinError(ErrorCode.SCHEMA_VIOLATION, f"tensor {tensor.name!r} appears more than once")
        if raw:
            arrays[tensor.name] = binary_array(spec, raw[i])
        else:
            field = CONTENTS.get(datatype)
            values = list(getattr(tensor.contents, field)) if field else []
            arrays[tensor.name] = binary_array(spec, np.asarray(values, dtype=WIRE_DTYPES[datatype]).tobytes())
        tensors.append(spec)
    if not tensors:
        raise DinError(ErrorCode.SCHEMA_VIOLATION, "inputs: the request has no input tensors")
    body = InferRequestV1.model_construct(
        id=request.id or None, model_name=request.model_name, model_version=request.model_version or None,
        inputs=tensors, outputs=[RequestedOutputV1(name=o.name) for o in request.outputs] or None,
        parameters={k: parameter_value(v) for k, v in request.parameters.items()} or None)
    return OipRequest(body, arrays)


def encode_infer(response: InferResponseV1, arrays: dict[str, np.ndarray]) -> pb.ModelInferResponse:
    """DIN's answer as a ``ModelInferResponse``, every output as raw contents."""
    answer = pb.ModelInferResponse(model_name=response.model_name, model_version=response.model_version,
                                   id=response.id)
    for output in response.outputs:
        answer.outputs.add(name=output.name, datatype=Datatype(output.datatype).value, shape=output.shape)
        dtype = WIRE_DTYPES[Datatype(output.datatype)]
        answer.raw_output_contents.append(np.ascontiguousarray(arrays[output.name], dtype=dtype).tobytes())
    answer.parameters["din_site"].string_param = response.served_by.site
    answer.parameters["din_executor"].string_param = response.served_by.executor
    return answer


def metadata_of(context: grpc.aio.ServicerContext) -> CIMultiDict:
    """The call's metadata, case-insensitive; ``din-*`` and ``authorization`` keys as the HTTP headers."""
    return CIMultiDict((key, value) for key, value in context.invocation_metadata() or ()
                       if isinstance(value, str))


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The gRPC face of the gateway: the same model lookup, options and request path as its HTTP one."""

    def __init__(self, *, ready: Callable[[], bool], model: Callable[[str, str | None], ModelEntry],
                 metadata: Callable[[ModelEntry], ModelMetadataV1], server: ServerMetadataV1,
                 infer: Callable[[str, str | None, OipRequest, CIMultiDict],
                                 Awaitable[tuple[InferResponseV1, dict[str, np.ndarray]]]]) -> None:
        self._ready, self._model, self._metadata, self._server, self._infer = ready, model, metadata, server, infer

    async def ServerLive(self, request, context):  # noqa: N802 - the proto's names
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):  # noqa: N802
        return pb.ServerReadyResponse(ready=self._ready())

    async def ServerMetadata(self, request, context):  # noqa: N802
        return pb.ServerMetadataResponse(name=self._server.name, version=self._server.version,
                                         extensions=self._server.extensions)

    async def ModelReady(self, request, context):  # noqa: N802
        try:
            self._model(request.name, request.version or None)
        except DinError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=self._ready())

    async def ModelMetadata(self, request, context):  # noqa: N802
        try:
            meta = self._metadata(self._model(request.name, request.version or None))
        except DinError as error:
            await abort(context, error)
        answer = pb.ModelMetadataResponse(name=meta.name, versions=meta.versions, platform=meta.platform)
        for tensor in meta.inputs:
            answer.inputs.add(name=tensor.name, datatype=tensor.datatype.value, shape=tensor.shape)
        for tensor in meta.outputs:
            answer.outputs.add(name=tensor.name, datatype=tensor.datatype.value, shape=tensor.shape)
        return answer

    async def ModelInfer(self, request, context):  # noqa: N802
        try:
            oip = decode_infer(request)
            response, arrays = await self._infer(request.model_name, request.model_version or None, oip,
                                                 metadata_of(context))
        except DinError as error:
            await abort(context, error)
        return encode_infer(response, arrays)


async def abort(context: grpc.aio.ServicerContext, error: DinError) -> None:
    """End the call with DIN's error as a gRPC status."""
    model = error.to_model()
    await context.abort(STATUS.get(model.status, grpc.StatusCode.UNKNOWN), f"{model.code.value}: {model.message}")
