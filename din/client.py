"""DIN's Python client: one request in, one answer (or one structured error) out.

    keys = PrincipalKeys.load(run_dir / "keys" / "tenant-acme.json")
    async with await DinClient.connect("nats://127.0.0.1:4222", tenant="acme", token=token, keys=keys) as client:
        result = await client.infer("digits-small", {"input": pixels}, sla="realtime")

With ``keys`` (the tenant's key file, written by ``din up``) every request is
sealed to the tenant's data key, bound to its id, model and reply subject, and
every result is checked: signed by a site the key manager vouches for, sealed to
this client's answer key (made per client, sent bound in each request) for this
request, so no site but the one that served it, and no other client, reads it.
Without keys the client sends in clear, which admission accepts only from tenants
the crypto policy lets in (or with security off).

Generation streams tokens::

    async for chunk in client.generate("charlm", "def ", max_tokens=32):
        print(chunk.text, end="")

Any NATS client can publish to ``din.v1.infer.<tenant>.<model>`` with a reply
subject; this one adds encoding, sealing, verification and error decoding.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import nats
import numpy as np
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from din.shared.bus.connect import nats_servers
from din.shared.contracts.inference import (
    JSON_CONTENT_TYPE,
    STREAM_SEQ_HEADER,
    InferResponseV1,
    RequestHeaders,
    SlaClass,
    StreamChunkV1,
)
from din.shared.contracts.options import SPLIT_NONE, RequestOptionsV1, option_headers
from din.shared.credentials import request_proof
from din.shared.envelope import InvalidToken, Reason
from din.shared.errors import DIN_ERROR_HEADER, DinError, ErrorCode, ErrorReplyV1, ErrorV1
from din.shared.naming import Subjects
from din.shared.security import (
    ANSWER_KEY_FIELD,
    KeyAgent,
    PayloadSecurity,
    PrincipalKeys,
    answer_keys,
    encode_answer_key,
    is_sealed,
    request_binding,
    result_binding,
    site_of,
    site_principal,
    tenant_principal,
)
from din.shared.sensitivity import header_labels, marks_sensitive
from din.shared.streaming import InOrder
from din.shared.tensors import encode_binary, encode_request_json, tensors_to_arrays

CLIENT_GRACE_S = 0.5
BUILD_OPTIONS = {
    "sla": "sla_class",
    "timeout_ms": "timeout_ms",
    "deadline_ms": "deadline_ms",
    "labels": "labels",
    "allow_degrade": "allow_degrade",
    "min_accuracy": "min_accuracy",
    "version": "model_version",
    "request_id": "request_id",
    "traceparent": "traceparent",
    "cascade": "cascade_threshold",
    "cascade_rate": "cascade_target_rate",
    "max_tokens": "max_tokens",
    "split": "split",
    "split_protection": "split_protection",
}
"""``DinClient.build``'s option keywords and the ``RequestOptionsV1`` field each sets (the token is the client's)."""
NO_RESPONDERS_STATUS = "503"
STATUS_HEADER = "Status"


log = logging.getLogger("din.client")


class DinRequestError(Exception):
    """The network answered with an error; ``error`` holds its code, message and retry hint."""

    def __init__(self, error: ErrorV1) -> None:
        super().__init__(f"{error.code.value}: {error.message}")
        self.error = error


class RefusedAnswer(DinRequestError):
    """An answer that could not be authenticated (unsigned, mis-signed, another request's, from a revoked site):
    ``send`` and ``stream`` count it and go on waiting for the real answer until the deadline."""


class NoAnswerError(Exception):
    """No answer arrived: the network is not running or not reachable from this client."""


class NoRespondersError(NoAnswerError):
    """Nobody listens on the request subject: no admission service runs."""


def confined(headers: Mapping[str, str]) -> bool:
    """Whether a request's answer may come only from its tenant's sensitive sites: its labels mark it sensitive and
    it is not split (a split job's tail may run anywhere the tenant is served: only protected intermediates leave
    the confined site)."""
    split = headers.get(RequestHeaders.SPLIT, SPLIT_NONE) not in ("", SPLIT_NONE)
    return marks_sensitive(header_labels(headers.get(RequestHeaders.LABELS))) and not split


class Refusals:
    """The answers one request refused as unauthenticated: logged as they come, the last raised if no real answer
    follows before the deadline."""

    def __init__(self) -> None:
        self.count = 0
        self.last: RefusedAnswer | None = None

    def note(self, refused: RefusedAnswer, reply: str) -> None:
        self.count += 1
        self.last = refused
        log.warning("refused an answer on %s that could not be authenticated (%s); waiting for the real one",
                    reply, refused.error.message)

    def raise_last(self) -> None:
        """Raise the last refusal, saying how many there were, when some answer was refused."""
        if self.last is not None:
            error = self.last.error.model_copy(update={
                "message": f"no authentic answer before the deadline: {self.count} refused "
                           f"({self.last.error.message})"})
            raise RefusedAnswer(error) from None


@dataclass
class InferResult:
    """A successful answer, with the outputs as numpy arrays and who vouched for it."""

    response: InferResponseV1
    outputs: dict[str, np.ndarray]
    signer: str | None = None
    encrypted: bool = False

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

    def __init__(
        self,
        nc: NatsClient,
        tenant: str,
        token: str,
        *,
        security: PayloadSecurity | None = None,
        owns_connection: bool = False,
        site: str | None = None,
    ) -> None:
        self._nc = nc
        self.tenant = tenant
        self.site = site
        self._token = token
        self._owns = owns_connection
        self.security = security or PayloadSecurity(None)
        self._answer = answer_keys() if self.security.enabled else None
        self._inbox = nc.new_inbox()
        self._answers: dict[str, asyncio.Queue] = {}
        self._subscription = None

    @classmethod
    async def connect(
        cls, url: str, tenant: str, token: str, keys: PrincipalKeys | None = None, *, keys_timeout_s: float = 30.0,
        options: Mapping[str, Any] | None = None, site: str | None = None,
    ) -> DinClient:
        """Connect as ``tenant``; with ``keys``, wait until the tenant's keys and sites have been distributed.

        ``site`` is the site whose NATS server ``url`` is (None: the hub's): requests are sealed for the admission
        that takes requests sent there alone. ``options`` are nats-py connect options: on a closed bus the
        tenant's credentials, its inbox prefix and TLS (``shared.bus.connect.nats_options`` with the tenant's
        creds file and the site it connects at)."""
        nc = await nats.connect(nats_servers(url), name=f"din-client-{tenant}", **(options or {}))
        try:
            security = None
            if keys is not None:
                if keys.principal != tenant_principal(tenant):
                    raise ValueError(f"key file of {keys.principal} cannot be used as tenant {tenant!r}")
                security = PayloadSecurity(KeyAgent(keys))
                await security.start(nc, readers=lambda agent: [tenant_principal(tenant)], timeout_s=keys_timeout_s)
                await security.agent.wait_until(lambda agent: agent.sites is not None, keys_timeout_s)
            client = cls(nc, tenant, token, security=security, owns_connection=True, site=site)
            await client._listen()
        except BaseException:
            await nc.close()
            raise
        return client

    @classmethod
    async def attach(cls, nc: NatsClient, tenant: str, token: str) -> DinClient:
        """A client without keys on an existing connection (which stays the caller's to close)."""
        client = cls(nc, tenant, token)
        await client._listen()
        return client

    async def _listen(self) -> None:
        self._subscription = await self._nc.subscribe(f"{self._inbox}.*", cb=self._on_answer)

    async def _on_answer(self, msg: Msg) -> None:
        answers = self._answers.get(msg.subject[len(self._inbox) + 1 :])
        if answers is not None:
            answers.put_nowait(msg)

    async def __aenter__(self) -> DinClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self.security.stop()
        if self._subscription is not None:
            await self._subscription.unsubscribe()
            self._subscription = None
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
        cascade: float | None = None,
        cascade_rate: float | None = None,
        max_tokens: int | None = None,
        split: str | None = None,
        split_protection: str | None = None,
        deadline_ms: int | None = None,
    ) -> tuple[bytes, dict[str, str]]:
        """Encode a request body and headers, unsealed (binary form takes exactly one input).

        The options are those of ``RequestOptionsV1`` (``BUILD_OPTIONS`` maps these keywords to its fields);
        ``version`` is the model version, ``deadline_ms`` an absolute deadline (epoch ms); with ``timeout_ms``
        alone the deadline is sent too (now plus the timeout), so the time a request waits before admission
        counts against it (end to end).

        ``cascade``: a confidence threshold; the model's smallest variant answers and escalates its answers
        less confident than this to the most accurate variant (``served_by.escalated`` says which answered);
        ``cascade_rate`` instead: escalate about this fraction of requests, the least confident ones.
        ``split``: 'auto', a split point or 'none' (split inference; ``served_by.split_point`` says where it was
        cut), with ``split_protection`` such as 'quantize:4'. ``max_tokens``: generation (use ``generate``).
        """
        if deadline_ms is None and timeout_ms is not None:
            deadline_ms = int(time.time() * 1000) + int(timeout_ms)
        options = RequestOptionsV1(
            token=self._token,
            sla_class=SlaClass(sla),
            timeout_ms=int(timeout_ms) if timeout_ms is not None else None,
            deadline_ms=int(deadline_ms) if deadline_ms is not None else None,
            labels=list(labels or []),
            allow_degrade=allow_degrade,
            min_accuracy=min_accuracy,
            model_version=version,
            request_id=request_id or uuid.uuid4().hex,
            traceparent=traceparent or None,
            cascade_threshold=cascade if cascade_rate is None else None,
            cascade_target_rate=cascade_rate,
            max_tokens=max_tokens,
            split=split,
            split_protection=split_protection,
        )
        headers = option_headers(options)
        if binary:
            if len(inputs) != 1:
                raise ValueError("the binary tensor form carries exactly one input")
            ((name, array),) = inputs.items()
            body, tensor_headers = encode_binary(name, np.asarray(array))
            headers.update(tensor_headers)
            return body, headers
        headers[RequestHeaders.CONTENT_TYPE] = JSON_CONTENT_TYPE
        return encode_request_json({n: np.asarray(a) for n, a in inputs.items()}), headers

    def seal(self, model: str, body: bytes, headers: dict[str, str], reply: str) -> tuple[bytes, dict[str, str]]:
        """Put the token's proof for this request in its headers (bound to its id, model and ``reply`` subject,
        issued now: the token itself never leaves the client) and seal it for the admission of its entry site
        alone (the pairwise key of this tenant and that site), bound to the same and to this client's answer
        key."""
        headers = {**headers, RequestHeaders.TOKEN: request_proof(self._token, model,
                                                                  headers[RequestHeaders.REQUEST_ID], reply)}
        if not self.security.enabled:
            return body, headers
        aad = request_binding(headers[RequestHeaders.REQUEST_ID], self.tenant, model, reply, headers)
        aad[ANSWER_KEY_FIELD] = encode_answer_key(self._answer)
        sites = self.security.agent.sites
        sensitive = marks_sensitive(header_labels(headers.get(RequestHeaders.LABELS)))
        entry = sites.entry(self.site, sensitive) if sites is not None else None
        request_id = headers[RequestHeaders.REQUEST_ID]
        if entry is None:
            raise DinRequestError(DinError(ErrorCode.BAD_REQUEST, f"no admission known for site {self.site!r}: "
                                           "the keys bucket has not said where requests are admitted"
                                           ).to_model(request_id))
        if site_principal(entry) in self.security.agent.revoked:
            raise DinRequestError(DinError(ErrorCode.NO_ELIGIBLE_EXECUTOR, f"site {entry}, whose admission opens "
                                           "these requests, is revoked").to_model(request_id))
        sealed = self.security.seal_to(body, to=site_principal(entry), aad=aad)
        return sealed.body, {**headers, **sealed.to_headers()}

    def open_answer(self, request_id: str, data: bytes, headers: Mapping[str, str] | None,
                    reply: str | None = None, sensitive: bool = False) -> InferResult:
        """Decode an answer: an error as ``DinRequestError``, a result checked (signature, seal) and decoded.

        With keys, an answer that cannot be authenticated raises ``RefusedAnswer`` (code ``unauthenticated``): a
        result not signed by a site, not sealed to this request, or signed by a site that may not serve it (the
        tenant's ``TenantSites``; for a ``sensitive`` request only its confined sites); an error not signed by a
        site for ``reply``, the subject the request was answered on (without ``reply`` no error can be checked).
        """
        data, signer, encrypted = self._open(request_id, data, headers, reply=reply, sensitive=sensitive)
        response = InferResponseV1.model_validate_json(data)
        return InferResult(response, tensors_to_arrays(response.outputs), signer, encrypted)

    def open_chunk(self, request_id: str, data: bytes, headers: Mapping[str, str] | None,
                   reply: str | None = None, sensitive: bool = False) -> StreamChunkV1:
        """Decode one message of a token stream, checked like an answer and bound to its position in the stream."""
        seq = headers.get(STREAM_SEQ_HEADER) if headers else None
        plain, _, _ = self._open(request_id, data, headers, seq=int(seq) if seq and seq.isdigit() else None,
                                 reply=reply, sensitive=sensitive)
        return StreamChunkV1.model_validate_json(plain)

    def _open(self, request_id: str, data: bytes, headers: Mapping[str, str] | None,
              seq: int | None = None, reply: str | None = None, sensitive: bool = False
              ) -> tuple[bytes, str | None, bool]:
        if headers and DIN_ERROR_HEADER in headers:
            if self.security.enabled:
                try:
                    self.security.verify_error(data, headers, reply or "")
                except InvalidToken as refused:
                    self.security.refused(refused)
                    raise RefusedAnswer(refused.to_model(request_id)) from None
            raise DinRequestError(ErrorReplyV1.model_validate_json(data).error)
        signer = None
        encrypted = False
        if self.security.enabled:
            try:
                if not is_sealed(headers):
                    raise InvalidToken()
                signer = self.security.verify_answer(data, headers)
                sites = self.security.agent.sites
                if sites is not None and site_of(signer) not in sites.allowed(sensitive):
                    raise InvalidToken(Reason.WRONG_SITE)
                opened = self.security.open_answer(
                    data, headers, answer=self._answer, signer=signer,
                    allow_integrity=self.security.agent.integrity_allowed(site_of(signer)),
                    expected_aad=result_binding(request_id, self.tenant, seq),
                )
            except InvalidToken as refused:
                self.security.refused(refused)
                raise RefusedAnswer(refused.to_model(request_id)) from None
            data, encrypted = opened.plaintext, opened.confidential
        return data, signer, encrypted

    async def answers(self, subject: str, body: bytes, headers: dict[str, str], token: str, wait_s: float
                      ) -> AsyncIterator[Msg]:
        """Publish with reply subject ``<inbox>.<token>`` and yield every message answered there until ``wait_s``
        has passed (then ``NoAnswerError``) or the caller stops; the server's no-responders status raises
        ``NoRespondersError``."""
        queue: asyncio.Queue = asyncio.Queue()
        self._answers[token] = queue
        ends_at = time.monotonic() + wait_s
        try:
            await self._nc.publish(subject, body, reply=f"{self._inbox}.{token}", headers=headers)
            while True:
                try:
                    msg = await asyncio.wait_for(queue.get(), max(0.0, ends_at - time.monotonic()))
                except TimeoutError:
                    raise NoAnswerError(f"no answer within {wait_s:.1f}s") from None
                if msg.headers and msg.headers.get(STATUS_HEADER) == NO_RESPONDERS_STATUS and not msg.data:
                    raise NoRespondersError("no admission service is listening: is the DIN stack running?")
                yield msg
        finally:
            self._answers.pop(token, None)

    async def infer(self, model: str, inputs: Mapping[str, np.ndarray], **options) -> InferResult:
        """Send one request and wait for its single answer; raise ``DinRequestError`` on a DIN error."""
        timeout_ms = options.get("timeout_ms")
        body, headers = self.build(inputs, **options)
        return await self.send(model, body, headers, (timeout_ms / 1000.0 if timeout_ms else 60.0) + CLIENT_GRACE_S)

    async def send(self, model: str, body: bytes, headers: dict[str, str], wait_s: float) -> InferResult:
        """Seal an already-built request (e.g. a recorded one being replayed), send it, check and open the answer.

        An answer that cannot be authenticated is refused (counted in ``security.refusals``) and the client goes
        on waiting for the real one; if none comes within ``wait_s``, the last refusal is raised."""
        token = uuid.uuid4().hex
        reply = f"{self._inbox}.{token}"
        sensitive = confined(headers)
        body, headers = self.seal(model, body, headers, reply)
        refusals = Refusals()
        try:
            async with contextlib.aclosing(self.answers(Subjects.infer(self.tenant, model), body, headers, token,
                                                        wait_s)) as answers:
                async for msg in answers:
                    try:
                        return self.open_answer(headers[RequestHeaders.REQUEST_ID], msg.data, msg.headers,
                                                reply=reply, sensitive=sensitive)
                    except RefusedAnswer as refused:
                        refusals.note(refused, reply)
        except NoAnswerError:
            refusals.raise_last()
            raise
        raise NoAnswerError(f"no answer within {wait_s:.1f}s")

    async def generate(
        self, model: str, prompt: str, max_tokens: int, *, timeout_ms: int | None = None, **options
    ) -> AsyncIterator[StreamChunkV1]:
        """Stream ``max_tokens`` tokens continuing ``prompt``: chunks in order, the last with ``done`` and the
        stream's timings (ttft, tpot). An error (also mid-stream) raises ``DinRequestError``; silence past the
        deadline raises ``NoAnswerError``."""
        inputs = {"prompt": np.frombuffer(prompt.encode("utf-8"), dtype=np.uint8)[None, :]}
        body, headers = self.build(inputs, max_tokens=max_tokens, timeout_ms=timeout_ms, **options)
        wait_s = (timeout_ms / 1000.0 if timeout_ms else 60.0) + CLIENT_GRACE_S
        async for chunk in self.stream(model, body, headers, wait_s):
            yield chunk

    async def stream(self, model: str, body: bytes, headers: dict[str, str], wait_s: float
                     ) -> AsyncIterator[StreamChunkV1]:
        """Seal an already-built generation request (e.g. a recorded one being replayed), send it and yield its
        chunks in order until the one with ``done``; errors as in ``generate``, silence for ``wait_s`` in all
        raises ``NoAnswerError``."""
        request_id = headers[RequestHeaders.REQUEST_ID]
        token = uuid.uuid4().hex
        reply = f"{self._inbox}.{token}"
        sensitive = confined(headers)
        body, headers = self.seal(model, body, headers, reply)
        order = InOrder()
        refusals = Refusals()
        try:
            async with contextlib.aclosing(self.answers(Subjects.infer(self.tenant, model), body, headers, token,
                                                        wait_s)) as answers:
                async for msg in answers:
                    try:
                        chunk = self.open_chunk(request_id, msg.data, msg.headers, reply=reply, sensitive=sensitive)
                    except RefusedAnswer as refused:
                        refusals.note(refused, reply)
                        continue
                    for ready in order.add(chunk.seq, chunk):
                        yield ready
                        if ready.done:
                            return
        except NoRespondersError:
            raise
        except NoAnswerError:
            refusals.raise_last()
            raise NoAnswerError(f"the stream stopped after {order.expected} chunks and no end came") from None
