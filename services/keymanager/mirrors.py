"""Site mirrors of the keys bucket: what each should be, what to do about what a site's JetStream shows.

Every site but the hub keeps a mirror of ``DIN_KEYS`` in its own JetStream
domain, so its processes find their keys while the site is cut off from the hub.
A mirror is fed by a durable consumer of the hub's stream kept for its site: the
site's server resets it after a partition and catches up within a second or two
of the link's return (an ephemeral mirror consumer backs off for up to minutes).
The key manager, the bucket's only writer, owns mirrors and consumers: it looks at
each on schedule, creates a missing one (with a fresh consumer, so the new mirror
gets every entry), replaces a stream of that name that is not such a mirror or
whose consumer is gone, and reports each site's state in its health detail. This
module decides; it knows no NATS (``MirrorSeen`` is what a look returned).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from din.shared.security.bucket import KeysMirror, keys_stream
from din.shared.topology import Topology

STALLED_AFTER_S = 10.0
"""A mirror that has heard nothing from the hub for this long (the server's own health interval) is stalled."""


class MirrorState(StrEnum):
    """A site's mirror as the key manager last saw it."""

    SYNCED = "synced"
    SYNCING = "syncing"
    STALLED = "stalled"
    CREATED = "created"
    REPLACED = "replaced"
    UNREACHABLE = "unreachable"
    FAILED = "failed"


class MirrorAction(StrEnum):
    """What to do about a site's mirror."""

    KEEP = "keep"
    CREATE = "create"
    REPLACE = "replace"


@dataclass(frozen=True)
class MirrorSpec:
    """The mirror one site should hold: the hub's keys stream under the same name, fed by the site's consumer."""

    site: str
    stream: str
    origin_api: str
    consumer: str
    deliver_subject: str

    @classmethod
    def of(cls, topology: Topology, site: str, bucket: str) -> MirrorSpec:
        """``site``'s mirror of ``bucket`` (at the hub of ``topology``)."""
        stream = keys_stream(bucket)
        return cls(site, stream, KeysMirror.origin_api(topology.hub.name), KeysMirror.consumer(site),
                   KeysMirror.deliver_subject(site, stream))


def mirror_specs(topology: Topology, bucket: str) -> list[MirrorSpec]:
    """The mirror of every site but the hub, in topology order."""
    return [MirrorSpec.of(topology, s.name, bucket) for s in topology.sites if s.name != topology.hub.name]


@dataclass(frozen=True)
class MirrorSeen:
    """What a site's JetStream answered about the stream named like the keys bucket, and the hub's about the
    site's consumer.

    ``reachable`` False: no answer (the site is cut off, or its server is down). ``exists`` False: no such stream.
    Otherwise the stream's mirror source (None when it mirrors nothing) and the consumer it names, how many of the
    origin's messages it lacks and how long since it last heard from the origin (None: never). ``consumer``:
    whether the hub holds the site's consumer (None: the hub did not say).
    """

    reachable: bool
    exists: bool = False
    source: str | None = None
    origin_api: str | None = None
    consumer_name: str | None = None
    deliver_subject: str | None = None
    lag: int = 0
    idle_s: float | None = None
    consumer: bool | None = True


def judge(spec: MirrorSpec, seen: MirrorSeen) -> tuple[MirrorState, MirrorAction]:
    """The state of ``spec``'s site's mirror and what to do about it."""
    if not seen.reachable:
        return MirrorState.UNREACHABLE, MirrorAction.KEEP
    if not seen.exists:
        return MirrorState.CREATED, MirrorAction.CREATE
    fed_by = (seen.source, seen.origin_api, seen.consumer_name, seen.deliver_subject)
    if fed_by != (spec.stream, spec.origin_api, spec.consumer, spec.deliver_subject) or seen.consumer is False:
        return MirrorState.REPLACED, MirrorAction.REPLACE
    if seen.idle_s is None:
        return MirrorState.SYNCING, MirrorAction.KEEP
    if seen.idle_s > STALLED_AFTER_S:
        return MirrorState.STALLED, MirrorAction.KEEP
    return (MirrorState.SYNCING if seen.lag else MirrorState.SYNCED), MirrorAction.KEEP


@dataclass
class MirrorLedger:
    """Each site's mirror state as last judged, and how many mirrors were created and replaced (health detail)."""

    states: dict[str, MirrorState] = field(default_factory=dict)
    created: int = 0
    replaced: int = 0
    failed: int = 0

    def record(self, site: str, state: MirrorState) -> None:
        """Note ``site``'s state after a look (and the action taken on it)."""
        self.states[site] = state
        if state is MirrorState.CREATED:
            self.created += 1
        elif state is MirrorState.REPLACED:
            self.replaced += 1
        elif state is MirrorState.FAILED:
            self.failed += 1

    def detail(self) -> dict[str, object]:
        """``mirrors``: ``site:state`` pairs, and the counts."""
        return {
            "mirrors": ",".join(f"{site}:{state.value}" for site, state in sorted(self.states.items())),
            "mirrors_created": self.created, "mirrors_replaced": self.replaced, "mirror_failures": self.failed,
        }
