"""Gateway's front door: HTTP in (OIP v2 REST, OpenAI-style completions), requests out on ``din.v1.infer.*``.

The gateway holds no keys and decides nothing: every request goes to admission
on its tenant's request subject (the tenant named by its token, which admission
verifies), its reply subject in that tenant's own inboxes at this site
(``shared.bus.permissions.gateway_reply``), so admission stays the one door and
one tenant's answers never reach another's request. It sends in clear (HTTP on
127.0.0.1 is in clear too): with payload security on, only tenants the crypto
policy lets in clear (``security.plaintext_ingress``) are served through it.
Each HTTP request gets exactly one answer: DIN's answer or error, or ``504``
``deadline_exceeded`` when nothing answered by the request's deadline.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Mapping

import grpc
import numpy as np
from aiohttp import web
from nats.aio.msg import Msg
from tritonclient.grpc.service_pb2_grpc import add_GRPCInferenceServiceServicer_to_server

from din.services.gateway.completions import (
    SSE_DONE,
    error_event,
    prompt_inputs,
    read_completion,
    stream_event,
    whole_completion,
)
from din.services.gateway.grpc_api import InferenceServicer
from din.services.gateway.oip import (
    HEADER_LENGTH,
    OipRequest,
    http_error,
    http_response,
    model_metadata,
    nats_request,
    read_infer_body,
    request_options,
    wait_s,
)
from din.services.gateway.settings import GatewaySettings
from din.shared.bus.permissions import gateway_replies, gateway_reply
from din.shared.catalog import ModelCatalog, ModelEntry
from din.shared.contracts.gateway import ModelMetadataV1, ModelReadyV1, ServerLiveV1, ServerMetadataV1, ServerReadyV1
from din.shared.contracts.inference import STREAM_SEQ_HEADER, InferResponseV1, RequestHeaders, StreamChunkV1
from din.shared.contracts.options import RequestOptionsV1, option_headers
from din.shared.credentials import request_proof
from din.shared.errors import DIN_ERROR_HEADER, DinError, ErrorCode, ErrorReplyV1
from din.shared.naming import InvalidNameError, Subjects
from din.shared.runtime import Service
from din.shared.streaming import InOrder
from din.shared.tensors import decode_response, encode_request_json

VERSION = "0.1.0"
NO_RESPONDERS = "503"
SERVER = ServerMetadataV1(name="din", version=VERSION, extensions=["binary_tensor_data"])


class NoAnswer(Exception):
    """Nothing answered by the deadline."""


class Gateway(Service):
    """Serves DIN's models over HTTP to the clients people have (tritonclient, KServe's, OpenAI's)."""

    name = "gateway"
    publishes = ("infer",)

    def __init__(self, settings: GatewaySettings) -> None:
        super().__init__(settings)
        self.catalog = ModelCatalog.from_repository(settings.model_repo)
        self.counts = {"requests": 0, "answered": 0, "errors": 0, "deadline": 0}
        self._waiting: dict[str, asyncio.Queue] = {}
        self._runner: web.AppRunner | None = None
        self._grpc: grpc.aio.Server | None = None
        self.runtime.on_start(self._start_http)
        self.runtime.on_drain(self._stop_http)

    def detail(self) -> dict[str, object]:
        return {**self.counts, "http_port": self.settings.http_port}

    def http_app(self) -> web.Application:
        """The HTTP routes: the OIP v2 REST API and ``/v1/completions``."""
        app = web.Application(client_max_size=self.settings.max_body_bytes)
        app.add_routes([
            web.get("/v2", self.on_server_metadata),
            web.get("/v2/health/live", self.on_live),
            web.get("/v2/health/ready", self.on_ready),
            web.get("/v2/models/{model}", self.on_model_metadata),
            web.get("/v2/models/{model}/versions/{version}", self.on_model_metadata),
            web.get("/v2/models/{model}/ready", self.on_model_ready),
            web.get("/v2/models/{model}/versions/{version}/ready", self.on_model_ready),
            web.post("/v2/models/{model}/infer", self.on_infer),
            web.post("/v2/models/{model}/versions/{version}/infer", self.on_infer),
            web.post("/v1/completions", self.on_completions),
        ])
        return app

    async def _start_http(self) -> None:
        await self.nc.subscribe(gateway_replies(self.settings.site), cb=self._on_reply)
        self._runner = web.AppRunner(self.http_app(), access_log=None)
        await self._runner.setup()
        try:
            await web.TCPSite(self._runner, self.settings.http_host, self.settings.http_port).start()
        except OSError as exc:
            raise OSError(f"gateway port {self.settings.http_host}:{self.settings.http_port} unavailable: "
                          f"{exc.strerror}") from exc
        if self.settings.grpc_port is not None:
            self._grpc = grpc.aio.server()
            add_GRPCInferenceServiceServicer_to_server(InferenceServicer(
                ready=lambda: self.nc.is_connected, model=self.model, metadata=self.metadata, server=SERVER,
                infer=self.infer), self._grpc)
            address = f"{self.settings.http_host}:{self.settings.grpc_port}"
            if self._grpc.add_insecure_port(address) == 0:
                raise OSError(f"gateway gRPC port {address} unavailable")
            await self._grpc.start()

    async def _stop_http(self) -> None:
        if self._grpc is not None:
            await self._grpc.stop(grace=1.0)
        if self._runner is not None:
            await self._runner.cleanup()

    async def _on_reply(self, msg: Msg) -> None:
        queue = self._waiting.get(msg.subject.rsplit(".", 1)[-1])
        if queue is not None:
            queue.put_nowait(msg)

    # ------------------------------------------------------------------ OIP metadata and health

    async def on_server_metadata(self, request: web.Request) -> web.Response:
        return _json(SERVER.model_dump_json())

    async def on_live(self, request: web.Request) -> web.Response:
        return _json(ServerLiveV1(live=True).model_dump_json())

    async def on_ready(self, request: web.Request) -> web.Response:
        ready = self.nc.is_connected
        return _json(ServerReadyV1(ready=ready).model_dump_json(), status=200 if ready else 503)

    def _model(self, request: web.Request) -> ModelEntry:
        """The model the URL names (and its version, when it names one)."""
        return self.model(request.match_info["model"], request.match_info.get("version"))

    def model(self, name: str, version: str | None) -> ModelEntry:
        """The model ``name`` (with ``version``, when given); tenants never see internal parts."""
        entry = self.catalog.get(name)
        if entry is None or entry.internal:
            raise DinError(ErrorCode.UNKNOWN_MODEL, f"model {name!r} is not served by this network")
        if not entry.has_version(version):
            raise DinError(ErrorCode.UNKNOWN_MODEL,
                           f"model {name!r} has no version {version!r}; versions: {', '.join(entry.versions)}")
        return entry

    async def on_model_metadata(self, request: web.Request) -> web.Response:
        try:
            metadata = self.metadata(self._model(request))
        except DinError as error:
            return _error(error)
        return _json(metadata.model_dump_json())

    def metadata(self, entry: ModelEntry) -> ModelMetadataV1:
        config = self.catalog.config(entry.name)
        if config is None:
            raise DinError(ErrorCode.UNKNOWN_MODEL, f"model {entry.name!r} is not served by this network")
        return model_metadata(entry, config)

    async def on_model_ready(self, request: web.Request) -> web.Response:
        try:
            entry = self._model(request)
        except DinError as error:
            return _error(error)
        ready = self.nc.is_connected
        return _json(ModelReadyV1(name=entry.name, ready=ready).model_dump_json(), status=200 if ready else 503)

    # ------------------------------------------------------------------ inference

    async def on_infer(self, request: web.Request) -> web.Response:
        """One OIP inference: decoded, sent to admission, answered with DIN's answer (or error)."""
        self.counts["requests"] += 1
        request_id = None
        try:
            entry = self._model(request)
            oip = read_infer_body(await request.read(), request.headers.get(HEADER_LENGTH), entry.name)
            request_id = oip.request.id
            response, arrays = await self.infer(entry.name, request.match_info.get("version"), oip, request.headers)
        except DinError as error:
            return self._failed(error, request_id)
        except web.HTTPRequestEntityTooLarge:
            return self._failed(DinError(ErrorCode.PAYLOAD_TOO_LARGE, "body exceeds the gateway's limit of "
                                         f"{self.settings.max_body_bytes} bytes"), request_id)
        self.counts["answered"] += 1
        body, headers = http_response(response, arrays, oip.binary_outputs([o.name for o in response.outputs]))
        return web.Response(body=body, headers=headers)

    async def infer(self, model: str, version: str | None, oip: OipRequest, headers: Mapping[str, str]
                    ) -> tuple[InferResponseV1, dict[str, np.ndarray]]:
        """Send one decoded inference to admission and return DIN's answer; ``DinError`` when it is an error."""
        params = dict(oip.request.parameters or {})
        if version is not None or oip.request.model_version is not None:
            params.setdefault("model_version", version or oip.request.model_version)
        tenant, options = request_options(headers, params, time.time() * 1000.0, oip.request.id)
        body, nats_headers = nats_request(oip, options)
        msg = await self._ask(tenant, model, body, nats_headers, options)
        if msg.headers and DIN_ERROR_HEADER in msg.headers:
            raise DinError(**_din_error(msg.data))
        arrays, response = decode_response(msg.data, msg.headers)
        return response or InferResponseV1.model_validate_json(msg.data), arrays

    def _failed(self, error: DinError, request_id: str | None) -> web.Response:
        self.counts["errors"] += 1
        if error.code is ErrorCode.DEADLINE_EXCEEDED:
            self.counts["deadline"] += 1
        return _error(error, request_id)

    async def _ask(self, tenant: str, model: str, body: bytes, headers: dict[str, str],
                   options: RequestOptionsV1) -> Msg:
        """Send one request and wait for its single answer, until the deadline (then ``deadline_exceeded``)."""
        replies = self._replies(tenant, model, body, headers, options)
        try:
            return await anext(replies)
        finally:
            await replies.aclose()

    async def _replies(self, tenant: str, model: str, body: bytes, headers: dict[str, str],
                       options: RequestOptionsV1) -> AsyncIterator[Msg]:
        """Every message on the request's reply subject until the caller stops, or ``deadline_exceeded`` at the
        deadline; ``unavailable`` when no admission listens."""
        token = uuid.uuid4().hex
        queue: asyncio.Queue = asyncio.Queue()
        self._waiting[token] = queue
        ends_at = time.monotonic() + wait_s(options, self.settings.grace_ms)
        try:
            try:
                subject = Subjects.infer(tenant, model)
                reply = gateway_reply(tenant, self.settings.site, token)
            except InvalidNameError:
                raise DinError(ErrorCode.UNAUTHENTICATED, "credential missing, invalid or expired") from None
            proof = request_proof(options.token or "", model, options.request_id or "", reply)
            await self.nc.publish(subject, body, reply=reply, headers={**headers, RequestHeaders.TOKEN: proof})
            while True:
                try:
                    msg = await asyncio.wait_for(queue.get(), max(0.0, ends_at - time.monotonic()))
                except TimeoutError:
                    raise DinError(ErrorCode.DEADLINE_EXCEEDED, "no answer by the request's deadline") from None
                if msg.headers and msg.headers.get("Status") == NO_RESPONDERS and not msg.data:
                    raise DinError(ErrorCode.UNAVAILABLE, "no admission service is listening at this site")
                yield msg
        finally:
            self._waiting.pop(token, None)

    # ------------------------------------------------------------------ completions

    async def on_completions(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/completions``: a generation, whole or streamed as server-sent events."""
        self.counts["requests"] += 1
        created = int(time.time())
        try:
            completion = read_completion(await request.read())
            entry = self.catalog.get(completion.model)
            if entry is None or entry.internal:
                raise DinError(ErrorCode.UNKNOWN_MODEL, f"model {completion.model!r} is not served by this network")
            tenant, options = request_options(request.headers, {"max_tokens": completion.max_tokens},
                                              time.time() * 1000.0)
            body = encode_request_json(prompt_inputs(completion), request_id=options.request_id)
            headers = {**option_headers(options), "Content-Type": "application/json"}
            chunks = self._chunks(tenant, entry.name, body, headers, options)
            if not completion.stream:
                whole = whole_completion([c async for c in chunks], entry.name, created)
                self.counts["answered"] += 1
                return _json(whole.model_dump_json(exclude_none=True))
            first = await anext(chunks)
        except DinError as error:
            return self._failed(error, None)
        return await self._stream(request, first, chunks, entry.name, created)

    async def _stream(self, request: web.Request, first: StreamChunkV1, chunks: AsyncIterator[StreamChunkV1],
                      model: str, created: int) -> web.StreamResponse:
        """Send the stream's chunks as server-sent events; an error mid-stream is the last event."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        try:
            await response.prepare(request)
            await response.write(stream_event(first, model, created))
            try:
                if not first.done:
                    async for chunk in chunks:
                        await response.write(stream_event(chunk, model, created))
                self.counts["answered"] += 1
                await response.write(SSE_DONE)
            except DinError as error:
                self.counts["errors"] += 1
                await response.write(error_event(http_error(error)[1]))
            await response.write_eof()
        finally:
            await chunks.aclose()
        return response

    async def _chunks(self, tenant: str, model: str, body: bytes, headers: dict[str, str],
                      options: RequestOptionsV1) -> AsyncIterator[StreamChunkV1]:
        """The stream's chunks in order until the one with ``done``; an error reply raises ``DinError``."""
        order = InOrder()
        replies = self._replies(tenant, model, body, headers, options)
        try:
            async for msg in replies:
                if msg.headers and DIN_ERROR_HEADER in msg.headers:
                    raise DinError(**_din_error(msg.data))
                chunk = StreamChunkV1.model_validate_json(msg.data)
                seq = (msg.headers or {}).get(STREAM_SEQ_HEADER)
                for ready in order.add(int(seq) if seq and seq.isdigit() else chunk.seq, chunk):
                    yield ready
                    if ready.done:
                        return
        finally:
            await replies.aclose()


def _din_error(data: bytes) -> dict:
    """``DinError`` arguments of an error reply."""
    error = ErrorReplyV1.model_validate_json(data).error
    return {"code": error.code, "message": error.message, "retry_after_ms": error.retry_after_ms}


def _json(text: str, status: int = 200) -> web.Response:
    return web.Response(text=text, content_type="application/json", status=status)


def _error(error: DinError, request_id: str | None = None) -> web.Response:
    status, body, headers = http_error(error, request_id)
    return web.Response(status=status, body=body, headers=headers)
