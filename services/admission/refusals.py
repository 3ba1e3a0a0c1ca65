"""Requests shed under overload, recorded together: one decision record per tenant, model and reason a second.

A refusal must cost admission far less than serving a request, or shedding itself eats the capacity it protects:
a shed request is answered at once and only counted here; ``RefusalTally.due`` turns the counts into
``AdmissionDecisionV1`` records (``count`` the requests each stands for). Pure: no NATS, no Kafka.
"""

from __future__ import annotations

from dataclasses import dataclass

from din.shared.contracts.events import AdmissionDecisionV1
from din.shared.errors import DinError

WINDOW_MS = 1_000.0


@dataclass
class _Shed:
    first_request_id: str
    detail: str
    count: int = 0
    input_bytes: int = 0
    last_ms: float = 0.0


class RefusalTally:
    """Shed requests counted by ``(tenant, model, reason)`` until their window closes."""

    def __init__(self, window_ms: float = WINDOW_MS) -> None:
        self.window_ms = window_ms
        self._open: dict[tuple[str, str, str], _Shed] = {}
        self._since_ms: float | None = None
        self.shed = 0

    def add(self, tenant: str, model: str, error: DinError, request_id: str, size: int, now_ms: float) -> None:
        """Count one shed request."""
        if self._since_ms is None:
            self._since_ms = now_ms
        key = (tenant, model, error.code.value)
        entry = self._open.get(key)
        if entry is None:
            entry = self._open[key] = _Shed(request_id, error.message)
        entry.count += 1
        entry.input_bytes += size
        entry.last_ms = now_ms
        self.shed += 1

    def due(self, now_ms: float, *, force: bool = False) -> list[AdmissionDecisionV1]:
        """The records of a window that has closed (every open count with ``force``, e.g. at shutdown)."""
        if self._since_ms is None or (not force and now_ms - self._since_ms < self.window_ms):
            return []
        records = [AdmissionDecisionV1(request_id=e.first_request_id, tenant=tenant, model=model, admitted=False,
                                       reason=reason, detail=e.detail, input_bytes=e.input_bytes, at_ms=e.last_ms,
                                       count=e.count)
                   for (tenant, model, reason), e in self._open.items()]
        self._open.clear()
        self._since_ms = None
        return records
