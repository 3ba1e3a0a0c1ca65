"""DIN's Python client: one request in, one answer (or one structured error) out.

    async with await DinClient.connect("nats://127.0.0.1:4222", tenant="acme", token=token) as client:
        result = await client.infer("digits-small", {"input": pixels}, sla="realtime")

Any NATS client can do the same by publishing to ``din.v1.infer.<tenant>.<model>``
with a reply subject; this one only adds encoding and error decoding.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass

import nats
import numpy as np
from nats.aio.client import Client as NatsClient
from nats.errors import NoRespondersError, TimeoutError as NatsTimeout

from shared.contracts.inference import (
    JSON_CONTENT_TYPE,
    InferResponseV1,
    RequestHeaders,
    SlaClass,
)
from shared.errors import DIN_ERROR_HEADER, ErrorReplyV1, ErrorV1
from shared.naming import Subjects
from shared.tensors import encode_binary, encode_request_json, tensors_to_arrays

CLIENT_GRACE_S = 0.5


class DinRequestError(Exception):
    """The network answered with an error; ``error`` holds its code, message and retry hint."""

    def __init__(self, error: ErrorV1) -> None:
        super().__init__(f"{error.code.value}: {error.message}")
        self.error = error


class NoAnswerError(Exception):
    """No answer arrived: the network is not running or not reachable from this client."""


@dataclass
class InferResult:
    """A successful answer, with the outputs as numpy arrays."""

    response: InferResponseV1
    outputs: dict[str, np.ndarray]

    @property
    def served_by(self):
        return self.response.served_by


def decode_answer(data: bytes, headers: Mapping[str, str] | None) -> InferResponseV1:
    """Turn an answer into a response, or raise ``DinRequestError``."""
    if headers and DIN_ERROR_HEADER in headers:
        raise DinRequestError(ErrorReplyV1.model_validate_json(data).error)
    return InferResponseV1.model_validate_json(data)


class DinClient:
    """A tenant's connection to a DIN network."""

    def __init__(self, nc: NatsClient, tenant: str, token: str, *, owns_connection: bool = False) -> None:
        self._nc = nc
        self.tenant = tenant
        self._token = token
        self._owns = owns_connection

    @classmethod
    async def connect(cls, url: str, tenant: str, token: str) -> "DinClient":
        nc = await nats.connect(url, name=f"din-client-{tenant}")
        return cls(nc, tenant, token, owns_connection=True)

    async def __aenter__(self) -> "DinClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        if self._owns:
            await self._nc.drain()

    def build(
        self,
        inputs: Mapping[str, np.ndarray],
        *,
        sla: SlaClass | str = SlaClass.INTERACTIVE,
        timeout_ms: int | None = None,
        labels: list[str] | None = None,
        allow_degrade: bool = False,
        min_accuracy: float | None = None,
        version: str | None = None,
        binary: bool = False,
        request_id: str | None = None,
        traceparent: str | None = None,
    ) -> tuple[bytes, dict[str, str]]:
        """Encode a request body and headers (binary form takes exactly one input)."""
        headers = {
            RequestHeaders.TOKEN: self._token,
            RequestHeaders.SLA_CLASS: SlaClass(sla).value,
            RequestHeaders.REQUEST_ID: request_id or uuid.uuid4().hex,
        }
        if timeout_ms is not None:
            headers[RequestHeaders.TIMEOUT_MS] = str(int(timeout_ms))
        if labels:
            headers[RequestHeaders.LABELS] = ",".join(labels)
        if allow_degrade:
            headers[RequestHeaders.ALLOW_DEGRADE] = "true"
        if min_accuracy is not None:
            headers[RequestHeaders.MIN_ACCURACY] = str(min_accuracy)
        if version is not None:
            headers[RequestHeaders.MODEL_VERSION] = version
        if traceparent:
            headers[RequestHeaders.TRACEPARENT] = traceparent
        if binary:
            if len(inputs) != 1:
                raise ValueError("the binary tensor form carries exactly one input")
            ((name, array),) = inputs.items()
            body, tensor_headers = encode_binary(name, np.asarray(array))
            headers.update(tensor_headers)
            return body, headers
        headers[RequestHeaders.CONTENT_TYPE] = JSON_CONTENT_TYPE
        return encode_request_json({n: np.asarray(a) for n, a in inputs.items()}), headers

    async def infer(self, model: str, inputs: Mapping[str, np.ndarray], **options) -> InferResult:
        """Send one request and wait for its single answer; raise ``DinRequestError`` on a DIN error."""
        timeout_ms = options.get("timeout_ms")
        body, headers = self.build(inputs, **options)
        wait_s = (timeout_ms / 1000.0 if timeout_ms else 60.0) + CLIENT_GRACE_S
        try:
            msg = await self._nc.request(Subjects.infer(self.tenant, model), body, timeout=wait_s, headers=headers)
        except NoRespondersError:
            raise NoAnswerError("no admission service is listening: is the DIN stack running?") from None
        except NatsTimeout:
            raise NoAnswerError(f"no answer within {wait_s:.1f}s") from None
        response = decode_answer(msg.data, msg.headers)
        return InferResult(response=response, outputs=tensors_to_arrays(response.outputs))
