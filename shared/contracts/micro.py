"""The NATS micro protocol's answers (``$SRV.PING|INFO|STATS``), as every DIN service instance gives them.

These are NATS's own schemas (``io.nats.micro.v1.*``, checked by the ``nats`` CLI against the JSON schemas in
``nats-io/jsm.go``), so ``nats micro ls|info|stats`` and any micro client see DIN's services like any other.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

MICRO_NAME_PATTERN = r"^[A-Za-z0-9_-]+$"


class MicroEndpointInfoV1(BaseModel):
    """One subscription of an instance: the channel it serves, where, and in which queue group."""

    name: str = Field(pattern=MICRO_NAME_PATTERN, description="Endpoint name: the channel served (e.g. infer).")
    subject: str = Field(description="Subject subscribed to (may hold wildcards).")
    queue_group: str = Field(default="", description="Queue group, empty when every instance hears each message.")
    metadata: dict[str, str] = Field(default_factory=dict, description="kind: raw, job, control or health.")


class MicroEndpointStatsV1(BaseModel):
    """What one subscription has handled since the instance started."""

    name: str = Field(pattern=MICRO_NAME_PATTERN, description="Endpoint name, as in the info answer.")
    subject: str = Field(description="Subject subscribed to.")
    queue_group: str = Field(default="", description="Queue group.")
    num_requests: int = Field(description="Messages handled.")
    num_errors: int = Field(description="Messages answered with an error (a DIN error reply) or whose handler failed.")
    last_error: str = Field(default="", description="The last error: its code and message.")
    processing_time: int = Field(description="Total time in the handler, nanoseconds.")
    average_processing_time: int = Field(description="Mean time in the handler per message, nanoseconds.")
    data: dict[str, str] | None = Field(default=None, description="Unused by DIN.")


class _MicroIdentity(BaseModel):
    name: str = Field(pattern=MICRO_NAME_PATTERN, description="Service kind (din-<service>), shared by its instances.")
    id: str = Field(min_length=1, description="This instance's id, unique while it runs.")
    version: str = Field(description="DIN's version (semantic).")
    metadata: dict[str, str] = Field(default_factory=dict, description="site and instance of this instance.")


class MicroPingV1(_MicroIdentity):
    """Answer to ``$SRV.PING[.<name>[.<id>]]``."""

    type: Literal["io.nats.micro.v1.ping_response"] = "io.nats.micro.v1.ping_response"


class MicroInfoV1(_MicroIdentity):
    """Answer to ``$SRV.INFO[.<name>[.<id>]]``: the instance and every subscription it holds."""

    type: Literal["io.nats.micro.v1.info_response"] = "io.nats.micro.v1.info_response"
    description: str = Field(description="What the service does.")
    endpoints: list[MicroEndpointInfoV1] = Field(description="Its subscriptions.")


class MicroStatsV1(_MicroIdentity):
    """Answer to ``$SRV.STATS[.<name>[.<id>]]``: per-subscription counts since ``started``."""

    type: Literal["io.nats.micro.v1.stats_response"] = "io.nats.micro.v1.stats_response"
    started: str = Field(description="When the instance started, RFC 3339 in UTC.")
    endpoints: list[MicroEndpointStatsV1] = Field(description="Its subscriptions' counts.")


MICRO_MODELS = (MicroPingV1, MicroInfoV1, MicroStatsV1)
"""The three answers, for the AsyncAPI document."""
