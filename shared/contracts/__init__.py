"""Versioned message contracts. A breaking change adds a ``V2`` model beside the ``V1`` one."""

from shared.contracts.events import (
    AdmissionDecisionV1,
    AlternativeV1,
    ClassificationV1,
    CompletionV1,
    DeadLetterV1,
    HealthV1,
    HeartbeatV1,
    LoadModelV1,
    ModelLoadedV1,
    PressureV1,
    ProbeV1,
    SchedulingDecisionV1,
)
from shared.contracts.inference import (
    Datatype,
    InferRequestV1,
    InferResponseV1,
    RequestedOutputV1,
    ServedByV1,
    SlaClass,
    TensorV1,
)
from shared.contracts.job import JobV1, WorkloadClassV1
from shared.contracts.keys import KeyAction, KeyCommandResultV1, KeyCommandV1
from shared.contracts.telemetry import RecordedRequestV1, SlaViolationV1, SpanV1
from shared.errors import ErrorReplyV1, ErrorV1

__all__ = [
    "AdmissionDecisionV1",
    "AlternativeV1",
    "ClassificationV1",
    "CompletionV1",
    "Datatype",
    "DeadLetterV1",
    "ErrorReplyV1",
    "ErrorV1",
    "HealthV1",
    "HeartbeatV1",
    "InferRequestV1",
    "InferResponseV1",
    "JobV1",
    "KeyAction",
    "KeyCommandResultV1",
    "KeyCommandV1",
    "LoadModelV1",
    "ModelLoadedV1",
    "PressureV1",
    "ProbeV1",
    "RecordedRequestV1",
    "RequestedOutputV1",
    "SchedulingDecisionV1",
    "ServedByV1",
    "SlaViolationV1",
    "SpanV1",
    "SlaClass",
    "TensorV1",
    "WorkloadClassV1",
]

MESSAGE_MODELS = {
    "din.v1.infer_request": InferRequestV1,
    "din.v1.infer_response": InferResponseV1,
    "din.v1.error_reply": ErrorReplyV1,
    "din.v1.job": JobV1,
    "din.v1.heartbeat": HeartbeatV1,
    "din.v1.health": HealthV1,
    "din.v1.admission_decision": AdmissionDecisionV1,
    "din.v1.classification": ClassificationV1,
    "din.v1.scheduling_decision": SchedulingDecisionV1,
    "din.v1.completion": CompletionV1,
    "din.v1.probe": ProbeV1,
    "din.v1.pressure": PressureV1,
    "din.v1.dead_letter": DeadLetterV1,
    "din.v1.load_model": LoadModelV1,
    "din.v1.recorded_request": RecordedRequestV1,
    "din.v1.sla_violation": SlaViolationV1,
    "din.v1.span": SpanV1,
    "din.v1.key_command": KeyCommandV1,
    "din.v1.key_command_result": KeyCommandResultV1,
}
