"""The admission decision: authenticate, validate, check quota, deadline and load. No NATS here."""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Callable

from din.services.admission.intake import Intake, read_intake
from din.services.admission.quota import QuotaLedger
from din.services.admission.shedding import LoadShedder
from din.shared.catalog import ModelCatalog, ModelEntry
from din.shared.contracts.options import SPLIT_AUTO, SPLIT_NONE, RequestOptionsV1
from din.shared.credentials import CredentialRefusal, InvalidCredential, Presented, TenantVerifier
from din.shared.envelope import InvalidToken, Reason, ReplayGuard
from din.shared.errors import DinError, ErrorCode


class Replayed(DinError):
    """A request whose token proof was used before: a capture sent again, refused without an answer (its
    reply subject is the original requester's)."""

    def __init__(self) -> None:
        super().__init__(ErrorCode.UNAUTHENTICATED, "credential missing, invalid or expired")


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
        proof_window_s: float = 30.0,
        bearer_tokens: bool = False,
    ) -> None:
        self._verifier = verifier
        self._proof_window_s = proof_window_s
        self._bearer = bearer_tokens
        self._proofs = ReplayGuard(proof_window_s, wall_clock)
        self.credential_refusals: Counter[CredentialRefusal] = Counter()
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

    def admit(self, tenant: str, model: str, headers: dict[str, str] | None, body: bytes, *,
              reply: str | None = None, sealed: bool = False) -> Intake:
        """Return the request's intake when admitted; raise ``DinError`` with the reason otherwise (``Replayed``
        for a proof used before). The token proof must be for this ``model``, request id and ``reply``; a
        ``sealed`` request's single use is its envelope's nonce, an unsealed one's its proof's."""
        now_ms = self._clock() * 1000.0
        intake = read_intake(headers, body, now_ms, self._max_payload)
        asked = intake.options
        if not self._verifier.knows(tenant):
            raise DinError(ErrorCode.UNKNOWN_TENANT, f"tenant {tenant!r} is not known to this network")
        presented = self._authenticate(tenant, model, intake, reply, sealed, now_ms / 1000.0)
        intake = dataclasses.replace(intake, credential=presented)
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

    def _authenticate(self, tenant: str, model: str, intake: Intake, reply: str | None, sealed: bool,
                      now_s: float) -> Presented:
        try:
            presented = self._verifier.verify(tenant, intake.options.token, now_s, model=model,
                                              request_id=intake.request_id, reply=reply,
                                              window_s=self._proof_window_s, bearer=self._bearer)
            if presented.nonce is not None and not sealed:
                try:
                    self._proofs.check(presented.nonce, presented.issued_s, now=now_s)
                except InvalidToken as seen:
                    raise InvalidCredential(CredentialRefusal.REPLAY if seen.reason is Reason.REPLAY
                                            else CredentialRefusal.STALE) from None
        except InvalidCredential as refused:
            self.credential_refusals[refused.reason] += 1
            if refused.reason is CredentialRefusal.REPLAY:
                raise Replayed() from None
            raise DinError(ErrorCode.UNAUTHENTICATED, "credential missing, invalid or expired") from None
        return presented

    def refused_replay(self) -> Replayed:
        """Count a proof another admission of the site claimed first; the error to raise."""
        self.credential_refusals[CredentialRefusal.REPLAY] += 1
        return Replayed()

    def credential_detail(self) -> dict[str, int]:
        """Health fields: ``credential_refused_<reason>`` for every reason."""
        return {f"credential_refused_{r.value}": self.credential_refusals[r] for r in CredentialRefusal}

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
