"""Is the keys bucket what the key manager wrote? The judgement of one look at it, and the readiness it implies.

The key manager is the bucket's only writer, so it knows exactly what every entry should hold: the last value it
put under each key, and the stream sequence its manifest was stored at. Anyone else able to write there (a leaked
credential, a JetStream administrator, a compromised hub operator) can delete entries, overwrite them with
garbage or with older values the key manager really signed, move the manifest, or delete the whole bucket. Key
agents refuse what does not verify or is older than the manifest, but refusing leaves a process that just started
without its keys: so the key manager looks at the bucket on schedule (``judge_bucket``), reports not-ready while
it is damaged (``BucketHealth``) and writes back what is missing (``BucketReport.rewrite``, then a new manifest).
This module decides; it knows no NATS (``Seen`` is what a look returned).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from din.shared.envelope import InvalidToken, PublicIdentity
from din.shared.security.bucket import EntryKeys, entry_issued_ms, read_entry


class Damage(StrEnum):
    """What is wrong with one entry of the bucket (or with the bucket)."""

    MISSING = "missing"
    """An entry the key manager wrote is gone (deleted or purged)."""
    INVALID = "invalid"
    """Overwritten with a value that does not verify under the key manager's key (garbage, unsigned, forged)."""
    STALE = "stale"
    """Overwritten with an older value the key manager signed, or the manifest stored at another sequence."""
    UNEXPECTED = "unexpected"
    """A key the key manager did not write (or deleted)."""
    BUCKET_MISSING = "bucket_missing"
    """No bucket at all."""
    UNREADABLE = "unreadable"
    """The bucket could not be read (its JetStream did not answer)."""


@dataclass(frozen=True)
class Seen:
    """One live entry of the bucket as a look found it: its value and the stream sequence it is stored at."""

    value: bytes
    revision: int


@dataclass(frozen=True)
class BucketReport:
    """One look's findings: each damaged key (``""`` for the bucket itself) and why."""

    damage: Mapping[str, Damage] = field(default_factory=dict)

    @property
    def intact(self) -> bool:
        return not self.damage

    @property
    def bucket_missing(self) -> bool:
        return self.damage.get("") is Damage.BUCKET_MISSING

    def counts(self) -> Counter[str]:
        """How many entries were found damaged, by reason."""
        return Counter(d.value for d in self.damage.values())

    def rewrite(self, written: Mapping[str, bytes]) -> list[str]:
        """The keys to put again, in the order they were written (every one when the bucket is gone); the
        manifest is not among them: it is signed anew for its new sequence."""
        return [key for key in written if key != EntryKeys.MANIFEST and (
            self.bucket_missing or self.damage.get(key) in (Damage.MISSING, Damage.INVALID, Damage.STALE))]

    def remove(self) -> list[str]:
        """The keys to delete: ones the key manager never wrote."""
        return sorted(key for key, d in self.damage.items() if d is Damage.UNEXPECTED)

    def summary(self) -> str:
        """``intact``, or the damage by reason (``missing:2,stale:1``)."""
        return "intact" if self.intact else ",".join(f"{r}:{n}" for r, n in sorted(self.counts().items()))


def judge_bucket(written: Mapping[str, bytes], manifest_seq: int | None, seen: Mapping[str, Seen] | None,
                 issuer: PublicIdentity) -> BucketReport:
    """Compare what the key manager last ``written`` under each key (its manifest stored at ``manifest_seq``) with
    what a look ``seen`` (None: no bucket). A value byte-equal to what was written is intact wherever it is stored,
    except the manifest, which is valid only at the sequence it was signed for."""
    if seen is None:
        return BucketReport({"": Damage.BUCKET_MISSING})
    damage: dict[str, Damage] = {}
    for key, value in written.items():
        found = seen.get(key)
        if found is None:
            damage[key] = Damage.MISSING
        elif found.value == value and (key != EntryKeys.MANIFEST or found.revision == manifest_seq):
            continue
        elif found.value == value:
            damage[key] = Damage.STALE
        else:
            damage[key] = _overwritten(key, found.value, value, issuer)
    for key in seen:
        if key not in written:
            damage[key] = Damage.UNEXPECTED
    return BucketReport(damage)


def _overwritten(key: str, found: bytes, written: bytes, issuer: PublicIdentity) -> Damage:
    try:
        issued = read_entry(found, key, issuer)["issued_ms"]
    except (InvalidToken, ValueError, KeyError, TypeError):
        return Damage.INVALID
    return Damage.STALE if issued <= entry_issued_ms(written) else Damage.INVALID


@dataclass
class BucketHealth:
    """The bucket as the key manager last judged it, for its health: not ready from a look that found damage
    until a later look finds it intact (a repair is trusted once seen), and the counts by reason."""

    damaged: bool = False
    last: str = "unchecked"
    looks: int = 0
    repairs: int = 0
    repair_failures: int = 0
    found: Counter[str] = field(default_factory=Counter)

    def record(self, report: BucketReport) -> None:
        """Note one look's findings."""
        self.looks += 1
        self.damaged = not report.intact
        self.last = report.summary()
        self.found.update(report.counts())

    def repaired(self, ok: bool) -> None:
        """Note a repair attempt after a look that found damage."""
        if ok:
            self.repairs += 1
        else:
            self.repair_failures += 1

    @property
    def ready(self) -> bool:
        return not self.damaged

    def detail(self) -> dict[str, object]:
        """``bucket`` (the last look: ``intact`` or the damage by reason), the repairs, and ``bucket_damage_<reason>``
        for every reason ever found."""
        return {"bucket": self.last, "bucket_looks": self.looks, "bucket_repairs": self.repairs,
                "bucket_repair_failures": self.repair_failures,
                **{f"bucket_damage_{d.value}": self.found.get(d.value, 0) for d in Damage}}
