"""Counting every answer: raw NATS requests from one site's own NATS server, each on its own reply subject.

The sites benchmark and the sites tests both need, per request: ok, each error code, unanswered and
duplicated, plus where ``ok`` answers were served and how long each took. ``Load`` sends plain (unsealed)
requests, so the tenants it uses must be in the topology's ``security.plaintext_ingress``.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

import nats
import numpy as np

from din.shared.contracts.inference import RequestHeaders
from din.shared.credentials import request_proof
from din.shared.errors import DIN_ERROR_HEADER, ErrorReplyV1
from din.shared.naming import Subjects
from din.shared.tensors import encode_request_json

BODY = encode_request_json({"input": np.zeros((1, 64), dtype=np.float32)})


@dataclass
class Tally:
    """Every request sent and every answer it got, by request id."""

    sent: list[str] = field(default_factory=list)
    answers: dict[str, list[str]] = field(default_factory=dict)
    sites: Counter = field(default_factory=Counter)
    sent_at: dict[str, float] = field(default_factory=dict)
    latency_ms: dict[str, float] = field(default_factory=dict)

    def outcome(self, ids: list[str] | None = None) -> dict[str, int]:
        """Counts of the first answers by code, plus unanswered and duplicated (over ``ids``, default all)."""
        ids = self.sent if ids is None else ids
        codes = Counter(replies[0] for rid in ids if (replies := self.answers.get(rid)))
        return {**codes, "unanswered": sum(1 for rid in ids if rid not in self.answers),
                "duplicated": sum(len(self.answers[rid]) - 1 for rid in ids if len(self.answers.get(rid, ())) > 1)}

    def settled(self) -> bool:
        return all(rid in self.answers for rid in self.sent)


class Load:
    """Requests from the NATS server at ``url``, answered on one inbox and counted in ``tally``.

    ``options``: nats-py connect options; on a closed bus the operator's at that site (raw requests of any
    tenant are answered into the operator's inboxes, its ``inbox_prefix``). ``body``: every request's body
    (default one zero image)."""

    def __init__(self, url: str, tokens: dict[str, str], options: dict | None = None, body: bytes = BODY) -> None:
        self.url = url
        self.body = body
        self.tokens = tokens
        self.options = options or {}
        self.tally = Tally()
        self.inbox = f"{self.options.get('inbox_prefix', '_INBOX')}.tally{uuid.uuid4().hex}"
        self.nc: nats.NATS | None = None

    async def __aenter__(self) -> Load:
        self.nc = await nats.connect(self.url, max_reconnect_attempts=-1, **self.options)
        await self.nc.subscribe(f"{self.inbox}.*", cb=self._answer)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.nc.close()

    async def _answer(self, msg) -> None:
        rid = msg.subject.rsplit(".", 1)[1]
        if DIN_ERROR_HEADER in (msg.headers or {}):
            code = ErrorReplyV1.model_validate_json(msg.data).error.code.value
        else:
            code = "ok"
            self.tally.sites[json.loads(msg.data)["served_by"]["site"]] += 1
        if rid not in self.tally.answers and rid in self.tally.sent_at:
            self.tally.latency_ms[rid] = (time.perf_counter() - self.tally.sent_at[rid]) * 1000.0
        self.tally.answers.setdefault(rid, []).append(code)

    async def request(self, tenant: str, model: str, *, timeout_ms: int = 3000, labels: str | None = None) -> str:
        """Send one request with its timeout and, as ``DinClient`` does, the absolute deadline; its id."""
        rid = uuid.uuid4().hex[:12]
        reply = f"{self.inbox}.{rid}"
        headers = {RequestHeaders.TOKEN: request_proof(self.tokens[tenant], model, rid, reply),
                   RequestHeaders.REQUEST_ID: rid,
                   RequestHeaders.TIMEOUT_MS: str(timeout_ms),
                   RequestHeaders.DEADLINE_MS: str(int(time.time() * 1000.0) + timeout_ms)}
        if labels:
            headers[RequestHeaders.LABELS] = labels
        self.tally.sent.append(rid)
        self.tally.sent_at[rid] = time.perf_counter()
        await self.nc.publish(Subjects.infer(tenant, model), self.body, reply=reply, headers=headers)
        return rid

    async def send(self, tenant: str, model: str, count: int, *, every_s: float = 0.02, **options) -> list[str]:
        """Send ``count`` requests, one every ``every_s``; their ids."""
        ids = []
        for _ in range(count):
            ids.append(await self.request(tenant, model, **options))
            await asyncio.sleep(every_s)
        return ids

    async def settle(self, timeout_s: float = 15.0, poll_s: float = 0.05) -> dict[str, int]:
        """The outcome once every request has its answer, or after ``timeout_s`` (missing ones unanswered)."""
        for _ in range(int(timeout_s / poll_s)):
            if self.tally.settled():
                break
            await asyncio.sleep(poll_s)
        return self.tally.outcome()
