"""The key manager's decisions: which DEK versions exist, who holds each, and the bucket entries that say so.

Pure logic, no NATS: every method returns the ``(key, value)`` entries to put in
the keys bucket (or the keys to delete), so tests drive rotation, revocation and
expiry with an injected clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from din.shared import envelope
from din.shared.envelope import DataKey, Identity, PublicIdentity
from din.shared.security import (
    KEYMANAGER,
    CryptoPolicy,
    EntryKeys,
    KeyAgent,
    Manifest,
    TenantSites,
    b64url,
    key_holders,
    sign_entry,
    sign_manifest,
    tenant_principal,
)
from din.shared.topology import Topology

Entry = tuple[str, bytes]


@dataclass
class DekRecord:
    """One version of a reader's DEK as the key manager keeps it."""

    dek: DataKey
    active: bool
    not_after: float | None = None


class KeyAuthority:
    """Versions of every reader's DEK, their holders and the revocation list, published as signed bucket entries."""

    def __init__(
        self,
        issuer: Identity,
        publics: Mapping[str, PublicIdentity],
        topology: Topology,
        policy: CryptoPolicy,
        *,
        grace_s: float,
        revoke_grace_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.issuer = issuer
        self.publics = dict(publics)
        self.topology = topology
        self.policy = policy
        self.grace_s = grace_s
        self.revoke_grace_s = revoke_grace_s
        self.clock = clock
        self.revoked: set[str] = set()
        self.records: dict[str, dict[int, DekRecord]] = {reader: {} for reader in key_holders(topology)}
        self.rotations = 0
        self._last_issued = 0

    # -- state

    def readers(self) -> list[str]:
        return sorted(self.records)

    def holders(self, reader: str) -> frozenset[str]:
        """Who receives ``reader``'s DEK now (revoked principals left out)."""
        return key_holders(self.topology, self.revoked)[reader]

    def current(self, reader: str) -> DekRecord | None:
        """The active version that seals for ``reader``."""
        active = [r for r in self.records[reader].values() if r.active and r.not_after is None]
        return max(active, key=lambda r: r.dek.version, default=None)

    def versions(self) -> dict[str, int]:
        return {reader: rec.dek.version for reader in self.readers() if (rec := self.current(reader)) is not None}

    def _issued_ms(self) -> int:
        self._last_issued = max(self._last_issued + 1, int(self.clock() * 1000))
        return self._last_issued

    def recover(self, agent: KeyAgent) -> None:
        """Rebuild state from what the bucket held, read by the key manager's own agent (the DEKs wrapped to itself)."""
        self.revoked |= set(agent.revoked)
        self._last_issued = max(self._last_issued, agent.latest_issued_ms())
        for (reader, version), state in agent.deks.items():
            if reader not in self.records:
                continue
            dek = agent.keyring.get(reader, version)
            if dek is not None:
                self.records[reader][version] = DekRecord(dek, state.active, state.not_after)

    def pending(self) -> list[tuple[str, int]]:
        """Versions published but never activated (a rotation cut short by a restart)."""
        return [(reader, v) for reader, records in self.records.items() for v, r in sorted(records.items())
                if not r.active and r.not_after is None]

    # -- entries

    def _dek_entries(self, record: DekRecord) -> list[Entry]:
        reader, version = record.dek.reader, record.dek.version
        body = {"active": record.active, "not_after": record.not_after}
        out = []
        for holder in sorted(self.holders(reader)):
            wrapped = envelope.wrap_dek_for(self.publics[holder], record.dek, issuer=self.issuer)
            key = EntryKeys.dek(holder, reader, version)
            signed = {**body, "wrapped": b64url.encode(wrapped), "issued_ms": self._issued_ms()}
            out.append((key, sign_entry(self.issuer, key, signed)))
        return out

    def revoked_entry(self) -> Entry:
        body = {"principals": sorted(self.revoked), "issued_ms": self._issued_ms()}
        return EntryKeys.REVOKED, sign_entry(self.issuer, EntryKeys.REVOKED, body)

    def policy_entry(self) -> Entry:
        body = {
            "integrity_only": self.policy.integrity_only_sites(self.topology),
            "plaintext_ingress": sorted(self.policy.plaintext_ingress),
            "issued_ms": self._issued_ms(),
        }
        return EntryKeys.POLICY, sign_entry(self.issuer, EntryKeys.POLICY, body)

    def sites_entries(self) -> list[Entry]:
        """For each tenant, where its requests may be served (``TenantSites``), for its clients to check results by."""
        out = []
        for spec in self.topology.tenants:
            key = EntryKeys.sites(tenant_principal(spec.name))
            body = {**TenantSites.of(self.topology, spec.name).to_dict(), "issued_ms": self._issued_ms()}
            out.append((key, sign_entry(self.issuer, key, body)))
        return out

    def publication(self) -> list[Entry]:
        """Everything, in the order holders need it: public identities, revocations, DEKs, and the policy last.

        Holders treat the policy's arrival as "the rest is here", so it must come last.
        """
        entries = [
            (EntryKeys.public(name), sign_entry(self.issuer, EntryKeys.public(name),
                                                {"identity": public.to_dict(), "issued_ms": self._issued_ms()}))
            for name, public in sorted(self.publics.items())
        ]
        entries.append(self.revoked_entry())
        for reader in self.readers():
            for record in sorted(self.records[reader].values(), key=lambda r: r.dek.version):
                entries += self._dek_entries(record)
        entries += self.sites_entries()
        entries.append(self.policy_entry())
        return entries

    def manifest_value(self, listing: Mapping[str, int], seq: int) -> bytes:
        """The ``manifest`` entry for the live entries ``listing`` (key: ``issued_ms``) and the revocations, to be
        stored at stream sequence ``seq``; issued after every entry it lists."""
        return sign_manifest(self.issuer, Manifest(self._issued_ms(), seq, dict(listing), frozenset(self.revoked)))

    # -- decisions

    def ensure_current(self) -> list[str]:
        """Give every reader without an active version a first one (active at once: nobody seals yet)."""
        created = []
        for reader in self.readers():
            if self.current(reader) is None:
                version = max(self.records[reader], default=0) + 1
                self.records[reader][version] = DekRecord(DataKey.generate(reader, version), active=True)
                created.append(reader)
        return created

    def begin_rotation(self, reader: str) -> tuple[int, list[Entry]]:
        """Phase one: a new version, pending (every holder can open it; nobody seals with it yet)."""
        version = max(self.records[reader], default=0) + 1
        record = DekRecord(DataKey.generate(reader, version), active=False)
        self.records[reader][version] = record
        return version, self._dek_entries(record)

    def activate(self, reader: str, version: int, grace_s: float | None = None) -> list[Entry]:
        """Phase two: ``version`` seals from now on; older active versions open until now + grace."""
        grace = self.grace_s if grace_s is None else grace_s
        record = self.records[reader][version]
        record.active = True
        entries = self._dek_entries(record)
        until = self.clock() + grace
        for other in self.records[reader].values():
            if other is not record and other.dek.version < version and other.not_after is None:
                other.not_after = until
                entries += self._dek_entries(other)
        self.rotations += 1
        return entries

    def revoke(self, principal: str) -> tuple[list[Entry], list[str], list[str]]:
        """Refuse ``principal`` from now on.

        Returns the revocation entry, the readers whose DEK it held (rotate them, with
        ``revoke_grace_s``, so it cannot seal under another name), and the bucket keys
        of its wrapped DEKs (delete them).
        """
        if principal == KEYMANAGER or principal not in self.publics:
            raise KeyError(principal)
        held = [reader for reader in self.readers() if principal in self.holders(reader)]
        self.revoked.add(principal)
        gone = [EntryKeys.dek(principal, reader, version) for reader in held for version in self.records[reader]]
        return [self.revoked_entry()], held, gone

    def expire(self) -> list[str]:
        """Forget versions whose grace has passed; return the bucket keys to delete."""
        now = self.clock()
        gone = []
        for reader, records in self.records.items():
            for version in [v for v, r in records.items() if r.not_after is not None and now > r.not_after]:
                del records[version]
                gone += [EntryKeys.dek(holder, reader, version)
                         for holder in key_holders(self.topology)[reader]]
        return gone
