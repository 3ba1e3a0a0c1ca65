"""The admission decision: authenticate, validate, check quota, deadline and load. No NATS here."""

from __future__ import annotations

import time
from collections.abc import Callable

from services.admission.intake import Intake, read_intake
from services.admission.quota import QuotaLedger
from shared.catalog import ModelCatalog, ModelEntry
from shared.contracts.events import PressureV1
from shared.contracts.options import SPLIT_AUTO, SPLIT_NONE, RequestOptionsV1
from shared.credentials import InvalidCredential, TenantVerifier
from shared.errors import DinError, ErrorCode

PRESSURE_STALE_MS = 2_000


class AdmissionGate:
    """Decides, for one request, to admit it or refuse it with an error."""

    def __init__(
        self,
        verifier: TenantVerifier,
        quota: QuotaLedger,
        catalog: ModelCatalog,
        *,
        max_payload: int,
        shed_factor: float = 1.0,
        wall_clock: Callable[[], float] = time.time,
        models: dict[str, frozenset[str]] | None = None,
    ) -> None:
        self._verifier = verifier
        self._quota = quota
        self._catalog = catalog
        self._max_payload = max_payload
        self._shed_factor = shed_factor
        self._clock = wall_clock
        self._models = models or {}
        """Per tenant, the models it may call, where the topology limits them."""
        self.pressure: PressureV1 | None = None

    def knows(self, tenant: str) -> bool:
        """True when ``tenant`` is a tenant of this network."""
        return self._verifier.knows(tenant)

    def admit(self, tenant: str, model: str, headers: dict[str, str] | None, body: bytes) -> Intake:
        """Return the request's intake when admitted; raise ``DinError`` with the reason otherwise."""
        now_ms = self._clock() * 1000.0
        intake = read_intake(headers, body, now_ms, self._max_payload)
        asked = intake.options
        if not self._verifier.knows(tenant):
            raise DinError(ErrorCode.UNKNOWN_TENANT, f"tenant {tenant!r} is not known to this network")
        try:
            self._verifier.verify(tenant, asked.token, now=now_ms / 1000.0)
        except InvalidCredential:
            raise DinError(ErrorCode.UNAUTHENTICATED, "credential missing, invalid or expired") from None
        entry = self._catalog.get(model)
        if entry is None:
            raise DinError(ErrorCode.UNKNOWN_MODEL, f"model {model!r} is not served by this network")
        self._check_access(tenant, entry)
        if not entry.has_version(asked.model_version):
            raise DinError(
                ErrorCode.UNKNOWN_MODEL,
                f"model {model!r} has no version {asked.model_version!r}; versions: {', '.join(entry.versions)}",
            )
        cascade = asked.cascade_threshold is not None or asked.cascade_target_rate is not None
        if cascade and len([v for v in self._catalog.variants(model) if self._may_call(tenant, v)]) < 2:
            raise DinError(ErrorCode.BAD_REQUEST, f"model {model!r} has no other variant of its task to cascade with")
        self._check_stages(entry, asked)
        wait_s = self._quota.admit(tenant)
        if wait_s > 0:
            raise DinError(
                ErrorCode.RATE_LIMITED,
                f"tenant {tenant!r} is over its request rate",
                retry_after_ms=max(1, int(wait_s * 1000)),
            )
        wait_s = self._quota.admit_model(tenant, model)
        if wait_s > 0:
            raise DinError(ErrorCode.RATE_LIMITED, f"tenant {tenant!r} used its daily queries of model {model!r}",
                           retry_after_ms=max(1, int(wait_s * 1000)))
        self._check_load(intake, now_ms)
        return intake

    def _may_call(self, tenant: str, entry: ModelEntry) -> bool:
        allowed = self._models.get(tenant)
        return not entry.internal and (allowed is None or entry.name in allowed)

    def _check_access(self, tenant: str, entry: ModelEntry) -> None:
        if entry.internal:
            raise DinError(ErrorCode.FORBIDDEN, f"model {entry.name!r} is an internal part of another model, not "
                                                "served to tenants")
        if not self._may_call(tenant, entry):
            raise DinError(ErrorCode.FORBIDDEN, f"tenant {tenant!r} may not call model {entry.name!r}")

    def _check_stages(self, entry: ModelEntry, asked: RequestOptionsV1) -> None:
        model = entry.name
        if asked.max_tokens is not None and (entry.prefill_model is None or self._catalog.get(entry.prefill_model)
                                              is None):
            raise DinError(ErrorCode.BAD_REQUEST, f"model {model!r} does not generate tokens (max_tokens needs a model "
                                                  "with a prefill part, e.g. charlm)")
        if asked.split is None or asked.split in (SPLIT_AUTO, SPLIT_NONE):
            if asked.split == SPLIT_AUTO and not self._catalog.split_parts(model):
                raise DinError(ErrorCode.BAD_REQUEST, f"model {model!r} has no split points")
            return
        points = self._catalog.split_parts(model)
        if asked.split not in points:
            known = ", ".join(points) or "none"
            raise DinError(ErrorCode.BAD_REQUEST, f"model {model!r} cannot be cut at {asked.split!r}: its graph's "
                                                  f"split points are {known} (or use 'auto')")

    def _check_load(self, intake: Intake, now_ms: float) -> None:
        pressure = self.pressure
        if pressure is None or now_ms - pressure.at_ms > PRESSURE_STALE_MS:
            return
        if pressure.capacity and pressure.inflight >= pressure.capacity * self._shed_factor:
            backlog = pressure.inflight - pressure.capacity * self._shed_factor + 1
            retry = max(5, int(backlog * max(pressure.fastest_ms, 1.0) / max(pressure.executors, 1)))
            raise DinError(ErrorCode.OVERLOADED, "the network is past capacity", retry_after_ms=retry)
        if intake.deadline_ms - now_ms < pressure.fastest_ms:
            raise DinError(
                ErrorCode.DEADLINE_EXCEEDED,
                f"the deadline leaves {intake.deadline_ms - now_ms:.0f} ms; the fastest executor needs "
                f"{pressure.fastest_ms:.0f} ms",
            )
