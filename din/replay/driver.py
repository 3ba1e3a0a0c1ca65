"""Re-driving recorded requests against a running stack, at the recorded pace times a speed factor.

Each recorded request is sent again as its tenant (with a fresh token from the
stack's credentials), to the same model, with every option it asked for (the
serving options of ``RecordedRequestV1``: SLA class, labels, degradation,
accuracy floor, version, cascade, max tokens, split and split protection), the
same time budget, and a new request id ``replay-<run>-<original id>``
(``outcomes.replay_request_id``) so the replay's own recordings never mix with
the original's: every record the replayed request leaves carries that id, which
``din report`` reads to show replayed traffic apart from live traffic. A generation request's
token stream is read to its last chunk. Sends are open-loop:
request *i* leaves at ``(received_i - received_0) / speed`` after the start,
whether or not earlier ones were answered, with at most ``concurrency`` in
flight (a send that has to wait for a slot is counted as late).

A sealed recording that could not be opened is replayed from its metadata
only: a zero tensor of the recorded (or the model's configured) shape stands
in for the payload, so load, routing and timing are reproduced but results are not.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from nats.aio.client import Client as NatsClient
from nats.errors import NoRespondersError as NatsNoResponders
from nats.errors import TimeoutError as NatsTimeout

from din.client import DinClient, DinRequestError, NoAnswerError, NoRespondersError
from din.replay.outcomes import Outcome, replay_request_id
from din.replay.progress import ProgressBar
from din.replay.reader import ReplayError
from din.shared.contracts.inference import TENSOR_CONTENT_TYPE, RequestHeaders, ServedByV1, StreamChunkV1
from din.shared.contracts.options import option_headers
from din.shared.naming import Subjects
from din.shared.recording import RecordedRequest
from din.shared.tensors import TENSOR_DATATYPE_HEADER, TENSOR_SHAPE_HEADER, WIRE_DTYPES, encode_binary, parse_datatype

ANSWER_GRACE_S = 1.0
LATE_AFTER_S = 0.05


@dataclass
class ReplayResult:
    """What the replay sent and what came back, keyed by the original request id."""

    outcomes: dict[str, Outcome] = field(default_factory=dict)
    wall_s: float = 0.0
    late: int = 0
    synthetic: int = 0
    unsendable: dict[str, str] = field(default_factory=dict)
    run_id: str = ""

    @property
    def rate(self) -> float:
        return len(self.outcomes) / self.wall_s if self.wall_s > 0 else 0.0


class SyntheticInputs:
    """Zero tensors standing in for payloads the replay cannot decrypt."""

    def __init__(self, model_repo: Path | None) -> None:
        self._repo = Path(model_repo) if model_repo else None
        self._cache: dict[str, tuple[bytes, dict[str, str]] | None] = {}

    def for_request(self, recorded: RecordedRequest) -> tuple[bytes, dict[str, str]] | None:
        meta = recorded.meta
        tensor = meta.tensor_headers
        if tensor.get(TENSOR_SHAPE_HEADER) and tensor.get(TENSOR_DATATYPE_HEADER):
            try:
                shape = tuple(int(d) for d in tensor[TENSOR_SHAPE_HEADER].split(","))
                dtype = WIRE_DTYPES[parse_datatype(tensor[TENSOR_DATATYPE_HEADER])]
            except Exception:  # noqa: BLE001 - fall back to the model's configuration
                shape = ()
            if shape:
                headers = {**tensor, RequestHeaders.CONTENT_TYPE: TENSOR_CONTENT_TYPE}
                return np.zeros(shape, dtype=dtype).tobytes(), headers
        if meta.model not in self._cache:
            self._cache[meta.model] = self._from_config(meta.model)
        return self._cache[meta.model]

    def _from_config(self, model: str) -> tuple[bytes, dict[str, str]] | None:
        if self._repo is None:
            return None
        try:
            config = json.loads((self._repo / model / "config.json").read_text())
            first = config["inputs"][0]
            shape = [1 if d < 0 else int(d) for d in first["shape"]]
            dtype = WIRE_DTYPES[parse_datatype(first["datatype"])]
        except (OSError, ValueError, KeyError, IndexError, TypeError):
            return None
        return encode_binary(first["name"], np.zeros(shape, dtype=dtype))


def replay_headers(recorded: RecordedRequest, token: str, request_id: str) -> dict[str, str]:
    """The request headers that ask again for everything the recorded request asked for (every serving option
    of ``RecordedRequestV1``, the same time budget), as ``request_id`` with ``token``."""
    meta = recorded.meta
    return {
        **option_headers(meta),
        RequestHeaders.TOKEN: token,
        RequestHeaders.REQUEST_ID: request_id,
        RequestHeaders.TIMEOUT_MS: str(meta.timeout_ms),
        RequestHeaders.CONTENT_TYPE: meta.content_type,
        **meta.tensor_headers,
    }


def served_into(outcome: Outcome, served: ServedByV1, timings_ms: dict[str, float]) -> None:
    """Fill ``outcome`` from where and how a request was served."""
    outcome.ok = True
    outcome.latency_ms = timings_ms.get("total")
    outcome.site = served.site
    outcome.model = served.model
    outcome.degraded = served.degraded
    outcome.escalated = served.escalated
    outcome.split_point = served.split_point


async def stream_into(outcome: Outcome, chunks: AsyncIterator[StreamChunkV1]) -> None:
    """Read a generation's token stream to its end into ``outcome``: its chunks counted, served as the last says."""
    outcome.chunks = 0
    async for chunk in chunks:
        outcome.chunks += 1
        if chunk.done and chunk.served_by is not None:
            served_into(outcome, chunk.served_by, chunk.timings_ms)


class ReplayDriver:
    """Sends recorded requests to a running stack and collects one outcome each."""

    def __init__(
        self,
        nc: NatsClient,
        tokens: dict[str, str],
        *,
        speed: float = 1.0,
        concurrency: int = 256,
        model_repo: Path | None = None,
        progress: bool = True,
        run_id: str | None = None,
        clients: dict[str, DinClient] | None = None,
    ) -> None:
        if speed < 0:
            raise ReplayError("--speed must be >= 0 (0 sends as fast as possible)")
        self._nc = nc
        self._tokens = tokens
        self._clients = dict(clients or {})
        self.speed = speed
        self._semaphore = asyncio.Semaphore(max(1, concurrency))
        self._synthetic = SyntheticInputs(model_repo)
        self._progress = progress
        self.run_id = run_id or uuid.uuid4().hex[:8]

    async def preflight(self) -> None:
        """Raise ``ReplayError`` unless an admission service answers on this connection."""
        try:
            await self._nc.request(Subjects.health("admission"), b"", timeout=3.0)
        except (NatsNoResponders, NatsTimeout):
            raise ReplayError(
                "no admission service answers on this NATS server: is the stack running (`din status`)?"
            ) from None

    def _prepare(self, recorded: RecordedRequest, result: ReplayResult):
        meta = recorded.meta
        token = self._tokens.get(meta.tenant)
        if token is None:
            result.unsendable[meta.request_id] = f"no credentials for tenant {meta.tenant}"
            return None
        request_id = replay_request_id(self.run_id, meta.request_id)
        headers = replay_headers(recorded, token, request_id)
        body = recorded.body
        if recorded.sealed:
            synthetic = self._synthetic.for_request(recorded)
            if synthetic is None:
                result.unsendable[meta.request_id] = f"sealed, and no input shape known for model {meta.model}"
                return None
            body, tensor_headers = synthetic
            headers.update(tensor_headers)
            result.synthetic += 1
        return body, headers

    async def run(self, requests: list[RecordedRequest]) -> ReplayResult:
        """Replay ``requests`` (sorted by receipt) and return their outcomes."""
        result = ReplayResult(run_id=self.run_id)
        if not requests:
            return result
        attached = await self._attach_clients({r.meta.tenant for r in requests})
        try:
            await self._send_all(requests, result)
        finally:
            for tenant in attached:
                await self._clients.pop(tenant).close()
        return result

    async def _attach_clients(self, tenants: set[str]) -> list[str]:
        """Plain clients on the replay's connection for the tenants with a token but no client of their own."""
        attached = []
        for tenant in sorted(tenants - set(self._clients)):
            if tenant in self._tokens:
                self._clients[tenant] = await DinClient.attach(self._nc, tenant, self._tokens[tenant])
                attached.append(tenant)
        return attached

    async def _send_all(self, requests: list[RecordedRequest], result: ReplayResult) -> None:
        bar = ProgressBar(len(requests), "replay", enabled=self._progress)
        origin_ms = requests[0].meta.received_ms
        began = time.monotonic()
        tasks = []
        for recorded in requests:
            prepared = self._prepare(recorded, result)
            if prepared is None:
                bar.advance()
                continue
            if self.speed > 0:
                due = began + (recorded.meta.received_ms - origin_ms) / 1000.0 / self.speed
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            else:
                due = time.monotonic()
            await self._semaphore.acquire()
            if time.monotonic() - due > LATE_AFTER_S and self.speed > 0:
                result.late += 1
            tasks.append(asyncio.create_task(self._one(recorded, *prepared, result, bar)))
        await asyncio.gather(*tasks)
        result.wall_s = time.monotonic() - began
        bar.close()

    async def _one(self, recorded: RecordedRequest, body: bytes, headers: dict[str, str], result: ReplayResult,
                   bar: ProgressBar) -> None:
        meta = recorded.meta
        outcome = Outcome(meta.request_id, meta.tenant, meta.sla_class.value, False)
        started = time.perf_counter()
        wait_s = meta.timeout_ms / 1000.0 + ANSWER_GRACE_S
        client = self._clients[meta.tenant]
        try:
            if meta.max_tokens is not None:
                await stream_into(outcome, client.stream(meta.model, body, headers, wait_s))
            else:
                response = (await client.send(meta.model, body, headers, wait_s)).response
                served_into(outcome, response.served_by, response.timings_ms)
        except DinRequestError as exc:
            outcome.code = exc.error.code.value
        except NoRespondersError:
            outcome.code = "no_responders"
        except NoAnswerError:
            outcome.code = "no_answer"
        except Exception as exc:  # noqa: BLE001 - an undecodable answer is an outcome too
            outcome.code = f"bad_answer:{exc.__class__.__name__}"
        finally:
            outcome.client_ms = (time.perf_counter() - started) * 1000.0
            result.outcomes[meta.request_id] = outcome
            self._semaphore.release()
            bar.advance()

