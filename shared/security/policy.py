"""The operator's crypto policy: how much assurance each path gets, and who may send in clear."""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, Field, field_validator

from din.shared.topology import PathType, Topology


class Level(StrEnum):
    """Assurance of a payload on one path. Results are signed at every level."""

    ENCRYPTED = "encrypted"
    INTEGRITY = "integrity"


class PayloadProtection(StrEnum):
    """What protected one request, as telemetry reports it (``CompletionV1.protection``)."""

    ENCRYPTED = "encrypted"
    INTEGRITY = "integrity"
    CLIENT_PLAINTEXT = "client-plaintext"
    OFF = "off"


LOCAL_PATH = "local"
"""The path key for a site's own link to itself (the hub's executors)."""


class CryptoPolicy(BaseModel):
    """The operator's per-path crypto policy: an assurance level per path type, and tenants allowed to send in clear.

    ``paths`` maps ``local`` (the hub's own site) and each topology path type
    (``dedicated``, ``vpn``, ``internet``) to ``encrypted`` or ``integrity``.
    Integrity-only (authenticated, readable) is allowed only where listed here and
    never on ``internet``; sensitive requests are encrypted whatever the path.
    """

    paths: dict[str, Level] = Field(
        default_factory=lambda: {p: Level.ENCRYPTED for p in (LOCAL_PATH, *PathType)},
        description="Assurance level per path type (local, dedicated, vpn, internet).",
    )
    plaintext_ingress: list[str] = Field(
        default_factory=list,
        description="Tenants whose unsealed requests admission accepts (raw NATS clients); answered unsealed.",
    )

    @field_validator("paths")
    @classmethod
    def _known_paths(cls, value: dict[str, Level]) -> dict[str, Level]:
        known = {LOCAL_PATH, *(p.value for p in PathType)}
        unknown = set(value) - known
        if unknown:
            raise ValueError(f"unknown path type {sorted(unknown)[0]!r}: use {', '.join(sorted(known))}")
        if value.get(PathType.INTERNET.value) == Level.INTEGRITY:
            raise ValueError("the internet path cannot be integrity-only: it is never a trusted segment")
        return {p: value.get(p, Level.ENCRYPTED) for p in sorted(known)}

    def level(self, path: PathType | None) -> Level:
        """The level of a path (None: a site's link to itself)."""
        return self.paths[LOCAL_PATH if path is None else path.value]

    def integrity_only_sites(self, topology: Topology) -> list[str]:
        """Sites whose link to the hub may carry integrity-only payloads."""
        hub = topology.hub.name
        return sorted(s.name for s in topology.sites
                      if self.level(topology.path_between(hub, s.name)) == Level.INTEGRITY)
