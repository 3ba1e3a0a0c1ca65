"""Machine-readable contracts generated from the code; nobody edits the output by hand.

``render_schemas`` builds:

* ``json/<name>.schema.json``: one JSON Schema per versioned message model
  (``din.v1.infer_request`` ...) of ``shared.contracts.MESSAGE_MODELS``, from
  ``model_json_schema()``;
* ``asyncapi.yaml``: one AsyncAPI 3.0 document with every NATS subject and
  Kafka topic as a channel (the catalog ``shared.channels``), the messages on
  each with their headers, and who sends and receives them: one operation per
  party, direction and channel, derived from the endpoints and publications the
  service classes declare (``din.service_operations``).

Every channel address is built by the ``shared.naming`` builders from
placeholder tokens, written as AsyncAPI parameters (``{tenant}``), so no
subject is spelled here. Output is byte-stable (sorted keys, fixed order):
``din schemas`` writes it to ``schemas/`` and a unit test fails when the
committed files drift.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from din.generated import drifted_files, stale_files, write_files
from din.service_operations import Operation, operations
from din.services.executor.stages import STATE_CONTENT_TYPE
from din.shared import envelope
from din.shared.channels import Channel, all_channels, subject_pattern
from din.shared.contracts import (
    MESSAGE_MODELS,
    AdmissionDecisionV1,
    ClassificationV1,
    CompletionV1,
    DeadLetterV1,
    ErrorReplyV1,
    ErrorV1,
    HealthV1,
    HeartbeatV1,
    InferRequestV1,
    InferResponseV1,
    JobV1,
    KeyCommandResultV1,
    KeyCommandV1,
    LoadModelV1,
    ModelLoadedV1,
    PressureV1,
    ProbeV1,
    ScalingDecisionV1,
    SchedulingDecisionV1,
    SiteRosterV1,
    SiteSummaryV1,
    SlaViolationV1,
    SpanV1,
    StreamChunkV1,
)
from din.shared.contracts.inference import JSON_CONTENT_TYPE, STREAM_SEQ_HEADER, TENSOR_CONTENT_TYPE, RequestHeaders
from din.shared.contracts.job import HEADER_PREFIX as JOB_HEADER_PREFIX
from din.shared.contracts.job import STAGE_DONE_HEADER
from din.shared.contracts.micro import MICRO_MODELS, MicroInfoV1, MicroPingV1, MicroStatsV1
from din.shared.contracts.model_config import ModelConfigV1
from din.shared.contracts.options import request_header_docs
from din.shared.errors import DIN_ERROR_HEADER, ERROR_CODE_HEADER, ERROR_HEADER, ErrorCode
from din.shared.eventlog import EVENT_TYPE_HEADER, event_type
from din.shared.naming import API_VERSION, MICRO_VERBS, SERVICES
from din.shared.recording import RECORD_HEADERS
from din.shared.runtime import Service
from din.shared.security import SIGNER_HEADER
from din.shared.tensors import TENSOR_DATATYPE_HEADER, TENSOR_NAME_HEADER, TENSOR_SHAPE_HEADER

__all__ = ["ASYNCAPI_FILE", "DEFAULT_OUT_DIR", "JSON_DIR", "asyncapi_document", "drifted", "render_schemas",
           "subject_pattern", "write_schemas"]

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT_DIR = REPO_ROOT / "schemas"
ASYNCAPI_FILE = "asyncapi.yaml"
JSON_DIR = "json"
MODEL_CONFIG_SCHEMA = "din.v1.model_config"
"""A model repository's ``<model>/config.json`` (not a message: ``din models add`` writes it, every service reads
it), its schema beside the messages'."""
JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
COMPONENT_REF = "#/components/schemas/{model}"
KAFKA_BINDING_VERSION = "0.5.0"
NATS_BINDING_VERSION = "0.1.0"
KAFKA_PARTITIONS = 3

PARAMETERS = {
    "tenant": "Tenant name from the topology.",
    "model": "Model name, as in the model repository.",
    "site": "Site name from the topology.",
    "executor": "Executor id from the topology.",
    "service": f"Service name: one of {', '.join(SERVICES)}.",
    "instance": "Instance id: the executor id for executors.",
    "entry": "Entry name: pub.<principal>, dek.<holder>.<reader>.<version>, revoked or policy.",
    "verb": f"NATS micro verb: one of {', '.join(MICRO_VERBS)}.",
    "name": "NATS micro service name: din-<service>.",
    "id": "NATS micro instance id, from an instance's PING or INFO answer.",
}


# --------------------------------------------------------------------------- JSON Schema files


def json_schema(name: str, model: type[BaseModel]) -> dict:
    """The JSON Schema of one message model, identified by its versioned ``name``."""
    return {
        **model.model_json_schema(),
        "$schema": JSON_SCHEMA_DIALECT,
        "$id": f"{name}.schema.json",
        "title": f"{name} ({model.__name__})",
    }


def _dump_json(document: dict) -> str:
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


# --------------------------------------------------------------------------- messages and headers


def _ref(model: type[BaseModel] | str) -> dict:
    return {"$ref": COMPONENT_REF.format(model=model if isinstance(model, str) else model.__name__)}


def _header_object(description: str, headers: dict[str, dict], required: tuple[str, ...] = ()) -> dict:
    schema = {"type": "object", "description": description, "properties": headers}
    if required:
        schema["required"] = list(required)
    return schema


def _text(description: str, **extra) -> dict:
    return {"type": "string", "description": description, **extra}


def header_schemas() -> dict[str, dict]:
    """Header objects (request, tensor, job, stage, stream, completion, error, envelope and signature headers) and
    bodies that are not contract models, as component schemas."""
    tensor = {
        TENSOR_NAME_HEADER: _text("Name of the tensor in the body."),
        TENSOR_SHAPE_HEADER: _text("Comma-separated dimensions, e.g. 1,64.", pattern=r"^(\d+(,\d+)*)?$"),
        TENSOR_DATATYPE_HEADER: {**_ref("Datatype"), "description": "Element type."},
    }
    job = {
        JOB_HEADER_PREFIX + "V1": _text(
            "The job's routing metadata (JobV1) as compact JSON.",
            contentMediaType=JSON_CONTENT_TYPE, contentSchema=_ref(JobV1),
        ),
        RequestHeaders.CONTENT_TYPE: _text("Content type of the body, passed through from the request."),
        **tensor,
    }
    return {
        "RequestHeaders": _header_object(
            "Headers a client may set on a request; each has a parameters.<name> fallback in the JSON body.",
            {getattr(RequestHeaders, name): _text(doc) for name, doc in request_header_docs().items()},
        ),
        "TensorHeaders": _header_object(
            "Describe a binary tensor body.", tensor, (TENSOR_NAME_HEADER, TENSOR_SHAPE_HEADER, TENSOR_DATATYPE_HEADER)
        ),
        "JobHeaders": _header_object(
            "Carry an admitted request between services; the body is the client's, untouched (or, on a "
            "multi-stage job's later stages, the previous stage's output).",
            job, (JOB_HEADER_PREFIX + "V1",),
        ),
        "ErrorHeaders": _header_object(
            "Mark an answer as an error (NATS micro error headers plus DIN's code).",
            {
                ERROR_HEADER: _text("Human-readable message, at most 200 characters."),
                ERROR_CODE_HEADER: _text("HTTP-like status number.", pattern=r"^\d{3}$"),
                DIN_ERROR_HEADER: {**_ref(ErrorCode.__name__), "description": "Stable DIN error code."},
            },
            (ERROR_HEADER, ERROR_CODE_HEADER, DIN_ERROR_HEADER),
        ),
        "EnvelopeHeaders": _header_object(
            "Seal a payload (shared.envelope): AES-256-GCM, or HMAC-SHA256 where the crypto policy allows "
            "integrity only; every header below is authenticated with the body.",
            {
                envelope.H_VERSION: _text("Envelope format version.", const=envelope.FORMAT_VERSION),
                envelope.H_MODE: _text("aead (encrypted) or mac (integrity only).", enum=[envelope.MODE_AEAD,
                                                                                         envelope.MODE_MAC]),
                envelope.H_KEY_VERSION: _text("Version of the reader's data key.", pattern=r"^\d+$"),
                envelope.H_SENDER: _text("Principal that sealed it: site-<site> or tenant-<tenant>."),
                envelope.H_READER: _text("Principal whose data key sealed it, who may open it."),
                envelope.H_TIMESTAMP: _text("Sealing time, Unix epoch ms.", pattern=r"^\d+$"),
                envelope.H_NONCE: _text("96 random bits, base64url; a nonce seen before is refused."),
                envelope.H_AAD: _text("Routing metadata bound to the payload, canonical JSON: request id, tenant, "
                                      "model, reply subject, tensor headers."),
                envelope.H_TAG: _text("mac mode only: the HMAC-SHA256 tag, base64url."),
            },
            envelope.ENVELOPE_HEADERS[:-1],
        ),
        "ResultSignatureHeaders": _header_object(
            "Sign a result: Ed25519 by the executor's site over SHA-256 of the body and the envelope headers.",
            {
                SIGNER_HEADER: _text("The signing site's principal, site-<site>."),
                envelope.SIGNATURE_HEADER: _text("Ed25519 signature, base64url."),
            },
            (SIGNER_HEADER, envelope.SIGNATURE_HEADER),
        ),
        "CompletionHeaders": _header_object(
            "Tell the scheduler what became of the job; at most one of the two is set. Neither: the job stays "
            "open at the scheduler (a cascade's small variant escalated it, or the executor gave up at its "
            "deadline cutoff and leaves the answer to the scheduler's deadline watchdog).",
            {
                RequestHeaders.REQUEST_ID: _text("The job is closed (the client was answered, with a result or "
                                                 "an error): the scheduler forgets it and releases its load "
                                                 "estimate."),
                STAGE_DONE_HEADER: _text("Request id of a multi-stage job one of whose stages (not the last) "
                                         "finished and handed its output on: the job stays open and the "
                                         "scheduler's in-flight entry advances to the next stage."),
            },
        ),
        "StageHeaders": _header_object(
            "A multi-stage job's next stage, as the executor of the previous one hands it on.",
            {
                RequestHeaders.REQUEST_ID: _text("Request id of the job."),
                RequestHeaders.CONTENT_TYPE: _text(f"{TENSOR_CONTENT_TYPE} for a split inference's intermediate "
                                                   f"tensor (with TensorHeaders), {STATE_CONTENT_TYPE} for a "
                                                   "generation's decode state."),
            },
            (RequestHeaders.REQUEST_ID, RequestHeaders.CONTENT_TYPE),
        ),
        "StreamHeaders": _header_object(
            "Mark a token-stream message.",
            {
                RequestHeaders.REQUEST_ID: _text("Request id of the generation request."),
                STREAM_SEQ_HEADER: _text("The chunk's seq (0, 1, ...; the result seal binds it too), so the "
                                         "client can order chunks and notice a gap.", pattern=r"^\d+$"),
            },
            (RequestHeaders.REQUEST_ID, STREAM_SEQ_HEADER),
        ),
        "TensorBody": {
            "type": "string",
            "format": "binary",
            "description": "One tensor as raw little-endian bytes in row-major order; see TensorHeaders.",
        },
        "JobBody": {
            "description": "The client's request body, untouched: JSON or binary as its Content-Type says.",
            "oneOf": [_ref(InferRequestV1), _ref("TensorBody")],
        },
        "DecodeStateBody": {
            "type": "string",
            "format": "binary",
            "description": "A generation's decode state: a NumPy .npz archive of the recurrent state after the "
            "prompt and the last token made.",
        },
        "StageBody": {
            "description": "A stage's output, as its Content-Type says: a split head's intermediate tensor "
            "(protected as the request asked) under the tail model's input name, or a decode state.",
            "oneOf": [_ref("TensorBody"), _ref("DecodeStateBody")],
        },
        "HealthRequest": {"type": "object", "description": "An empty JSON object."},
        "KeysEntry": {
            "type": "object",
            "description": "A keys-bucket value, signed by the key manager so no one else can forge one.",
            "properties": {
                "body": _text("The entry as canonical JSON; it carries issued_ms, so an older value cannot "
                              "replace a newer one."),
                "sig": _text("Ed25519 signature of the key manager over the body and the entry's name, base64url."),
            },
            "required": ["body", "sig"],
        },
    }


def _model_name(model: type[BaseModel]) -> str:
    return next(name for name, candidate in MESSAGE_MODELS.items() if candidate is model)


def messages() -> dict[str, dict]:
    """Every message, keyed as channels reference them."""

    def json_message(model: type[BaseModel], summary: str, headers: dict | None = None) -> dict:
        message = {"summary": summary, "contentType": JSON_CONTENT_TYPE, "payload": _ref(model)}
        if model in MESSAGE_MODELS.values():
            message["name"] = _model_name(model)
            message["x-din-json-schema"] = f"{JSON_DIR}/{message['name']}.schema.json"
        if headers:
            message["headers"] = headers
        return message

    def event(model: type[BaseModel], summary: str, key: str) -> dict:
        message = json_message(
            model, summary,
            _header_object("Kafka record headers.", {
                EVENT_TYPE_HEADER: _text("Versioned event type.", const=event_type(model.model_construct())),
            }, (EVENT_TYPE_HEADER,)),
        )
        message["bindings"] = {"kafka": {"key": _text(key), "bindingVersion": KAFKA_BINDING_VERSION}}
        return message

    return {
        "inferRequest": json_message(
            InferRequestV1, "An inference request, tensors as JSON (sealed to the tenant: the body is ciphertext).",
            {"allOf": [_ref("RequestHeaders"), _ref("EnvelopeHeaders")]},
        ),
        "inferRequestTensor": {
            "summary": "An inference request with one binary tensor as the body (sealed to the tenant).",
            "contentType": TENSOR_CONTENT_TYPE,
            "payload": _ref("TensorBody"),
            "headers": {"allOf": [_ref("RequestHeaders"), _ref("TensorHeaders"), _ref("EnvelopeHeaders")]},
        },
        "inferResponse": json_message(
            InferResponseV1, "The result, and where it was served; sealed to the tenant and signed by the site.",
            {"allOf": [_ref("EnvelopeHeaders"), _ref("ResultSignatureHeaders")]},
        ),
        "streamChunk": json_message(
            StreamChunkV1, "One message of a token stream (a generation request): a token, or the last one "
            "(done) with the stream's summary; sealed to the tenant and signed like a result.",
            {"allOf": [_ref("StreamHeaders"), _ref("EnvelopeHeaders"), _ref("ResultSignatureHeaders")]},
        ),
        "errorReply": json_message(ErrorReplyV1, "Why the request failed (on a stream: the stream ends).",
                                   _ref("ErrorHeaders")),
        "job": {
            "name": _model_name(JobV1),
            "summary": "An admitted request: the client's body sealed to the tenant, then by the scheduler to the "
                       "executor's site; routing metadata in headers.",
            "payload": _ref("JobBody"),
            "headers": {"allOf": [_ref("JobHeaders"), _ref("EnvelopeHeaders")]},
        },
        "stageJob": {
            "name": _model_name(JobV1),
            "summary": "A multi-stage job's next stage: the previous stage's output sealed to the tenant and bound "
                       "to the next stage's site; the job header's stage says which plan entry runs.",
            "payload": _ref("StageBody"),
            "headers": {"allOf": [_ref("JobHeaders"), _ref("StageHeaders"), _ref("EnvelopeHeaders")]},
        },
        "pressure": json_message(PressureV1, "Network load."),
        "siteSummary": json_message(SiteSummaryV1, "A site's capacity per model and its links as it measures them."),
        "siteRoster": json_message(SiteRosterV1, "A bounded sample of a site's executors and the ones it lost."),
        "heartbeat": json_message(HeartbeatV1, "An executor's state and load."),
        "completion": json_message(CompletionV1, "A job finished or failed.", _ref("CompletionHeaders")),
        "probe": json_message(ProbeV1, "A link probe."),
        "loadModel": json_message(LoadModelV1, "Serve a model version from now on."),
        "modelLoaded": json_message(ModelLoadedV1, "The model version now served."),
        "controlError": json_message(ErrorV1, "Why the command failed."),
        "keyCommand": json_message(
            KeyCommandV1, "Rotate data keys, revoke a principal, or report key status.",
            _header_object("Signed by the operator principal.",
                           {envelope.SIGNATURE_HEADER: _text("Ed25519 signature over the body, base64url.")},
                           (envelope.SIGNATURE_HEADER,)),
        ),
        "keyCommandResult": json_message(KeyCommandResultV1, "The keys after the command."),
        "healthRequest": {"summary": "Ask for health.", "contentType": JSON_CONTENT_TYPE,
                          "payload": _ref("HealthRequest")},
        "health": json_message(HealthV1, "An instance's health."),
        "microRequest": {"summary": "Ask for micro discovery (any body; nats sends none).",
                         "contentType": JSON_CONTENT_TYPE, "payload": _ref("HealthRequest")},
        "microPing": json_message(MicroPingV1, "The instance's NATS micro identity."),
        "microInfo": json_message(MicroInfoV1, "The instance and its subscriptions."),
        "microStats": json_message(MicroStatsV1, "Its subscriptions' counts."),
        "keysEntry": {"summary": "An identity, wrapped data key, revocation list or policy.",
                      "contentType": JSON_CONTENT_TYPE, "payload": _ref("KeysEntry")},
        "admissionDecision": event(AdmissionDecisionV1, "Admission's verdict.", "Tenant."),
        "classification": event(ClassificationV1, "A request's workload class.", "Tenant."),
        "schedulingDecision": event(SchedulingDecisionV1, "A placement decision.", "Tenant."),
        "completionEvent": event(CompletionV1, "A job finished or failed.", "Site of the executor."),
        "heartbeatEvent": event(HeartbeatV1, "An executor heartbeat.", "Executor id."),
        "deadLetter": event(DeadLetterV1, "A message kept for inspection.", "Service that gave up on it."),
        "slaViolation": json_message(SlaViolationV1, "An SLA class crossed its latency target, or came back under."),
        "slaViolationEvent": event(SlaViolationV1, "An SLA violation alert.", "SLA class."),
        "spanEvent": event(SpanV1, "A finished trace span.", "Trace id."),
        "scalingDecision": event(ScalingDecisionV1, "A change the autoscaler made to a pool, and why.", "Site."),
        "recordedRequest": {
            "summary": "An admitted request as the client sent it (the token never recorded), for replay.",
            "payload": _ref("JobBody"),
            "headers": _header_object(
                "Kafka record headers: the request's metadata (RecordedRequestV1) and the tensor headers of a "
                "binary body.",
                {name: _text(f"Recorded metadata: {name}.") for name in RECORD_HEADERS},
                (EVENT_TYPE_HEADER,),
            ),
            "bindings": {"kafka": {"key": _text("Tenant."), "bindingVersion": KAFKA_BINDING_VERSION}},
        },
    }


# --------------------------------------------------------------------------- the AsyncAPI document


def _channel_object(channel: Channel) -> dict:
    body: dict = {"description": channel.description}
    if channel.address is None:
        body["address"] = None
        body["servers"] = [{"$ref": "#/servers/nats"}]
    else:
        body["address"] = channel.address
        body["servers"] = [{"$ref": "#/servers/kafka" if channel.kafka else "#/servers/nats"}]
    body["messages"] = {key: {"$ref": f"#/components/messages/{key}"} for key in channel.messages}
    params = re.findall(r"\{(\w+)\}", channel.address or "")
    if params:
        body["parameters"] = {name: {"description": PARAMETERS[name]} for name in params}
    if channel.kafka:
        body["bindings"] = {
            "kafka": {
                "topic": channel.address,
                "partitions": KAFKA_PARTITIONS,
                "replicas": 1,
                "bindingVersion": KAFKA_BINDING_VERSION,
            }
        }
    return body


def _operation_object(op: Operation) -> dict:
    body: dict = {
        "action": op.action,
        "channel": {"$ref": f"#/channels/{op.channel.key}"},
        "messages": [{"$ref": f"#/channels/{op.channel.key}/messages/{m}"} for m in op.messages],
        "tags": [{"name": op.party}],
    }
    if op.queue:
        body["bindings"] = {"nats": {"queue": op.queue, "bindingVersion": NATS_BINDING_VERSION}}
    if op.reply is not None:
        body["reply"] = {
            "channel": {"$ref": f"#/channels/{op.reply.key}"},
            "messages": [{"$ref": f"#/channels/{op.reply.key}/messages/{m}"} for m in op.reply.messages],
        }
    return body


def asyncapi_document(services: list[type[Service]] | None = None) -> dict:
    """The AsyncAPI 3.0 document of every channel, message and operation; ``services``: the service classes
    whose declarations give the operations (default: every service's, see ``din.service_operations``)."""
    table = all_channels()
    found = operations(services)
    _, defs = models_json_schema(
        [(model, "validation") for model in (*MESSAGE_MODELS.values(), ModelLoadedV1, *MICRO_MODELS)],
        ref_template=COMPONENT_REF
    )
    schemas = {**defs["$defs"], **header_schemas()}
    actors = sorted({op.party for op in found})
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "DIN, a Distributed Inference Network",
            "version": f"{API_VERSION.removeprefix('v')}.0.0",
            "description": "Every NATS subject and Kafka topic of DIN's API "
            f"{API_VERSION}. Generated by `din schemas` from shared.contracts, shared.channels and the endpoints "
            "the service classes declare; do not edit.",
            "tags": [{"name": actor} for actor in actors],
        },
        "defaultContentType": JSON_CONTENT_TYPE,
        "servers": {
            "nats": {
                "host": "localhost:4222",
                "protocol": "nats",
                "description": "The hub site's NATS server. Each edge site runs a leaf server joined to it, so "
                "every subject is reachable from any site's server; JetStream runs at every site, one domain each.",
            },
            "kafka": {
                "host": "localhost:9092",
                "protocol": "kafka",
                "description": "The event log: decisions, completions and dead letters, for replay and audit.",
            },
        },
        "channels": {c.key: _channel_object(c) for c in table},
        "operations": {op.key: _operation_object(op) for op in sorted(found, key=lambda op: op.key)},
        "components": {"schemas": schemas, "messages": messages()},
    }


# --------------------------------------------------------------------------- rendering


def render_schemas(services: list[type[Service]] | None = None) -> dict[str, str]:
    """Every generated file, keyed by its path relative to ``schemas/`` (``services``: see ``asyncapi_document``)."""
    files = {
        f"{JSON_DIR}/{name}.schema.json": _dump_json(json_schema(name, model))
        for name, model in sorted({**MESSAGE_MODELS, MODEL_CONFIG_SCHEMA: ModelConfigV1}.items())
    }
    header = "# Generated by `din schemas` from shared.contracts, shared.channels and the services. Do not edit.\n"
    files[ASYNCAPI_FILE] = header + yaml.safe_dump(
        asyncapi_document(services), sort_keys=True, allow_unicode=True, width=120, default_flow_style=False
    )
    return files


def write_schemas(out_dir: Path = DEFAULT_OUT_DIR) -> list[Path]:
    """Write every generated file under ``out_dir``, removing stale JSON Schemas; return the paths written."""
    out_dir, files = Path(out_dir), render_schemas()
    return write_files(out_dir, files, stale_files(out_dir, JSON_DIR, "*.schema.json", files))


def drifted(out_dir: Path = DEFAULT_OUT_DIR) -> list[str]:
    """Relative paths whose committed content differs from a fresh render (missing and stale files too)."""
    out_dir, files = Path(out_dir), render_schemas()
    return drifted_files(out_dir, files, stale_files(out_dir, JSON_DIR, "*.schema.json", files))
