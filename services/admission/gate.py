"""The admission decision: authenticate, validate, check quota, deadline and load. No NATS here."""

from __future__ import annotations

import time
from collections.abc import Callable

from din.services.admission.intake import Intake, read_intake
from din.services.admission.quota import QuotaLedger
from din.services.admission.shedding import LoadShedder
from din.shared.catalog import ModelCatalog, ModelEntry
from din.shared.contracts.options import SPLIT_AUTO, SPLIT_NONE, RequestOptionsV1
from din.shared.credentials import InvalidCredential, TenantVerifier
from din.shared.errors import DinError, ErrorCode


class AdmissionGate:
    """Decides, for one request, to admit it or refuse it with an error."""

    def __init__(
        self,
        verifier: TenantVerifier,
        quota: QuotaLedger,
        catalog: ModelCatalog,
        *,
        max_payload: int,
        shedder: LoadShedder | None = None,
        wall_clock: Callable[[], float] = time.time,
        models: dict[str, frozenset[str]] | None = None,
    ) -> None:
        self._verifier = verifier
        self._quota = quota
        self._catalog = catalog
        self._max_payload = max_payload
        self._clock = wall_clock
        self._models = models or {}
        """Per tenant, the models it may call, where the topology limits them."""
        self.shedder = shedder or LoadShedder({})

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
        self.shedder.check_deadline(now_ms, intake.deadline_ms)
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
