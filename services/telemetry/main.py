"""Telemetry's front door: relays completion events and heartbeats from NATS into Kafka topics."""

from __future__ import annotations

from nats.aio.msg import Msg

from services.telemetry.settings import TelemetrySettings
from shared.contracts.events import CompletionV1, HeartbeatV1
from shared.naming import Subjects, Topics
from shared.runtime import ServiceRuntime

COMPLETION_TYPE = f"din.v1.{CompletionV1.__name__}"
HEARTBEAT_TYPE = f"din.v1.{HeartbeatV1.__name__}"


def create_runtime(settings: TelemetrySettings) -> ServiceRuntime:
    """Build the telemetry service."""
    runtime = ServiceRuntime("telemetry", settings)
    counts = {"completions": 0, "heartbeats": 0}
    runtime.detail = lambda: counts

    @runtime.on_start
    async def create_topics() -> None:
        try:
            await runtime.events.ensure_topics()
        except Exception as exc:
            runtime.log.warning("could not create Kafka topics yet: %s", exc)

    @runtime.hot_path(Subjects.COMPLETED_ALL, queue="telemetry")
    async def on_completed(msg: Msg) -> None:
        counts["completions"] += 1
        runtime.events.emit_encoded(Topics.COMPLETIONS, COMPLETION_TYPE, msg.data, key=msg.subject.rsplit(".", 1)[-1])

    @runtime.hot_path(Subjects.HEARTBEAT_ALL, queue="telemetry")
    async def on_heartbeat(msg: Msg) -> None:
        counts["heartbeats"] += 1
        runtime.events.emit_encoded(Topics.HEARTBEATS, HEARTBEAT_TYPE, msg.data, key=msg.subject.rsplit(".", 1)[-1])

    return runtime
